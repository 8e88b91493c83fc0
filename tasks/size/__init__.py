"""Memory sizing that follows vLLM's own accounting: shape, kv, plan per tier, estimate, explain; io reads files."""

from tasks.register.shape import count_params, parse_config
from tasks.size.apply import AppliedSizing, apply_sizing
from tasks.size.estimate import estimate_memory, not_fit_line
from tasks.size.io import load_tiers, make_request, read_model_config, runtime_facts, size_model
from tasks.size.kv import blocks_per_request, kv_capacity, kv_layout
from tasks.size.machine import fit_line, local_tiers
from tasks.size.plan import GiB, MemoryEstimate, MiB, Recommendation, RuntimeFacts, SizingRequest, Tier

__all__ = [
    "AppliedSizing",
    "GiB",
    "MemoryEstimate",
    "MiB",
    "Recommendation",
    "RuntimeFacts",
    "SizingRequest",
    "Tier",
    "apply_sizing",
    "blocks_per_request",
    "count_params",
    "estimate_memory",
    "fit_line",
    "kv_capacity",
    "kv_layout",
    "load_tiers",
    "local_tiers",
    "make_request",
    "not_fit_line",
    "parse_config",
    "read_model_config",
    "runtime_facts",
    "size_model",
]
