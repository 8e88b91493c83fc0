"""Client-side pacing of a hosted API: per-minute request and token limits, and the server's retry hints.

A small GCRA-style limiter (each bucket keeps the time its next unit is free) rather than a dependency:
it takes one amount per call (a request's estimated tokens), and a 429's hint pauses every slot at once.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

MAX_WAIT_S = 60.0
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|h|m|s)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration_s(text: str) -> float | None:
    """Seconds in a Go-style duration such as `6m0s`, `1.5s` or `20ms` (OpenAI's x-ratelimit-reset-*)."""
    text = text.strip()
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def retry_after_s(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """How long the server asks the client to wait, from the first hint present, capped at MAX_WAIT_S.

    `retry-after-ms`, then `retry-after` (seconds or an HTTP date), then the longer of
    `x-ratelimit-reset-requests` and `x-ratelimit-reset-tokens`. None: the response gave no usable hint.
    """
    h = {k.lower(): v for k, v in headers.items()}
    wait: float | None = None
    if (ms := h.get("retry-after-ms")) is not None:
        try:
            wait = float(ms) / 1000
        except ValueError:
            wait = None
    if wait is None and (ra := h.get("retry-after")) is not None:
        try:
            wait = float(ra)
        except ValueError:
            try:
                when = parsedate_to_datetime(ra)
                wait = (when - (now or datetime.now(UTC))).total_seconds()
            except (TypeError, ValueError):
                wait = None
    if wait is None:
        resets = [go_duration_s(h[k]) for k in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens") if k in h]
        known = [r for r in resets if r is not None]
        wait = max(known) if known else None
    return None if wait is None else min(max(wait, 0.0), MAX_WAIT_S)


class RateLimiter:
    """Requests per minute and tokens per minute, shared by every concurrent request of one run."""

    def __init__(self, rpm: int | None = None, tpm: int | None = None, burst_s: float = 1.0) -> None:
        self.rates = {"requests": rpm / 60 if rpm else None, "tokens": tpm / 60 if tpm else None}
        self.burst_s = burst_s
        self._next = {k: 0.0 for k in self.rates}
        self._hold = 0.0
        self._lock = asyncio.Lock()
        self.waited_s = 0.0

    @property
    def active(self) -> bool:
        return any(self.rates.values())

    async def acquire(self, tokens: int = 0) -> float:
        """Wait until one request of about `tokens` tokens fits both limits; returns the seconds waited."""
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._hold)
            for k, amount in (("requests", 1), ("tokens", tokens)):
                rate = self.rates[k]
                if not rate or amount <= 0:
                    continue
                begin = max(now, self._next[k])
                self._next[k] = begin + amount / rate
                start = max(start, begin - self.burst_s)
        wait = max(0.0, start - now)
        if wait > 0:
            self.waited_s += wait
            await asyncio.sleep(wait)
        return wait

    def pause(self, seconds: float) -> None:
        """Hold every later request for `seconds` (the server's Retry-After applies to the whole key)."""
        self._hold = max(self._hold, time.monotonic() + seconds)


def estimate_tokens(messages: list[dict[str, str]], max_out: int) -> int:
    """A request's token cost for the tpm limit: prompt at ~4 characters per token, plus its output budget."""
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    return chars // 4 + 1 + max_out
