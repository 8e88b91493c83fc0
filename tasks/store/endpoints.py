"""Endpoints, their immutable revisions (content-addressed specs) and the replicas serving a revision.

Every change writes an audit entry in the same transaction; route changes bump the `routes` epoch.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tasks.core.errors import ConfigError, GatewayError
from tasks.store.audit import record as audit_record
from tasks.store.schema import AuditEntry, Endpoint, EndpointRevision, ReplicaRow, bump_epoch, session_scope

# `swapping`: a revision is being replaced in place (tasks.deploy.swap); the gateway holds its requests.
ENDPOINT_STATUSES = ("active", "disabled", "stopped", "swapping")
REVISION_STATUSES = ("pending", "starting", "deploying", "ready", "live", "retired", "failed", "stopped")
# `restarting`: a local replica's supervisor is restarting it after a crash (tasks.serving.supervisor).
REPLICA_STATES = ("starting", "up", "down", "restarting", "failed", "stopped")


def spec_hash(spec: dict[str, Any]) -> str:
    """Content hash of a revision spec: sha256 of canonical JSON, so equal specs get equal ids."""
    canon = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def _endpoint_public(e: Endpoint) -> dict[str, Any]:
    return {"name": e.name, "description": e.description, "usage_notes": e.usage_notes, "owner": e.owner,
            "status": e.status, "fallback": e.fallback, "live_revision_id": e.live_revision_id}


def get_endpoint_row(s: Session, name: str) -> Endpoint:
    """The endpoint's row in session `s`; GatewayError naming the fix when there is none."""
    e = s.execute(select(Endpoint).where(Endpoint.name == name)).scalar_one_or_none()
    if e is None:
        raise GatewayError(f"endpoint {name!r} does not exist: list them with `llmhost endpoints list`, or "
                           "register one with `llmhost endpoints attach NAME --base-url URL "
                           "--served-model M`.")
    return e


def get_endpoint(name: str, *, engine: Engine | None = None) -> Endpoint:
    with session_scope(engine) as s:
        return get_endpoint_row(s, name)


def upsert_endpoint(
    name: str,
    *,
    description: str | None = None,
    usage_notes: str | None = None,
    owner: str | None = None,
    status: str | None = None,
    fallback: str | None = None,
    actor: str = "system",
    engine: Engine | None = None,
) -> Endpoint:
    """Create the endpoint or update the fields given (None leaves a field as it is; fallback="" clears it)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name or ""):
        raise ConfigError("endpoint", name,
                          "use letters, digits, '.', '_' or '-' (no ':'; it separates adapters)")
    if status is not None and status not in ENDPOINT_STATUSES:
        raise ConfigError("status", status, f"use one of {', '.join(ENDPOINT_STATUSES)}")
    with session_scope(engine) as s:
        e = s.execute(select(Endpoint).where(Endpoint.name == name)).scalar_one_or_none()
        before = _endpoint_public(e) if e else None
        if e is None:
            e = Endpoint(name=name, status=status or "active")
            s.add(e)
        for attr, val in (("description", description), ("usage_notes", usage_notes), ("owner", owner),
                          ("status", status)):
            if val is not None:
                setattr(e, attr, val)
        if fallback is not None:
            if fallback == name:
                raise ConfigError("fallback", fallback, "an endpoint cannot be its own fallback")
            e.fallback = fallback or None
        s.flush()
        after = _endpoint_public(e)
        if after != before:
            audit_record(actor, "endpoint.create" if before is None else "endpoint.update", f"endpoint:{name}",
                         before, after, endpoint=name, session=s)
            bump_epoch(s)
        return e


def add_revision(
    endpoint: str,
    spec: dict[str, Any],
    *,
    served_model_name: str,
    adapters: dict[str, str] | None = None,
    model_version: str | None = None,
    status: str = "pending",
    reason: str | None = None,
    actor: str = "system",
    engine: Engine | None = None,
) -> EndpointRevision:
    """Add an immutable revision (or return the existing one with the same content hash)."""
    if status not in REVISION_STATUSES:
        raise ConfigError("status", status, f"use one of {', '.join(REVISION_STATUSES)}")
    chash = spec_hash(spec)
    with session_scope(engine) as s:
        e = get_endpoint_row(s, endpoint)
        existing = s.execute(select(EndpointRevision).where(
            EndpointRevision.endpoint_id == e.id, EndpointRevision.content_hash == chash
        )).scalar_one_or_none()
        if existing is not None:
            return existing
        rev = EndpointRevision(
            endpoint_id=e.id, content_hash=chash, spec=spec, served_model_name=served_model_name,
            adapters=dict(adapters or {}), model_version=model_version, status=status, reason=reason,
            created_by=actor,
        )
        s.add(rev)
        s.flush()
        audit_record(actor, "revision.create", f"endpoint:{endpoint}", None,
                     {"revision": chash[:12], "served_model_name": served_model_name,
                      "model_version": model_version, "adapters": rev.adapters, "status": status},
                     endpoint=endpoint, revision=chash[:12], session=s)
        return rev


def _get_revision(s: Session, endpoint: Endpoint, revision: int | str) -> EndpointRevision:
    q = select(EndpointRevision).where(EndpointRevision.endpoint_id == endpoint.id)
    if isinstance(revision, int):
        q = q.where(EndpointRevision.id == revision)
    else:
        q = q.where(EndpointRevision.content_hash.startswith(revision))
    rows = s.execute(q).scalars().all()
    if len(rows) != 1:
        raise GatewayError(f"revision {revision!r} of endpoint {endpoint.name!r} "
                           f"{'is ambiguous' if rows else 'does not exist'}: see `llmhost endpoints list`.")
    return rows[0]


def set_revision_status(
    endpoint: str, revision: int | str, status: str, *, reason: str | None = None, actor: str = "system",
    engine: Engine | None = None,
) -> EndpointRevision:
    if status not in REVISION_STATUSES:
        raise ConfigError("status", status, f"use one of {', '.join(REVISION_STATUSES)}")
    with session_scope(engine) as s:
        e = get_endpoint_row(s, endpoint)
        rev = _get_revision(s, e, revision)
        before = {"status": rev.status, "reason": rev.reason}
        rev.status, rev.reason = status, reason if reason is not None else rev.reason
        audit_record(actor, "revision.status", f"endpoint:{endpoint}", before,
                     {"status": rev.status, "reason": rev.reason}, endpoint=endpoint,
                     revision=rev.content_hash[:12], session=s)
        return rev


def set_revision_facts(
    endpoint: str, revision: int | str, topic: str, value: dict[str, Any], *, actor: str = "system",
    engine: Engine | None = None,
) -> EndpointRevision:
    """Record one topic of what a revision ran with (sizing, placement, swap); audited as `revision.facts`."""
    with session_scope(engine) as s:
        e = get_endpoint_row(s, endpoint)
        rev = _get_revision(s, e, revision)
        facts = dict(rev.facts or {})
        before = facts.get(topic)
        facts[topic] = value
        rev.facts = facts
        audit_record(actor, "revision.facts", f"endpoint:{endpoint}", {topic: before}, {topic: value},
                     endpoint=endpoint, revision=rev.content_hash[:12], session=s)
        return rev


def set_live_revision(
    endpoint: str, revision: int | str, *, reason: str | None = None, actor: str = "system",
    engine: Engine | None = None,
) -> EndpointRevision:
    """Point the endpoint's traffic at `revision` (id or content-hash prefix); the old live one is retired."""
    with session_scope(engine) as s:
        e = get_endpoint_row(s, endpoint)
        rev = _get_revision(s, e, revision)
        old = s.get(EndpointRevision, e.live_revision_id) if e.live_revision_id else None
        if old is not None and old.id == rev.id:
            return rev
        if old is not None:
            old.status = "retired"
        e.live_revision_id = rev.id
        rev.status = "live"
        if reason:
            rev.reason = reason
        s.flush()
        audit_record(actor, "endpoint.route", f"endpoint:{endpoint}",
                     {"live_revision": old.content_hash[:12] if old else None},
                     {"live_revision": rev.content_hash[:12], "reason": reason}, endpoint=endpoint,
                     revision=rev.content_hash[:12], model_version=rev.model_version, session=s)
        bump_epoch(s)
        return rev


def list_revisions(endpoint: str, *, engine: Engine | None = None) -> list[EndpointRevision]:
    with session_scope(engine) as s:
        e = get_endpoint_row(s, endpoint)
        return list(s.execute(select(EndpointRevision).where(EndpointRevision.endpoint_id == e.id)
                              .order_by(EndpointRevision.id)).scalars())


def add_replica(
    endpoint: str,
    revision: int | str,
    *,
    base_url: str,
    served_model_name: str,
    name: str | None = None,
    state: str = "starting",
    target: str = "local",
    kv_cache_tokens: int | None = None,
    pid: int | None = None,
    log_path: str | None = None,
    managed: bool = True,
    gpus: str | None = None,
    actor: str = "system",
    engine: Engine | None = None,
) -> ReplicaRow:
    """Register a replica (a running vLLM server) of a revision; the same base URL twice is a no-op."""
    base_url = base_url.rstrip("/")
    if not re.match(r"^https?://[^/]+", base_url):
        raise ConfigError("base_url", base_url, "give the server's OpenAI base URL, e.g. http://127.0.0.1:8001/v1")
    if not base_url.endswith("/v1"):
        base_url += "/v1"
    if state not in REPLICA_STATES:
        raise ConfigError("state", state, f"use one of {', '.join(REPLICA_STATES)}")
    with session_scope(engine) as s:
        e = get_endpoint_row(s, endpoint)
        rev = _get_revision(s, e, revision)
        row = s.execute(select(ReplicaRow).where(ReplicaRow.revision_id == rev.id,
                                                 ReplicaRow.base_url == base_url)).scalar_one_or_none()
        if row is not None:
            return row
        row = ReplicaRow(
            revision_id=rev.id, name=name or f"{endpoint}-{rev.content_hash[:8]}", target=target,
            base_url=base_url, served_model_name=served_model_name, state=state,
            kv_cache_tokens=kv_cache_tokens, pid=pid, log_path=log_path, managed=managed, gpus=gpus,
        )
        s.add(row)
        s.flush()
        audit_record(actor, "replica.add", f"endpoint:{endpoint}", None,
                     {"replica": row.name, "base_url": base_url, "served_model_name": served_model_name,
                      "state": state, **({"gpus": gpus} if gpus is not None else {})},
                     endpoint=endpoint, revision=rev.content_hash[:12], session=s)
        bump_epoch(s)
        return row


def set_replica_state(
    replica_id: int, state: str, *, pid: int | None = None, audit: bool = True, bump: bool = True,
    actor: str = "system", action: str = "replica.state", detail: dict[str, Any] | None = None,
    engine: Engine | None = None,
) -> ReplicaRow:
    """Record a replica's state. The gateway's health loop passes audit=False, bump=False (observations).

    `action` and `detail` name the audit entry and add to its `after` (the supervisor's `replica.restart` with
    the attempt and exit code, `replica.failed` with the log tail).
    """
    if state not in REPLICA_STATES:
        raise ConfigError("state", state, f"use one of {', '.join(REPLICA_STATES)}")
    with session_scope(engine) as s:
        row = s.get(ReplicaRow, replica_id)
        if row is None:
            raise GatewayError(f"replica id {replica_id} does not exist: see `llmhost endpoints list`.")
        before = row.state
        if before == state and pid is None and detail is None:
            return row
        row.state = state
        if pid is not None:
            row.pid = pid
        s.flush()
        if audit:
            rev = s.get(EndpointRevision, row.revision_id)
            ep = s.get(Endpoint, rev.endpoint_id) if rev else None
            audit_record(actor, action, f"replica:{row.name}", {"state": before}, {"state": state, **(detail or {})},
                         endpoint=ep.name if ep else None, revision=rev.content_hash[:12] if rev else None, session=s)
        if bump:
            bump_epoch(s)
        return row


def supervised_replica(pid: int, base_url: str, *, engine: Engine | None = None) -> ReplicaRow | None:
    """The running managed replica whose supervisor is `pid` at `base_url` (None: not registered yet, or stopped)."""
    with session_scope(engine) as s:
        return s.execute(select(ReplicaRow).where(
            ReplicaRow.pid == pid, ReplicaRow.base_url == base_url.rstrip("/"), ReplicaRow.managed.is_(True),
            ReplicaRow.state.not_in(("stopped", "failed"))).order_by(ReplicaRow.id.desc()).limit(1)
        ).scalar_one_or_none()


def replica_failures(endpoint: str, *, engine: Engine | None = None) -> dict[str, dict[str, Any]]:
    """Replica name -> what its supervisor recorded when it gave up (reason, exit code, log tail), newest wins."""
    with session_scope(engine) as s:
        rows = s.execute(select(AuditEntry.subject, AuditEntry.after).where(
            AuditEntry.endpoint == endpoint, AuditEntry.action == "replica.failed").order_by(AuditEntry.seq)).all()
    return {subject.removeprefix("replica:"): json.loads(after or "{}") for subject, after in rows}


def list_replicas(endpoint: str, revision: int | str | None = None, *,
                  engine: Engine | None = None) -> list[ReplicaRow]:
    """Replicas of `revision` (default: the live one)."""
    with session_scope(engine) as s:
        e = get_endpoint_row(s, endpoint)
        if revision is None:
            if e.live_revision_id is None:
                return []
            revision = e.live_revision_id
        rev = _get_revision(s, e, revision)
        return list(s.execute(select(ReplicaRow).where(ReplicaRow.revision_id == rev.id)
                              .order_by(ReplicaRow.id)).scalars())


def gpus_in_use(*, states: tuple[str, ...] | None = None, engine: Engine | None = None) -> dict[int, list[str]]:
    """GPU index -> the replicas (any endpoint) holding it: those in `states`, default every state but stopped and
    failed (a `down` or `restarting` replica's process may still hold, or soon take, the GPU's memory)."""
    live = ReplicaRow.state.in_(states) if states is not None else ReplicaRow.state.not_in(("stopped", "failed"))
    with session_scope(engine) as s:
        rows = s.execute(select(ReplicaRow.name, ReplicaRow.gpus).where(ReplicaRow.gpus.is_not(None), live)).all()
    held: dict[int, list[str]] = {}
    for name, gpus in rows:
        for idx in filter(None, (g.strip() for g in str(gpus).split(","))):
            if idx.isdigit():
                held.setdefault(int(idx), []).append(name)
    return held


@dataclass
class EndpointView:
    name: str
    status: str
    owner: str | None
    description: str | None
    live_revision: str | None
    served_model_name: str | None
    model_version: str | None
    replicas: list[ReplicaRow] = field(default_factory=list)
    external: dict[str, Any] | None = None  # an external endpoint's provider, model and prices (no key)
    fallback: str | None = None


def list_endpoints(*, engine: Engine | None = None) -> list[EndpointView]:
    with session_scope(engine) as s:
        out = []
        for e in s.execute(select(Endpoint).order_by(Endpoint.name)).scalars():
            rev = s.get(EndpointRevision, e.live_revision_id) if e.live_revision_id else None
            reps = list(s.execute(select(ReplicaRow).where(ReplicaRow.revision_id == rev.id)
                                  .order_by(ReplicaRow.id)).scalars()) if rev else []
            out.append(EndpointView(e.name, e.status, e.owner, e.description,
                                    rev.content_hash[:12] if rev else None,
                                    rev.served_model_name if rev else None,
                                    rev.model_version if rev else None, reps,
                                    external_of(rev.spec) if rev else None, e.fallback))
        return out


def external_of(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """An external revision's provider config (base URL, model, key variable or file, prices, request rules)."""
    ext = (spec or {}).get("external")
    return dict(ext) if isinstance(ext, dict) else None


def attach_server(
    name: str,
    *,
    base_url: str,
    served_model: str,
    adapters: dict[str, str] | None = None,
    description: str | None = None,
    owner: str | None = None,
    actor: str = "system",
    engine: Engine | None = None,
) -> tuple[EndpointRevision, ReplicaRow]:
    """Register a vLLM server llmhost does not manage as a replica of endpoint `name`.

    The revision's spec is the served model and adapters (not the URL), so attaching a second server of the
    same model adds a replica to the live revision, while a different model makes a new live revision.
    A running endpoint that `llmhost deploy` manages is refused before anything is written: attaching would
    replace its deployed revision with a server llmhost does not manage.
    """
    with session_scope(engine) as s:
        existing = s.execute(select(Endpoint).where(Endpoint.name == name)).scalar_one_or_none()
        live = (s.get(EndpointRevision, existing.live_revision_id)
                if existing and existing.live_revision_id and existing.status != "stopped" else None)
        if live is not None and (live.spec or {}).get("kind") != "attached":
            raise ConfigError("name", name, f"endpoint {name!r} already exists and is managed by `llmhost deploy` "
                              f"(live revision {live.content_hash[:12]}); attach under another name, or stop it "
                              f"first with `llmhost endpoints stop {name}`")
    upsert_endpoint(name, description=description, owner=owner, actor=actor, engine=engine)
    spec = {"kind": "attached", "served_model_name": served_model,
            "adapters": dict(sorted((adapters or {}).items()))}
    rev = add_revision(name, spec, served_model_name=served_model, adapters=adapters, status="ready",
                       reason="attached with `llmhost endpoints attach`", actor=actor, engine=engine)
    rep = add_replica(name, rev.id, base_url=base_url, served_model_name=served_model, state="up",
                      target="external", managed=False, name=f"{name}-ext-{_url_tag(base_url)}", actor=actor,
                      engine=engine)
    if rep.state in ("stopped", "failed"):
        set_replica_state(rep.id, "up", actor=actor, engine=engine)
    rev = set_live_revision(name, rev.id, reason="attached", actor=actor, engine=engine)
    return rev, rep


def _url_tag(url: str) -> str:
    m = re.match(r"^https?://([^/]+)", url)
    return re.sub(r"[^A-Za-z0-9]+", "-", m.group(1) if m else url).strip("-")

