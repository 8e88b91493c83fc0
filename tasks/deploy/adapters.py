"""Serve LoRA adapter versions next to their base without a restart, or by a blue/green redeploy.

Hot-loading goes through each replica's runtime adapter API (`tasks.serving.lora`). Where that API is missing
(the variable was not set, LoRA is off, the adapter's rank exceeds --max-lora-rank, or the revision runs on
Ray Serve), the endpoint is redeployed blue/green with the adapter in its spec's --lora-modules instead, and the
result says so. Every load and unload is an audit entry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks import store
from tasks.core.errors import ConfigError, ServingError
from tasks.deploy.resolve import AdapterVersion, adapter_ref, resolve_adapter
from tasks.deploy.rollout import DeployResult, deploy, live_revision
from tasks.deploy.spec import EndpointSpec
from tasks.serving.base import Replica, VllmArgs
from tasks.serving.lora import RuntimeLoraUnavailable, load_on_replica, unload_on_replica
from tasks.store import audit


class AdapterChange(BaseModel):
    """What one load or unload did."""

    action: Literal["load", "unload"]
    adapter: str = Field(description="Name the adapter is served under.")
    version: str | None = Field(default=None, description="models:/NAME/VERSION")
    endpoint: str | None = None
    method: Literal["runtime", "restart"]
    seconds: float
    replicas: list[str] = Field(default_factory=list, description="Base URLs that now serve the change.")
    note: str = ""


def hot_load(replica: Replica | str, adapter: AdapterVersion, *, name: str | None = None) -> AdapterChange:
    """Load an adapter version into one running replica (no store, no endpoint); audited."""
    base_url = replica if isinstance(replica, str) else replica.base_url
    lora_name = name or adapter.default_serving_name
    seconds = load_on_replica(base_url, lora_name, adapter.adapter_dir)
    audit.record(
        None,
        "adapter.load",
        f"replica:{base_url}",
        None,
        {"adapter": lora_name, "version": adapter.ref, "method": "runtime", "seconds": round(seconds, 3)},
        model_version=f"{adapter.name}/{adapter.version}",
    )
    return AdapterChange(
        action="load",
        adapter=lora_name,
        version=adapter.ref,
        method="runtime",
        seconds=round(seconds, 3),
        replicas=[base_url],
    )


def hot_unload(replica: Replica | str, lora_name: str) -> AdapterChange:
    base_url = replica if isinstance(replica, str) else replica.base_url
    seconds = unload_on_replica(base_url, lora_name)
    audit.record(None, "adapter.unload", f"replica:{base_url}", {"adapter": lora_name}, None)
    return AdapterChange(
        action="unload", adapter=lora_name, method="runtime", seconds=round(seconds, 3), replicas=[base_url]
    )


def restart_with_adapters(
    target: Any,
    replica: Replica,
    args: VllmArgs,
    adapters: dict[str, Path | str],
    *,
    name: str | None = None,
    max_lora_rank: int | None = None,
) -> tuple[Replica, float]:
    """Blue/green for one replica: start a new one with the adapters, then stop the old one.

    Returns (new replica, seconds until the new one was healthy). Used as the fallback when runtime loading is
    unavailable, and by the benchmark as the restart baseline.
    """
    lora = {**args.lora_modules, **{k: str(v) for k, v in adapters.items()}}
    new_args = args.model_copy(
        update={
            "enable_lora": True,
            "lora_modules": lora,
            "max_lora_rank": max(args.max_lora_rank or 0, max_lora_rank or 0) or None,
        }
    )
    started = time.monotonic()
    new = target.start(new_args, name=name or f"{replica.name}-lora")
    seconds = time.monotonic() - started
    target.stop(replica)
    return new, seconds


# ---------------------------------------------------------------------------------------------- endpoints


def _live(endpoint: str) -> tuple[store.EndpointRevision, list[store.ReplicaRow]]:
    """(live revision row, up replicas) from the store."""
    rev = live_revision(endpoint)
    if rev is None:
        raise ConfigError("endpoint", endpoint, "has no live revision; deploy it first (llmhost deploy)")
    reps = [r for r in store.list_replicas(endpoint) if r.state == "up"]
    if not reps:
        raise ServingError(
            f"endpoint {endpoint!r}: no replica of the live revision is up; see `llmhost endpoints list`"
        )
    return rev, reps


def _changed(current: dict[str, str], change: dict[str, str | None]) -> dict[str, str]:
    """A copy of `current` with `change` applied: a value sets the name, None removes it."""
    new = dict(current)
    for k, v in change.items():
        if v is None:
            new.pop(k, None)
        else:
            new[k] = v
    return new


def _set_adapters(
    endpoint: str, revision_id: int, change: dict[str, str | None], action: str, after: dict[str, Any]
) -> dict[str, str]:
    """Record the live revision's adapter set and the audit entry in one transaction.

    The set maps the gateway's adapter name (`endpoint:<name>`) to the name vLLM serves it under, which is
    what the gateway rewrites `model` to; here both are the same. The version lives in the audit entry.
    """
    with store.session_scope() as s:
        rev = s.get(store.EndpointRevision, revision_id)
        if rev is None:
            raise ServingError(
                f"endpoint {endpoint!r}: revision {revision_id} is gone; see `llmhost endpoints list`"
            )
        before = dict(rev.adapters or {})
        new = _changed(before, change)
        rev.adapters = new  # a new dict, so SQLAlchemy sees the JSON column change
        audit.record(
            None,
            action,
            f"endpoint:{endpoint}",
            {"adapters": before},
            {"adapters": new, **after},
            session=s,
            endpoint=endpoint,
            revision=rev.content_hash[:12],
        )
        store.bump_epoch(s)
        return new


def _revision_lora(rev: store.EndpointRevision) -> tuple[bool | None, int | None]:
    """(LoRA enabled?, --max-lora-rank) from the revision's vLLM args; None if unknown (attached servers)."""
    vllm = (rev.spec or {}).get("vllm")
    if not isinstance(vllm, dict):
        return None, None
    return bool(vllm.get("enable_lora") or vllm.get("lora_modules")), vllm.get("max_lora_rank")


def runtime_unsafe(rev: store.EndpointRevision) -> str:
    """Why runtime (un)loading would leave replicas disagreeing, or "" when it is safe."""
    if ((rev.spec or {}).get("spec") or {}).get("target") == "ray":
        # One gateway row is a whole Serve application: a runtime call reaches one of its replicas, and the
        # replicas Serve adds (autoscaling) or replaces (failed health check) start from the revision's
        # command line. The adapter set has to be in that command line.
        return "a Ray Serve revision starts its replicas from the revision's --lora-modules"
    return ""


def _redeploy(
    endpoint: str, rev: store.EndpointRevision, adapters: dict[str, str | None], max_rank: int | None
) -> DeployResult:
    """Blue/green through the endpoint deploy path, with the adapter set changed in the spec."""
    raw = dict((rev.spec or {}).get("spec") or {})
    if not raw:
        raise ServingError(
            f"endpoint {endpoint!r}: the live revision has no spec to redeploy from; deploy it with "
            "`llmhost deploy` first"
        )
    spec = EndpointSpec.model_validate(raw)
    new = _changed(spec.adapters, adapters)
    vllm = spec.vllm.model_copy(
        update={"max_lora_rank": max(spec.vllm.max_lora_rank or 0, max_rank or 0) or None}
    )
    return deploy(spec.model_copy(update={"adapters": new, "vllm": vllm}))


def load_into_endpoint(
    endpoint: str, version: str, *, name: str | None = None, allow_restart: bool = True
) -> AdapterChange:
    """Hot-load an adapter version into every live replica of `endpoint`; fall back to blue/green.

    Holds the endpoint's deploy lease, so a deploy cannot switch revisions under the load.
    """
    with store.deploy_lease(endpoint, actor=audit.default_actor()):
        return _load_into_endpoint(endpoint, version, name=name, allow_restart=allow_restart)


def _load_into_endpoint(endpoint: str, version: str, *, name: str | None, allow_restart: bool) -> AdapterChange:
    rev, reps = _live(endpoint)
    model_name = (rev.model_version or "").split("/")[0] or None
    adapter = resolve_adapter(adapter_ref(version, model_name))
    base = f"{adapter.name}/{adapter.base_version}"
    # An endpoint whose champion is itself an adapter runs that adapter's base weights: a sibling adapter
    # on the same base loads next to it.
    weights = (rev.spec or {}).get("base_version") or rev.model_version
    if weights and weights != base:
        raise ConfigError(
            "version",
            adapter.ref,
            f"is an adapter on {base}, but endpoint {endpoint!r} runs the weights of "
            f"{weights}; fine-tune on {weights} or deploy {base}",
        )
    lora_name = name or adapter.default_serving_name
    enabled, max_rank = _revision_lora(rev)
    if enabled is False:
        reason = "the live revision was started without --enable-lora"
    elif max_rank is not None and adapter.lora_rank > max_rank:
        reason = f"adapter rank {adapter.lora_rank} > the revision's --max-lora-rank {max_rank}"
    else:
        reason = runtime_unsafe(rev)
    started = time.monotonic()
    done: list[str] = []
    if not reason:
        try:
            for r in reps:
                load_on_replica(r.base_url, lora_name, adapter.adapter_dir)
                done.append(r.base_url)
        except RuntimeLoraUnavailable as exc:
            reason = str(exc)
            for url in done:  # leave no replica serving an adapter the others lack
                unload_on_replica(url, lora_name)
            done = []
    if not reason:
        seconds = round(time.monotonic() - started, 3)
        _set_adapters(
            endpoint,
            rev.id,
            {lora_name: lora_name},
            "adapter.load",
            {"adapter": lora_name, "version": adapter.ref, "method": "runtime", "seconds": seconds},
        )
        return AdapterChange(
            action="load",
            adapter=lora_name,
            version=adapter.ref,
            endpoint=endpoint,
            method="runtime",
            seconds=seconds,
            replicas=done,
        )
    if not allow_restart:
        raise RuntimeLoraUnavailable(
            f"endpoint {endpoint!r}: {reason}; rerun without --no-restart to redeploy"
        )
    result = _redeploy(endpoint, rev, {lora_name: adapter.ref}, adapter.lora_rank)
    seconds = round(time.monotonic() - started, 3)
    audit.record(
        None,
        "adapter.load",
        f"endpoint:{endpoint}",
        None,
        {
            "adapter": lora_name,
            "version": adapter.ref,
            "method": "restart",
            "reason": reason,
            "outcome": result.outcome,
            "seconds": seconds,
        },
        endpoint=endpoint,
    )
    if result.outcome not in ("live", "unchanged"):
        raise ServingError(
            f"endpoint {endpoint!r}: runtime loading unavailable ({reason}) and the blue/green "
            f"redeploy did not go live: {result.message}"
        )
    return AdapterChange(
        action="load",
        adapter=lora_name,
        version=adapter.ref,
        endpoint=endpoint,
        method="restart",
        seconds=seconds,
        replicas=[r.base_url for r in result.replicas],
        note=f"runtime loading unavailable ({reason}); redeployed blue/green",
    )


def unload_from_endpoint(endpoint: str, version_or_name: str, *, allow_restart: bool = True) -> AdapterChange:
    """Unload an adapter (by served name, or by version) from every live replica; fall back to blue/green."""
    with store.deploy_lease(endpoint, actor=audit.default_actor()):
        return _unload_from_endpoint(endpoint, version_or_name, allow_restart=allow_restart)


def _unload_from_endpoint(endpoint: str, version_or_name: str, *, allow_restart: bool) -> AdapterChange:
    rev, reps = _live(endpoint)
    current = dict(rev.adapters or {})
    if version_or_name in current:
        lora_name = version_or_name
    else:
        model_name = (rev.model_version or "").split("/")[0] or None
        name, _, version = adapter_ref(version_or_name, model_name).removeprefix("models:/").partition("/")
        lora_name = f"{name}-v{version}"
        if lora_name not in current:
            raise ConfigError(
                "version",
                version_or_name,
                f"is not served by {endpoint!r}; served adapters: {sorted(current) or 'none'}",
            )
    started = time.monotonic()
    try:
        if why := runtime_unsafe(rev):
            raise RuntimeLoraUnavailable(why)
        for r in reps:
            unload_on_replica(r.base_url, lora_name)
    except RuntimeLoraUnavailable as exc:
        if not allow_restart:
            raise
        result = _redeploy(endpoint, rev, {lora_name: None}, None)
        seconds = round(time.monotonic() - started, 3)
        audit.record(
            None,
            "adapter.unload",
            f"endpoint:{endpoint}",
            {"adapter": lora_name},
            {"method": "restart", "reason": str(exc), "outcome": result.outcome},
            endpoint=endpoint,
        )
        return AdapterChange(
            action="unload",
            adapter=lora_name,
            endpoint=endpoint,
            method="restart",
            seconds=seconds,
            note=f"runtime unloading unavailable ({exc}); redeployed blue/green",
        )
    seconds = round(time.monotonic() - started, 3)
    _set_adapters(
        endpoint,
        rev.id,
        {lora_name: None},
        "adapter.unload",
        {"adapter": lora_name, "method": "runtime", "seconds": seconds},
    )
    return AdapterChange(
        action="unload",
        adapter=lora_name,
        endpoint=endpoint,
        method="runtime",
        seconds=seconds,
        replicas=[r.base_url for r in reps],
    )
