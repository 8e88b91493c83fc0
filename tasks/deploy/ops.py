"""Operate an endpoint: stop it, roll it back to an earlier revision, describe its revisions, render it for k8s."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tasks import store
from tasks.core.errors import ConfigError
from tasks.deploy.plan import REPLICA_ENV, RevisionPlan, device_for, ray_settings
from tasks.deploy.replicas import stop_row
from tasks.deploy.rollout import DeployResult, deploy, live_revision
from tasks.deploy.spec import EndpointSpec, pinned_spec
from tasks.serving.k8s import K8sOptions, render_endpoint
from tasks.store import audit


def stop_endpoint(name: str, *, actor: str | None = None) -> int:
    """Stops every managed replica of every revision of the endpoint; returns how many were stopped.

    Takes the endpoint's deploy lease, so a stop never interleaves with a deploy, a rollback or an adapter load:
    while one runs, the stop is refused with its holder named, and nothing is changed.
    """
    actor = actor or audit.default_actor()
    store.get_endpoint(name)  # one-line error for an unknown name
    with store.deploy_lease(name, actor=actor):
        return _stop(name, actor)


def _stop(name: str, actor: str) -> int:
    n = 0
    store.upsert_endpoint(name, status="stopped", actor=actor)  # the gateway refuses new requests first
    for rev in store.list_revisions(name):
        for row in store.list_replicas(name, rev.id):
            if row.state in ("stopped", "failed"):
                continue
            n += int(row.managed)
            stop_row(name, row, actor=actor)
        if rev.status == "live":
            store.set_revision_status(name, rev.id, "stopped", reason="endpoint stopped", actor=actor)
    audit.record(actor, "endpoint.stop", f"endpoint:{name}", after={"replicas_stopped": n}, endpoint=name)
    return n


def rollback(name: str, *, to: str | None = None, actor: str | None = None) -> DeployResult:
    """Redeploys the previous good revision (or `to`) through the same start -> smoke -> switch path."""
    actor = actor or audit.default_actor()
    revs = store.list_revisions(name)
    live = live_revision(name)
    live_hash = live.content_hash if live else None
    if to:
        cands = [r for r in revs if r.content_hash.startswith(to)]
        if len(cands) != 1:
            raise ConfigError(
                "--to",
                to,
                f"give a revision hash prefix of {name} "
                f"({'ambiguous' if cands else 'no match'}); see `llmhost endpoints show {name}`",
            )
        target_rev = cands[0]
        if target_rev.status == "failed":
            raise ConfigError(
                "--to",
                to,
                f"revision failed ({target_rev.reason}); pick a good one from `llmhost endpoints show {name}`",
            )
    else:
        good = [
            r
            for r in revs
            if r.content_hash != live_hash
            and r.status in {"retired", "stopped"}
            and isinstance((r.spec or {}).get("spec"), dict)
        ]
        if not good:
            raise ConfigError(
                "endpoint",
                name,
                f"has no earlier good revision to roll back to; see `llmhost endpoints show {name}`",
            )
        target_rev = max(good, key=lambda r: (r.updated_at, r.id))  # the one retired most recently
    spec = pinned_spec(target_rev)
    with store.deploy_lease(name, actor=actor):  # taken before the audit entry, so a refusal records nothing
        return _rollback_to(spec, target_rev, live_hash, actor=actor)


def _rollback_to(spec: EndpointSpec, target_rev: store.EndpointRevision, live_hash: str | None, *,
                 actor: str) -> DeployResult:
    name = spec.name
    audit.record(
        actor,
        "rollback",
        f"endpoint:{name}",
        before={"revision": (live_hash or "")[:12] or None},
        after={"revision": target_rev.content_hash[:12], "model_version": target_rev.model_version},
        endpoint=name,
        revision=target_rev.content_hash[:12],
    )
    result = deploy(spec, actor=actor)
    if result.revision != target_rev.content_hash[:12]:
        result.message += (
            f" (the runtime changed since {target_rev.content_hash[:12]}, so the same spec and "
            "versions make a new revision)"
        )
    return result


# ---------------------------------------------------------------------------------------------- views


class ReplicaView(BaseModel):
    name: str
    state: str
    url: str
    kv_cache_tokens: int | None
    pid: int | None
    log_path: str | None
    gpus: str | None = None


class RevisionView(BaseModel):
    revision: str
    status: str
    live: bool
    model_version: str | None
    served_model_name: str
    adapters: dict[str, str]
    tool_calling: str | None
    reason: str | None
    created_at: str
    replicas: list[ReplicaView]
    facts: dict[str, Any] = {}


def describe(name: str) -> list[RevisionView]:
    """Every revision of the endpoint, newest first, with its replicas (what `endpoints show` prints)."""
    e = store.get_endpoint(name)
    out = []
    for rev in reversed(store.list_revisions(name)):
        spec = rev.spec or {}
        out.append(
            RevisionView(
                revision=rev.content_hash[:12],
                status=rev.status,
                live=rev.id == e.live_revision_id,
                model_version=rev.model_version,
                served_model_name=rev.served_model_name,
                adapters=dict(rev.adapters or {}),
                tool_calling=spec.get("tool_calling"),
                reason=rev.reason,
                facts=dict(rev.facts or {}),
                created_at=rev.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                replicas=[
                    ReplicaView(
                        name=r.name,
                        state=r.state,
                        url=r.base_url,
                        kv_cache_tokens=r.kv_cache_tokens,
                        pid=r.pid,
                        log_path=r.log_path,
                        gpus=r.gpus,
                    )
                    for r in store.list_replicas(name, rev.id)
                ],
            )
        )
    return out


def render_k8s(spec: EndpointSpec, plan: RevisionPlan, opts: K8sOptions) -> dict[str, list[dict[str, Any]]]:
    """File name -> validated manifests for a planned revision (see `tasks.serving.k8s.render_endpoint`)."""
    return render_endpoint(
        endpoint=spec.name,
        revision=plan.content_hash,
        args=plan.vllm,
        model_version=plan.model_version,
        settings=ray_settings(spec),
        device=device_for(spec.hardware),
        opts=opts,
        extra_env=REPLICA_ENV,
    )
