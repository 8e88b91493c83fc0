"""A model's shape from its Hugging Face config.json: dimensions, attention and MoE layout, parameter count, weights.

Read at registration (the params tags) and built on by sizing (KV cache, plans), so it lives in the earlier step.
Pure functions: the parsed config dict comes in as an argument.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from pydantic import BaseModel

from tasks.core.errors import ConfigError, SizingError
from tasks.core.hf_config import MOE_EXPERT_KEYS, MOE_TOP_K_KEYS, first_int, text_config

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Quantization = Literal["none", "awq", "gptq", "fp8", "int8", "int4"]
KvCacheDtype = Literal["auto", "fp8"]
LayerKind = Literal["full", "sliding"]

DTYPES: tuple[str, ...] = get_args(Dtype)
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
KV_CACHE_DTYPES: tuple[str, ...] = get_args(KvCacheDtype)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Spellings found in config.json's torch_dtype/dtype and on command lines.
DTYPE_ALIASES = {
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

# Bytes of int4 weight per parameter plus one fp16 scale and one packed 4-bit zero point per group.
INT4_SCALE_ZERO_BYTES = 2.5


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


def normalize_dtype(value: str, field: str = "dtype", source: str | None = None) -> str:
    name = DTYPE_ALIASES.get(value, value)
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
    cfg = text_config(config)
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
    n_experts = first_int(cfg, MOE_EXPERT_KEYS, minimum=2)
    if n_experts:
        top_k = first_int(cfg, MOE_TOP_K_KEYS, minimum=1) or _positive(
            _need(cfg, MOE_TOP_K_KEYS[0], source, *MOE_TOP_K_KEYS[1:]), MOE_TOP_K_KEYS[0], source
        )
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
            num_experts=n_experts,
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
