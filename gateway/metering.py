"""Usage metering: Prometheus counters per request, store rows written in batches, a journal that makes them durable."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import Engine

from gateway.journal import Journal, replay
from tasks.store.usage import USAGE_FIELDS, add_usage

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


JournalSync = Literal["write", "fdatasync"]


class Meter:
    """Counters per request, and store rows written in one INSERT every `flush_interval_s`.

    With a journal directory (the default in the gateway), `record` first appends the row to this process's
    journal (see gateway.journal), and the proxy calls it before the answer's end leaves, so a `kill -9` loses
    no answered request's row. `journal_sync` says how far the row goes first:
    - "write" (default): into the kernel with one write() on the event loop, a few microseconds. It survives
      any death of the gateway process, not a power cut: the same promise the store makes, as SQLite runs
      with synchronous=NORMAL.
    - "fdatasync": onto the disk. `record` then hands back a future that the proxy awaits; rows that finish
      while a sync is in flight share the next one (group commit), so a request waits about one or two syncs.
    """

    def __init__(self, engine: Engine, metrics: Metrics, *, flush_interval_s: float = 0.5,
                 batch_size: int = 500, journal_dir: Path | None = None, journal_sync: JournalSync = "write"):
        self.engine, self.metrics = engine, metrics
        self.flush_interval_s, self.batch_size = flush_interval_s, batch_size
        self.journal_dir, self.journal_sync = journal_dir, journal_sync
        self._pending: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.written = 0
        self._boot, self._seq = secrets.token_hex(6), itertools.count(1)
        self._journal: Journal | None = None
        self._jpending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._jwake = asyncio.Event()
        self._jtask: asyncio.Task[None] | None = None
        self._jexec: ThreadPoolExecutor | None = None
        self._segment = 0
        self._closing = False
        self._journal_errors = 0
        self._kept = False  # rows dropped from memory after store failures: keep the journal for a replay

    def new_id(self) -> str:
        """A request id unique across processes and restarts (the store deduplicates on it)."""
        return f"{self._boot}-{next(self._seq):x}"

    def record(self, row: dict[str, Any]) -> asyncio.Future[None] | None:
        """Called on the request path: counters now, the store row later; the future says the row is durable."""
        self.metrics.observe(row.get("endpoint") or "(none)", row["status_code"], row.get("prompt_tokens"),
                             row.get("completion_tokens"), row["latency_ms"] / 1000.0,
                             row["ttft_ms"] / 1000.0 if row.get("ttft_ms") is not None else None)
        if row.get("fallback"):
            self.metrics.fallback.labels(row.get("endpoint") or "(none)", row["fallback"],
                                         str(row["status_code"])).inc()
        if row.get("cost_usd"):
            self.metrics.cost.labels(row.get("endpoint") or "(none)", row.get("provider") or "?").inc(row["cost_usd"])
        if "request_id" not in row:
            row["request_id"] = self.new_id()
        self._pending.append(row)
        if len(self._pending) == 1 or len(self._pending) >= self.batch_size:  # the first starts the flush clock
            self._wake.set()
        if self._journal is None:
            return None
        if self.journal_sync == "write":
            try:
                self._journal.write(self._segment, (row,), USAGE_FIELDS, sync=False)
            except OSError as exc:  # disk full? answer anyway; the row is in memory until the next flush
                self._journal_errors += 1
                if self._journal_errors in (1, 10, 100) or self._journal_errors % 1000 == 0:
                    log.error("usage journal write failed %d times (%s): a crash now loses usage not yet "
                              "flushed to the store", self._journal_errors, exc)
            return None
        if self._jtask is None:  # shutting down: the last flush stores it
            return None
        fut = asyncio.get_running_loop().create_future()
        self._jpending.append((row, fut))
        self._jwake.set()
        return fut

    @staticmethod
    async def durable(fut: asyncio.Future[None] | None) -> None:
        """Wait until the row behind `fut` (from `record`) is on disk; None: nothing to wait for."""
        if fut is not None and not fut.done():
            await fut

    # -- journal -----------------------------------------------------------------------------------------

    async def recover(self) -> None:
        """At startup: replay the journals of gateways that died into the store, then open this one's."""
        directory = self.journal_dir
        if directory is None:
            return
        try:
            files, rows = await anyio.to_thread.run_sync(
                lambda: replay(directory, lambda batch: add_usage(batch, engine=self.engine)))
            if files:
                log.warning("replayed %d journaled usage rows from %d segments of a gateway that stopped "
                            "uncleanly (the ones already in the store were skipped)", rows, files)
        except Exception as exc:  # the store may be down: the segments stay for the next start
            log.error("could not replay the usage journal in %s (%s); it is kept for the next start",
                      self.journal_dir, exc)
        try:
            self._journal = Journal(directory)
        except OSError as exc:
            log.error("usage journal disabled: cannot write %s (%s); a crash may lose up to %.1fs of usage",
                      directory, exc, self.flush_interval_s)

    async def _journal_loop(self) -> None:
        assert self._journal is not None and self._jexec is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._jwake.wait()
            self._jwake.clear()
            while self._jpending:
                group, self._jpending = self._jpending, []
                rows = [row for row, _ in group]
                try:
                    await loop.run_in_executor(self._jexec, self._journal.write, self._segment, rows, USAGE_FIELDS)
                except Exception as exc:
                    await self._store_now(rows, exc)
                for _, fut in group:
                    if not fut.done():
                        fut.set_result(None)
            if self._closing:
                return

    async def _store_now(self, rows: list[dict[str, Any]], exc: Exception) -> None:
        """The journal failed (disk full?): write the group to the store instead, before answering."""
        assert self._jexec is not None
        log.error("usage journal write failed (%s); writing %d rows to the store directly", exc, len(rows))
        try:
            await asyncio.get_running_loop().run_in_executor(self._jexec, lambda: add_usage(rows, engine=self.engine))
        except Exception as exc2:  # answer anyway: refusing every request over billing would be worse
            log.error("and the store refused them too (%s): they are only in memory until the next flush", exc2)

    # -- store -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="llmhost-meter")
        if self._journal is not None and self.journal_sync == "fdatasync":
            self._jexec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmhost-journal")
            self._jtask = asyncio.create_task(self._journal_loop(), name="llmhost-journal")

    async def _loop(self) -> None:
        # An idle gateway does not wake for the meter: with nothing pending the loop waits for the first row,
        # then flushes `flush_interval_s` after it (or as soon as a batch is full). A failed flush keeps its rows
        # pending, so the next try follows one interval later.
        while True:
            if not self._pending:
                await self._wake.wait()
            self._wake.clear()
            if len(self._pending) < self.batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.flush_interval_s)
                self._wake.clear()
            await self.flush()

    async def flush(self) -> int:
        if not self._pending:
            return 0
        batch, self._pending = self._pending, []
        # Rows recorded from now on go to a new segment; the older ones hold only rows in `batch` or stored.
        cut = self._segment = self._segment + 1
        try:
            n = await anyio.to_thread.run_sync(lambda: add_usage(batch, engine=self.engine))
        except asyncio.CancelledError:  # shutdown: the insert may still land; the store skips it if rewritten
            self._pending = batch + self._pending
            raise
        except Exception as exc:  # the store may be locked or down; keep the rows and try again next tick
            log.warning("usage flush of %d rows failed (%s); will retry", len(batch), exc)
            merged = batch + self._pending
            self._kept = self._kept or len(merged) > _MAX_PENDING
            self._pending = merged[-_MAX_PENDING:]
            return 0
        self.written += n
        # Every row recorded before the cut was in `batch` (a failed flush puts its rows back for the next).
        if self._journal is not None and not self._kept:
            if self._jexec is not None:  # after the writes already queued to that thread
                await asyncio.get_running_loop().run_in_executor(self._jexec, self._journal.discard_before, cut)
            else:
                self._journal.discard_before(cut)
        return n

    async def close(self) -> None:
        """Stop the loops and write what is pending (called on shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._jtask is not None:  # let the last groups reach the disk and answer their requests
            self._closing = True
            self._jwake.set()
            with contextlib.suppress(Exception):
                await self._jtask
            self._jtask = None
        for _ in range(3):
            if not self._pending:
                break
            await self.flush()
        if self._jexec is not None:
            self._jexec.shutdown(wait=True)
            self._jexec = None
        if self._journal is not None:
            keep = bool(self._pending) or self._kept
            if keep:
                log.error("%d usage rows could not be written at shutdown; they stay in the journal %s for "
                          "the next start", len(self._pending), self.journal_dir)
            self._journal.close(remove=not keep)
            self._journal = None
        elif self._pending:
            log.error("dropping %d usage rows that could not be written at shutdown", len(self._pending))
