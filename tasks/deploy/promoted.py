"""Serve a version that is being promoted: switch the route to an adapter the live replicas already run, else redeploy.

The lifecycle hot-loads a candidate adapter onto the endpoint's live replicas to evaluate it, so by promotion time
those processes already serve it. Promotion then needs no restart: a new revision (the one `deploy` would plan for
the spec pinned to the candidate) takes over the same processes, and the gateway's route moves to it with one
epoch bump. Anything else (a full model, a spec that changed, Ray Serve, an adapter not loaded everywhere) goes
through the blue/green deploy. Either way the caller learns whether the serving change succeeded before it moves
an alias.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, Field

from tasks import store
from tasks.core.errors import ConfigError, DeployError, GatewayError
from tasks.deploy.adapters import runtime_unsafe
from tasks.deploy.plan import RevisionPlan, plan_revision
from tasks.deploy.resolve import AdapterVersion, resolve_adapter
from tasks.deploy.rollout import deploy, live_revision
from tasks.deploy.spec import EndpointSpec
from tasks.serving.lora import RuntimeLoraUnavailable, load_on_replica
from tasks.store import audit


class ServingChange(BaseModel):
    """How an endpoint came to serve a version."""

    endpoint: str
    model_version: str = Field(description="NAME/VERSION the endpoint now serves.")
    revision: str = Field(description="The live revision (short hash).")
    previous: str | None = Field(default=None, description="The revision live before (short hash).")
    method: Literal["route-switch", "blue-green", "unchanged"]
    seconds: float
    restarted: bool = Field(description="Whether any vLLM process was started for it.")
    replicas: list[str] = Field(default_factory=list, description="Base URLs that serve it.")
    note: str = Field(default="", description="Why the route could not simply switch, where it could not.")


def pinned_to(spec: EndpointSpec, version_ref: str) -> EndpointSpec:
    """The spec with its model pinned to one version (what the alias will name once promotion succeeds)."""
    return spec.model_copy(update={"model": version_ref})


def _loaded_roots(base_url: str) -> dict[str, str]:
    """Served adapter name -> the folder vLLM loaded it from, as the replica's /v1/models lists them."""
    resp = httpx.get(base_url.rstrip("/").removesuffix("/v1") + "/v1/models", timeout=10.0)
    resp.raise_for_status()
    return {m["id"]: str(m.get("root") or "") for m in resp.json().get("data", []) if m.get("parent")}


def _same_dir(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def _without_model(identity_spec: dict) -> dict:
    return {k: v for k, v in identity_spec.items() if k != "model"}


def route_switch_blocker(
    rev: store.EndpointRevision, reps: list[store.ReplicaRow], plan: RevisionPlan, adapter: AdapterVersion
) -> str:
    """Why the live replicas cannot simply take the planned revision, or "" when they can."""
    if why := runtime_unsafe(rev):
        return why
    live = rev.spec or {}
    if not isinstance(live.get("spec"), dict):
        return "the live revision was attached, not deployed from a spec"
    if _without_model(live["spec"]) != _without_model(plan.identity["spec"]):
        return "the spec changed since the live revision was deployed: a restart applies the change"
    if live.get("runtime") != plan.runtime:
        return f"the runtime changed ({live.get('runtime')} -> {plan.runtime})"
    weights = live.get("base_version") or rev.model_version
    if plan.base_version != weights:
        return f"the adapter is on {plan.base_version}, the live replicas run {weights}"
    if not reps:
        return "no replica of the live revision is up"
    for r in reps:
        try:
            roots = _loaded_roots(r.base_url)
        except httpx.HTTPError as exc:
            return f"replica {r.base_url} did not list its adapters ({type(exc).__name__})"
        if not any(_same_dir(root, adapter.adapter_dir) for root in roots.values()):
            return f"{adapter.ref} is not loaded on replica {r.base_url} (hot-load it first: llmhost adapters load)"
    return ""


def switch_route(spec: EndpointSpec, version_ref: str, *, actor: str) -> ServingChange | str:
    """Move the endpoint to `version_ref` on its running replicas, or return why that is not possible.

    Holds the endpoint's deploy lease. Nothing is recorded when the answer is a reason.
    """
    with store.deploy_lease(spec.name, actor=actor):
        return _switch_route(spec, version_ref, actor=actor)


def _switch_route(spec: EndpointSpec, version_ref: str, *, actor: str) -> ServingChange | str:
    t0 = time.monotonic()
    try:
        rev = live_revision(spec.name)
    except GatewayError:
        rev = None
    if rev is None:
        return "the endpoint has no live revision"
    try:
        adapter = resolve_adapter(version_ref)
    except ConfigError:
        return f"{version_ref} is a full model: only new replicas can serve its weights"
    reps = [r for r in store.list_replicas(spec.name) if r.state == "up"]
    plan = plan_revision(pinned_to(spec, version_ref))
    if why := route_switch_blocker(rev, reps, plan, adapter):
        return why
    served = plan.served_model_name
    for r in reps:  # the evaluation loaded it under its own name; the revision serves it under the plan's
        if served not in _loaded_roots(r.base_url):
            try:
                load_on_replica(r.base_url, served, adapter.adapter_dir)
            except RuntimeLoraUnavailable as exc:
                return str(exc)
    # Adapters loaded at runtime stay loaded in these processes and stay callable as `endpoint:NAME`.
    carried = {k: v for k, v in (rev.adapters or {}).items() if k not in plan.adapters}
    new = store.add_revision(spec.name, plan.identity, served_model_name=served,
                             adapters={**carried, **plan.adapters}, model_version=plan.model_version,
                             status="pending", actor=actor)
    for r in reps:
        row = store.add_replica(spec.name, new.id, base_url=r.base_url, served_model_name=served, name=r.name,
                                state="up", target=r.target, kv_cache_tokens=r.kv_cache_tokens, pid=r.pid,
                                log_path=r.log_path, managed=r.managed, actor=actor)
        if row.state != "up":  # the revision existed before (promoted, rolled back, promoted again)
            store.set_replica_state(row.id, "up", pid=r.pid, actor=actor)
    store.set_live_revision(spec.name, new.id, actor=actor,
                            reason=f"promoted {plan.model_version}: already loaded on the live replicas")
    # The old revision's rows hand their processes over: stopped as rows, so that nothing stops them twice.
    for r in reps:
        store.set_replica_state(r.id, "stopped", actor=actor)
    seconds = round(time.monotonic() - t0, 3)
    short, old = new.content_hash[:12], rev.content_hash[:12]
    audit.record(actor, "deploy.route_switch", f"endpoint:{spec.name}",
                 before={"revision": old, "served_model_name": rev.served_model_name},
                 after={"revision": short, "served_model_name": served, "model_version": plan.model_version,
                        "method": "route-switch", "seconds": seconds,
                        "replicas": [{"url": r.base_url, "pid": r.pid} for r in reps]},
                 endpoint=spec.name, revision=short, model_version=plan.model_version)
    return ServingChange(endpoint=spec.name, model_version=plan.model_version, revision=short, previous=old,
                         method="route-switch", seconds=seconds, restarted=False,
                         replicas=[r.base_url for r in reps])


def serve_version(spec: EndpointSpec, version_ref: str, *, actor: str) -> ServingChange:
    """Make `spec`'s endpoint serve `version_ref`: a route switch where the replicas run it, else blue/green.

    Raises DeployError when the endpoint does not end up serving it (the old revision keeps serving then).
    """
    switched = switch_route(spec, version_ref, actor=actor)
    if isinstance(switched, ServingChange):
        return switched
    t0 = time.monotonic()
    result = deploy(pinned_to(spec, version_ref), actor=actor)
    if result.outcome not in ("live", "unchanged"):
        raise DeployError(f"{spec.name}: serving {version_ref} failed ({result.outcome}): {result.message}")
    live = live_revision(spec.name)
    return ServingChange(
        endpoint=spec.name,
        model_version=(live.model_version if live else None) or version_ref.removeprefix("models:/"),
        revision=result.revision, previous=result.previous,
        method="unchanged" if result.outcome == "unchanged" else "blue-green",
        seconds=round(time.monotonic() - t0, 3), restarted=result.outcome == "live",
        replicas=[r.base_url for r in result.replicas], note=switched)
