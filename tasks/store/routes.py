"""The gateway's read model of the store: routes per endpoint, the routes epoch, and the reads of its dashboard.

The gateway reads the store only through this module (and writes only usage rows, replica health and audited
admin flags through the store's functions), never with SQL of its own against the store's tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, Engine, select, update

from tasks.core.errors import ConfigError, GatewayError, TransientError
from tasks.store.audit import entries as audit_entries
from tasks.store.endpoints import (
    EndpointView,
    external_of,
    get_endpoint,
    list_endpoints,
    list_replicas,
    list_revisions,
    replica_failures,
)
from tasks.store.keys import KeyInfo
from tasks.store.schema import (
    ROUTES_EPOCH,
    AccessGrant,
    Endpoint,
    EndpointRevision,
    Meta,
    ReplicaRow,
    Team,
    User,
    get_engine,
    session_scope,
)
from tasks.store.usage import (
    LatencyRow,
    UsageBreakdown,
    UsageGroup,
    UsageSeries,
    UsageTotals,
    latency_rows,
    request_counts_since,
    usage_breakdown,
    usage_series,
)


@dataclass(frozen=True)
class ReplicaRoute:
    id: int
    name: str
    base_url: str
    served_model_name: str
    state: str


@dataclass(frozen=True)
class EndpointRoute:
    name: str
    status: str
    owner: str | None
    created_at: datetime
    revision_id: int | None
    revision_hash: str | None
    served_model_name: str | None
    adapters: dict[str, str]
    replicas: tuple[ReplicaRoute, ...]
    users: frozenset[str]
    teams: frozenset[str]
    external: dict[str, Any] | None = None  # set for an external endpoint: where the provider is (no key)
    fallback: str | None = None  # the external endpoint to answer when no replica is healthy
    swap_to: str | None = None  # status `swapping`: the revision starting in place of the live one (short hash)

    def allows(self, key: KeyInfo) -> bool:
        return key.user in self.users or (key.team is not None and key.team in self.teams)


def load_routes(*, engine: Engine | None = None) -> tuple[int, dict[str, EndpointRoute]]:
    """(epoch, endpoint name -> route) as of one epoch; replicas that were stopped or failed are left out.

    SQLite's driver runs each SELECT on its own, so a switch committed between the read of an endpoint's live
    revision and the read of its replicas could pair the old revision with its just-stopped rows: a route with no
    replica, and 503s until the next reload. Every change bumps the epoch in its own transaction, so the epoch is
    read again at the end and the read repeated when it moved, up to `ROUTES_READ_TRIES` times: a store whose
    epoch moves during every read (a writer bumping it in a loop) raises `RoutesUnsettledError` rather than
    holding the caller, often the gateway's event loop, in the loop.
    """
    moved = []
    for _ in range(ROUTES_READ_TRIES):
        epoch, routes = _read_routes(engine)
        now = routes_epoch(engine)
        if now == epoch:
            return epoch, routes
        moved.append(f"{epoch}->{now}")
    raise RoutesUnsettledError(
        f"the routes epoch moved during each of {ROUTES_READ_TRIES} reads of the routes ({', '.join(moved[-3:])}, "
        f"...): a writer bumps it continuously (deploys, grants or key changes in a loop); retry once it settles")


ROUTES_READ_TRIES = 20


class RoutesUnsettledError(GatewayError, TransientError):
    """The routes could not be read as of one epoch: they changed during every read."""


def _read_routes(engine: Engine | None) -> tuple[int, dict[str, EndpointRoute]]:
    with session_scope(engine) as s:
        epoch = int(s.execute(select(Meta.value).where(Meta.name == ROUTES_EPOCH)).scalar_one())
        grants: dict[int, tuple[set[str], set[str]]] = {}
        q = (select(AccessGrant.endpoint_id, User.name, Team.name).select_from(AccessGrant)
             .outerjoin(User, User.id == AccessGrant.user_id).outerjoin(Team, Team.id == AccessGrant.team_id))
        for eid, u, t in s.execute(q):
            users, teams = grants.setdefault(eid, (set(), set()))
            if u:
                users.add(u)
            if t:
                teams.add(t)
        routes: dict[str, EndpointRoute] = {}
        for e in s.execute(select(Endpoint)).scalars():
            rev = s.get(EndpointRevision, e.live_revision_id) if e.live_revision_id else None
            reps: tuple[ReplicaRoute, ...] = ()
            if rev is not None:
                reps = tuple(
                    ReplicaRoute(r.id, r.name, r.base_url, r.served_model_name, r.state)
                    for r in s.execute(select(ReplicaRow).where(ReplicaRow.revision_id == rev.id)
                                       .order_by(ReplicaRow.id)).scalars()
                    if r.state not in ("stopped", "failed")
                )
            users, teams = grants.get(e.id, (set(), set()))
            swap_to = s.execute(select(EndpointRevision.content_hash).where(
                EndpointRevision.endpoint_id == e.id, EndpointRevision.status.in_(("pending", "starting")))
                .order_by(EndpointRevision.id.desc()).limit(1)).scalar() if e.status == "swapping" else None
            routes[e.name] = EndpointRoute(
                name=e.name, status=e.status, owner=e.owner, created_at=e.created_at,
                revision_id=rev.id if rev else None, revision_hash=rev.content_hash if rev else None,
                served_model_name=rev.served_model_name if rev else None,
                adapters=dict(rev.adapters or {}) if rev else {}, replicas=reps,
                users=frozenset(users), teams=frozenset(teams),
                external=external_of(rev.spec) if rev else None, fallback=e.fallback,
                swap_to=swap_to[:12] if swap_to else None,
            )
        return epoch, routes


def routes_epoch(engine: Engine | None = None) -> int:
    with (engine or get_engine()).connect() as c:
        return int(c.execute(select(Meta.value).where(Meta.name == ROUTES_EPOCH)).scalar_one())


_EPOCH_SQL = f"SELECT value FROM {Meta.__tablename__} WHERE name = '{ROUTES_EPOCH}'"


def read_epoch(raw_connection: Any) -> int:
    """The routes epoch through a DBAPI connection the caller holds open: microseconds on a local SQLite file."""
    cur = raw_connection.cursor()
    try:
        cur.execute(_EPOCH_SQL)
        return int(cur.fetchone()[0])
    finally:
        cur.close()


OBSERVABLE_STATES = ("up", "down", "starting")


def record_replica_health(replica_id: int, state: str, *, engine: Engine | None = None) -> bool:
    """The health loop's observation of a replica (up or down): neither audited nor an epoch bump.

    One conditional UPDATE: a state the managing step owns ('stopped', 'failed') is never overwritten,
    even by a probe that was in flight when the step wrote it. Returns whether the row changed.
    """
    if state not in ("up", "down"):
        raise ConfigError("state", state, "the health loop records only 'up' or 'down'")
    with session_scope(engine) as s:
        res: CursorResult[Any] = s.execute(  # type: ignore[assignment]
            update(ReplicaRow)
            .where(ReplicaRow.id == replica_id, ReplicaRow.state.in_(OBSERVABLE_STATES), ReplicaRow.state != state)
            .values(state=state)
        )
        return bool(res.rowcount)


def replica_pids(ids: list[int], *, engine: Engine | None = None) -> dict[int, int | None]:
    """replica id -> the pid the store knows (None for attached servers)."""
    with session_scope(engine) as s:
        q = select(ReplicaRow.id, ReplicaRow.pid).where(ReplicaRow.id.in_(ids))
        return {rid: pid for rid, pid in s.execute(q)}


__all__ = [
    # the routing snapshot the proxy caches, and the epoch that says when to reload it
    "EndpointRoute", "ReplicaRoute", "load_routes", "read_epoch", "record_replica_health", "replica_pids",
    "routes_epoch",
    # what the dashboard shows: endpoints, revisions, replicas, their audit trail and their usage
    "EndpointView", "LatencyRow", "UsageBreakdown", "UsageGroup", "UsageSeries", "UsageTotals", "audit_entries",
    "get_endpoint", "latency_rows", "list_endpoints", "list_replicas", "list_revisions", "replica_failures",
    "request_counts_since", "usage_breakdown", "usage_series",
]
