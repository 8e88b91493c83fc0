"""The gateway's sampling loop: each live replica's vLLM /metrics and its hardware, stored every few seconds.

Hardware is GPU utilisation and memory through NVML (tasks.core.gpus) where a GPU exists; otherwise the CPU and
resident memory of the replica's processes (psutil). vLLM runs its engine in child processes, so the whole
process tree is counted. A replica attached by URL has no pid in the store; when it listens on a loopback
port, the listening process is found by that port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, delete, insert

from gateway.dashboard.tables import ReplicaSample, dashboard_session, ensure_tables
from gateway.routing import root_url
from tasks.core.gpus import Gpu, inventory
from tasks.store.routes import load_routes, replica_pids
from tasks.store.schema import utcnow

log = logging.getLogger("llmhost.gateway.dashboard")

# vLLM metric name -> sample column. Gauges are summed over label sets (one per model/engine).
VLLM_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    "vllm:generation_tokens_total": "generation_tokens_total",
}
RETENTION = timedelta(days=8)  # the longest window shown is 7 days
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """The columns of VLLM_GAUGES found in a Prometheus text exposition; missing ones are left out.

    kv_cache_usage is averaged, not summed, over engines (it is a fraction of each engine's cache).
    Only the lines of those metrics are parsed: vLLM's page is about 600 lines (histograms with many buckets), and
    parsing all of it took 8.5 ms of the gateway's event loop per replica and sample; its five lines take well under
    one. A page with none of them (not vLLM) is parsed whole, so one that is not an exposition at all still raises.
    """
    kept = [line for line in text.splitlines() if _metric_of(line) in VLLM_GAUGES]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for fam in text_string_to_metric_families("\n".join(kept) + "\n" if kept else text):
        for s in fam.samples:
            col = VLLM_GAUGES.get(s.name)
            if col is None:
                continue
            sums[col] = sums.get(col, 0.0) + float(s.value)
            counts[col] = counts.get(col, 0) + 1
    if "kv_cache_usage" in sums:
        sums["kv_cache_usage"] /= counts["kv_cache_usage"]
    return sums


def _metric_of(line: str) -> str:
    """The metric a line of the exposition belongs to: a sample's name, or the one its # HELP/# TYPE names."""
    if line.startswith("#"):
        parts = line.split(None, 3)
        return parts[2] if len(parts) > 2 and parts[1] in ("HELP", "TYPE") else ""
    end = len(line)
    for sep in "{ ":
        i = line.find(sep)
        if 0 <= i < end:
            end = i
    return line[:end]


# ------------------------------------------------------------------------------------------ hardware


def find_listening_pid(port: int) -> int | None:
    """The pid listening on a local TCP port (for replicas attached by URL, which have no pid stored)."""
    import psutil

    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return int(c.pid)
    except (psutil.AccessDenied, OSError):
        return None
    return None


@dataclass
class _CpuState:
    wall: float
    cpu_s: float


@dataclass
class HardwareProbe:
    """Keeps the previous CPU-time reading per replica, so CPU % is measured over the sampling interval."""

    _prev: dict[int, _CpuState] = field(default_factory=dict)
    _pids: dict[int, int] = field(default_factory=dict)
    # Replica id -> when a search for its listener last found nothing. The search walks every process's sockets
    # (psutil.net_connections), so a listener this host cannot see (another network namespace, a container, no
    # permission) is looked for again only after `miss_ttl_s`, not on every sample.
    _misses: dict[int, float] = field(default_factory=dict)
    miss_ttl_s: float = 300.0

    def pid_of(self, replica_id: int, pid: int | None, base_url: str) -> int | None:
        import psutil

        if pid and psutil.pid_exists(pid):
            return pid
        cached = self._pids.get(replica_id)
        if cached and psutil.pid_exists(cached):
            return cached
        parts = urlsplit(base_url)
        if parts.hostname in _LOOPBACK and parts.port:
            missed = self._misses.get(replica_id)
            if missed is not None and time.monotonic() - missed < self.miss_ttl_s:
                return None
            found = find_listening_pid(parts.port)
            if found:
                self._pids[replica_id] = found
                self._misses.pop(replica_id, None)
            else:
                self._misses[replica_id] = time.monotonic()
            return found
        return None

    def cpu(self, replica_id: int, pid: int) -> dict[str, float]:
        """CPU (% of all host cores, over the last interval) and RSS of the process tree at `pid`."""
        import psutil

        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return {}
        cpu_s = rss = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                cpu_s += t.user + t.system
                rss += p.memory_info().rss
        now = time.monotonic()
        out = {"rss_bytes": rss, "host_mem_percent": float(psutil.virtual_memory().percent)}
        prev = self._prev.get(replica_id)
        self._prev[replica_id] = _CpuState(now, cpu_s)
        if prev is not None and now > prev.wall:
            cores = psutil.cpu_count() or 1
            out["cpu_percent"] = max(0.0, 100.0 * (cpu_s - prev.cpu_s) / (now - prev.wall) / cores)
        return out

    def measure(self, replica_id: int, pid: int | None, base_url: str, gpus: list[Gpu]) -> dict[str, Any]:
        local_pid = self.pid_of(replica_id, pid, base_url)
        tree: set[int] = set()
        if local_pid:
            import psutil

            with contextlib.suppress(psutil.Error):
                root = psutil.Process(local_pid)
                tree = {local_pid, *(c.pid for c in root.children(recursive=True))}
        if gpus:
            mine = [g for g in gpus if g.pids & tree] if tree else []
            # Without a known pid (a remote replica) the host's GPUs say nothing about it.
            if mine or (local_pid and not any(g.pids for g in gpus)):
                used = mine or gpus
                return {
                    "hw_kind": "gpu",
                    "gpu_util": sum(g.util_percent for g in used) / len(used),
                    "gpu_mem_used_bytes": float(sum(g.used_bytes for g in used)),
                    "gpu_mem_total_bytes": float(sum(g.total_bytes for g in used)),
                }
        if local_pid:
            return {"hw_kind": "cpu", **self.cpu(replica_id, local_pid)}
        return {}


# ------------------------------------------------------------------------------------------ the loop


class Sampler:
    """Scrapes every live replica each `interval_s` and writes one ReplicaSample row per replica."""

    def __init__(self, engine: Engine, *, interval_s: float = 15.0, timeout_s: float = 5.0):
        self.engine, self.interval_s, self.timeout_s = engine, interval_s, timeout_s
        self.hw = HardwareProbe()
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._last_prune = 0.0

    def start(self) -> None:
        ensure_tables(self.engine)
        self._client = httpx.AsyncClient(timeout=self.timeout_s, trust_env=False)
        self._task = asyncio.create_task(self._loop(), name="llmhost-dashboard-sampler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.sample_once()
            except Exception as exc:  # never let the loop die; the next round may work
                log.warning("replica sampling round failed: %s", exc)
            await asyncio.sleep(self.interval_s)

    async def _scrape(self, base_url: str) -> tuple[dict[str, float], str | None]:
        assert self._client is not None
        try:
            resp = await self._client.get(root_url(base_url) + "/metrics")
        except httpx.HTTPError as exc:
            return {}, f"{type(exc).__name__}: {exc}"[:500]
        if resp.status_code != 200:
            return {}, f"/metrics answered {resp.status_code}"
        try:
            return parse_vllm_metrics(resp.text), None
        except ValueError as exc:
            return {}, f"unparseable /metrics: {exc}"[:500]

    async def sample_once(self) -> int:
        """One round over the live replicas; returns the number of rows written."""
        _, routes = await anyio.to_thread.run_sync(lambda: load_routes(engine=self.engine))
        reps = [(name, r) for name, route in routes.items() for r in route.replicas]
        if not reps:
            return 0
        pids = await anyio.to_thread.run_sync(lambda: replica_pids([r.id for _, r in reps], engine=self.engine))
        scraped = await asyncio.gather(*(self._scrape(r.base_url) for _, r in reps))
        now = utcnow()

        def measure_and_write() -> int:
            gpus = inventory()
            rows = []
            for (endpoint, r), (values, err) in zip(reps, scraped, strict=True):
                hw = self.hw.measure(r.id, pids.get(r.id), r.base_url, gpus)
                rows.append(
                    {
                        "ts": now,
                        "endpoint": endpoint,
                        "replica_id": r.id,
                        "replica": r.name,
                        "ok": 0 if err else 1,
                        "error": err,
                        **values,
                        **hw,
                    }
                )
            with dashboard_session(self.engine) as s:
                s.execute(insert(ReplicaSample), rows)
                if time.monotonic() - self._last_prune > 3600:
                    s.execute(delete(ReplicaSample).where(ReplicaSample.ts < now - RETENTION))
                    self._last_prune = time.monotonic()
            return len(rows)

        n = await anyio.to_thread.run_sync(measure_and_write)
        self.rounds += 1
        return n

