"""Per-tier plans: what to size (request, tiers, runtime facts), the memory of each tier, vLLM's arguments.

On the CPU runtime the KV space is explicit (`VLLM_CPU_KVCACHE_SPACE` GiB), so the prediction is exact. On a
GPU the space is `gpu_memory_utilization x memory - weights - profiled overhead`; the overhead is an estimate.
"""

from __future__ import annotations

import math
from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.core.errors import ConfigError
from tasks.register.shape import (
    DTYPE_ALIASES,
    DTYPE_BYTES,
    Dtype,
    KvCacheDtype,
    MissingConfigField,
    ModelShape,
    ParamCount,
    Quantization,
    resolve_dtype,
    resolve_quantization,
    weight_bytes_of,
)
from tasks.size.kv import (
    CPU_BLOCK_SIZE,
    CPU_MLA_BLOCK_SIZE,
    GPU_BLOCK_SIZE,
    GPU_MLA_BLOCK_SIZE,
    KvCapacity,
    KvLayout,
    blocks_per_request,
    kv_capacity,
    kv_fits,
    kv_layout,
)

GiB = 1 << 30
MiB = 1 << 20

# vLLM 0.32 CacheConfig.gpu_memory_utilization default; used when the installed runtime can't be read.
FALLBACK_GPU_MEMORY_UTILIZATION = 0.92
FALLBACK_VLLM_VERSION = "0.32.0"

# GPU overhead estimates (per GPU). vLLM measures these by profiling; the figures below are calibrated on
# logs published in vLLM PR #10511 (Llama-3-8B, H100: non-torch 1.79 GiB, activation peak 1.26 GiB) and
# the smaller non-torch figures (0.16-0.20 GiB) in PRs #12126 and #14447.
NON_TORCH_BYTES = 1 * GiB
NON_TORCH_TP_EXTRA_BYTES = 1 * GiB  # NCCL buffers and the custom all-reduce workspace
CUDA_GRAPH_BYTES = GiB // 2
CPU_RUNTIME_BYTES = 2 * GiB  # API server + engine core processes, each with torch imported


class SizingRequest(BaseModel):
    """What to size: precision, context, concurrency and where it may run."""

    model_config = ConfigDict(extra="forbid")

    dtype: Dtype = Field(default="auto", description="Weights dtype; auto = config.json's torch_dtype.")
    quantization: Quantization | None = Field(
        default=None,
        description="Weight quantization; None = from config.json's quantization_config, else none.",
    )
    quant_group_size: int = Field(default=128, gt=0, le=8192, description="Group size of int4 formats.")
    kv_cache_dtype: KvCacheDtype = Field(default="auto", description="auto = the model dtype; fp8 = 1 byte.")
    max_model_len: int | None = Field(
        default=None, gt=0, description="Context length; None = the model's max."
    )
    concurrency: int = Field(
        default=1,
        gt=0,
        le=100_000,
        description="Sequences at max_model_len that must fit in the KV cache at once.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="None = the installed vLLM's default (0.92 in vLLM 0.32)."
    )
    tier: str | None = Field(default=None, description="Pin a tier by name; None = the cheapest that fits.")
    tensor_parallel_size: int | Literal["auto"] = Field(
        default="auto", description="auto = every GPU of the tier; an int pins it."
    )
    max_num_seqs: int | None = Field(default=None, gt=0, description="None = vLLM's default for the device.")
    max_num_batched_tokens: int | None = Field(
        default=None, gt=0, description="None = vLLM's default for the device."
    )
    enforce_eager: bool = Field(default=False, description="No CUDA graphs: saves their memory, costs speed.")
    overhead_gib: float | None = Field(
        default=None, ge=0, description="Per-GPU non-weight, non-KV memory; overrides the estimate."
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        return DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("tensor_parallel_size", mode="before")
    @classmethod
    def _tp(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "auto":
            if not v.isdigit():
                raise ValueError("use 'auto' or a positive integer")
            v = int(v)
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError("must be between 1 and 64")
        return v


class Tier(BaseModel):
    """One hardware offer: N identical devices and an hourly price."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    device: Literal["cpu", "gpu"]
    accelerator: str = Field(description="GPU model, or 'cpu'.")
    count: int = Field(default=1, ge=1, le=64, description="Devices in the tier.")
    memory_bytes: int = Field(gt=0, description="Memory per device as the runtime sees it.")
    price_per_hour: float = Field(ge=0, description="USD per hour for the whole tier.")
    instance: str = Field(default="", description="Cloud instance type the price is read from (provider:type).")
    price_source: str = Field(default="", description="Pricing page the hourly price was read from.")
    prices_as_of: date | None = Field(default=None, description="Date the hourly price was read.")
    kv_cache_space_bytes: int | None = Field(
        default=None, gt=0, description="CPU only: VLLM_CPU_KVCACHE_SPACE in bytes."
    )
    bf16: bool = Field(default=True, description="False for pre-Ampere GPUs (T4): bfloat16 runs as float16.")
    note: str = ""


class RuntimeFacts(BaseModel):
    """Defaults of the installed vLLM, read at the edge; the fallback is noted in the explanation."""

    vllm_version: str = FALLBACK_VLLM_VERSION
    gpu_memory_utilization: float = Field(default=FALLBACK_GPU_MEMORY_UTILIZATION, gt=0, le=1)
    source: str = "fallback: no vLLM runtime found; vLLM 0.32 defaults"


class Plan(BaseModel):
    """Everything computed for one tier."""

    tier: Tier
    tp: int
    valid: bool
    invalid_reason: str = ""
    dtype: str
    quantization: str
    kv_cache_dtype: str
    max_model_len: int
    concurrency: int
    gpu_memory_utilization: float
    max_num_seqs: int
    max_num_batched_tokens: int
    in_flight_tokens: int
    weight_bytes: int
    weight_formula: str
    weight_bytes_per_device: int
    non_torch_bytes: int = 0
    activation_bytes: int = 0
    cuda_graph_bytes: int = 0
    overhead_bytes_per_device: int
    overhead_overridden: bool = False
    budget_bytes_per_device: int = Field(description="util x memory on a GPU; RAM on the CPU.")
    kv_available_bytes: int
    layout: KvLayout
    capacity: KvCapacity
    kv_bytes_per_token: int
    kv_bytes_total: int
    fits: bool
    fit_reason: str = ""


def _defaults(tier: Tier, tp: int) -> tuple[int, int, int]:
    """vLLM 0.32 get_batch_defaults, OpenAI server: (max_num_seqs, batched tokens, batches in flight)."""
    if tier.device == "cpu":
        return 128 * tp, 2048 * tp, 1  # async scheduling is off on the CPU platform
    if tier.memory_bytes >= 160 * GiB:
        return 1024, 16384, 2
    if tier.memory_bytes >= 70 * GiB and "a100" not in tier.accelerator.lower():
        return 1024, 8192, 2
    return 256, 2048, 2  # async scheduling keeps two batches in flight


def default_max_num_seqs(tier: Tier, tp: int = 1) -> int:
    """The max_num_seqs vLLM picks on `tier` when the spec sets none (what a saturation load runs at)."""
    return _defaults(tier, tp)[0]


def _activation_bytes(s: ModelShape, tokens: int, seqs: int, tp: int, act_bytes: int) -> int:
    """Peak of vLLM's profile run: one max_num_batched_tokens forward pass plus the sampler's fp32 logits.

    Calibrated on vLLM PR #10511's Llama-3-8B log (1.26 GiB at 8,192 tokens, 256 sequences).
    """
    inter = s.intermediate_size
    if s.moe:
        inter = max(inter, s.moe.top_k * s.moe.expert_intermediate + s.moe.shared_intermediate)
    q_kv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    per_token = (3 * inter + q_kv) // tp + 4 * s.hidden_size
    return tokens * per_token * act_bytes + seqs * s.vocab_size * 4 * 2


def _tp_problem(s: ModelShape, tp: int) -> str:
    if s.num_heads % tp:
        return f"num_attention_heads {s.num_heads} is not divisible by tensor_parallel_size {tp}"
    if not s.mla and s.num_kv_heads % tp and tp % s.num_kv_heads:
        return f"num_key_value_heads {s.num_kv_heads} and tensor_parallel_size {tp} do not divide each other"
    return ""


def plan_on_tier(
    s: ModelShape, params: ParamCount, req: SizingRequest, tier: Tier, runtime: RuntimeFacts
) -> Plan:
    dtype = resolve_dtype(s, req.dtype)
    if dtype == "bfloat16" and not tier.bf16:
        dtype = "float16"  # vLLM refuses bfloat16 below compute capability 8.0 and asks for --dtype half
    quant = resolve_quantization(s, req.quantization)
    group = s.quant_group_size if (req.quantization is None and s.quant_group_size) else req.quant_group_size
    wbytes, wformula = weight_bytes_of(params, dtype, quant, group)
    max_len = req.max_model_len or s.max_len
    if max_len is None:
        raise MissingConfigField(
            "max_position_embeddings", None, "config.json has no context length; pass --max-model-len"
        )
    invalid = ""
    if req.tensor_parallel_size == "auto":
        tp = tier.count
    else:
        tp = req.tensor_parallel_size
        if tp > tier.count:
            invalid = f"tensor_parallel_size {tp} needs {tp} devices; {tier.name} has {tier.count}"
    if tier.device == "cpu" and tp != 1:
        invalid = invalid or "the CPU tier runs one process (tensor_parallel_size 1)"
    invalid = invalid or _tp_problem(s, tp)
    seqs_default, tokens_default, batches = _defaults(tier, tp)
    max_num_seqs = max(req.max_num_seqs or seqs_default, req.concurrency)
    batched = req.max_num_batched_tokens or tokens_default
    in_flight = batches * batched
    util = req.gpu_memory_utilization or runtime.gpu_memory_utilization
    kv_bytes = 1 if req.kv_cache_dtype == "fp8" else DTYPE_BYTES[dtype]
    mla_block = CPU_MLA_BLOCK_SIZE if tier.device == "cpu" else GPU_MLA_BLOCK_SIZE
    block = mla_block if s.mla else CPU_BLOCK_SIZE if tier.device == "cpu" else GPU_BLOCK_SIZE
    layout = kv_layout(s, kv_dtype_bytes=kv_bytes, tp=tp, block_size=block)
    bpr = blocks_per_request(layout, max_len, s.sliding_window, in_flight)
    w_dev = math.ceil(wbytes / tp)
    act = _activation_bytes(s, batched, max_num_seqs, tp, min(DTYPE_BYTES[dtype], 4))
    if tier.device == "cpu":
        non_torch, graphs = CPU_RUNTIME_BYTES, 0
        overhead = non_torch + act
        budget = tier.memory_bytes
        kv_avail = tier.kv_cache_space_bytes or 0
    else:
        non_torch = NON_TORCH_BYTES + (NON_TORCH_TP_EXTRA_BYTES if tp > 1 else 0)
        graphs = 0 if req.enforce_eager else CUDA_GRAPH_BYTES
        overhead = non_torch + act + graphs
        budget = int(tier.memory_bytes * util)
        kv_avail = 0
    overridden = req.overhead_gib is not None
    if overridden:
        overhead = int(req.overhead_gib * GiB)  # type: ignore[operator]
    if tier.device == "gpu":
        kv_avail = max(0, budget - w_dev - overhead)
    cap = kv_capacity(layout, kv_avail, max_len, bpr)
    kv_token_total = layout.token_bytes_rank * tp
    kv_total = bpr * layout.bytes_per_block * req.concurrency * tp
    why = ""
    if invalid:
        why = invalid
    elif tier.device == "cpu" and w_dev + kv_avail + overhead > budget:
        why = (
            f"weights {gib(w_dev)} + KV space {gib(kv_avail)} + runtime {gib(overhead)} "
            f"exceed {gib(budget)} of RAM"
        )
    elif tier.device == "gpu" and w_dev + overhead >= budget:
        why = (
            f"weights {gib(w_dev)}/GPU + overhead {gib(overhead)} leave nothing of "
            f"{util:g} x {gib(tier.memory_bytes)} for the KV cache"
        )
    elif not kv_fits(layout, kv_avail, bpr, req.concurrency):
        need = layout.bytes_per_block * (bpr * req.concurrency + 1)
        why = (
            f"{req.concurrency} x {max_len:,}-token sequences need {gib(need)} of KV per device; "
            f"{gib(kv_avail)} is available"
        )
    fits = not why
    return Plan(
        tier=tier,
        tp=tp,
        valid=not invalid,
        invalid_reason=invalid,
        dtype=dtype,
        quantization=quant,
        kv_cache_dtype=req.kv_cache_dtype,
        max_model_len=max_len,
        concurrency=req.concurrency,
        gpu_memory_utilization=util,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=batched,
        in_flight_tokens=in_flight,
        weight_bytes=wbytes,
        weight_formula=wformula,
        weight_bytes_per_device=w_dev,
        non_torch_bytes=non_torch,
        activation_bytes=act,
        cuda_graph_bytes=graphs,
        overhead_bytes_per_device=overhead,
        overhead_overridden=overridden,
        budget_bytes_per_device=budget,
        kv_available_bytes=kv_avail,
        layout=layout,
        capacity=cap,
        kv_bytes_per_token=kv_token_total,
        kv_bytes_total=kv_total,
        fits=fits,
        fit_reason=why,
    )


class Recommendation(BaseModel):
    tier: str
    gpus: int = Field(description="Devices in the tier (0 for the CPU tier).")
    tensor_parallel_size: int
    max_model_len: int
    kv_cache_dtype: str
    max_num_seqs: int
    gpu_memory_utilization: float
    vllm_args: list[str] = Field(description="Ready for the endpoint spec's vLLM args.")


class MemoryEstimate(BaseModel):
    """The sizing answer; `--json` prints exactly these keys."""

    params_total: int
    params_active: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_bytes_total: int = Field(description="KV for max_model_len x concurrency, in vLLM's block accounting.")
    overhead_bytes: int
    total_bytes: int
    fits: bool
    kv_capacity_tokens: int = Field(description="What vLLM will log as its KV cache size on the chosen tier.")
    max_concurrency: float = Field(description="Sequences of max_model_len the KV cache holds at once.")
    recommendation: Recommendation
    refusal: str | None = Field(
        default=None, description="Why the closest tier does not fit, one line; None when it fits."
    )
    suggestions: list[str] = Field(
        default_factory=list,
        description="What would make it fit, one change each with its numbers (inline Markdown); "
        "the most actionable first.",
    )
    explanation: str = Field(
        default="", description="Markdown rendered from the fields above: every term with its formula."
    )


def gib(n: float) -> str:
    """Bytes as the explanation and the one-line errors print them."""
    return f"{n / GiB:,.2f} GiB"


def vllm_args_for(p: Plan) -> list[str]:
    args = [
        "--dtype",
        p.dtype,
        "--max-model-len",
        str(p.max_model_len),
        "--max-num-seqs",
        str(p.max_num_seqs),
    ]
    if p.tp > 1:
        args += ["--tensor-parallel-size", str(p.tp)]
    if p.tier.device == "gpu":
        args += ["--gpu-memory-utilization", f"{p.gpu_memory_utilization:g}"]
    if p.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", p.kv_cache_dtype]
    if p.quantization in ("awq", "gptq", "fp8"):
        # int8/int4 name no vLLM method: the checkpoint's quantization_config tells vLLM what it is.
        args += ["--quantization", p.quantization]
    return args


def _sort_key(p: Plan) -> tuple[float, int, int]:
    return (p.tier.price_per_hour, p.tier.count, p.tier.memory_bytes)


def plan_all(
    s: ModelShape, params: ParamCount, req: SizingRequest, tiers: list[Tier], runtime: RuntimeFacts
) -> list[Plan]:
    chosen = tiers
    if req.tier is not None:
        chosen = [t for t in tiers if t.name == req.tier]
        if not chosen:
            raise ConfigError("tier", req.tier, f"use one of {', '.join(t.name for t in tiers)}")
    return sorted((plan_on_tier(s, params, req, t, runtime) for t in chosen), key=_sort_key)


def recommend(p: Plan) -> Recommendation:
    """The chosen plan as the settings an endpoint spec takes."""
    return Recommendation(
        tier=p.tier.name,
        gpus=p.tier.count if p.tier.device == "gpu" else 0,
        tensor_parallel_size=p.tp,
        max_model_len=p.max_model_len,
        kv_cache_dtype=p.kv_cache_dtype,
        max_num_seqs=p.max_num_seqs,
        gpu_memory_utilization=p.gpu_memory_utilization,
        vllm_args=vllm_args_for(p),
    )
