"""Memory sizing that follows vLLM's own accounting: weights, KV cache, overhead -> tier, TP, vLLM args.

Pure functions only: config dicts, tier lists and runtime facts come in as arguments (read at the edge by
`tasks/sizing_io.py`). The KV cache arithmetic mirrors vLLM 0.32 (`vllm/v1/core/kv_cache_utils.py` and
`vllm/v1/kv_cache_interface.py`):

- a layer's page is `block_size x kv_heads_per_rank x (head_dim_k + head_dim_v) x dtype bytes`; MLA stores
  one latent of `kv_lora_rank + qk_rope_head_dim` per token instead of K and V per head;
- layers are grouped (one group when all layers share a type; hybrid sliding/full models get groups of
  equal layer count), a block spans one page of every layer in the largest group, and
  `num_blocks = available_bytes // bytes_per_block`;
- a request at `max_model_len` needs `cdiv(L, block)` blocks per full-attention group and
  `cdiv(min(window - 1 + in_flight_tokens, L), block) + 1` per sliding-window group;
- vLLM logs `KV cache size: int(num_blocks / blocks_per_request * L) tokens`.

On the CPU runtime the KV space is explicit (`VLLM_CPU_KVCACHE_SPACE` GiB), so the prediction is exact. On a
GPU the space is `gpu_memory_utilization x memory - weights - profiled overhead`; the overhead is an estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.core.errors import ConfigError, SizingError

GiB = 1 << 30
MiB = 1 << 20

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Quantization = Literal["none", "awq", "gptq", "fp8", "int8", "int4"]
KvCacheDtype = Literal["auto", "fp8"]
LayerKind = Literal["full", "sliding"]

DTYPES: tuple[str, ...] = get_args(Dtype)
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
KV_CACHE_DTYPES: tuple[str, ...] = get_args(KvCacheDtype)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Spellings found in config.json's torch_dtype/dtype and on command lines.
_DTYPE_ALIASES = {
    "float": "float32",
    "fp32": "float32",
    "half": "float16",
    "fp16": "float16",
    "bf16": "bfloat16",
}
# Config classes whose tie_word_embeddings defaults to True when config.json omits it.
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text"}
# quantization_config.quant_method -> our name.
_QUANT_METHODS = {
    "awq": "awq",
    "gptq": "gptq",
    "fp8": "fp8",
    "compressed-tensors": "int8",
    "bitsandbytes": "int4",
    "awq_marlin": "awq",
    "gptq_marlin": "gptq",
}

# vLLM 0.32 CacheConfig.gpu_memory_utilization default; used when the installed runtime can't be read.
FALLBACK_GPU_MEMORY_UTILIZATION = 0.92
FALLBACK_VLLM_VERSION = "0.32.0"

# Block sizes vLLM picks when --block-size is not given (vllm/platforms/cpu.py,
# CacheConfig.DEFAULT_BLOCK_SIZE,# FlashMLA's only kernel block size).
CPU_BLOCK_SIZE = 128
CPU_MLA_BLOCK_SIZE = 16
GPU_BLOCK_SIZE = 16
GPU_MLA_BLOCK_SIZE = 64

# GPU overhead estimates (per GPU). vLLM measures these by profiling; the figures below are calibrated on
# logs published in vLLM PR #10511 (Llama-3-8B, H100: non-torch 1.79 GiB, activation peak 1.26 GiB) and
# the smaller non-torch figures (0.16-0.20 GiB) in PRs #12126 and #14447.
NON_TORCH_BYTES = 1 * GiB
NON_TORCH_TP_EXTRA_BYTES = 1 * GiB  # NCCL buffers and the custom all-reduce workspace
CUDA_GRAPH_BYTES = GiB // 2
CPU_RUNTIME_BYTES = 2 * GiB  # API server + engine core processes, each with torch imported
# Bytes of int4 weight per parameter plus one fp16 scale and one packed 4-bit zero point per group.
INT4_SCALE_ZERO_BYTES = 2.5


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------


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
        return _DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v

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


# --------------------------------------------------------------------------------------------------------
# Model shape from config.json
# --------------------------------------------------------------------------------------------------------


class MlaDims(BaseModel):
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None


class MoeDims(BaseModel):
    num_experts: int
    top_k: int
    expert_intermediate: int
    shared_intermediate: int = 0
    shared_gate: bool = False
    score_bias: bool = False
    moe_layers: list[bool]


class ModelShape(BaseModel):
    """The numbers sizing needs, normalised across architectures."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_explicit: bool
    vocab_size: int
    intermediate_size: int
    tie_word_embeddings: bool
    torch_dtype: str | None
    max_len: int | None
    max_len_key: str | None
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    norms_per_layer: int
    layer_kinds: list[LayerKind]
    sliding_window: int | None
    mla: MlaDims | None = None
    moe: MoeDims | None = None
    quant_method: str | None = None
    quant_bits: int | None = None
    quant_group_size: int | None = None

    @property
    def attention(self) -> str:
        if self.mla:
            return "MLA"
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"


class MissingConfigField(ConfigError, SizingError):
    """config.json lacks a field sizing needs."""


def _need(cfg: dict[str, Any], key: str, source: str, *alts: str) -> Any:
    for k in (key, *alts):
        if cfg.get(k) is not None:
            return cfg[k]
    names = " or ".join(repr(k) for k in (key, *alts))
    raise MissingConfigField(
        key, None, f"config.json has no {names}; add it or pass a complete config.json", source=source
    )


def _positive(v: Any, key: str, source: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(key, v, "must be a positive integer in config.json", source=source)
    return v


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal wrappers (Gemma 3, Llava...) nest the language model under text_config."""
    text = config.get("text_config")
    if isinstance(text, dict) and text.get("hidden_size"):
        merged = {k: v for k, v in config.items() if k != "text_config"}
        merged.update(text)
        merged.setdefault("model_type", config.get("model_type"))
        return merged
    return config


def normalize_dtype(value: str, field: str = "dtype", source: str | None = None) -> str:
    name = _DTYPE_ALIASES.get(value, value)
    if name not in DTYPE_BYTES:
        raise ConfigError(field, value, f"use one of {', '.join(DTYPE_BYTES)}", source=source)
    return name


def _layer_kinds(
    cfg: dict[str, Any], n: int, model_type: str, source: str
) -> tuple[list[LayerKind], int | None]:
    """Which layers use a sliding window, as vLLM's model code reads them."""
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not cfg.get(
        "use_sliding_window", False
    ):
        window = None  # transformers sets sliding_window=None unless use_sliding_window
    if not window:  # vLLM treats 0 as disabled
        return ["full"] * n, None
    types = cfg.get("layer_types")
    if types is None:
        if model_type == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        elif model_type in ("gemma3", "gemma3_text"):
            pattern = int(cfg.get("sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        elif model_type.startswith("qwen"):
            start = int(cfg.get("max_window_layers", n))
            types = ["sliding_attention" if i >= start else "full_attention" for i in range(n)]
        else:  # Mistral-style: one model-level window for every layer
            types = ["sliding_attention"] * n
    if len(types) != n:
        raise ConfigError(
            "layer_types", f"{len(types)} entries", f"needs one entry per layer ({n})", source=source
        )
    kinds: list[LayerKind] = ["sliding" if t == "sliding_attention" else "full" for t in types]
    return kinds, int(window)


def _max_len(cfg: dict[str, Any], tokenizer_max: int | None) -> tuple[int | None, str | None]:
    """vLLM's derived max_model_len: the smallest of the known keys, then tokenizer and RoPE scaling."""
    best, key = None, None
    for k in (
        "max_position_embeddings",
        "n_positions",
        "max_seq_len",
        "seq_length",
        "model_max_length",
        "max_target_positions",
        "max_sequence_length",
        "max_seq_length",
        "seq_len",
    ):
        v = cfg.get(k)
        if isinstance(v, int) and v > 0 and (best is None or v < best):
            best, key = v, k
    if best is not None and tokenizer_max and 0 < tokenizer_max < best:
        best, key = tokenizer_max, "tokenizer_config.model_max_length"
    rope = cfg.get("rope_scaling") or {}
    if best is not None and isinstance(rope, dict):
        kind = rope.get("rope_type") or rope.get("type")
        if kind in ("linear", "dynamic") and rope.get("factor"):
            best = int(best * float(rope["factor"]))
            key = f"{key} x rope_scaling.factor"
    return best, key


def parse_config(
    config: dict[str, Any],
    *,
    name: str = "model",
    tokenizer_max_len: int | None = None,
    source: str = "config.json",
) -> ModelShape:
    """Normalise a HF config.json dict; raises MissingConfigField naming the first field it lacks."""
    if not isinstance(config, dict) or not config:
        raise ConfigError(
            "config", type(config).__name__, "pass the parsed config.json object", source=source
        )
    cfg = _text_config(config)
    model_type = str(cfg.get("model_type") or "unknown")
    hidden = _positive(_need(cfg, "hidden_size", source, "d_model", "n_embd"), "hidden_size", source)
    layers = _positive(
        _need(cfg, "num_hidden_layers", source, "n_layer", "num_layers"), "num_hidden_layers", source
    )
    heads = _positive(_need(cfg, "num_attention_heads", source, "n_head"), "num_attention_heads", source)
    vocab = _positive(_need(cfg, "vocab_size", source), "vocab_size", source)
    kv_heads = cfg.get("num_key_value_heads") or cfg.get("num_kv_heads") or cfg.get("n_head_kv") or heads
    kv_heads = _positive(kv_heads, "num_key_value_heads", source)
    explicit = isinstance(cfg.get("head_dim"), int) and cfg["head_dim"] > 0
    head_dim = int(cfg["head_dim"]) if explicit else hidden // heads
    if not explicit and hidden % heads:
        raise ConfigError(
            "head_dim",
            None,
            f"hidden_size {hidden} is not divisible by num_attention_heads "
            f"{heads}; config.json must set head_dim",
            source=source,
        )

    mla = None
    if cfg.get("kv_lora_rank"):
        mla = MlaDims(
            kv_lora_rank=_positive(cfg["kv_lora_rank"], "kv_lora_rank", source),
            qk_rope_head_dim=_positive(_need(cfg, "qk_rope_head_dim", source), "qk_rope_head_dim", source),
            qk_nope_head_dim=_positive(_need(cfg, "qk_nope_head_dim", source), "qk_nope_head_dim", source),
            v_head_dim=_positive(_need(cfg, "v_head_dim", source), "v_head_dim", source),
            q_lora_rank=cfg.get("q_lora_rank") or None,
        )

    moe = None
    n_experts = cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts")
    if n_experts:
        top_k = _positive(_need(cfg, "num_experts_per_tok", source), "num_experts_per_tok", source)
        if model_type.startswith("deepseek"):
            first_dense = int(cfg.get("first_k_dense_replace", 0))
            freq = int(cfg.get("moe_layer_freq", 1))
            moe_layers = [i >= first_dense and i % freq == 0 for i in range(layers)]
            expert_inter = _need(cfg, "moe_intermediate_size", source)
            shared = int(cfg.get("n_shared_experts") or 0) * expert_inter
            score_bias = cfg.get("topk_method") == "noaux_tc"
            shared_gate = False
        elif "moe_intermediate_size" in cfg:  # Qwen2-MoE / Qwen3-MoE
            step = int(cfg.get("decoder_sparse_step", 1))
            only_mlp = set(cfg.get("mlp_only_layers") or [])
            moe_layers = [i not in only_mlp and (i + 1) % step == 0 for i in range(layers)]
            expert_inter = cfg["moe_intermediate_size"]
            shared = int(cfg.get("shared_expert_intermediate_size") or 0)
            shared_gate, score_bias = shared > 0, False
        else:  # Mixtral: every layer's MLP is n experts of intermediate_size
            moe_layers = [True] * layers
            expert_inter = _need(cfg, "intermediate_size", source)
            shared, shared_gate, score_bias = 0, False, False
        moe = MoeDims(
            num_experts=int(n_experts),
            top_k=top_k,
            expert_intermediate=int(expert_inter),
            shared_intermediate=shared,
            shared_gate=shared_gate,
            score_bias=score_bias,
            moe_layers=moe_layers,
        )
    inter_needed = moe is None or not all(moe.moe_layers)
    intermediate = (
        _positive(_need(cfg, "intermediate_size", source, "ffn_dim", "n_inner"), "intermediate_size", source)
        if inter_needed
        else int(cfg.get("intermediate_size") or 0)
    )

    kinds, window = _layer_kinds(cfg, layers, model_type, source)
    max_len, max_len_key = _max_len(cfg, tokenizer_max_len)
    raw_dtype = cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or config.get("dtype")
    qcfg = cfg.get("quantization_config") or {}
    qwen2_like = model_type in ("qwen2", "qwen2_moe")
    return ModelShape(
        name=name,
        model_type=model_type,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        head_dim_explicit=explicit,
        vocab_size=vocab,
        intermediate_size=intermediate,
        tie_word_embeddings=bool(
            cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT))
        ),
        torch_dtype=str(raw_dtype) if raw_dtype else None,
        max_len=max_len,
        max_len_key=max_len_key,
        qkv_bias=bool(cfg.get("attention_bias", False)) or qwen2_like,
        o_bias=bool(cfg.get("attention_bias", False)) and not qwen2_like,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3", "gemma3_text"),
        norms_per_layer=4 if model_type in ("gemma2", "gemma3", "gemma3_text") else 2,
        layer_kinds=kinds,
        sliding_window=window,
        mla=mla,
        moe=moe,
        quant_method=qcfg.get("quant_method"),
        quant_bits=qcfg.get("bits") or qcfg.get("w_bit"),
        quant_group_size=qcfg.get("group_size") or qcfg.get("q_group_size"),
    )


# --------------------------------------------------------------------------------------------------------
# Parameters and weights
# --------------------------------------------------------------------------------------------------------


class ParamCount(BaseModel):
    """Parameters by role; `linear` are the matmul weights a weight-only quantization compresses."""

    embedding: int
    lm_head: int
    attention: int
    mlp: int
    experts_routed: int
    experts_shared: int
    router: int
    norms: int
    biases: int
    total: int
    active: int
    linear: int


def count_params(s: ModelShape) -> ParamCount:
    h, L = s.hidden_size, s.num_layers
    embedding = s.vocab_size * h
    lm_head = 0 if s.tie_word_embeddings else s.vocab_size * h
    q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    norms_layer = s.norms_per_layer * h
    biases = 0
    if s.mla:
        m = s.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = (
            h * s.num_heads * qk
            if not m.q_lora_rank
            else h * m.q_lora_rank + m.q_lora_rank * s.num_heads * qk
        )
        attn_layer = (
            q
            + h * (m.kv_lora_rank + m.qk_rope_head_dim)
            + m.kv_lora_rank * s.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
            + s.num_heads * m.v_head_dim * h
        )
        norms_layer += m.kv_lora_rank + (m.q_lora_rank or 0)
    else:
        attn_layer = h * q_out + 2 * h * kv_out + q_out * h
        biases += L * ((q_out + 2 * kv_out) * s.qkv_bias + h * s.o_bias)
        norms_layer += 2 * s.head_dim * s.qk_norm
    dense_mlp = 3 * h * s.intermediate_size
    moe_layers = sum(s.moe.moe_layers) if s.moe else 0
    dense_layers = L - moe_layers
    routed = shared = router = 0
    if s.moe:
        e = s.moe
        routed = moe_layers * e.num_experts * 3 * h * e.expert_intermediate
        shared = moe_layers * (3 * h * e.shared_intermediate + h * e.shared_gate)
        router = moe_layers * (h * e.num_experts + e.num_experts * e.score_bias)
    mlp = dense_layers * dense_mlp
    biases += dense_layers * (2 * s.intermediate_size + h) * s.mlp_bias
    attention = L * attn_layer
    norms = L * norms_layer + h
    total = embedding + lm_head + attention + mlp + routed + shared + router + norms + biases
    inactive = 0
    if s.moe:
        inactive = routed - routed * s.moe.top_k // s.moe.num_experts
    return ParamCount(
        embedding=embedding,
        lm_head=lm_head,
        attention=attention,
        mlp=mlp,
        experts_routed=routed,
        experts_shared=shared,
        router=router,
        norms=norms,
        biases=biases,
        total=total,
        active=total - inactive,
        linear=attention + mlp + routed + shared,
    )


def resolve_dtype(shape: ModelShape, requested: str) -> str:
    """vLLM's --dtype auto: the checkpoint's dtype, with float32 checkpoints kept as float32 here."""
    if requested != "auto":
        return requested
    if shape.torch_dtype is None:
        return "bfloat16"
    return normalize_dtype(shape.torch_dtype, "torch_dtype")


def resolve_quantization(shape: ModelShape, requested: str | None) -> str:
    if requested is not None:
        return requested
    if shape.quant_method is None:
        return "none"
    method = _QUANT_METHODS.get(str(shape.quant_method))
    if method is None:
        raise ConfigError(
            "quantization_config.quant_method",
            shape.quant_method,
            f"not sized here; pass --quantization with one of {', '.join(QUANTIZATIONS)}",
        )
    if method in ("awq", "gptq") and shape.quant_bits == 8:
        return "int8"
    return method


def weight_bytes_of(params: ParamCount, dtype: str, quant: str, group_size: int) -> tuple[int, str]:
    """Bytes of the weights, and the formula in words. Embeddings, lm_head and norms stay 16-bit."""
    dt = DTYPE_BYTES[dtype]
    rest = params.total - params.linear
    if quant == "none":
        return params.total * dt, f"{params.total:,} params x {dt} B ({dtype})"
    rest_bytes = rest * min(dt, 2)
    if quant in ("fp8", "int8"):
        # Scales (one per tensor for fp8, one per output channel for int8) are < 0.1 % and left out.
        return params.linear + rest_bytes, (
            f"{params.linear:,} linear params x 1 B ({quant}) + {rest:,} embedding/norm params x 2 B"
        )
    per = 0.5 + INT4_SCALE_ZERO_BYTES / group_size
    return (
        math.ceil(params.linear * per) + rest_bytes,
        f"{params.linear:,} linear params x (0.5 B + 2.5 B scale+zero / group {group_size}) = "
        f"{per:.4f} B ({quant}) + {rest:,} embedding/norm params x 2 B",
    )


# --------------------------------------------------------------------------------------------------------
# KV cache, as vLLM allocates and reports it
# --------------------------------------------------------------------------------------------------------


class KvLayout(BaseModel):
    """Per-rank KV cache geometry."""

    block_size: int
    kv_dtype_bytes: int
    kv_heads_per_rank: int
    per_layer_token_bytes: int = Field(description="One layer, one token, one rank.")
    page_bytes: int = Field(description="One layer's page: block_size tokens.")
    groups: list[LayerKind] = Field(description="KV cache groups; each holds layers_per_group layers.")
    layers_per_group: int
    bytes_per_block: int = Field(description="One block across every layer of the largest group.")
    token_bytes_rank: int = Field(description="All layers, one token, one rank.")


def kv_layout(s: ModelShape, *, kv_dtype_bytes: int, tp: int, block_size: int) -> KvLayout:
    if s.mla:
        kv_heads_rank = 1  # the latent is replicated on every rank
        per_layer = (s.mla.kv_lora_rank + s.mla.qk_rope_head_dim) * kv_dtype_bytes
    else:
        kv_heads_rank = max(1, s.num_kv_heads // tp)
        per_layer = kv_heads_rank * 2 * s.head_dim * kv_dtype_bytes
    page = block_size * per_layer
    counts: dict[LayerKind, int] = {}
    for k in s.layer_kinds:
        counts[k] = counts.get(k, 0) + 1
    if len(counts) == 1:
        kind = next(iter(counts))
        groups, size = [kind], s.num_layers
    else:
        # _get_kv_cache_groups_uniform_page_size: groups of equal layer count, the last one padded.
        size = min(counts.values())
        if max(counts.values()) < size * 1.5:
            size = max(counts.values())
        groups = [kind for kind, n in counts.items() for _ in range(math.ceil(n / size))]
    return KvLayout(
        block_size=block_size,
        kv_dtype_bytes=kv_dtype_bytes,
        kv_heads_per_rank=kv_heads_rank,
        per_layer_token_bytes=per_layer,
        page_bytes=page,
        groups=groups,
        layers_per_group=size,
        bytes_per_block=size * page,
        token_bytes_rank=s.num_layers * per_layer,
    )


def blocks_per_request(
    layout: KvLayout, max_model_len: int, sliding_window: int | None, in_flight_tokens: int
) -> int:
    """Blocks one request at max_model_len takes from the shared pool, summed over groups."""
    total = 0
    for kind in layout.groups:
        if kind == "full":
            total += math.ceil(max_model_len / layout.block_size)
        else:
            assert sliding_window is not None
            tokens = min(sliding_window - 1 + in_flight_tokens, max_model_len)
            total += math.ceil(tokens / layout.block_size) + 1
    return total


class KvCapacity(BaseModel):
    num_blocks: int
    blocks_per_request: int
    max_concurrency: float
    tokens: int = Field(description="vLLM's 'KV cache size: N tokens'.")


def kv_capacity(
    layout: KvLayout, available_bytes: int, max_model_len: int, blocks_per_req: int
) -> KvCapacity:
    """get_kv_cache_config_from_groups + get_kv_cache_capacity, with vLLM's own float arithmetic."""
    num_blocks = max(0, available_bytes // layout.bytes_per_block)
    conc = num_blocks / blocks_per_req
    return KvCapacity(
        num_blocks=num_blocks,
        blocks_per_request=blocks_per_req,
        max_concurrency=conc,
        tokens=int(conc * max_model_len),
    )


def kv_fits(layout: KvLayout, available_bytes: int, blocks_per_req: int, concurrency: int) -> bool:
    """vLLM refuses to start unless one request fits beside the reserved null block; we need `concurrency`."""
    return available_bytes - layout.bytes_per_block >= layout.bytes_per_block * blocks_per_req * concurrency


# --------------------------------------------------------------------------------------------------------
# Per-tier plan
# --------------------------------------------------------------------------------------------------------


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
            f"weights {_gib(w_dev)} + KV space {_gib(kv_avail)} + runtime {_gib(overhead)} "
            f"exceed {_gib(budget)} of RAM"
        )
    elif tier.device == "gpu" and w_dev + overhead >= budget:
        why = (
            f"weights {_gib(w_dev)}/GPU + overhead {_gib(overhead)} leave nothing of "
            f"{util:g} x {_gib(tier.memory_bytes)} for the KV cache"
        )
    elif not kv_fits(layout, kv_avail, bpr, req.concurrency):
        need = layout.bytes_per_block * (bpr * req.concurrency + 1)
        why = (
            f"{req.concurrency} x {max_len:,}-token sequences need {_gib(need)} of KV per device; "
            f"{_gib(kv_avail)} is available"
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


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------


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
    explanation: str = Field(description="Markdown: every term with its formula and numbers.")


_CPU_OVERHEAD_TEXT = "two processes with torch ~2 GiB + profile-run activations"


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def _num(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.2f} B"
    if n >= 10**6:
        return f"{n / 1e6:.2f} M"
    return f"{n:,}"


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


def _max_len_that_fits(s: ModelShape, p: Plan) -> int:
    """Largest max_model_len whose `concurrency` requests fit in this plan's KV space (binary search)."""
    lo, hi, best = 1, p.max_model_len, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if kv_fits(
            p.layout,
            p.kv_available_bytes,
            blocks_per_request(p.layout, mid, s.sliding_window, p.in_flight_tokens),
            p.concurrency,
        ):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _suggestions(
    s: ModelShape, params: ParamCount, req: SizingRequest, tiers: list[Tier], runtime: RuntimeFacts, ref: Plan
) -> list[str]:
    """What would make it fit, each with its numbers; one change at a time, else that change plus a shorter
    context. Actionable lines come first (the CLI's one-line error quotes the first)."""
    out: list[str] = []

    def where(p: Plan) -> str:
        return f"`{p.tier.name}` (tensor_parallel_size {p.tp}, ${p.tier.price_per_hour:g}/h)"

    def cheapest(r: SizingRequest) -> Plan | None:
        fit = [p for p in plan_all(s, params, r, tiers, runtime) if p.fits]
        return fit[0] if fit else None

    def roomiest(r: SizingRequest) -> Plan | None:
        room = [p for p in plan_all(s, params, r, tiers, runtime) if p.valid and p.kv_available_bytes]
        return max(room, key=lambda p: p.kv_available_bytes) if room else None

    def with_shorter_context(flag: str, r: SizingRequest, what: Callable[[Plan], str]) -> None:
        q = roomiest(r)
        best = _max_len_that_fits(s, q) if q else 0
        if q and best > 0:
            out.append(
                f"**`{flag} --max-model-len {best}`:** {what(q)}; {q.concurrency} sequence(s) of "
                f"{best:,} tokens fit on {where(q)}."
            )

    if req.tier is not None or req.tensor_parallel_size != "auto":
        p = cheapest(req.model_copy(update={"tier": None, "tensor_parallel_size": "auto"}))
        if p:
            out.append(
                f"**More GPUs / tensor parallelism:** fits on {where(p)}: "
                f"{_gib(p.weight_bytes_per_device)} of weights per GPU, KV capacity {p.capacity.tokens:,} "
                "tokens."
            )
    for quant in ("awq", "fp8"):
        if ref.quantization in (quant, "int4") or (quant == "fp8" and ref.quantization in ("awq", "gptq")):
            continue
        r = req.model_copy(update={"quantization": quant})
        p = cheapest(r)
        if p:
            out.append(
                f"**`--quantization {quant}`:** weights {_gib(p.weight_bytes)} instead of "
                f"{_gib(ref.weight_bytes)}; fits on {where(p)} with {p.capacity.tokens:,} KV tokens."
            )
        else:
            with_shorter_context(f"--quantization {quant}", r, lambda q: f"weights {_gib(q.weight_bytes)}")
    if req.kv_cache_dtype != "fp8":
        r = req.model_copy(update={"kv_cache_dtype": "fp8"})
        p = cheapest(r)
        if p:
            out.append(
                f"**`--kv-cache-dtype fp8`:** KV per token {p.kv_bytes_per_token:,} B instead of "
                f"{ref.kv_bytes_per_token:,} B; fits on {where(p)}."
            )
        else:
            with_shorter_context("--kv-cache-dtype fp8", r, lambda q: f"KV {q.kv_bytes_per_token:,} B/token")
    q = roomiest(req)
    if q:
        best = _max_len_that_fits(s, q)
        if best > 0:
            out.append(
                f"**`--max-model-len {best}`** (from {q.max_model_len:,}): {q.concurrency} sequence(s) fit "
                f"in {_gib(q.kv_available_bytes)} of KV space on {where(q)}."
            )
        if req.concurrency > 1:
            n = (q.kv_available_bytes // q.layout.bytes_per_block - 1) // q.capacity.blocks_per_request
            if n >= 1:
                out.append(
                    f"**`--concurrency {n}`** (from {req.concurrency}): that many {q.max_model_len:,}-token "
                    f"sequences fit on {where(q)}."
                )
    if req.tier is None and req.tensor_parallel_size == "auto":
        out.append(
            f"**More tensor parallelism:** no tier in the catalog fits with all of its GPUs (the roomiest "
            f"is `{ref.tier.name}`); add a larger tier through LLMHOST_TIERS_FILE."
        )
    return out


def _explain(
    s: ModelShape,
    params: ParamCount,
    p: Plan,
    plans: list[Plan],
    runtime: RuntimeFacts,
    fits: bool,
    suggestions: list[str],
    est_overhead: int,
) -> str:
    lay, cap = p.layout, p.capacity
    kv_dt = "fp8" if p.kv_cache_dtype == "fp8" else p.dtype
    lines = [f"## Sizing `{s.name}` on `{p.tier.name}`" + ("" if fits else " (does not fit)"), ""]
    lines.append(
        f"{s.model_type}, {s.num_layers} layers, hidden {s.hidden_size}, {s.attention} "
        f"({s.num_heads} heads, {s.num_kv_heads} KV heads, head_dim {s.head_dim}"
        f"{' explicit' if s.head_dim_explicit and s.head_dim * s.num_heads != s.hidden_size else ''})"
        + (f", MoE {s.moe.num_experts} experts top-{s.moe.top_k}" if s.moe else "")
        + (
            f", sliding window {s.sliding_window} on {s.layer_kinds.count('sliding')} layers"
            if s.sliding_window
            else ""
        )
        + "."
    )
    lines += ["", "| term | formula | value |", "|---|---|---|"]
    attn = (
        "MLA: q/kv low-rank + kv_b + o"
        if s.mla
        else f"q {s.num_heads}x{s.head_dim} + k,v {s.num_kv_heads}x{s.head_dim} + o"
    )
    lines.append(
        f"| parameters | embed {s.vocab_size:,}x{s.hidden_size} + {s.num_layers} x (attention: {attn}; "
        f"MLP 3 x hidden x intermediate{'; experts' if s.moe else ''}; norms)"
        f"{'' if s.tie_word_embeddings else ' + lm_head'} | {params.total:,} ({_num(params.total)}) |"
    )
    if s.moe:
        lines.append(
            f"| active parameters | total - routed experts x (1 - {s.moe.top_k}/{s.moe.num_experts}) "
            f"| {params.active:,} ({_num(params.active)}) |"
        )
    lines.append(f"| weights | {p.weight_formula} | {_gib(p.weight_bytes)} ({p.weight_bytes:,} B) |")
    if p.tp > 1:
        lines.append(
            f"| weights / GPU | weights / tensor_parallel_size {p.tp} | {_gib(p.weight_bytes_per_device)} |"
        )
    if s.mla:
        kv_formula = (
            f"{s.num_layers} layers x (kv_lora_rank {s.mla.kv_lora_rank} + qk_rope_head_dim "
            f"{s.mla.qk_rope_head_dim}) x {lay.kv_dtype_bytes} B ({kv_dt}), latent replicated on "
            f"{p.tp} rank(s)"
        )
    else:
        kv_formula = (
            f"{s.num_layers} layers x 2 (K,V) x {lay.kv_heads_per_rank} KV heads/rank x "
            f"head_dim {s.head_dim} x {lay.kv_dtype_bytes} B ({kv_dt}) x {p.tp} rank(s)"
        )
    lines.append(f"| KV bytes per token | {kv_formula} | {p.kv_bytes_per_token:,} B |")
    kinds = ", ".join(f"{lay.groups.count(k)} {k}" for k in dict.fromkeys(lay.groups))
    lines.append(
        f"| KV block | {lay.layers_per_group} layers/group x block {lay.block_size} tokens x "
        f"{lay.per_layer_token_bytes:,} B/layer/token ({kinds} group(s)) | {lay.bytes_per_block:,} B |"
    )
    sw = ""
    if "sliding" in lay.groups:
        sw = (
            f"; sliding groups: cdiv(min(window {s.sliding_window} - 1 + in-flight "
            f"{p.in_flight_tokens:,}, L), "
            f"{lay.block_size}) + 1"
        )
    lines.append(
        f"| blocks per request | full groups: cdiv(L {p.max_model_len:,}, {lay.block_size}){sw} | "
        f"{cap.blocks_per_request:,} |"
    )
    lines.append(
        f"| KV for requests | blocks/request x block bytes x concurrency {p.concurrency} x {p.tp} rank(s) "
        f"| {_gib(p.kv_bytes_total)} |"
    )
    if p.tier.device == "cpu":
        lines.append(
            f"| KV space | VLLM_CPU_KVCACHE_SPACE (LLMHOST_CPU_KVCACHE_SPACE_GIB) | "
            f"{_gib(p.kv_available_bytes)} ({p.kv_available_bytes:,} B) |"
        )
        lines.append(
            f"| runtime overhead | {'given' if p.overhead_overridden else _CPU_OVERHEAD_TEXT} "
            f"| {_gib(p.overhead_bytes_per_device)} |"
        )
    else:
        if p.overhead_overridden:
            lines.append(f"| overhead / GPU | given (--overhead-gib) | {_gib(p.overhead_bytes_per_device)} |")
        else:
            lines.append(
                f"| overhead / GPU | non-torch {_gib(p.non_torch_bytes)} + activations "
                f"{p.max_num_batched_tokens:,}"
                f" tokens x ((3 x intermediate + qkv)/tp + 4 x hidden) x {min(DTYPE_BYTES[p.dtype], 4)} B + "
                f"sampler {p.max_num_seqs} seqs x vocab x 8 B = {_gib(p.activation_bytes)} + CUDA graphs "
                f"{_gib(p.cuda_graph_bytes)} | {_gib(p.overhead_bytes_per_device)} |"
            )
        lines.append(
            f"| KV space / GPU | {p.gpu_memory_utilization:g} x {_gib(p.tier.memory_bytes)} - weights/GPU - "
            f"overhead | {_gib(p.kv_available_bytes)} |"
        )
    lines.append(
        f"| KV capacity | floor(KV space / block bytes) = {cap.num_blocks:,} blocks; "
        f"int({cap.num_blocks:,} / {cap.blocks_per_request:,} x {p.max_model_len:,}) | "
        f"**{cap.tokens:,} tokens** ({cap.max_concurrency:.2f}x at {p.max_model_len:,}) |"
    )
    lines.append(
        f"| total | weights + KV for requests + overhead x {p.tier.count if p.tier.device == 'gpu' else 1} "
        f"device(s) | {_gib(p.weight_bytes + p.kv_bytes_total + est_overhead)} |"
    )
    lines.append("")
    if fits:
        lines.append(
            f"**Recommendation:** `{p.tier.name}` ({p.tier.count} x {p.tier.accelerator}, "
            f"${p.tier.price_per_hour:g}/h), tensor_parallel_size {p.tp}, max_model_len "
            f"{p.max_model_len:,}, max_num_seqs {p.max_num_seqs}."
        )
    else:
        lines.append(f"**Does not fit:** {p.fit_reason}.")
        lines += ["", "### What would make it fit", ""] + [f"- {x}" for x in suggestions]
    lines += ["", "```", "vllm serve MODEL " + " ".join(vllm_args_for(p)), "```", ""]
    ranked = plans if fits else sorted(plans, key=lambda q: (not q.valid, -q.kv_available_bytes))
    shown = ranked[:8]
    lines += ["| tier | $/h | tp | fits | KV capacity (tokens) | why not |", "|---|---|---|---|---|---|"]
    for q in shown:
        lines.append(
            f"| {q.tier.name} | {q.tier.price_per_hour:g} | {q.tp} | {'yes' if q.fits else 'no'} | "
            f"{q.capacity.tokens:,} | {q.fit_reason} |"
        )
    if len(plans) > len(shown):
        lines.append(f"| ... {len(plans) - len(shown)} more tiers | | | | | |")
    lines += ["", "Notes:"]
    if p.tier.device == "cpu":
        lines.append(
            "- CPU: the KV space is explicit, so the capacity above is exactly what vLLM logs "
            "(`CPU KV cache size: N tokens`)."
        )
    else:
        lines.append(
            "- GPU: vLLM measures the overhead by profiling; the figure above is an estimate, so "
            "the logged capacity can differ by the overhead's error. Calibrate with --overhead-gib."
        )
    lines.append(
        f"- gpu_memory_utilization {p.gpu_memory_utilization:g}: "
        + (
            "given."
            if p.gpu_memory_utilization != runtime.gpu_memory_utilization
            else f"vLLM {runtime.vllm_version} default ({runtime.source})."
        )
    )
    if p.quantization in ("int8", "int4"):
        lines.append(
            f"- {p.quantization} needs a pre-quantized checkpoint; vLLM reads its method from "
            "config.json's quantization_config, so no --quantization flag is given."
        )
    if s.moe and s.model_type.startswith("deepseek"):
        lines.append(
            "- DeepSeek MTP layers (num_nextn_predict_layers) are not counted: vLLM loads them only "
            "for speculative decoding."
        )
    return "\n".join(lines) + "\n"


def estimate_memory(
    config: dict[str, Any],
    request: SizingRequest,
    tiers: list[Tier],
    *,
    runtime: RuntimeFacts | None = None,
    name: str = "model",
    tokenizer_max_len: int | None = None,
) -> MemoryEstimate:
    """Size a model on the cheapest tier that fits; `fits=False` with suggestions when none does."""
    if not tiers:
        raise ConfigError(
            "tiers", [], "the tier catalog is empty; check tasks/tiers.yaml and LLMHOST_TIERS_FILE"
        )
    runtime = runtime or RuntimeFacts()
    s = parse_config(config, name=name, tokenizer_max_len=tokenizer_max_len)
    if request.max_model_len and s.max_len and request.max_model_len > s.max_len:
        raise ConfigError(
            "max_model_len",
            request.max_model_len,
            f"exceeds the model's maximum {s.max_len:,} ({s.max_len_key}); vLLM refuses it",
        )
    params = count_params(s)
    plans = plan_all(s, params, request, tiers, runtime)
    fitting = [p for p in plans if p.fits]
    if fitting:
        chosen, fits, suggestions = fitting[0], True, []
    else:
        valid = [p for p in plans if p.valid] or plans
        # Report on the tier that came closest: the most KV space, then the most memory.
        chosen = max(valid, key=lambda p: (p.kv_available_bytes, p.tier.memory_bytes * p.tier.count))
        fits = False
        suggestions = _suggestions(s, params, request, tiers, runtime, chosen)
    devices = chosen.tier.count if chosen.tier.device == "gpu" else 1
    overhead_total = chosen.overhead_bytes_per_device * devices
    rec = Recommendation(
        tier=chosen.tier.name,
        gpus=chosen.tier.count if chosen.tier.device == "gpu" else 0,
        tensor_parallel_size=chosen.tp,
        max_model_len=chosen.max_model_len,
        kv_cache_dtype=chosen.kv_cache_dtype,
        max_num_seqs=chosen.max_num_seqs,
        gpu_memory_utilization=chosen.gpu_memory_utilization,
        vllm_args=vllm_args_for(chosen),
    )
    return MemoryEstimate(
        params_total=params.total,
        params_active=params.active,
        weight_bytes=chosen.weight_bytes,
        kv_bytes_per_token=chosen.kv_bytes_per_token,
        kv_bytes_total=chosen.kv_bytes_total,
        overhead_bytes=overhead_total,
        total_bytes=chosen.weight_bytes + chosen.kv_bytes_total + overhead_total,
        fits=fits,
        kv_capacity_tokens=chosen.capacity.tokens,
        max_concurrency=round(chosen.capacity.max_concurrency, 4),
        recommendation=rec,
        explanation=_explain(s, params, chosen, plans, runtime, fits, suggestions, overhead_total),
    )


def not_fit_line(est: MemoryEstimate, name: str) -> str:
    """The one line the CLI exits with when nothing fits."""
    first = ""
    for line in est.explanation.splitlines():
        if line.startswith("- **"):
            first = line[2:].replace("**", "").replace("`", "")
            break
    return (
        f"{name} does not fit: {est.recommendation.tier} is the closest tier "
        f"({_gib(est.total_bytes)} needed)" + (f"; {first}" if first else "")
    )
