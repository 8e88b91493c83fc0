"""What the dashboard pages show, read from the store: pure functions from (engine, endpoint, window) to data.

Time series are bucketed in Python from the rows of the window (one indexed range read), which keeps the
queries the same on SQLite and PostgreSQL and makes percentiles exact.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine, Float, case, cast, func, select

from gateway.dashboard.tables import ReplicaSample, ensure_tables
from tasks import store
from tasks.store import audit
from tasks.store import UsageRecord

WINDOWS: dict[str, tuple[timedelta, timedelta]] = {
    # window -> (length, bucket width)
    "1h": (timedelta(hours=1), timedelta(minutes=1)),
    "24h": (timedelta(hours=24), timedelta(hours=1)),
    "7d": (timedelta(days=7), timedelta(hours=6)),
}
LOG_LINES = 80


def window_of(name: str | None) -> str:
    return name if name in WINDOWS else "1h"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Buckets:
    """Fixed-width time buckets on round times, from the one holding `since` to the one holding now.

    Totals count exactly [since, now]; the oldest bucket may reach a little before `since`.
    """

    start: datetime
    width: timedelta
    n: int
    since: datetime

    @classmethod
    def for_window(cls, window: str, now: datetime | None = None) -> Buckets:
        length, width = WINDOWS[window]
        now = now or store.utcnow()
        since = now - length
        step = width.total_seconds()
        start = datetime.fromtimestamp(math.floor(since.timestamp() / step) * step, UTC)
        n = int((now - start) / width) + 1
        return cls(start, width, n, since)

    def index(self, ts: datetime) -> int | None:
        i = int((ts - self.start) / self.width)
        return i if 0 <= i < self.n else None

    def labels(self) -> list[str]:
        fmt = (
            "%H:%M"
            if self.width < timedelta(hours=1)
            else ("%d %b %H:%M" if self.width >= timedelta(hours=6) else "%H:00")
        )
        return [(self.start + i * self.width).strftime(fmt) for i in range(self.n)]


# ------------------------------------------------------------------------------------------ endpoints


@dataclass
class EndpointRow:
    name: str
    status: str
    owner: str | None
    description: str | None
    live_revision: str | None
    served_model_name: str | None
    model_version: str | None
    alias: str | None
    replicas_up: int
    replicas: int
    requests_1h: int
    errors_1h: int


def counts_since(engine: Engine, since: datetime) -> dict[str, tuple[int, int]]:
    """endpoint -> (requests, errors) since `since`."""
    with store.session_scope(engine) as s:
        err = func.sum(case((UsageRecord.status_code >= 400, 1), else_=0))
        q = (
            select(UsageRecord.endpoint, func.count(), err)
            .where(UsageRecord.ts >= since)
            .group_by(UsageRecord.endpoint)
        )
        return {ep: (int(n), int(e or 0)) for ep, n, e in s.execute(q) if ep}


def endpoint_rows(engine: Engine, visible: set[str] | None, aliases: dict[str, str] | None = None) -> list[EndpointRow]:
    """One row per endpoint the viewer may see (`visible` None = all)."""
    counts = counts_since(engine, store.utcnow() - timedelta(hours=1))
    out = []
    for v in store.list_endpoints(engine=engine):
        if visible is not None and v.name not in visible:
            continue
        n, e = counts.get(v.name, (0, 0))
        up = sum(1 for r in v.replicas if r.state == "up")
        live = [r for r in v.replicas if r.state not in ("stopped", "failed")]
        out.append(
            EndpointRow(
                v.name,
                v.status,
                v.owner,
                v.description,
                v.live_revision,
                v.served_model_name,
                v.model_version,
                (aliases or {}).get(v.model_version or ""),
                up,
                len(live),
                n,
                e,
            )
        )
    return out


# ------------------------------------------------------------------------------------------ overview


@dataclass
class RevisionRow:
    id: int
    hash: str
    status: str
    live: bool
    model_version: str | None
    served_model_name: str
    created_by: str
    created_at: datetime
    reason: str | None
    deployed_by: str | None = None
    deployed_at: str | None = None
    spec_yaml: str = ""
    vllm_args: str | None = None
    runtime: str | None = None
    tool_calling: str | None = None


@dataclass
class SmokeRun:
    ts: str
    actor: str
    revision: str | None
    passed: bool
    replicas: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Overview:
    name: str
    status: str
    owner: str | None
    description: str | None
    usage_notes: str | None
    live: RevisionRow | None
    revisions: list[RevisionRow]
    smoke: list[SmokeRun]
    events: list[dict[str, Any]]


def _loads(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def render_spec(spec: dict[str, Any]) -> tuple[str, str | None, str | None, str | None]:
    """(spec as YAML, vLLM args line, runtime, tool-calling decision) of a stored revision spec.

    Deployed revisions store the plan's identity ({"spec": ..., "vllm": ..., "runtime": ...}); attached
    servers store a small dict, shown as it is.
    """
    inner = spec.get("spec") if isinstance(spec.get("spec"), dict) else spec
    text = yaml.safe_dump(inner, sort_keys=False, default_flow_style=False, allow_unicode=True).strip()
    vllm = spec.get("vllm") if isinstance(spec.get("vllm"), dict) else None
    args = None
    if vllm:
        parts = []
        for k, v in vllm.items():
            if v in (None, False, "", [], {}) or k in ("extra_args",):
                continue
            flag = "--" + k.replace("_", "-")
            if v is True:
                parts.append(flag)
            elif isinstance(v, dict):
                parts.append(f"{flag} " + " ".join(f"{a}={b}" for a, b in v.items()))
            else:
                parts.append(f"{flag} {v}")
        parts += [str(a) for a in vllm.get("extra_args") or []]
        args = " ".join(parts)
    return text, args, spec.get("runtime"), spec.get("tool_calling")


def overview(engine: Engine, name: str) -> Overview:
    e = store.get_endpoint(name, engine=engine)
    entries = audit.entries(endpoint=name, engine=engine)
    # who made each revision live, and when: the route changes in the audit log
    went_live: dict[str, tuple[str, str]] = {}
    for a in entries:
        if a.action == "endpoint.route":
            after = _loads(a.after) or {}
            h = after.get("live_revision") if isinstance(after, dict) else None
            if h:
                went_live[h] = (a.actor, a.ts)
    revisions = []
    for rev in reversed(store.list_revisions(name, engine=engine)):
        text, args, runtime, tools = render_spec(rev.spec or {})
        by, at = went_live.get(rev.content_hash[:12], (None, None))
        revisions.append(
            RevisionRow(
                rev.id,
                rev.content_hash[:12],
                rev.status,
                rev.id == e.live_revision_id,
                rev.model_version,
                rev.served_model_name,
                rev.created_by,
                rev.created_at,
                rev.reason,
                by,
                _short_ts(at),
                text,
                args,
                runtime,
                tools,
            )
        )
    smoke = []
    for a in reversed(entries):
        if a.action != "deploy.smoke":
            continue
        after = _loads(a.after) or {}
        links = _loads(a.links) or {}
        smoke.append(
            SmokeRun(
                _short_ts(a.ts) or a.ts,
                a.actor,
                links.get("revision"),
                bool(after.get("passed")),
                list(after.get("replicas") or []),
            )
        )
    events = [
        {
            "ts": _short_ts(a.ts),
            "actor": a.actor,
            "action": a.action,
            "subject": a.subject,
            "revision": (_loads(a.links) or {}).get("revision"),
        }
        for a in reversed(entries[-30:])
    ]
    live = next((r for r in revisions if r.live), None)
    return Overview(e.name, e.status, e.owner, e.description, e.usage_notes, live, revisions, smoke[:10], events)


def _short_ts(iso: str | None) -> str | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso


# ------------------------------------------------------------------------------------------ usage


@dataclass
class UsageView:
    window: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    series: dict[str, Any]
    top_keys: list[dict[str, Any]]
    top_users: list[dict[str, Any]]
    status_codes: dict[int, int]


def _rows(engine: Engine, endpoint: str, since: datetime, *cols: Any, ok_only: bool = False) -> list[Any]:
    with store.session_scope(engine) as s:
        q = select(*cols).where(UsageRecord.endpoint == endpoint, UsageRecord.ts >= since)
        if ok_only:  # errors answer fast and would flatter the latency percentiles
            q = q.where(UsageRecord.status_code < 400)
        return list(s.execute(q))


def _bucket_sql(engine: Engine, b: Buckets) -> Any:
    """SQL for a row's bucket index (SQLite and PostgreSQL; None elsewhere, where Python buckets the rows).

    The store keeps naive UTC timestamps, so both databases read them as UTC epoch seconds.
    """
    start, width = b.start.timestamp(), b.width.total_seconds()
    epoch: Any
    if engine.dialect.name == "sqlite":
        epoch = cast(func.strftime("%s", UsageRecord.ts), Float)
    elif engine.dialect.name == "postgresql":
        epoch = func.extract("epoch", UsageRecord.ts)
    else:
        return None
    return func.floor((epoch - start) / width).label("bucket")


def usage(engine: Engine, endpoint: str, window: str, now: datetime | None = None) -> UsageView:
    b = Buckets.for_window(window, now)
    req, err, pin, pout = ([0] * b.n for _ in range(4))
    err_sum = func.sum(case((UsageRecord.status_code >= 400, 1), else_=0))
    aggs = (
        func.count(),
        err_sum,
        func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
        func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
    )
    series_where = (UsageRecord.endpoint == endpoint, UsageRecord.ts >= b.start)
    where = (UsageRecord.endpoint == endpoint, UsageRecord.ts >= b.since)
    bucket = _bucket_sql(engine, b)
    if bucket is not None:  # the database counts per bucket: a handful of rows cross over, not one per request
        with store.session_scope(engine) as s:
            for i, n, e, p, c in s.execute(select(bucket, *aggs).where(*series_where).group_by(bucket)):
                if i is not None and 0 <= int(i) < b.n:
                    i = int(i)
                    req[i], err[i], pin[i], pout[i] = int(n), int(e or 0), int(p), int(c)
    else:
        start, width = b.start, b.width.total_seconds()
        for ts, code, p, c in _rows(
            engine,
            endpoint,
            b.start,
            UsageRecord.ts,
            UsageRecord.status_code,
            UsageRecord.prompt_tokens,
            UsageRecord.completion_tokens,
        ):
            i = int((ts - start).total_seconds() // width)
            if 0 <= i < b.n:
                req[i] += 1
                err[i] += code >= 400
                pin[i] += p or 0
                pout[i] += c or 0

    # the top lists and status codes are grouped by the database too
    def agg(name: str, n: int, e: int, p: int, c: int, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            **extra,
            "requests": int(n),
            "errors": int(e or 0),
            "prompt_tokens": int(p),
            "completion_tokens": int(c),
        }

    with store.session_scope(engine) as s:
        totals = s.execute(select(*aggs).where(*where)).one()
        keys = [
            agg(k or "(none)", n, e, p, c, user=u, team=t)
            for k, u, t, n, e, p, c in s.execute(
                select(UsageRecord.key_prefix, func.max(UsageRecord.user), func.max(UsageRecord.team), *aggs)
                .where(*where)
                .group_by(UsageRecord.key_prefix)
                .order_by(func.count().desc(), UsageRecord.key_prefix)
                .limit(10)
            )
        ]
        users = [
            agg(u or "(none)", n, e, p, c, team=t)
            for u, t, n, e, p, c in s.execute(
                select(UsageRecord.user, func.max(UsageRecord.team), *aggs)
                .where(*where)
                .group_by(UsageRecord.user)
                .order_by(func.count().desc(), UsageRecord.user)
                .limit(10)
            )
        ]
        codes = {
            int(code): int(n)
            for code, n in s.execute(
                select(UsageRecord.status_code, func.count())
                .where(*where)
                .group_by(UsageRecord.status_code)
                .order_by(UsageRecord.status_code)
            )
        }
    return UsageView(
        window,
        int(totals[0]),
        int(totals[1] or 0),
        int(totals[2]),
        int(totals[3]),
        {
            "labels": b.labels(),
            "requests": req,
            "errors": err,
            "prompt_tokens": pin,
            "completion_tokens": pout,
        },
        keys,
        users,
        codes,
    )


# ------------------------------------------------------------------------------------------ health


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


def health(engine: Engine, endpoint: str, window: str, now: datetime | None = None) -> HealthView:
    ensure_tables(engine)
    b = Buckets.for_window(window, now)
    rows = _rows(engine, endpoint, b.start, UsageRecord.ts, UsageRecord.latency_ms, UsageRecord.ttft_ms, ok_only=True)
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

    with store.session_scope(engine) as s:
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
    for r in store.list_replicas(endpoint, engine=engine):
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
            )
        )
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


# ------------------------------------------------------------------------------------------ aliases


def model_aliases(versions: set[str]) -> dict[str, str]:
    """'NAME/VERSION' -> 'alias[, alias]' from the MLflow registry; empty when it cannot be read.

    Imported lazily: mlflow is heavy, and a gateway serving only attached servers never needs it.
    """
    versions = {v for v in versions if v and "/" in v}
    if not versions or os.environ.get("LLMHOST_DASHBOARD_NO_MLFLOW"):
        return {}
    try:
        from mlflow import MlflowClient

        from tasks.core.settings import get_settings

        client = MlflowClient(tracking_uri=get_settings().mlflow_uri, registry_uri=get_settings().mlflow_uri)
        out = {}
        for v in versions:
            name, version = v.rsplit("/", 1)
            aliases = client.get_model_version(name, version).aliases or []
            if aliases:
                out[v] = ", ".join(sorted(aliases))
        return out
    except Exception:  # the registry is a nicety here; the page must render without it
        return {}
