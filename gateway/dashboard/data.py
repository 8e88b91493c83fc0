"""What the dashboard pages show, read through the store's read model: functions from (engine, endpoint, window).

This module holds the windows and their time buckets, the endpoints list and the Usage tab; the Overview and
System Health tabs are in `overview` and `health`. Usage is counted per bucket by the store's queries.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from tasks.core.settings import get_settings
from tasks.store.routes import UsageGroup, list_endpoints, request_counts_since, usage_breakdown, usage_series
from tasks.store.schema import utcnow

WINDOWS: dict[str, tuple[timedelta, timedelta]] = {
    # window -> (length, bucket width)
    "1h": (timedelta(hours=1), timedelta(minutes=1)),
    "24h": (timedelta(hours=24), timedelta(hours=1)),
    "7d": (timedelta(days=7), timedelta(hours=6)),
}


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
        now = now or utcnow()
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
    provider: str | None = None  # external endpoints: the provider and its price, instead of replicas
    price: str | None = None
    fallback: str | None = None


def price_label(ext: dict[str, Any]) -> str:
    """`$0.15 in / $0.60 out per 1M tokens (as of 2025-08-01)`, or why there is none."""
    pin, pout = ext.get("price_in_per_1m"), ext.get("price_out_per_1m")
    if pin is None or pout is None:
        return "no catalog price"
    when = f" (as of {ext['prices_as_of']})" if ext.get("prices_as_of") else ""
    return f"${pin:g} in / ${pout:g} out per 1M tokens{when}"


def endpoint_rows(engine: Engine, visible: set[str] | None, aliases: dict[str, str] | None = None) -> list[EndpointRow]:
    """One row per endpoint the viewer may see (`visible` None = all)."""
    counts = request_counts_since(utcnow() - timedelta(hours=1), engine=engine)
    out = []
    for v in list_endpoints(engine=engine):
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
                v.external["provider"] if v.external else None,
                price_label(v.external) if v.external else None,
                v.fallback,
            )
        )
    return out

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


def _group(g: UsageGroup, **extra: Any) -> dict[str, Any]:
    return {
        "name": g.name or "(none)",
        **extra,
        "requests": g.totals.requests,
        "errors": g.totals.errors,
        "prompt_tokens": g.totals.prompt_tokens,
        "completion_tokens": g.totals.completion_tokens,
    }


def usage(engine: Engine, endpoint: str, window: str, now: datetime | None = None) -> UsageView:
    b = Buckets.for_window(window, now)
    series = usage_series(endpoint, b.start, b.width, b.n, engine=engine)
    got = usage_breakdown(endpoint, b.since, engine=engine)
    return UsageView(
        window,
        got.totals.requests,
        got.totals.errors,
        got.totals.prompt_tokens,
        got.totals.completion_tokens,
        {
            "labels": b.labels(),
            "requests": series.requests,
            "errors": series.errors,
            "prompt_tokens": series.prompt_tokens,
            "completion_tokens": series.completion_tokens,
        },
        [_group(g, user=g.user, team=g.team) for g in got.top_keys],
        [_group(g, team=g.team) for g in got.top_users],
        got.status_codes,
    )


# ------------------------------------------------------------------------------------------ cost


def usage_cost(engine: Engine, endpoint: str, now: datetime | None = None) -> dict[str, Any] | None:
    """The endpoint's last 24 h of tokens priced at the frontier's rates, next to the tier's cost for the day.

    Prices and throughput come from the endpoint's latest eval comparison with a frontier (MLflow), through
    the same module as its report and `llmhost cost`; None when there is none (or MLflow is off here).
    """
    if os.environ.get("LLMHOST_DASHBOARD_NO_MLFLOW"):
        return None
    try:
        from tasks.evaluate.cost import day_cost, latest_comparison_cost

        found = latest_comparison_cost(endpoint)
    except Exception:  # the comparison is a nicety here; the page must render without MLflow
        return None
    if found is None:
        return None
    report, run_id = found
    since = (now or utcnow()) - timedelta(hours=24)
    got = usage_breakdown(endpoint, since, engine=engine)
    replicas = next((len(e.replicas) for e in list_endpoints(engine=engine) if e.name == endpoint), 1)
    day = day_cost(report, got.totals.prompt_tokens, got.totals.completion_tokens, replicas=replicas or 1)
    return {"run_id": run_id, "lines": report.lines(), "day": day.model_dump(),
            "frontier": report.api.name if report.api else None, "tier": report.tier.tier, **report.metrics()}


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
