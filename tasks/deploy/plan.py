"""Plan a revision: resolve the spec's model and adapters to versions, choose tool calling, render the vLLM args.

A revision is immutable: the spec with its model pinned to the resolved version, the rendered vLLM args and the
runtime version, named by a content hash over them. `sizing_request` is the one sizing request a spec makes;
`size_spec` fills what the spec leaves auto (tier, TP, context, KV dtype, max_num_seqs) from it, and the rendered
args carry those values, so deploy's fit gate checks exactly what runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from tasks import store
from tasks.core.errors import ConfigError
from tasks.core.gpus import Gpu, inventory
from tasks.deploy.resolve import resolve_adapter
from tasks.deploy.spec import EndpointSpec, ToolCallingExplicit
from tasks.register import get_version, resolve_model_ref
from tasks.serving.base import Dtype, VllmArgs
from tasks.serving.local import has_cuda_gpu
from tasks.serving.ray import Device, RaySettings
from tasks.size import MemoryEstimate, SizingRequest, Tier, load_tiers, make_request, read_model_config, runtime_facts
from tasks.size.apply import AppliedSizing, apply_sizing
from tasks.size.machine import local_tiers

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

# Environment of every replica the deploy path starts (on top of LocalTarget's own), and of the rendered pods.
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
# `fallback` is read from the endpoint's row by the gateway; the external-only fields are None here and are left
# out so that self-hosted revisions keep the hashes they had before external endpoints existed.
_COSMETIC = {"description", "usage_notes", "owner", "access", "serve_promoted", "fallback",
             "frontier", "base_url", "api_key_env", "api_key_file", "swap"}


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
    sizing: AppliedSizing | None = Field(default=None, description="What sizing applied (the revision's facts).")
    estimate: MemoryEstimate | None = Field(default=None, description="The sizing of exactly the rendered args.")


# ---------------------------------------------------------------------------------------------- hardware


def _tier(hardware: str) -> Tier:
    """The catalog tier a spec's `hardware` names (not `auto`)."""
    for tier in load_tiers():
        if tier.name == hardware:
            return tier
    raise ConfigError(
        "hardware",
        hardware,
        "use a tier name from `llmhost size --help` / tasks/tiers.yaml (or LLMHOST_TIERS_FILE), or auto",
    )


def device_for(hardware: str, cluster_gpus: float | None = None) -> Device:
    """gpu for a GPU tier; cpu for a CPU tier; for auto, whatever runs the replicas has: the Ray cluster's GPU count
    (`cluster_gpus`, for a ray spec), else this machine's."""
    if hardware == "auto":
        if cluster_gpus is not None:
            return "gpu" if cluster_gpus > 0 else "cpu"
        return "gpu" if has_cuda_gpu() else "cpu"
    return "gpu" if _tier(hardware).device == "gpu" else "cpu"


def _tier_device_count(hardware: str) -> int:
    """Devices of a named GPU tier (tensor_parallel_size auto); 1 for cpu and auto."""
    if hardware == "auto":
        return 1
    tier = _tier(hardware)
    return tier.count if tier.device == "gpu" else 1


def _runtime_dtype(spec: EndpointSpec) -> Dtype:
    v = spec.vllm
    # CPU attention runs fp32; a named GPU tier keeps auto even where it is planned (k8s render) on a CPU machine.
    return v.dtype if (v.dtype != "auto" or device_for(spec.hardware) == "gpu") else "float32"


def ray_settings(spec: EndpointSpec) -> RaySettings:
    """The spec's Ray Serve settings; for a local spec, a fixed count of its replicas."""
    return spec.ray or RaySettings(min_replicas=spec.replicas, max_replicas=spec.replicas)


def sizing_request(spec: EndpointSpec) -> SizingRequest:
    """The one sizing request of a spec: what deploy enforces before it starts anything, and what the lifecycle sizes.

    The tier is the spec's (auto: this machine's CPU tier for a local spec without a GPU, else the cheapest that
    fits); precision, context and batch limits are the vLLM args the revision will run with.
    """
    tier = spec.hardware
    if tier == "auto" and spec.target == "local" and not has_cuda_gpu():
        tier = "cpu"  # the local target can only run on this machine
    v = spec.vllm
    return make_request(
        dtype=_runtime_dtype(spec),
        quantization=v.quantization,
        kv_cache_dtype="fp8" if v.kv_cache_dtype.startswith("fp8") else "auto",
        max_model_len=v.max_model_len,
        concurrency=spec.concurrency,
        gpu_memory_utilization=v.gpu_memory_utilization,
        tier=None if tier == "auto" else tier,
        tensor_parallel_size=v.tensor_parallel_size,
        max_num_seqs=v.max_num_seqs,
        enforce_eager=v.enforce_eager,
    )


def machine_gpus() -> list[Gpu]:
    """This machine's GPUs (NVML); empty where there are none."""
    return inventory()


def size_spec(
    spec: EndpointSpec, model_dir: str, gpus: list[Gpu] | None = None
) -> tuple[AppliedSizing, MemoryEstimate]:
    """Sizing's values for the spec's auto fields, and the estimate of exactly those values.

    Where it may run: a named tier; for `hardware: auto` on the local target, this machine's GPUs as tiers of
    1..N GPUs (the fewest that fit win), or the CPU tier without GPUs; on ray, the cheapest catalog tier that fits.
    """
    pinned: str | None
    if spec.hardware != "auto":
        _tier(spec.hardware)  # one line naming the catalog for an unknown name
        tiers, pinned = load_tiers(), spec.hardware
    elif spec.target == "local":
        gpus = machine_gpus() if gpus is None else gpus
        if not gpus and has_cuda_gpu():
            raise ConfigError(
                "hardware", "auto", "nvidia-smi lists a GPU but NVML reads none; install the gpu extra "
                "(pip install 'llmhost[gpu]', nvidia-ml-py) or name a tier from `llmhost size --list-tiers`"
            )
        tiers, pinned = (local_tiers(gpus), None) if gpus else (load_tiers(), "cpu")
    else:
        tiers, pinned = load_tiers(), None
    src = read_model_config(model_dir)
    return apply_sizing(
        src.config,
        sizing_request(spec).model_copy(update={"tier": pinned}),
        tiers,
        runtime=runtime_facts(),
        name=src.name,
        tokenizer_max_len=src.tokenizer_max_len,
        tier_is_auto=spec.hardware == "auto",
    )


# ---------------------------------------------------------------------------------------------- tool calling


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


def _architectures(tags: dict[str, str]) -> list[str]:
    raw = tags.get("architectures", "")
    if raw.startswith("["):
        return list(json.loads(raw))
    return [a for a in raw.split(",") if a]


# ---------------------------------------------------------------------------------------------- the revision


def runtime_version() -> str:
    """The serving runtime's version, read from its venv's files (the control plane never imports vLLM)."""
    version = getattr(runtime_facts(), "vllm_version", None)
    return f"vllm {version}" if version else "vllm (version unknown)"


def _version_ref(model_version: str) -> str:
    return f"models:/{model_version}"


@dataclass
class _Weights:
    """What the spec's model resolved to: the weights vLLM loads, the names it serves, the LoRA modules."""

    model_version: str
    model_dir: str
    served: str  # what plain `<endpoint>` is routed to
    base_served: str  # vLLM's --served-model-name
    tool_tags: dict[str, str]
    model_hash: dict[str, str | None]
    base_version: str | None = None
    lora_modules: dict[str, str] = field(default_factory=dict)  # vLLM name -> adapter dir
    lora_versions: dict[str, str] = field(default_factory=dict)  # vLLM name -> NAME/VERSION (no paths)
    ranks: list[int] = field(default_factory=list)


def _resolve_model(spec: EndpointSpec) -> _Weights:
    """The spec's model; a LoRA adapter version (tag adapter=true) runs as its base's weights plus itself."""
    mv = get_version(spec.model)  # tags first: an adapter version has no full model folder to resolve
    model_version = f"{mv.name}/{mv.version}"
    tags = dict(mv.tags)
    if tags.get("adapter") != "true":
        return _Weights(
            model_version=model_version,
            model_dir=str(resolve_model_ref(_version_ref(model_version)).local_dir),
            served=spec.name,
            base_served=spec.name,
            tool_tags=tags,
            model_hash={"model": tags.get("content_hash")},
        )
    adapter = resolve_adapter(_version_ref(model_version))
    if not adapter.base_version:
        raise ConfigError(
            "model",
            spec.model,
            f"version {model_version} is an adapter without a base_version "
            "tag; re-register it with `llmhost finetune`",
        )
    base = resolve_model_ref(f"models:/{adapter.name}/{adapter.base_version}")
    served = adapter.default_serving_name
    return _Weights(
        model_version=model_version,
        model_dir=str(base.local_dir),
        served=served,
        base_served=f"{base.name}-v{base.version}",
        tool_tags={
            **dict(base.tags),
            **{k: v for k, v in tags.items() if k in ("template_supports_tools", "tool_call_format", "architectures")},
        },
        model_hash={"model": tags.get("content_hash"), "base": dict(base.tags).get("content_hash")},
        base_version=f"{base.name}/{base.version}",
        lora_modules={served: str(adapter.adapter_dir)},
        lora_versions={served: model_version},
        ranks=[adapter.lora_rank],
    )


def _add_adapters(spec: EndpointSpec, w: _Weights) -> dict[str, str]:
    """The spec's adapters as LoRA modules next to the weights; returns gateway name -> NAME/VERSION."""
    versions: dict[str, str] = {}
    for name, ref in sorted(spec.adapters.items()):
        a = resolve_adapter(ref)
        want = w.base_version or w.model_version
        if f"{a.name}/{a.base_version}" != want:
            raise ConfigError(
                f"adapters.{name}",
                ref,
                f"is an adapter on {a.name}/{a.base_version}, but the "
                f"endpoint serves {want}; fine-tune on {want} or pick a matching adapter",
            )
        if name in w.lora_modules:
            raise ConfigError(f"adapters.{name}", ref, f"clashes with the endpoint's own adapter name {name!r}")
        w.lora_modules[name] = str(a.adapter_dir)
        w.lora_versions[name] = versions[name] = f"{a.name}/{a.version}"
        w.ranks.append(a.lora_rank)
    return versions


def _vllm_args(spec: EndpointSpec, w: _Weights, parser: str | None, sized: AppliedSizing) -> VllmArgs:
    """The spec's vLLM args; every field it leaves auto takes sizing's value, an explicit one is kept as written."""
    v = spec.vllm
    return VllmArgs(
        model=w.model_dir,
        served_model_name=w.base_served,
        max_model_len=v.max_model_len or sized.max_model_len,
        dtype=_runtime_dtype(spec),
        tensor_parallel_size=sized.tensor_parallel_size if v.tensor_parallel_size == "auto" else v.tensor_parallel_size,
        gpu_memory_utilization=v.gpu_memory_utilization,
        kv_cache_dtype=sized.kv_cache_dtype if v.kv_cache_dtype == "auto" else v.kv_cache_dtype,
        quantization=v.quantization,
        enforce_eager=v.enforce_eager,
        max_num_seqs=v.max_num_seqs or sized.max_num_seqs,
        enable_lora=bool(w.lora_modules) or v.max_lora_rank is not None,
        lora_modules=w.lora_modules,
        max_lora_rank=max([v.max_lora_rank or 0, *w.ranks]) or None,
        enable_auto_tool_choice=parser is not None,
        tool_call_parser=parser,
        chat_template=spec.tool_calling.chat_template if isinstance(spec.tool_calling, ToolCallingExplicit) else None,
        extra_args=v.extra_args,
    )


def plan_revision(spec: EndpointSpec) -> RevisionPlan:
    """Resolves the model alias and adapters, sizes the auto fields and renders the vLLM args; starts nothing.

    A model version that is a LoRA adapter (tag adapter=true) runs as its base version's weights plus
    `--enable-lora --lora-modules <adapter>=<dir>`, and the endpoint's plain name is routed to the adapter.
    """
    w = _resolve_model(spec)
    parser, why = choose_tool_calling(spec, w.tool_tags, _architectures(w.tool_tags))
    adapter_versions = _add_adapters(spec, w)
    # Sizing runs here, not only at deploy's fit gate: what it applies is part of the args, so of the hash.
    sized, estimate = size_spec(spec, w.model_dir)
    args = _vllm_args(spec, w, parser, sized)
    runtime = runtime_version()
    # The spec as it runs: model and adapters pinned to the versions they resolved to, so that the alias a
    # spec names does not matter (same version = same revision) and rollback redeploys exactly this.
    pinned = spec.model_copy(
        update={
            "model": _version_ref(w.model_version),
            "adapters": {k: _version_ref(x) for k, x in adapter_versions.items()},
        }
    )
    identity = {
        # `ray` only when set, so that local revisions keep the hashes they had before the ray target existed.
        "spec": pinned.model_dump(mode="json", exclude=_COSMETIC | ({"ray"} if pinned.ray is None else set())),
        "model_version": w.model_version,
        "base_version": w.base_version,
        "adapters": adapter_versions,
        "served_model_name": w.served,
        "vllm": {**args.model_dump(mode="json", exclude={"model"}), "lora_modules": w.lora_versions},
        "runtime": runtime,
        "content_hashes": w.model_hash,
        "tool_calling": why,
    }
    return RevisionPlan(
        endpoint=spec.name,
        content_hash=store.spec_hash(identity),
        model_version=w.model_version,
        base_version=w.base_version,
        model_dir=w.model_dir,
        served_model_name=w.served,
        vllm=args,
        runtime=runtime,
        tool_call_parser=parser,
        tool_calling=why,
        adapters={name: name for name in adapter_versions},
        identity=identity,
        sizing=sized,
        estimate=estimate,
    )
