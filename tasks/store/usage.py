"""Usage rows written by the gateway's meter, and the reads over them: the CLI's summary, the dashboard's views.

The dashboard's time series are counted per bucket by the database on SQLite and PostgreSQL (a handful of rows
cross over, not one per request), and bucketed in Python from the window's rows elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Engine, Float, Table, case, cast, func, insert, select

from tasks.store.schema import UsageRecord, get_engine, session_scope

USAGE_FIELDS = ("ts", "key_prefix", "user", "team", "endpoint", "adapter", "revision_id", "replica_id",
                "route", "stream", "status_code", "prompt_tokens", "completion_tokens", "latency_ms",
                "ttft_ms", "provider", "reasoning_tokens", "cost_usd", "fallback", "request_id")
_USAGE: Table = UsageRecord.metadata.tables[UsageRecord.__tablename__]


def add_usage(records: Sequence[dict[str, Any]], *, engine: Engine | None = None) -> int:
    """Insert usage rows in one statement (the gateway batches them off the request path).

    A row whose `request_id` is already stored is skipped, so the gateway may write a row twice (a journal
    replayed after a crash, a flush retried after an unclear failure) and it still counts once.
    """
    # A Core executemany on a connection: the ORM's bulk path cost the gateway's meter flush ~8% of its CPU.
    # Every row names every column, so `stream`'s column default (which the ORM applied to a None) is set here.
    rows = list({(r.get("request_id") or i): {k: r.get(k) for k in USAGE_FIELDS} | {"stream": r.get("stream") or False}
                 for i, r in enumerate(records)}.values())
    if not rows:
        return 0
    engine = engine or get_engine()
    with engine.begin() as conn:
        if engine.dialect.name in ("sqlite", "postgresql"):
            conn.execute(_insert_ignoring_duplicates(engine.dialect.name), rows)
        else:
            ids = [r["request_id"] for r in rows if r["request_id"]]
            if ids:
                have = set(conn.execute(select(_USAGE.c.request_id).where(_USAGE.c.request_id.in_(ids))).scalars())
                rows = [r for r in rows if r["request_id"] not in have]
            if rows:
                conn.execute(insert(_USAGE), rows)
    return len(rows)


def _insert_ignoring_duplicates(dialect: str) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    if dialect == "sqlite":
        return sqlite.insert(_USAGE).on_conflict_do_nothing()
    return postgresql.insert(_USAGE).on_conflict_do_nothing()


def list_usage(*, endpoint: str | None = None, since: datetime | None = None, key_prefix: str | None = None,
               limit: int | None = None, engine: Engine | None = None) -> list[UsageRecord]:
    with session_scope(engine) as s:
        q = select(UsageRecord).order_by(UsageRecord.ts)
        if endpoint:
            q = q.where(UsageRecord.endpoint == endpoint)
        if since:
            q = q.where(UsageRecord.ts >= since)
        if key_prefix:
            q = q.where(UsageRecord.key_prefix == key_prefix)
        if limit:
            q = q.limit(limit)
        return list(s.execute(q).scalars())


@dataclass
class UsageSummary:
    endpoint: str | None
    user: str | None
    team: str | None
    key_prefix: str | None
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    avg_latency_ms: float
    avg_ttft_ms: float | None
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    fallback_requests: int = 0


def summarize_usage(*, endpoint: str | None = None, since: datetime | None = None,
                    engine: Engine | None = None) -> list[UsageSummary]:
    """Per endpoint x user x team x key: requests, errors (status >= 400), tokens, mean latency and TTFT, and
    for external endpoints reasoning tokens, API spend (USD at the catalog's rates) and fallback answers."""
    with session_scope(engine) as s:
        q = (select(UsageRecord.endpoint, UsageRecord.user, UsageRecord.team, UsageRecord.key_prefix,
                    *_aggregates(), func.avg(UsageRecord.latency_ms), func.avg(UsageRecord.ttft_ms),
                    func.coalesce(func.sum(UsageRecord.reasoning_tokens), 0),
                    func.coalesce(func.sum(UsageRecord.cost_usd), 0.0),
                    func.count(UsageRecord.fallback))
             .group_by(UsageRecord.endpoint, UsageRecord.user, UsageRecord.team, UsageRecord.key_prefix)
             .order_by(UsageRecord.endpoint, UsageRecord.user))
        if endpoint:
            q = q.where(UsageRecord.endpoint == endpoint)
        if since:
            q = q.where(UsageRecord.ts >= since)
        return [UsageSummary(ep, u, t, k, int(n), int(e or 0), int(p), int(c), float(lat or 0.0),
                             float(tt) if tt is not None else None, int(rt), float(cost), int(fb))
                for ep, u, t, k, n, e, p, c, lat, tt, rt, cost, fb in s.execute(q)]


# ---------------------------------------------------------------------------------------------------------
# The dashboard's reads


def _errors() -> Any:
    return func.sum(case((UsageRecord.status_code >= 400, 1), else_=0))


def _aggregates() -> tuple[Any, ...]:
    """requests, errors (status >= 400), prompt tokens, completion tokens."""
    return (func.count(), _errors(), func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
            func.coalesce(func.sum(UsageRecord.completion_tokens), 0))


@dataclass(frozen=True)
class UsageTotals:
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def of(cls, n: Any, e: Any, p: Any, c: Any) -> UsageTotals:
        return cls(int(n), int(e or 0), int(p), int(c))


@dataclass(frozen=True)
class UsageGroup:
    """One row of a top list: `name` is the key prefix or the user (None when the row has none)."""

    name: str | None
    user: str | None
    team: str | None
    totals: UsageTotals


@dataclass(frozen=True)
class UsageBreakdown:
    totals: UsageTotals
    top_keys: list[UsageGroup]
    top_users: list[UsageGroup]
    status_codes: dict[int, int]


@dataclass(frozen=True)
class UsageSeries:
    """Per time bucket, oldest first."""

    requests: list[int]
    errors: list[int]
    prompt_tokens: list[int]
    completion_tokens: list[int]


class LatencyRow(NamedTuple):
    ts: datetime
    latency_ms: float
    ttft_ms: float | None


def request_counts_since(since: datetime, *, engine: Engine | None = None) -> dict[str, tuple[int, int]]:
    """endpoint -> (requests, errors) since `since`."""
    with session_scope(engine) as s:
        q = (select(UsageRecord.endpoint, func.count(), _errors())
             .where(UsageRecord.ts >= since).group_by(UsageRecord.endpoint))
        return {ep: (int(n), int(e or 0)) for ep, n, e in s.execute(q) if ep}


def _bucket_sql(engine: Engine, start: datetime, width: timedelta) -> Any:
    """SQL for a row's bucket index (SQLite and PostgreSQL; None elsewhere, where Python buckets the rows).

    The store keeps naive UTC timestamps, so both databases read them as UTC epoch seconds.
    """
    epoch: Any
    if engine.dialect.name == "sqlite":
        epoch = cast(func.strftime("%s", UsageRecord.ts), Float)
    elif engine.dialect.name == "postgresql":
        epoch = func.extract("epoch", UsageRecord.ts)
    else:
        return None
    return func.floor((epoch - start.timestamp()) / width.total_seconds()).label("bucket")


def usage_series(endpoint: str, start: datetime, width: timedelta, n: int, *,
                 engine: Engine | None = None) -> UsageSeries:
    """Requests, errors and tokens of `endpoint` in `n` buckets of `width` from `start`."""
    engine = engine or get_engine()
    req, err, pin, pout = ([0] * n for _ in range(4))
    bucket = _bucket_sql(engine, start, width)
    with session_scope(engine) as s:
        where = (UsageRecord.endpoint == endpoint, UsageRecord.ts >= start)
        if bucket is not None:
            for i, *totals in s.execute(select(bucket, *_aggregates()).where(*where).group_by(bucket)):
                if i is not None and 0 <= int(i) < n:
                    t = UsageTotals.of(*totals)
                    i = int(i)
                    req[i], err[i], pin[i], pout[i] = t.requests, t.errors, t.prompt_tokens, t.completion_tokens
        else:
            cols = (UsageRecord.ts, UsageRecord.status_code, UsageRecord.prompt_tokens, UsageRecord.completion_tokens)
            step = width.total_seconds()
            for ts, code, p, c in s.execute(select(*cols).where(*where)):
                i = int((ts - start).total_seconds() // step)
                if 0 <= i < n:
                    req[i] += 1
                    err[i] += code >= 400
                    pin[i] += p or 0
                    pout[i] += c or 0
    return UsageSeries(req, err, pin, pout)


def usage_breakdown(endpoint: str, since: datetime, *, top: int = 10,
                    engine: Engine | None = None) -> UsageBreakdown:
    """Totals of `endpoint` since `since`, its `top` keys and users by requests, and its status codes."""
    where = (UsageRecord.endpoint == endpoint, UsageRecord.ts >= since)
    aggs = _aggregates()
    with session_scope(engine) as s:
        totals = UsageTotals.of(*s.execute(select(*aggs).where(*where)).one())
        keys = [
            UsageGroup(k, u, t, UsageTotals.of(*rest))
            for k, u, t, *rest in s.execute(
                select(UsageRecord.key_prefix, func.max(UsageRecord.user), func.max(UsageRecord.team), *aggs)
                .where(*where)
                .group_by(UsageRecord.key_prefix)
                .order_by(func.count().desc(), UsageRecord.key_prefix)
                .limit(top)
            )
        ]
        users = [
            UsageGroup(u, u, t, UsageTotals.of(*rest))
            for u, t, *rest in s.execute(
                select(UsageRecord.user, func.max(UsageRecord.team), *aggs)
                .where(*where)
                .group_by(UsageRecord.user)
                .order_by(func.count().desc(), UsageRecord.user)
                .limit(top)
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
    return UsageBreakdown(totals, keys, users, codes)


def latency_rows(endpoint: str, since: datetime, *, engine: Engine | None = None) -> list[LatencyRow]:
    """Latency and TTFT of the successful requests (errors answer fast and would flatter the percentiles)."""
    with session_scope(engine) as s:
        q = select(UsageRecord.ts, UsageRecord.latency_ms, UsageRecord.ttft_ms).where(
            UsageRecord.endpoint == endpoint, UsageRecord.ts >= since, UsageRecord.status_code < 400)
        return [LatencyRow(ts, lat, ttft) for ts, lat, ttft in s.execute(q)]
