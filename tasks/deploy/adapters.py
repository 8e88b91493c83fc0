"""Serve LoRA adapter versions next to their base without a restart: vLLM's runtime adapter API.

A replica started with `--enable-lora` (LocalTarget then sets VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) takes
new adapters through POST /v1/load_lora_adapter and drops them through /v1/unload_lora_adapter; the adapter
is then callable by its name as `model`. Where that API is missing (the variable was not set, LoRA is off,
or the adapter's rank exceeds --max-lora-rank), the endpoint is redeployed blue/green with the adapter in
its spec instead, and the result says so. Every load and unload is an audit entry.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import httpx
from prefect import task
from pydantic import BaseModel, Field

from tasks.core.errors import ConfigError, ServingError
from tasks.serving.base import Replica, VllmArgs
from tasks.core.settings import get_settings

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"


class AdapterError(ServingError):
    """A replica refused an adapter load or unload for a reason a restart would not fix."""


class ReplicaUnreachable(ServingError):
    """The replica did not answer (transient: the load task retries these only)."""


class RuntimeLoraUnavailable(AdapterError):
    """The replica cannot change adapters at runtime; a restart (blue/green redeploy) is needed."""


# ---------------------------------------------------------------------------------------------- registry


class AdapterVersion(BaseModel):
    """A registered adapter version and its local folder (the one holding adapter_config.json)."""

    name: str = Field(description="Registered model name (the base's name).")
    version: str
    adapter_dir: Path
    base_version: str
    lora_rank: int
    tags: dict[str, str] = Field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def default_serving_name(self) -> str:
        """The adapter's name on vLLM and in the gateway (`endpoint:<this>`)."""
        return f"{self.name}-v{self.version}"


def adapter_ref(version: str, model_name: str | None = None) -> str:
    """`models:/NAME/V`, `NAME/V`, or a bare `V` of `model_name` -> a models:/ reference."""
    if version.startswith("models:/"):
        return version
    if "/" in version:
        return f"models:/{version}"
    if model_name and re.fullmatch(r"\d+", version):
        return f"models:/{model_name}/{version}"
    raise ConfigError(
        "version",
        version,
        "use models:/NAME/VERSION, NAME/VERSION, or a version number of the endpoint's model",
    )


def find_adapter_dir(root: Path) -> Path:
    found = sorted(root.rglob("adapter_config.json"))
    if not found:
        raise ConfigError(
            "version",
            str(root),
            "holds no adapter_config.json; register a PEFT adapter version (llmhost finetune)",
        )
    return found[0].parent


def resolve_adapter(ref: str) -> AdapterVersion:
    """Download (once) a registered adapter version; refuse versions that are not adapters."""
    import mlflow

    from tasks.register import get_version

    mv = get_version(ref)
    tags = dict(mv.tags)
    if tags.get("adapter") != "true":
        raise ConfigError(
            "version",
            ref,
            "is a full model, not a LoRA adapter; deploy it with `llmhost deploy`, or "
            "pick a version tagged adapter=true (llmhost finetune registers those)",
        )
    dest = get_settings().home_abs / "model_cache" / mv.name / str(mv.version)
    if not (dest / ".complete").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{mv.version}-", dir=dest.parent))
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(tmp)
            )
            (tmp / ".complete").write_text(ref)
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    adapter_dir = find_adapter_dir(dest)
    rank = tags.get("lora_rank") or str(
        json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 0)
    )
    return AdapterVersion(
        name=mv.name,
        version=str(mv.version),
        adapter_dir=adapter_dir,
        base_version=tags.get("base_version", ""),
        lora_rank=int(rank),
        tags=tags,
    )


# ---------------------------------------------------------------------------------------------- one replica


def _root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        return str(body.get("detail") or body.get("message") or body)[:300]
    return str(body)[:300]


_NEEDS_RESTART = re.compile(
    r"(lora.*not enabled|enable[_-]lora|max_lora_rank|max-lora-rank|greater than max)", re.I
)


def _post(url: str, payload: dict[str, Any], timeout_s: float) -> httpx.Response:
    try:
        return httpx.post(url, json=payload, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ReplicaUnreachable(
            f"{url}: replica unreachable ({type(exc).__name__}: {exc}); check `llmhost endpoints "
            "list` and the replica log"
        ) from exc


def load_on_replica(
    base_url: str, lora_name: str, adapter_dir: Path | str, *, timeout_s: float = 120.0
) -> float:
    """POST the adapter to one replica; returns seconds until vLLM acknowledged it (it is callable then)."""
    started = time.monotonic()
    resp = _post(
        _root(base_url) + LOAD_PATH, {"lora_name": lora_name, "lora_path": str(adapter_dir)}, timeout_s
    )
    seconds = time.monotonic() - started
    if resp.status_code == 200:
        return seconds
    text = _error_text(resp)
    if resp.status_code == 404 and "Not Found" in text:
        raise RuntimeLoraUnavailable(
            f"{base_url}: the runtime adapter API is off (start the replica with --enable-lora and "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); redeploy with the adapter in the spec instead"
        )
    if resp.status_code == 400 and "already been loaded" in text:
        return seconds  # same name already served: loading is idempotent for callers
    if _NEEDS_RESTART.search(text):
        raise RuntimeLoraUnavailable(
            f"{base_url}: {text}; redeploy with a larger --max-lora-rank / --enable-lora"
        )
    raise AdapterError(
        f"{base_url}: vLLM refused adapter {lora_name!r} from {adapter_dir} "
        f"(HTTP {resp.status_code}: {text}); check the adapter was trained on this base model"
    )


def unload_on_replica(base_url: str, lora_name: str, *, timeout_s: float = 60.0) -> float:
    started = time.monotonic()
    resp = _post(_root(base_url) + UNLOAD_PATH, {"lora_name": lora_name}, timeout_s)
    seconds = time.monotonic() - started
    if resp.status_code == 200:
        return seconds
    text = _error_text(resp)
    if resp.status_code == 404 and "Not Found" in text and "cannot be found" not in text:
        raise RuntimeLoraUnavailable(
            f"{base_url}: the runtime adapter API is off; redeploy without the adapter"
        )
    if resp.status_code == 404:
        raise AdapterError(f"{base_url}: adapter {lora_name!r} is not loaded there; see served_adapters()")
    raise AdapterError(f"{base_url}: vLLM refused to unload {lora_name!r} (HTTP {resp.status_code}: {text})")


def served_adapters(base_url: str) -> list[str]:
    """Adapter names a replica serves (the /v1/models entries that have a parent model)."""
    resp = httpx.get(_root(base_url) + "/v1/models", timeout=10.0)
    resp.raise_for_status()
    return sorted(m["id"] for m in resp.json().get("data", []) if m.get("parent"))


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


def _audit(action: str, subject: str, before: Any, after: Any, **links: Any) -> None:
    try:
        from tasks.store import audit
    except ImportError:  # the audit module ships with the store; without it there is nowhere to write
        return
    audit.record(None, action, subject, before, after, **links)


def hot_load(replica: Replica | str, adapter: AdapterVersion, *, name: str | None = None) -> AdapterChange:
    """Load an adapter version into one running replica (no store, no endpoint); audited."""
    base_url = replica if isinstance(replica, str) else replica.base_url
    lora_name = name or adapter.default_serving_name
    seconds = load_on_replica(base_url, lora_name, adapter.adapter_dir)
    _audit(
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
    _audit("adapter.unload", f"replica:{base_url}", {"adapter": lora_name}, None)
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


def _live(endpoint: str) -> tuple[Any, Any, list[Any]]:
    """(endpoint row, live revision row, up replicas) from the store."""
    from tasks import store

    e = store.get_endpoint(endpoint)
    if e.live_revision_id is None:
        raise ConfigError("endpoint", endpoint, "has no live revision; deploy it first (llmhost deploy)")
    rev = next(r for r in store.list_revisions(endpoint) if r.id == e.live_revision_id)
    reps = [r for r in store.list_replicas(endpoint) if r.state == "up"]
    if not reps:
        raise ServingError(
            f"endpoint {endpoint!r}: no replica of the live revision is up; see `llmhost endpoints list`"
        )
    return e, rev, reps


def _set_adapters(
    endpoint: str, revision_id: int, change: dict[str, str | None], action: str, after: dict[str, Any]
) -> dict[str, str]:
    """Record the live revision's adapter set and the audit entry in one transaction.

    The set maps the gateway's adapter name (`endpoint:<name>`) to the name vLLM serves it under, which is
    what the gateway rewrites `model` to; here both are the same. The version lives in the audit entry.
    """
    from tasks import store
    from tasks.store import audit

    with store.session_scope() as s:
        rev = s.get(store.EndpointRevision, revision_id)
        if rev is None:
            raise ServingError(
                f"endpoint {endpoint!r}: revision {revision_id} is gone; see `llmhost endpoints list`"
            )
        before = dict(rev.adapters or {})
        new = dict(before)
        for k, v in change.items():
            if v is None:
                new.pop(k, None)
            else:
                new[k] = v
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


def _revision_lora(rev: Any) -> tuple[bool | None, int | None]:
    """(LoRA enabled?, --max-lora-rank) from the revision's vLLM args; None if unknown (attached servers)."""
    vllm = (rev.spec or {}).get("vllm")
    if not isinstance(vllm, dict):
        return None, None
    return bool(vllm.get("enable_lora") or vllm.get("lora_modules")), vllm.get("max_lora_rank")


def _runtime_unsafe(rev: Any) -> str:
    """Why runtime (un)loading would leave replicas disagreeing, or "" when it is safe."""
    if ((rev.spec or {}).get("spec") or {}).get("target") == "ray":
        # One gateway row is a whole Serve application: a runtime call reaches one of its replicas, and the
        # replicas Serve adds (autoscaling) or replaces (failed health check) start from the revision's
        # command line. The adapter set has to be in that command line.
        return "a Ray Serve revision starts its replicas from the revision's --lora-modules"
    return ""


def _redeploy(endpoint: str, rev: Any, adapters: dict[str, str | None], max_rank: int | None) -> Any:
    """Blue/green through the endpoint deploy path, with the adapter set changed in the spec."""
    from tasks.deploy import EndpointSpec, deploy

    raw = dict((rev.spec or {}).get("spec") or {})
    if not raw:
        raise ServingError(
            f"endpoint {endpoint!r}: the live revision has no spec to redeploy from; deploy it with "
            "`llmhost deploy` first"
        )
    spec = EndpointSpec.model_validate(raw)
    new = dict(spec.adapters)
    for k, v in adapters.items():
        if v is None:
            new.pop(k, None)
        else:
            new[k] = v
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
    from tasks import store
    from tasks.store import audit

    with store.deploy_lease(endpoint, actor=audit.default_actor()):
        return _load_into_endpoint(endpoint, version, name=name, allow_restart=allow_restart)


def _load_into_endpoint(endpoint: str, version: str, *, name: str | None, allow_restart: bool) -> AdapterChange:
    _, rev, reps = _live(endpoint)
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
        reason = _runtime_unsafe(rev)
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
    _audit(
        "adapter.load",
        f"endpoint:{endpoint}",
        None,
        {
            "adapter": lora_name,
            "version": adapter.ref,
            "method": "restart",
            "reason": reason,
            "outcome": getattr(result, "outcome", None),
            "seconds": seconds,
        },
        endpoint=endpoint,
    )
    if getattr(result, "outcome", "live") not in ("live", "unchanged"):
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
        replicas=[r.base_url for r in getattr(result, "replicas", [])],
        note=f"runtime loading unavailable ({reason}); redeployed blue/green",
    )


def unload_from_endpoint(endpoint: str, version_or_name: str, *, allow_restart: bool = True) -> AdapterChange:
    """Unload an adapter (by served name, or by version) from every live replica; fall back to blue/green."""
    from tasks import store
    from tasks.store import audit

    with store.deploy_lease(endpoint, actor=audit.default_actor()):
        return _unload_from_endpoint(endpoint, version_or_name, allow_restart=allow_restart)


def _unload_from_endpoint(endpoint: str, version_or_name: str, *, allow_restart: bool) -> AdapterChange:
    _, rev, reps = _live(endpoint)
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
        if why := _runtime_unsafe(rev):
            raise RuntimeLoraUnavailable(why)
        for r in reps:
            unload_on_replica(r.base_url, lora_name)
    except RuntimeLoraUnavailable as exc:
        if not allow_restart:
            raise
        result = _redeploy(endpoint, rev, {lora_name: None}, None)
        seconds = round(time.monotonic() - started, 3)
        _audit(
            "adapter.unload",
            f"endpoint:{endpoint}",
            {"adapter": lora_name},
            {"method": "restart", "reason": str(exc), "outcome": getattr(result, "outcome", None)},
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


# ---------------------------------------------------------------------------------------------- tasks


def _unreachable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only when a replica could not be reached; a refused adapter stays refused."""
    try:
        state.result()
    except ReplicaUnreachable:
        return True
    except Exception:
        return False
    return False


@task(name="load-adapter", retries=2, retry_delay_seconds=5, retry_condition_fn=_unreachable)
def load_adapter_task(endpoint: str, version: str, name: str | None = None) -> AdapterChange:
    return load_into_endpoint(endpoint, version, name=name)


@task(name="unload-adapter", retries=2, retry_delay_seconds=5, retry_condition_fn=_unreachable)
def unload_adapter_task(endpoint: str, version_or_name: str) -> AdapterChange:
    return unload_from_endpoint(endpoint, version_or_name)
