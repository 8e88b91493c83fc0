"""Endpoints as versioned specs: plan a revision, size it, start replicas, smoke-test, switch blue/green.

A revision is immutable: the spec with its model pinned to the resolved version, the rendered vLLM args and
the runtime version, named by a content hash. Traffic moves to a new revision only after every replica passes
its smoke test; the old revision keeps serving until then, and is drained before it is stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field, field_validator, model_validator

from tasks import store
from tasks.store import audit
from tasks.core.errors import ConfigError, DeployError, ReplicaStartError
from tasks.core.inputs import load_yaml_model
from tasks.serving.base import Dtype, KvCacheDtype, Quantization, Replica, Target, VllmArgs
from tasks.serving.local import LocalTarget, has_cuda_gpu
from tasks.serving.ray import RaySettings, RayTarget, device_for
from tasks.smoke import SmokeConfig, SmokeReport, run_smoke

# Tool-call parser by architecture, used when the chat template's markup does not name the format (the
# registry reads that markup first; a template's own format wins over its architecture's usual one).
# Source: vLLM docs, "Tool Calling" (https://docs.vllm.ai/en/latest/features/tool_calling.html), which lists
# the parser per model family; parser names as registered in vllm/tool_parsers/__init__.py (vLLM 0.32).
ARCH_TOOL_PARSERS: dict[str, str] = {
    "Qwen2ForCausalLM": "hermes",  # Qwen2.5 instruct templates use <tool_call>
    "Qwen3ForCausalLM": "hermes",
    "Qwen3MoeForCausalLM": "hermes",
    "LlamaForCausalLM": "llama3_json",  # Llama 3.1 / 3.2 JSON tool calls
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mistral",
    "Llama4ForConditionalGeneration": "llama4_pythonic",
    "GraniteForCausalLM": "granite",
    "InternLM2ForCausalLM": "internlm",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Phi3ForCausalLM": "phi4_mini_json",
    "GptOssForCausalLM": "openai",
}

# Environment of every replica the deploy path starts (on top of LocalTarget's own).
# - VLLM_HTTP_TIMEOUT_KEEP_ALIVE: vLLM closes idle keep-alive connections after 5 s, the period of the
#   gateway's health probes and of httpx's default pool expiry. A probe then races the server's close, fails
#   with "Server disconnected", and the gateway marks a healthy replica down for a whole probe period
#   (measured: 201 of 2,532 requests got a 503 in a switch test). Replicas keep idle connections longer than
#   any client pool here (the gateway's is 60 s), so the client side always closes first.
# - VLLM_CPU_OMP_THREADS_BIND=nobind: by default the CPU runtime pins every replica's worker to the same core
#   (core 0 of 2 here, the other one "reserved"), so during a blue/green switch the new replica's worker
#   queues behind the old one serving traffic (measured: worker spawn took 13 min instead of ~1). Unpinned,
#   the OS spreads them. No effect on GPU replicas.
REPLICA_ENV = {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "75", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}

# Revision fields that describe the endpoint rather than what runs: they never change a revision's identity.
_COSMETIC = {"description", "usage_notes", "owner", "access"}


class DeployStartError(DeployError):
    """A replica of the new revision did not start; the old revision keeps serving (retryable)."""


class ToolCallingExplicit(BaseModel):
    model_config = {"extra": "forbid"}

    parser: str = Field(description="vLLM --tool-call-parser, e.g. hermes.")
    chat_template: str | None = Field(default=None, description="Path to a Jinja template with tool support.")


class SpecVllm(BaseModel):
    """The vLLM args a spec may set; `model` and `served_model_name` come from the revision."""

    model_config = {"extra": "forbid"}

    max_model_len: int | None = Field(default=None, gt=0)
    dtype: Dtype = "auto"
    tensor_parallel_size: int | Literal["auto"] = "auto"
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    kv_cache_dtype: KvCacheDtype = "auto"
    quantization: Quantization | None = None
    enforce_eager: bool = False
    max_num_seqs: int | None = Field(default=None, gt=0)
    max_lora_rank: int | None = Field(default=None, gt=0)
    extra_args: list[str] = Field(default_factory=list)


class Access(BaseModel):
    model_config = {"extra": "forbid"}

    users: list[str] = Field(default_factory=list)
    teams: list[str] = Field(default_factory=list)


class EndpointSpec(BaseModel):
    """One endpoint, as written in deployments/<name>.yaml."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="What clients send as `model`.")
    description: str | None = None
    usage_notes: str | None = None
    owner: str | None = None
    model: str = Field(description="models:/NAME@ALIAS or models:/NAME/VERSION")
    target: Literal["local", "ray"] = "local"
    replicas: int = Field(default=1, ge=1, le=16)
    ray: RaySettings | None = Field(
        default=None, description="target: ray only: the cluster's dashboard URL, replica bounds and placement."
    )
    hardware: str = Field(default="auto", description="A tier name from the catalog, or auto.")
    concurrency: int = Field(default=4, ge=1, description="Expected concurrent sequences, for sizing.")
    vllm: SpecVllm = Field(default_factory=SpecVllm)
    tool_calling: Literal["auto", "off"] | ToolCallingExplicit = "auto"
    adapters: dict[str, str] = Field(default_factory=dict, description="Adapter name -> models:/ ref.")
    access: Access = Field(default_factory=Access)
    smoke: SmokeConfig = Field(default_factory=SmokeConfig)

    @field_validator("model")
    @classmethod
    def _model_ref(cls, v: str) -> str:
        if not v.startswith("models:/"):
            raise ValueError("use models:/NAME@ALIAS or models:/NAME/VERSION (register the model first)")
        return v

    @model_validator(mode="after")
    def _target_settings(self) -> EndpointSpec:
        if self.ray is not None and self.target != "ray":
            raise ValueError("ray: is set but target is local; set target: ray, or remove the ray block")
        if self.target == "ray":
            self.ray = self.ray or RaySettings()
            # Ray Serve owns the replica count (ray.min_replicas..max_replicas); two numbers that disagree
            # would leave one of them silently ignored.
            if self.replicas not in (1, self.ray.min_replicas):
                raise ValueError(
                    f"replicas={self.replicas} with target: ray; set ray.min_replicas (and ray.max_replicas) "
                    "instead and leave replicas out"
                )
        return self

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, ref in v.items():
            if ":" in name or not name:
                raise ValueError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (no ':')")
            if not ref.startswith("models:/"):
                raise ValueError(f"adapter {name!r}: use models:/NAME/VERSION of an adapter version")
        return v


def load_spec(path: str | Path) -> EndpointSpec:
    """Reads and validates a spec; errors name the file, the field and the problem."""
    return load_yaml_model(path, EndpointSpec, field="spec", example="an endpoint YAML, e.g. deployments/demo.yaml")


# ---------------------------------------------------------------------------------------------- planning


class RevisionPlan(BaseModel):
    """Everything needed to start a revision. `identity` is what the content hash is taken over."""

    endpoint: str
    content_hash: str
    model_version: str = Field(description="NAME/VERSION that was resolved (an adapter version if it is one).")
    base_version: str | None = Field(default=None, description="NAME/VERSION of the base, for adapter versions.")
    model_dir: str
    served_model_name: str = Field(description="What the gateway sends as `model` for plain `<endpoint>`.")
    vllm: VllmArgs
    runtime: str
    tool_call_parser: str | None = None
    tool_calling: str = Field(description="The decision and why, e.g. 'hermes: from the chat template'.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Gateway adapter name -> vLLM name.")
    identity: dict[str, Any]


def choose_tool_calling(spec: EndpointSpec, tags: dict[str, str], architectures: list[str]) -> tuple[str | None, str]:
    """(parser or None, why) for the spec's tool_calling setting and the model's chat template."""
    if spec.tool_calling == "off":
        return None, "off: disabled in the spec"
    if isinstance(spec.tool_calling, ToolCallingExplicit):
        return spec.tool_calling.parser, f"{spec.tool_calling.parser}: set in the spec"
    supports = tags.get("template_supports_tools", "").lower() == "true"
    guess = tags.get("tool_call_format", "unknown")
    if not supports:
        return None, "off: the model's chat template does not support tools"
    if guess not in {"unknown", "none", ""}:
        return guess, f"{guess}: from the chat template's tool-call markup"
    for arch in architectures:
        if arch in ARCH_TOOL_PARSERS:
            return ARCH_TOOL_PARSERS[arch], f"{ARCH_TOOL_PARSERS[arch]}: from architecture {arch}"
    return None, (
        "off: the template supports tools but no known parser matches its format or architecture "
        f"{architectures}; set tool_calling: {{parser: NAME}}"
    )


def runtime_version() -> str:
    """The serving runtime's version, read from its venv's files (the control plane never imports vLLM)."""
    from tasks.size.io import runtime_facts

    version = getattr(runtime_facts(), "vllm_version", None)
    return f"vllm {version}" if version else "vllm (version unknown)"


def _architectures(tags: dict[str, str]) -> list[str]:
    raw = tags.get("architectures", "")
    if raw.startswith("["):
        return list(json.loads(raw))
    return [a for a in raw.split(",") if a]


def _version_ref(model_version: str) -> str:
    return f"models:/{model_version}"


def _tier_device_count(hardware: str) -> int:
    """Devices of a named GPU tier (tensor_parallel_size auto); 1 for cpu, auto and unknown names."""
    if hardware == "auto":
        return 1
    from tasks.size.io import load_tiers

    for tier in load_tiers():
        if tier.name == hardware:
            return tier.count if tier.device == "gpu" else 1
    raise ConfigError(
        "hardware",
        hardware,
        "use a tier name from `llmhost size --help` / tasks/tiers.yaml (or LLMHOST_TIERS_FILE), or auto",
    )


def plan_revision(spec: EndpointSpec) -> RevisionPlan:
    """Resolves the model alias and adapters and renders the vLLM args; starts nothing.

    A model version that is a LoRA adapter (tag adapter=true) runs as its base version's weights plus
    `--enable-lora --lora-modules <adapter>=<dir>`, and the endpoint's plain name is routed to the adapter.
    """
    from tasks.deploy.adapters import resolve_adapter
    from tasks.register import get_version, resolve_model_ref

    mv = get_version(spec.model)  # tags first: an adapter version has no full model folder to resolve
    model_version = f"{mv.name}/{mv.version}"
    tags = dict(mv.tags)
    lora_modules: dict[str, str] = {}  # vLLM name -> adapter dir
    lora_versions: dict[str, str] = {}  # vLLM name -> NAME/VERSION (paths stay out of the identity)
    ranks: list[int] = []
    base_version: str | None = None
    model_hash = {"model": tags.get("content_hash")}
    if tags.get("adapter") == "true":
        adapter = resolve_adapter(_version_ref(model_version))
        if not adapter.base_version:
            raise ConfigError(
                "model",
                spec.model,
                f"version {model_version} is an adapter without a base_version "
                "tag; re-register it with `llmhost finetune`",
            )
        base = resolve_model_ref(f"models:/{adapter.name}/{adapter.base_version}")
        base_version = f"{base.name}/{base.version}"
        model_dir = base.local_dir
        served = adapter.default_serving_name
        base_served = f"{base.name}-v{base.version}"
        lora_modules[served] = str(adapter.adapter_dir)
        lora_versions[served] = model_version
        ranks.append(adapter.lora_rank)
        model_hash = {"model": tags.get("content_hash"), "base": dict(base.tags).get("content_hash")}
        tool_tags = {
            **dict(base.tags),
            **{k: v for k, v in tags.items() if k in ("template_supports_tools", "tool_call_format", "architectures")},
        }
    else:
        model_dir = resolve_model_ref(_version_ref(model_version)).local_dir
        served = base_served = spec.name
        tool_tags = tags
    parser, why = choose_tool_calling(spec, tool_tags, _architectures(tool_tags))

    adapters: dict[str, str] = {}
    adapter_versions: dict[str, str] = {}
    for name, ref in sorted(spec.adapters.items()):
        a = resolve_adapter(ref)
        want = base_version or model_version
        if f"{a.name}/{a.base_version}" != want:
            raise ConfigError(
                f"adapters.{name}",
                ref,
                f"is an adapter on {a.name}/{a.base_version}, but the "
                f"endpoint serves {want}; fine-tune on {want} or pick a matching adapter",
            )
        if name in lora_modules:
            raise ConfigError(f"adapters.{name}", ref, f"clashes with the endpoint's own adapter name {name!r}")
        lora_modules[name] = str(a.adapter_dir)
        lora_versions[name] = f"{a.name}/{a.version}"
        adapter_versions[name] = f"{a.name}/{a.version}"
        adapters[name] = name
        ranks.append(a.lora_rank)

    v = spec.vllm
    dtype = v.dtype if (v.dtype != "auto" or has_cuda_gpu()) else "float32"  # CPU attention runs fp32
    tp = _tier_device_count(spec.hardware) if v.tensor_parallel_size == "auto" else v.tensor_parallel_size
    max_rank = max([v.max_lora_rank or 0, *ranks]) or None
    args = VllmArgs(
        model=str(model_dir),
        served_model_name=base_served,
        max_model_len=v.max_model_len,
        dtype=dtype,
        tensor_parallel_size=tp,
        gpu_memory_utilization=v.gpu_memory_utilization,
        kv_cache_dtype=v.kv_cache_dtype,
        quantization=v.quantization,
        enforce_eager=v.enforce_eager,
        max_num_seqs=v.max_num_seqs,
        enable_lora=bool(lora_modules) or v.max_lora_rank is not None,
        lora_modules=lora_modules,
        max_lora_rank=max_rank,
        enable_auto_tool_choice=parser is not None,
        tool_call_parser=parser,
        chat_template=spec.tool_calling.chat_template if isinstance(spec.tool_calling, ToolCallingExplicit) else None,
        extra_args=v.extra_args,
    )
    runtime = runtime_version()
    # The spec as it runs: model and adapters pinned to the versions they resolved to, so that the alias a
    # spec names does not matter (same version = same revision) and rollback redeploys exactly this.
    pinned = spec.model_copy(
        update={
            "model": _version_ref(model_version),
            "adapters": {k: _version_ref(x) for k, x in adapter_versions.items()},
        }
    )
    identity = {
        # `ray` only when set, so that local revisions keep the hashes they had before the ray target existed.
        "spec": pinned.model_dump(mode="json", exclude=_COSMETIC | ({"ray"} if pinned.ray is None else set())),
        "model_version": model_version,
        "base_version": base_version,
        "adapters": adapter_versions,
        "served_model_name": served,
        "vllm": {**args.model_dump(mode="json", exclude={"model"}), "lora_modules": lora_versions},
        "runtime": runtime,
        "content_hashes": model_hash,
        "tool_calling": why,
    }
    return RevisionPlan(
        endpoint=spec.name,
        content_hash=store.spec_hash(identity),
        model_version=model_version,
        base_version=base_version,
        model_dir=str(model_dir),
        served_model_name=served,
        vllm=args,
        runtime=runtime,
        tool_call_parser=parser,
        tool_calling=why,
        adapters=adapters,
        identity=identity,
    )


def pinned_spec(rev: store.EndpointRevision) -> EndpointSpec:
    """The spec a stored revision was planned from, with its model and adapters pinned to versions."""
    raw = (rev.spec or {}).get("spec")
    if not isinstance(raw, dict):
        raise ConfigError(
            "revision",
            rev.content_hash[:12],
            "was not deployed from a spec (attached server); deploy a spec with `llmhost deploy`",
        )
    return EndpointSpec.model_validate(raw)


# ---------------------------------------------------------------------------------------------- sizing


class SizingOutcome(BaseModel):
    fits: bool
    tier: str
    explanation: str
    reason: str | None = Field(default=None, description="Why it was refused, one line.")
    kv_capacity_tokens: int | None = None


def size_plan(plan: RevisionPlan, spec: EndpointSpec) -> SizingOutcome:
    """Sizes the revision on the spec's tier (auto: this machine's CPU tier, or the cheapest GPU tier)."""
    from tasks.size.io import make_request, size_model

    tier = spec.hardware
    if tier == "auto" and spec.target == "local" and not has_cuda_gpu():
        tier = "cpu"  # the local target can only run on this machine
    v = plan.vllm
    request = make_request(
        dtype=v.dtype,
        quantization=v.quantization,
        kv_cache_dtype="fp8" if v.kv_cache_dtype.startswith("fp8") else "auto",
        max_model_len=v.max_model_len,
        concurrency=spec.concurrency,
        gpu_memory_utilization=v.gpu_memory_utilization,
        tier=None if tier == "auto" else tier,
        tensor_parallel_size=spec.vllm.tensor_parallel_size,
        max_num_seqs=v.max_num_seqs,
        enforce_eager=v.enforce_eager,
    )
    estimate = size_model(plan.model_dir, request)
    chosen = estimate.recommendation.tier
    if not estimate.fits:
        why = next(
            (
                ln.strip().removeprefix("**Does not fit:**").strip().rstrip(".")
                for ln in estimate.explanation.splitlines()
                if ln.startswith("**Does not fit:**")
            ),
            "",
        )
        reason = f"does not fit hardware {chosen!r}" + (f": {why}" if why else "")
        return SizingOutcome(fits=False, tier=chosen, explanation=estimate.explanation, reason=reason)
    gpu_tier = estimate.recommendation.gpus > 0
    if spec.target == "local" and gpu_tier and not has_cuda_gpu():
        return SizingOutcome(
            fits=False,
            tier=chosen,
            explanation=estimate.explanation,
            reason=f"hardware {chosen!r} is a GPU tier, but this machine has no GPU "
            "(nvidia-smi lists none); use hardware: cpu or auto here",
        )
    return SizingOutcome(
        fits=True,
        tier=chosen,
        explanation=estimate.explanation,
        kv_capacity_tokens=estimate.kv_capacity_tokens,
    )


# ---------------------------------------------------------------------------------------------- replicas


def _as_replica(row: store.ReplicaRow) -> Replica:
    host_port = row.base_url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    return Replica(
        name=row.name,
        base_url=row.base_url,
        host=host or "127.0.0.1",
        port=int(port or 0),
        pid=row.pid,
        log_path=row.log_path,
        served_model_name=row.served_model_name,
        state="up",
        target=row.target,
    )


def target_for(spec: EndpointSpec) -> Target:
    """The serving target a spec names; the ray one carries the spec's cluster address and scaling."""
    if spec.target == "ray":
        return RayTarget(spec.ray or RaySettings(), device=device_for(spec.hardware))
    return LocalTarget()


def _row_target(endpoint: str, row: store.ReplicaRow) -> Target:
    """The target that runs a stored replica; a Ray application's cluster is in its revision's pinned spec."""
    if row.target != "ray":
        return LocalTarget()
    rev = next(r for r in store.list_revisions(endpoint) if r.id == row.revision_id)
    return target_for(pinned_spec(rev))


def _rows_per_revision(spec: EndpointSpec) -> int:
    """Store rows (gateway upstreams) a live revision has: one per process, or one Ray application."""
    return 1 if spec.target == "ray" else spec.replicas


def start_replicas(
    plan: RevisionPlan,
    revision_id: int,
    replicas: int,
    *,
    actor: str,
    register: bool = True,
    target: Target | None = None,
) -> tuple[list[Replica], list[int]]:
    """Starts every replica of the plan, recorded as `starting`; on a failed start, stops the ones already up.

    `register=False` defers the store rows (used when the revision is already live: rows of a live revision
    take traffic at once, and these have not passed their smoke test yet).
    """
    target = target or LocalTarget()
    started: list[Replica] = []
    row_ids: list[int] = []
    try:
        for i in range(replicas):
            r = target.start(plan.vllm, name=f"{plan.endpoint}-{plan.content_hash[:8]}-{i}", env=REPLICA_ENV)
            started.append(r)
            if register:
                row_ids.append(_register(plan, revision_id, r, "starting", actor).id)
    except Exception:
        for r in started:
            target.stop(r)
        for rid in row_ids:
            store.set_replica_state(rid, "failed", actor=actor)
        raise
    return started, row_ids


def _register(plan: RevisionPlan, revision_id: int, r: Replica, state: str, actor: str) -> store.ReplicaRow:
    row = store.add_replica(
        plan.endpoint,
        revision_id,
        base_url=r.base_url,
        served_model_name=r.served_model_name,
        name=r.name,
        state=state,
        kv_cache_tokens=r.kv_cache_tokens,
        pid=r.pid,
        log_path=r.log_path,
        target=r.target,
        actor=actor,
    )
    return row


def in_flight(root: str) -> int | None:
    """Running + waiting requests from vLLM's /metrics; None when the replica does not answer."""
    try:
        text = httpx.get(f"{root}/metrics", timeout=2.0).text
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            total += float(line.rsplit(" ", 1)[-1])
    return int(total)


class DrainReport(BaseModel):
    replica: str
    waited_s: float
    max_in_flight: int
    timed_out: bool


def drain_and_stop(
    endpoint: str,
    rows: list[store.ReplicaRow],
    *,
    actor: str,
    reload_s: float = 1.0,
    quiet_s: float = 1.0,
    timeout_s: float = 120.0,
) -> list[DrainReport]:
    """Stops the given (old) replicas once no request can reach them and none is still running on them.

    The route already points elsewhere. Gateways pick that up on their next request (SQLite store) or within
    their 0.25 s epoch poll; `reload_s` covers that, and a request that picked an old replica just before the
    switch shows up in vLLM's running/waiting gauges, which must then stay at 0 for `quiet_s`.
    """
    time.sleep(reload_s)
    reports = []
    for row in rows:
        root = row.base_url.removesuffix("/v1")
        t0 = time.monotonic()
        deadline, idle_since, peak, timed_out = t0 + timeout_s, None, 0, False
        while True:
            busy = in_flight(root)
            peak = max(peak, busy or 0)
            now = time.monotonic()
            if not busy:
                idle_since = idle_since or now
                if now - idle_since >= quiet_s or busy is None:
                    break
            else:
                idle_since = None
            if now > deadline:
                timed_out = True
                break
            time.sleep(0.1)
        if row.managed:
            _row_target(endpoint, row).stop(_as_replica(row))
        store.set_replica_state(row.id, "stopped", actor=actor)
        reports.append(
            DrainReport(
                replica=row.name,
                waited_s=round(time.monotonic() - t0, 2),
                max_in_flight=peak,
                timed_out=timed_out,
            )
        )
    return reports


def apply_access(spec: EndpointSpec, *, actor: str) -> None:
    for user in spec.access.users:
        store.grant(spec.name, user=user, actor=actor)
    for team in spec.access.teams:
        store.grant(spec.name, team=team, actor=actor)


def _healthy(row: store.ReplicaRow) -> bool:
    try:
        return httpx.get(row.base_url.removesuffix("/v1") + "/health", timeout=3.0).status_code == 200
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------------------------------------- deploy


Outcome = Literal["live", "unchanged", "failed", "refused"]


class DeployResult(BaseModel):
    endpoint: str
    revision: str
    outcome: Outcome
    message: str
    previous: str | None = Field(default=None, description="The revision that was live before (short hash).")
    replicas: list[Replica] = Field(default_factory=list)
    smoke: list[SmokeReport] = Field(default_factory=list)
    sizing_markdown: str | None = None
    tool_calling: str | None = None
    drain: list[DrainReport] = Field(default_factory=list)
    seconds: float = 0.0


def _live(endpoint: str) -> store.EndpointRevision | None:
    e = store.get_endpoint(endpoint)
    if e.live_revision_id is None:
        return None
    return next((r for r in store.list_revisions(endpoint) if r.id == e.live_revision_id), None)


def deploy(spec: EndpointSpec, *, actor: str | None = None, force: bool = False) -> DeployResult:
    """Plan -> size -> start -> smoke -> switch (blue/green) -> drain the old revision; each step audited.

    One deploy per endpoint at a time: a second one (another shell, a scheduled retrain) is refused with
    `store.DeployInProgress`, naming the holder, before it creates anything.
    """
    actor = actor or audit.default_actor()
    with store.deploy_lease(spec.name, actor=actor):
        return _deploy(spec, actor=actor, force=force)


def _deploy(spec: EndpointSpec, *, actor: str, force: bool) -> DeployResult:
    t0 = time.monotonic()
    name = spec.name
    store.upsert_endpoint(
        name, description=spec.description, usage_notes=spec.usage_notes, owner=spec.owner, actor=actor
    )
    apply_access(spec, actor=actor)
    plan = plan_revision(spec)
    short = plan.content_hash[:12]
    live = _live(name)
    old_hash = live.content_hash if live else None

    def done(outcome: Outcome, message: str, **kw: Any) -> DeployResult:
        return DeployResult(
            endpoint=name,
            revision=short,
            outcome=outcome,
            message=message,
            previous=old_hash[:12] if old_hash else None,
            tool_calling=plan.tool_calling,
            seconds=round(time.monotonic() - t0, 1),
            **kw,
        )

    same = old_hash == plan.content_hash
    if same and not force:
        up = [r for r in store.list_replicas(name) if r.state == "up" and _healthy(r)]
        if up and len(up) >= _rows_per_revision(spec) and store.get_endpoint(name).status == "active":
            audit.record(
                actor,
                "deploy.noop",
                f"endpoint:{name}",
                after={"revision": short, "replicas": len(up)},
                endpoint=name,
                revision=short,
            )
            return done(
                "unchanged",
                f"revision {short} is already live on {len(up)} healthy replica(s); "
                "nothing to do (change the spec, or pass --force to restart it)",
            )

    rev = store.add_revision(
        name,
        plan.identity,
        served_model_name=plan.served_model_name,
        adapters=plan.adapters,
        model_version=plan.model_version,
        status="pending",
        actor=actor,
    )
    audit.record(
        actor,
        "deploy.plan",
        f"endpoint:{name}",
        before={"revision": old_hash[:12] if old_hash else None},
        after={
            "revision": short,
            "model_version": plan.model_version,
            "base_version": plan.base_version,
            "served_model_name": plan.served_model_name,
            "tool_calling": plan.tool_calling,
            "runtime": plan.runtime,
            "args": plan.vllm.to_cli()[2:],
        },
        endpoint=name,
        revision=short,
        model_version=plan.model_version,
    )

    try:
        sizing = size_plan(plan, spec)
    except ConfigError as exc:
        store.set_revision_status(name, rev.id, "failed", reason=f"sizing refused it: {exc}", actor=actor)
        audit.record(
            actor,
            "deploy.size",
            f"endpoint:{name}",
            after={"fits": False, "error": str(exc)},
            endpoint=name,
            revision=short,
        )
        raise
    audit.record(
        actor,
        "deploy.size",
        f"endpoint:{name}",
        after={
            "fits": sizing.fits,
            "tier": sizing.tier,
            "reason": sizing.reason,
            "kv_capacity_tokens": sizing.kv_capacity_tokens,
        },
        endpoint=name,
        revision=short,
    )
    if not sizing.fits:
        store.set_revision_status(name, rev.id, "failed", reason=sizing.reason, actor=actor)
        return done(
            "refused",
            f"revision {short} {sizing.reason}; nothing was started"
            f"{' and the old revision keeps serving' if old_hash else ''}",
            sizing_markdown=sizing.explanation,
        )

    store.set_revision_status(name, rev.id, "starting", reason="", actor=actor)
    try:
        replicas, row_ids = start_replicas(
            plan, rev.id, _rows_per_revision(spec), actor=actor, register=not same, target=target_for(spec)
        )
    except Exception as exc:
        store.set_revision_status(name, rev.id, "failed", reason=f"replica start failed: {exc}"[:2000], actor=actor)
        audit.record(
            actor,
            "deploy.start",
            f"endpoint:{name}",
            after={"ok": False, "error": str(exc)[:2000]},
            endpoint=name,
            revision=short,
        )
        if not isinstance(exc, ReplicaStartError):
            raise
        raise DeployStartError(
            f"revision {short} failed to start; "
            f"{'the old revision keeps serving' if old_hash else 'nothing is serving'}: "
            f"{exc}"
        ) from exc
    audit.record(
        actor,
        "deploy.start",
        f"endpoint:{name}",
        after={
            "ok": True,
            "replicas": [
                {
                    "url": r.base_url,
                    "pid": r.pid,
                    "kv_cache_tokens": r.kv_cache_tokens,
                    "startup_seconds": r.startup_seconds,
                }
                for r in replicas
            ],
        },
        endpoint=name,
        revision=short,
    )

    reports = [
        run_smoke(
            r.base_url,
            plan.served_model_name,
            spec.smoke,
            tool_calling=plan.vllm.enable_auto_tool_choice,
            tool_call_parser=plan.tool_call_parser,
        )
        for r in replicas
    ]
    passed = all(rp.passed for rp in reports)
    audit.record(
        actor,
        "deploy.smoke",
        f"endpoint:{name}",
        after={
            "passed": passed,
            "replicas": [
                {
                    "url": rp.base_url,
                    "checks": [
                        {"name": c.name, "passed": c.passed, "detail": c.detail, "seconds": c.seconds}
                        for c in rp.checks
                    ],
                }
                for rp in reports
            ],
        },
        endpoint=name,
        revision=short,
    )
    target = target_for(spec)
    if not passed:
        failed = sorted({f"{c.name}: {c.detail}" for rp in reports for c in rp.failures()})
        for r in replicas:
            target.stop(r)
        for rid in row_ids:
            store.set_replica_state(rid, "stopped", actor=actor)
        reason = "smoke test failed: " + "; ".join(failed)
        if not same:
            store.set_revision_status(name, rev.id, "failed", reason=reason, actor=actor)
        audit.record(
            actor,
            "deploy.failed",
            f"endpoint:{name}",
            after={"reason": reason},
            endpoint=name,
            revision=short,
        )
        return done(
            "failed",
            f"revision {short} {reason}; new replicas stopped; "
            f"{'the old revision keeps serving' if old_hash else 'nothing is serving'}",
            smoke=reports,
            replicas=replicas,
            sizing_markdown=sizing.explanation,
        )

    # Switch: mark the new replicas up, then point the route at the revision (one epoch bump each).
    if same:
        old_rows = [r for r in store.list_replicas(name, rev.id) if r.state not in ("stopped", "failed")]
        for r in replicas:
            _register(plan, rev.id, r, "up", actor)
    else:
        old_rows = (
            [r for r in store.list_replicas(name, live.id) if r.state not in ("stopped", "failed")] if live else []
        )
        for rid in row_ids:
            store.set_replica_state(rid, "up", actor=actor)
    store.set_live_revision(name, rev.id, reason="smoke tests passed", actor=actor)
    store.set_revision_status(name, rev.id, "live", reason="smoke tests passed", actor=actor)
    if store.get_endpoint(name).status != "active":
        store.upsert_endpoint(name, status="active", actor=actor)
    drained: list[DrainReport] = []
    if old_rows:
        drained = drain_and_stop(name, old_rows, actor=actor)
        audit.record(
            actor,
            "deploy.drain",
            f"endpoint:{name}",
            before={"revision": old_hash[:12] if old_hash else None},
            after={"revision": short, "drained": [d.model_dump() for d in drained]},
            endpoint=name,
            revision=short,
        )
    return done(
        "live",
        f"revision {short} is live on "
        + (f"Ray Serve application {replicas[0].name}" if spec.target == "ray" else f"{len(replicas)} replica(s)")
        + (f"; {old_hash[:12]} drained and stopped" if old_hash and not same else ""),
        replicas=replicas,
        smoke=reports,
        sizing_markdown=sizing.explanation,
        drain=drained,
    )


def stop_endpoint(name: str, *, actor: str | None = None) -> int:
    """Stops every managed replica of every revision of the endpoint; returns how many were stopped."""
    actor = actor or audit.default_actor()
    store.get_endpoint(name)  # one-line error for an unknown name
    n = 0
    store.upsert_endpoint(name, status="stopped", actor=actor)  # the gateway refuses new requests first
    for rev in store.list_revisions(name):
        for row in store.list_replicas(name, rev.id):
            if row.state in ("stopped", "failed"):
                continue
            if row.managed:
                _row_target(name, row).stop(_as_replica(row))
                n += 1
            store.set_replica_state(row.id, "stopped", actor=actor)
        if rev.status == "live":
            store.set_revision_status(name, rev.id, "stopped", reason="endpoint stopped", actor=actor)
    audit.record(actor, "endpoint.stop", f"endpoint:{name}", after={"replicas_stopped": n}, endpoint=name)
    return n


def rollback(name: str, *, to: str | None = None, actor: str | None = None) -> DeployResult:
    """Redeploys the previous good revision (or `to`) through the same start -> smoke -> switch path."""
    actor = actor or audit.default_actor()
    revs = store.list_revisions(name)
    live = _live(name)
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
                created_at=rev.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                replicas=[
                    ReplicaView(
                        name=r.name,
                        state=r.state,
                        url=r.base_url,
                        kv_cache_tokens=r.kv_cache_tokens,
                        pid=r.pid,
                        log_path=r.log_path,
                    )
                    for r in store.list_replicas(name, rev.id)
                ],
            )
        )
    return out
