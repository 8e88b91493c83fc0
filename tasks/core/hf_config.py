"""Facts read from a Hugging Face config.json, shared by register (compatibility) and size (memory)."""

from __future__ import annotations

from typing import Any

# Keep these lists in one place so register and size agree on what makes a model a mixture of experts.
MOE_EXPERT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
MOE_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "num_experts_per_token")


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal wrappers (Gemma 3, Llava...) nest the language model under text_config; merge it up."""
    text = config.get("text_config")
    if isinstance(text, dict) and text.get("hidden_size"):
        merged = {k: v for k, v in config.items() if k != "text_config"}
        merged.update(text)
        merged.setdefault("model_type", config.get("model_type"))
        return merged
    return config


def first_int(cfg: dict[str, Any], keys: tuple[str, ...], *, minimum: int) -> int | None:
    """The first of `keys` holding an int of at least `minimum` (bools are not ints here)."""
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v >= minimum:
            return v
    return None


def moe_shape(cfg: dict[str, Any]) -> tuple[int, int] | None:
    """(experts, experts per token) for a mixture-of-experts config; None for a dense one."""
    experts = first_int(cfg, MOE_EXPERT_KEYS, minimum=2)
    top_k = first_int(cfg, MOE_TOP_K_KEYS, minimum=1)
    return (experts, top_k) if experts and top_k else None
