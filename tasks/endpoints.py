"""Endpoints as versioned specs: plan a revision, size it, start replicas, smoke-test, switch blue/green.

A revision is immutable: spec + resolved model version + rendered vLLM args + runtime version, named by a
content hash. Traffic moves to a new revision only after every replica passes its smoke test; the old
revision keeps serving until then, and is drained before it is stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from tasks import audit, store
from tasks.errors import ConfigError, DeployError
from tasks.serving.base import Dtype, KvCacheDtype, Quantization, Replica, VllmArgs
from tasks.serving.local import LocalTarget, has_cuda_gpu
from tasks.smoke import SmokeConfig, SmokeReport, run_smoke

# Tool-call parser by architecture, used when the chat template's markup does not tell (registry guesses
# from the template first). Source: vLLM docs, "Tool Calling" (docs.vllm.ai/en/latest/features/tool_calling).
ARCH_TOOL_PARSERS: dict[str, str] = {
    "Qwen2ForCausalLM": "hermes",
    "Qwen3ForCausalLM": "hermes",
    "Qwen3MoeForCausalLM": "hermes",
    "LlamaForCausalLM": "llama3_json",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mistral",
    "Llama4ForConditionalGeneration": "llama4_pythonic",
    "GraniteForCausalLM": "granite",
    "InternLM2ForCausalLM": "internlm",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Phi3ForCausalLM": "phi4_mini_json",
    "GptOssForCausalLM": "openai",
}


class ToolCallingExplicit(BaseModel):
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
    target: Literal["local"] = "local"
    replicas: int = Field(default=1, ge=1, le=16)
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


def load_spec(path: str | Path) -> EndpointSpec:
    """Reads and validates a spec; errors name the file, the field and the problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("spec", str(p), "give the path of an endpoint YAML, e.g. deployments/demo.yaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError("yaml", where, f"fix the YAML syntax ({getattr(exc, 'problem', exc)})", source=str(p)) from None
    try:
        return EndpointSpec.model_validate(raw or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(root)"
        raise ConfigError(field, err.get("input"), err["msg"], source=str(p)) from None


class RevisionPlan(BaseModel):
    """Everything needed to start a revision, hashed into its identity."""

    endpoint: str
    content_hash: str
    model_version: str = Field(description="NAME/VERSION")
    model_dir: str
    vllm: VllmArgs
    runtime: str
    tool_calling: str = Field(description="Parser in use, or 'off' with the reason.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Adapter name -> NAME/VERSION.")
    spec: dict[str, Any]


def choose_tool_calling(spec: EndpointSpec, tags: dict[str, str], architectures: list[str]) -> tuple[str | None, str]:
    """(parser or None, why) for the spec's tool_calling setting and the model's template."""
    if spec.tool_calling == "off":
        return None, "off: disabled in the spec"
    if isinstance(spec.tool_calling, ToolCallingExplicit):
        return spec.tool_calling.parser, f"{spec.tool_calling.parser}: set in the spec"
    supports = tags.get("template_supports_tools", "").lower() == "true"
    guess = tags.get("tool_call_format", "unknown")
    if not supports:
        return None, "off: the chat template does not support tools"
    if guess not in {"unknown", "none", ""}:
        return guess, f"{guess}: from the chat template's tool-call markup"
    for arch in architectures:
        if arch in ARCH_TOOL_PARSERS:
            return ARCH_TOOL_PARSERS[arch], f"{ARCH_TOOL_PARSERS[arch]}: from architecture {arch}"
    return None, "off: the template supports tools but no parser matches its format; set tool_calling.parser"


def runtime_version() -> str:
    try:
        from tasks.vllm_compat import runtime_info  # type: ignore[attr-defined]

        info = runtime_info()
        return f"vllm {getattr(info, 'vllm_version', info)}"
    except Exception:
        return "vllm (version unknown)"


def plan_revision(spec: EndpointSpec) -> RevisionPlan:
    """Resolves the model alias and adapters and renders the vLLM args; no process is started."""
    from tasks.registry import resolve_model_ref

    resolved = resolve_model_ref(spec.model)
    architectures = json.loads(resolved.tags.get("architectures", "[]")) if resolved.tags.get(
        "architectures", "").startswith("[") else [a for a in resolved.tags.get("architectures", "").split(",") if a]
    parser, why = choose_tool_calling(spec, resolved.tags, architectures)
    adapters: dict[str, str] = {}
    lora_modules: dict[str, str] = {}
    for adapter_name, ref in sorted(spec.adapters.items()):
        a = resolve_model_ref(ref)
        adapters[adapter_name] = f"{a.name}/{a.version}"
        lora_modules[adapter_name] = str(_adapter_dir(a.local_dir))
    v = spec.vllm
    dtype = v.dtype if (v.dtype != "auto" or has_cuda_gpu()) else "float32"  # CPU attention runs fp32
    tp = 1 if v.tensor_parallel_size == "auto" else v.tensor_parallel_size
    args = VllmArgs(
        model=str(resolved.local_dir), served_model_name=spec.name, max_model_len=v.max_model_len, dtype=dtype,
        tensor_parallel_size=tp, gpu_memory_utilization=v.gpu_memory_utilization, kv_cache_dtype=v.kv_cache_dtype,
        quantization=v.quantization, enforce_eager=v.enforce_eager, max_num_seqs=v.max_num_seqs,
        enable_lora=bool(lora_modules) or v.max_lora_rank is not None, lora_modules=lora_modules,
        max_lora_rank=v.max_lora_rank, enable_auto_tool_choice=parser is not None, tool_call_parser=parser,
        chat_template=spec.tool_calling.chat_template if isinstance(spec.tool_calling, ToolCallingExplicit) else None,
        extra_args=v.extra_args,
    )
    runtime = runtime_version()
    spec_dump = spec.model_dump(mode="json", exclude={"access", "description", "usage_notes", "owner"})
    identity = {"spec": spec_dump, "model_version": f"{resolved.name}/{resolved.version}",
                "vllm": args.model_dump(mode="json", exclude={"model"}), "runtime": runtime,
                "model_hash": resolved.tags.get("content_hash")}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return RevisionPlan(endpoint=spec.name, content_hash=digest, model_version=f"{resolved.name}/{resolved.version}",
                        model_dir=str(resolved.local_dir), vllm=args, runtime=runtime, tool_calling=parser or why,
                        adapters=adapters, spec=spec.model_dump(mode="json"))


def _adapter_dir(local_dir: Path) -> Path:
    """The folder holding adapter_config.json inside a resolved adapter version."""
    local_dir = Path(local_dir)
    if (local_dir / "adapter_config.json").exists():
        return local_dir
    found = sorted(local_dir.rglob("adapter_config.json"))
    if not found:
        raise DeployError(f"adapter at {local_dir} has no adapter_config.json: register a PEFT adapter version")
    return found[0].parent


class DeployResult(BaseModel):
    endpoint: str
    revision: str
    outcome: Literal["live", "unchanged", "failed", "refused"]
    message: str
    replicas: list[Replica] = Field(default_factory=list)
    smoke: list[SmokeReport] = Field(default_factory=list)
    sizing_markdown: str | None = None
    seconds: float = 0.0


def _live_hash(endpoint: str) -> str | None:
    try:
        e = store.get_endpoint(endpoint)
    except Exception:
        return None
    if e.live_revision_id is None:
        return None
    for rev in store.list_revisions(endpoint):
        if rev.id == e.live_revision_id:
            return rev.content_hash
    return None


def size_plan(plan: RevisionPlan, spec: EndpointSpec) -> tuple[bool, str]:
    """(fits, explanation markdown) for the revision on the spec's hardware (or the cheapest tier: auto)."""
    from tasks.sizing_io import make_request, size_model

    request = make_request(
        dtype=plan.vllm.dtype, quantization=plan.vllm.quantization, kv_cache_dtype=plan.vllm.kv_cache_dtype
        if plan.vllm.kv_cache_dtype in {"auto", "fp8"} else "fp8", max_model_len=plan.vllm.max_model_len,
        concurrency=spec.concurrency, gpu_memory_utilization=plan.vllm.gpu_memory_utilization,
        tier=None if spec.hardware == "auto" else spec.hardware,
        tensor_parallel_size=spec.vllm.tensor_parallel_size)
    estimate = size_model(plan.model_dir, request)
    return estimate.fits, estimate.explanation


def start_replicas(plan: RevisionPlan, replicas: int, *, actor: str, target: LocalTarget | None = None) -> list[Replica]:
    """Starts every replica of the plan; on a failed start, stops the ones already up and re-raises."""
    target = target or LocalTarget()
    started: list[Replica] = []
    try:
        for i in range(replicas):
            r = target.start(plan.vllm, name=f"{plan.endpoint}-{plan.content_hash[:8]}-{i}")
            started.append(r)
            store.add_replica(plan.endpoint, plan.content_hash, base_url=r.base_url, served_model_name=r.served_model_name,
                              name=r.name, state="up", kv_cache_tokens=r.kv_cache_tokens, pid=r.pid,
                              log_path=r.log_path, actor=actor)
    except Exception:
        for r in started:
            target.stop(r)
        raise
    return started


def drain_and_stop(endpoint: str, revision_hash: str, *, actor: str, quiet_s: float = 1.0,
                   timeout_s: float = 120.0) -> None:
    """Waits until the gateway moved off the old replicas and they finished in-flight work, then stops them."""
    from tasks.settings import get_settings

    rows = [r for r in store.list_replicas(endpoint, revision_hash) if r.managed and r.state != "stopped"]
    # Gateways reload routes when the store's epoch moves; give them one reload period before draining.
    time.sleep(min(get_settings().health_interval_s, 2.0))
    target = LocalTarget()
    for row in rows:
        root = row.base_url.removesuffix("/v1")
        deadline, idle_since = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            busy = _in_flight(root)
            if busy == 0:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= quiet_s:
                    break
            else:
                idle_since = None
            time.sleep(0.2)
        target.stop(Replica(name=row.name, base_url=row.base_url, host="127.0.0.1", port=0, pid=row.pid,
                            served_model_name=row.served_model_name, state="up"))
        store.set_replica_state(row.id, "stopped", actor=actor)


def _in_flight(root: str) -> int:
    """Running + waiting requests from vLLM's /metrics; 0 when the replica is gone."""
    try:
        text = httpx.get(f"{root}/metrics", timeout=2.0).text
    except httpx.HTTPError:
        return 0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            total += float(line.rsplit(" ", 1)[-1])
    return int(total)


def apply_access(spec: EndpointSpec, *, actor: str) -> None:
    for user in spec.access.users:
        store.ensure_user(user)
        store.grant(spec.name, user=user, actor=actor)
    for team in spec.access.teams:
        store.ensure_team(team)
        store.grant(spec.name, team=team, actor=actor)


def deploy(spec: EndpointSpec, *, actor: str | None = None, force: bool = False) -> DeployResult:
    """Plan -> size -> start -> smoke -> switch (blue/green) -> drain the old revision."""
    actor = actor or audit.default_actor()
    t0 = time.monotonic()
    store.upsert_endpoint(spec.name, description=spec.description, usage_notes=spec.usage_notes, owner=spec.owner,
                          actor=actor)
    apply_access(spec, actor=actor)
    plan = plan_revision(spec)
    short = plan.content_hash[:12]
    old_live = _live_hash(spec.name)
    if old_live == plan.content_hash and not force:
        alive = [r for r in store.list_replicas(spec.name) if r.state == "up"]
        if alive:
            return DeployResult(endpoint=spec.name, revision=short, outcome="unchanged",
                                message=f"revision {short} is already live on {len(alive)} replica(s); nothing to do")
    rev = store.add_revision(spec.name, plan.model_dump(mode="json"), served_model_name=spec.name,
                             adapters=plan.adapters, model_version=plan.model_version, status="pending", actor=actor)
    audit.record(actor, "deploy.plan", f"endpoint:{spec.name}", after={
        "revision": short, "model_version": plan.model_version, "tool_calling": plan.tool_calling,
        "args": plan.vllm.to_cli()[2:]}, endpoint=spec.name, revision=short)

    fits, explanation = size_plan(plan, spec)
    audit.record(actor, "deploy.size", f"endpoint:{spec.name}", after={"fits": fits}, endpoint=spec.name, revision=short)
    if not fits:
        store.set_revision_status(spec.name, rev.id, "failed", reason="does not fit the chosen hardware", actor=actor)
        return DeployResult(endpoint=spec.name, revision=short, outcome="refused", sizing_markdown=explanation,
                            message=f"revision {short} does not fit hardware={spec.hardware!r}; nothing was started",
                            seconds=round(time.monotonic() - t0, 1))

    store.set_revision_status(spec.name, rev.id, "starting", actor=actor)
    try:
        replicas = start_replicas(plan, spec.replicas, actor=actor)
    except Exception as exc:
        store.set_revision_status(spec.name, rev.id, "failed", reason=str(exc)[:2000], actor=actor)
        audit.record(actor, "deploy.start_failed", f"endpoint:{spec.name}", after={"error": str(exc)[:2000]},
                     endpoint=spec.name, revision=short)
        raise DeployError(f"revision {short} failed to start; the old revision keeps serving: {exc}") from exc
    audit.record(actor, "deploy.start", f"endpoint:{spec.name}", after={
        "replicas": [{"url": r.base_url, "kv_cache_tokens": r.kv_cache_tokens,
                      "startup_seconds": r.startup_seconds} for r in replicas]}, endpoint=spec.name, revision=short)

    reports = [run_smoke(r.base_url, spec.name, spec.smoke, tool_calling=plan.vllm.enable_auto_tool_choice,
                         tool_call_parser=plan.vllm.tool_call_parser) for r in replicas]
    passed = all(rp.passed for rp in reports)
    audit.record(actor, "deploy.smoke", f"endpoint:{spec.name}", after={
        "passed": passed, "checks": [[c.model_dump(exclude={"evidence"}) for c in rp.checks] for rp in reports]},
        endpoint=spec.name, revision=short)
    if not passed:
        failed = [f"{c.name}: {c.detail}" for rp in reports for c in rp.failures()]
        target = LocalTarget()
        for r in replicas:
            target.stop(r)
        for row in store.list_replicas(spec.name, rev.id):
            store.set_replica_state(row.id, "stopped", actor=actor)
        reason = "smoke test failed: " + "; ".join(failed)
        store.set_revision_status(spec.name, rev.id, "failed", reason=reason, actor=actor)
        return DeployResult(endpoint=spec.name, revision=short, outcome="failed", smoke=reports, replicas=replicas,
                            message=f"revision {short} {reason}; "
                                    f"{'the old revision keeps serving' if old_live else 'nothing is serving'}",
                            sizing_markdown=explanation, seconds=round(time.monotonic() - t0, 1))

    store.set_live_revision(spec.name, rev.id, reason="smoke tests passed", actor=actor)
    if old_live and old_live != plan.content_hash:
        drain_and_stop(spec.name, old_live, actor=actor)
        audit.record(actor, "deploy.drain", f"endpoint:{spec.name}", before={"revision": old_live[:12]},
                     after={"revision": short}, endpoint=spec.name, revision=short)
    return DeployResult(endpoint=spec.name, revision=short, outcome="live", replicas=replicas, smoke=reports,
                        sizing_markdown=explanation, seconds=round(time.monotonic() - t0, 1),
                        message=f"revision {short} is live on {len(replicas)} replica(s)")


def stop_endpoint(name: str, *, actor: str | None = None) -> int:
    """Stops every managed replica of every revision of the endpoint; returns how many were stopped."""
    actor = actor or audit.default_actor()
    target, n = LocalTarget(), 0
    for rev in store.list_revisions(name):
        for row in store.list_replicas(name, rev.id):
            if row.managed and row.state not in {"stopped"}:
                target.stop(Replica(name=row.name, base_url=row.base_url, host="127.0.0.1", port=0, pid=row.pid,
                                    served_model_name=row.served_model_name))
                store.set_replica_state(row.id, "stopped", actor=actor)
                n += 1
    store.upsert_endpoint(name, status="stopped", actor=actor)
    return n


def rollback(name: str, *, to: str | None = None, actor: str | None = None) -> DeployResult:
    """Redeploys the previous good revision (or `to`) through the same start -> smoke -> switch path."""
    actor = actor or audit.default_actor()
    revs = store.list_revisions(name)
    live = _live_hash(name)
    if to:
        cands = [r for r in revs if r.content_hash.startswith(to)]
        if len(cands) != 1:
            raise ConfigError("--to", to, f"give a revision hash prefix of {name}; see `llmhost endpoints show {name}`")
        target_rev = cands[0]
    else:
        good = [r for r in revs if r.content_hash != live and r.status in {"retired", "live"}]
        if not good:
            raise ConfigError("endpoint", name, "has no earlier good revision to roll back to")
        target_rev = good[-1]
    spec = EndpointSpec.model_validate(target_rev.spec["spec"])
    audit.record(actor, "rollback.start", f"endpoint:{name}", before={"revision": (live or "")[:12]},
                 after={"revision": target_rev.content_hash[:12]}, endpoint=name)
    return deploy(spec, actor=actor, force=True)
