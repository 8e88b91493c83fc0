"""The System Health tab: latency percentiles from usage rows, the sampler's replica metrics, replica log tails."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from gateway.dashboard.data import Buckets, percentile
from gateway.dashboard.tables import ReplicaSample, dashboard_session, ensure_tables
from tasks.store.routes import latency_rows, list_endpoints, list_replicas, replica_failures, request_counts_since

LOG_LINES = 80


@dataclass
class ReplicaHealth:
    id: int
    name: str
    state: str
    base_url: str
    target: str
    pid: int | None
    kv_cache_tokens: int | None
    log_path: str | None
    log_tail: list[str]
    last_sample: dict[str, Any] | None
    failure: str | None = None  # why its supervisor gave up restarting it


@dataclass
class HealthView:
    window: str
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    latency_series: dict[str, Any]
    metrics_series: dict[str, Any]
    hw_kind: str | None
    hw_label: str
    replicas: list[ReplicaHealth]
    samples: int
    external: dict[str, Any] | None = None  # an external endpoint: its provider, model and prices (no replicas)
    requests: int = 0
    errors: int = 0


def tail_lines(path: str | None, n: int = LOG_LINES, max_bytes: int = 256 * 1024) -> list[str]:
    """The last `n` lines of a text file, reading at most `max_bytes` from its end."""
    if not path:
        return []
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first one is probably cut
    return lines[-n:]


HW_LABELS = {
    "gpu": "GPU utilisation and memory (NVML)",
    "cpu": "CPU and RAM of the replica processes (psutil; no GPU)",
    None: "no hardware readings (the replica is not on this host)",
}


def health_view(engine: Engine, endpoint: str, window: str, now: datetime | None = None) -> HealthView:
    ensure_tables(engine)
    b = Buckets.for_window(window, now)
    rows = latency_rows(endpoint, b.start, engine=engine)
    lat: list[list[float]] = [[] for _ in range(b.n)]
    ttft: list[list[float]] = [[] for _ in range(b.n)]
    all_lat: list[float] = []
    all_ttft: list[float] = []
    start, width = b.start, b.width.total_seconds()
    for ts, latency, t in rows:
        i = int((ts - start).total_seconds() // width)
        if not 0 <= i < b.n:
            continue
        lat[i].append(latency)
        if t is not None:
            ttft[i].append(t)
        if ts >= b.since:
            all_lat.append(latency)
            if t is not None:
                all_ttft.append(t)
    latency_series = {
        "labels": b.labels(),
        "p50": [percentile(x, 50) for x in lat],
        "p95": [percentile(x, 95) for x in lat],
        "ttft_p50": [percentile(x, 50) for x in ttft],
    }

    with dashboard_session(engine) as s:
        samples = list(
            s.execute(
                select(ReplicaSample)
                .where(ReplicaSample.endpoint == endpoint, ReplicaSample.ts >= b.start)
                .order_by(ReplicaSample.ts)
            ).scalars()
        )
    metrics_series = _sample_series(samples, b)
    kinds = [x.hw_kind for x in samples if x.hw_kind]
    hw_kind = kinds[-1] if kinds else None
    last: dict[int, ReplicaSample] = {}
    for x in samples:
        last[x.replica_id] = x

    replicas = []
    failures = replica_failures(endpoint, engine=engine)
    for r in list_replicas(endpoint, engine=engine):
        smp = last.get(r.id)
        replicas.append(
            ReplicaHealth(
                r.id,
                r.name,
                r.state,
                r.base_url,
                r.target,
                r.pid,
                r.kv_cache_tokens,
                r.log_path,
                tail_lines(r.log_path),
                {
                    c: getattr(smp, c)
                    for c in (
                        "ts",
                        "ok",
                        "error",
                        "running",
                        "waiting",
                        "kv_cache_usage",
                        "cpu_percent",
                        "rss_bytes",
                        "gpu_util",
                        "gpu_mem_used_bytes",
                        "gpu_mem_total_bytes",
                        "hw_kind",
                    )
                }
                if smp
                else None,
                failures.get(r.name, {}).get("reason") if r.state == "failed" else None,
            )
        )
    view = next((v for v in list_endpoints(engine=engine) if v.name == endpoint), None)
    n, e = request_counts_since(b.since, engine=engine).get(endpoint, (0, 0))
    return HealthView(
        window,
        percentile(all_lat, 50),
        percentile(all_lat, 95),
        percentile(all_ttft, 50),
        percentile(all_ttft, 95),
        latency_series,
        metrics_series,
        hw_kind,
        HW_LABELS[hw_kind],
        replicas,
        len(samples),
        view.external if view else None,
        n,
        e,
    )


def _sample_series(samples: list[ReplicaSample], b: Buckets) -> dict[str, Any]:
    """Per bucket: the mean over samples (summed over replicas within one round) of each sampled column."""
    cols = (
        "running",
        "waiting",
        "kv_cache_usage",
        "cpu_percent",
        "rss_bytes",
        "gpu_util",
        "gpu_mem_used_bytes",
    )
    # Group by round (same ts) first so two replicas add up for counts, then average rounds per bucket.
    rounds: dict[datetime, dict[str, list[float]]] = {}
    for x in samples:
        r = rounds.setdefault(x.ts, {c: [] for c in cols})
        for c in cols:
            v = getattr(x, c)
            if v is not None:
                r[c].append(v)
    acc: dict[str, list[list[float]]] = {c: [[] for _ in range(b.n)] for c in cols}
    for ts, r in rounds.items():
        i = b.index(ts)
        if i is None:
            continue
        for c in cols:
            if r[c]:
                # fractions and percentages are averaged over replicas, counts and bytes summed
                agg = sum(r[c]) / len(r[c]) if c in ("kv_cache_usage", "gpu_util") else sum(r[c])
                acc[c][i].append(agg)
    out: dict[str, Any] = {"labels": b.labels()}
    for c in cols:
        out[c] = [sum(v) / len(v) if v else None for v in acc[c]]
    out["kv_cache_usage"] = [None if v is None else round(v * 100.0, 2) for v in out["kv_cache_usage"]]
    out["rss_bytes"] = [None if v is None else round(v / 2**20, 1) for v in out["rss_bytes"]]
    out["gpu_mem_used_bytes"] = [None if v is None else round(v / 2**30, 2) for v in out["gpu_mem_used_bytes"]]
    return out

