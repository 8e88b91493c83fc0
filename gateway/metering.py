"""Usage metering: Prometheus counters per request, and store rows written in batches off the request path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import anyio.to_thread
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import Engine

from tasks.store.usage import add_usage

log = logging.getLogger("llmhost.gateway.metering")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_MAX_PENDING = 100_000


class Metrics:
    """One registry per app, so several gateways in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmhost_gateway_requests", "Requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("llmhost_gateway_errors", "Requests answered with status >= 400.",
                              ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llmhost_gateway_prompt_tokens", "Prompt tokens, from upstream usage.",
                                     ["endpoint", "status"], registry=r)
        self.completion_tokens = Counter("llmhost_gateway_completion_tokens",
                                         "Completion tokens, from upstream usage.", ["endpoint", "status"],
                                         registry=r)
        self.latency = Histogram("llmhost_gateway_request_latency_seconds", "Total request latency.",
                                 ["endpoint", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmhost_gateway_time_to_first_token_seconds",
                              "Time to the first byte of the upstream answer.", ["endpoint", "status"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.fallback = Counter("llmhost_gateway_fallback_requests",
                                "Requests answered by an endpoint's external fallback (their data left the network).",
                                ["endpoint", "fallback", "status"], registry=r)
        self.cost = Counter("llmhost_gateway_cost_usd", "API spend of external endpoints at the catalog's rates.",
                            ["endpoint", "provider"], registry=r)
        self.replica_up = Gauge("llmhost_gateway_replica_up", "1 when the last health probe passed.",
                                ["endpoint", "replica"], registry=r)
        # label lookups take a lock and a dict walk; keep the children per (endpoint, status)
        self._children: dict[tuple[str, str], tuple[Any, ...]] = {}

    def observe(self, endpoint: str, status: int, prompt: int | None, completion: int | None,
                latency_s: float, ttft_s: float | None) -> None:
        key = (endpoint, str(status))
        ch = self._children.get(key)
        if ch is None:
            ch = self._children[key] = (
                self.requests.labels(*key), self.errors.labels(*key) if status >= 400 else None,
                self.prompt_tokens.labels(*key), self.completion_tokens.labels(*key),
                self.latency.labels(*key), self.ttft.labels(*key),
            )
        req, err, pt, ct, lat, tt = ch
        req.inc()
        if err is not None:
            err.inc()
        if prompt:
            pt.inc(prompt)
        if completion:
            ct.inc(completion)
        lat.observe(latency_s)
        if ttft_s is not None:
            tt.observe(ttft_s)


class Meter:
    """Collects usage rows in memory and writes them in one INSERT every `flush_interval_s`."""

    def __init__(self, engine: Engine, metrics: Metrics, *, flush_interval_s: float = 0.5,
                 batch_size: int = 500):
        self.engine, self.metrics = engine, metrics
        self.flush_interval_s, self.batch_size = flush_interval_s, batch_size
        self._pending: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.written = 0

    def record(self, row: dict[str, Any]) -> None:
        """Called on the request path: counters now, the store row later."""
        self.metrics.observe(row.get("endpoint") or "(none)", row["status_code"], row.get("prompt_tokens"),
                             row.get("completion_tokens"), row["latency_ms"] / 1000.0,
                             row["ttft_ms"] / 1000.0 if row.get("ttft_ms") is not None else None)
        if row.get("fallback"):
            self.metrics.fallback.labels(row.get("endpoint") or "(none)", row["fallback"],
                                         str(row["status_code"])).inc()
        if row.get("cost_usd"):
            self.metrics.cost.labels(row.get("endpoint") or "(none)", row.get("provider") or "?").inc(row["cost_usd"])
        self._pending.append(row)
        if len(self._pending) >= self.batch_size:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="llmhost-meter")

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.flush_interval_s)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> int:
        if not self._pending:
            return 0
        batch, self._pending = self._pending, []
        try:
            n = await anyio.to_thread.run_sync(lambda: add_usage(batch, engine=self.engine))
        except Exception as exc:  # the store may be locked or down; keep the rows and try again next tick
            log.warning("usage flush of %d rows failed (%s); will retry", len(batch), exc)
            self._pending = (batch + self._pending)[-_MAX_PENDING:]
            return 0
        self.written += n
        return n

    async def close(self) -> None:
        """Stop the loop and write what is pending (called on shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        for _ in range(3):
            if not self._pending:
                break
            await self.flush()
        if self._pending:
            log.error("dropping %d usage rows that could not be written at shutdown", len(self._pending))
