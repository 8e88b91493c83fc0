"""This machine's GPUs as sizing tiers, and which of them a model fits on.

Pure: the GPU inventory comes in as an argument (`tasks.core.gpus.inventory()` reads it at the edge).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tasks.core.gpus import Gpu
from tasks.register.shape import count_params, parse_config
from tasks.size.apply import apply_sizing, round_context
from tasks.size.estimate import _max_len_that_fits
from tasks.size.plan import GiB, Plan, RuntimeFacts, SizingRequest, Tier, plan_on_tier

LOCAL_TIER_PREFIX = "this-machine-gpu-x"
# GPUs below compute capability 8.0 (no bfloat16: vLLM asks for --dtype half there), by name.
_NO_BF16 = re.compile(r"\b(T4|V100|P100|P40|P4|K80|M60|TITAN V|GTX|RTX 20\d0|Quadro RTX)\b", re.IGNORECASE)


def _chosen(gpus: Sequence[Gpu], count: int) -> list[Gpu]:
    """The `count` GPUs a tier of that size runs on: the largest first, then by index (stable per machine)."""
    return sorted(gpus, key=lambda g: (-g.total_bytes, g.index))[:count]


def local_tiers(gpus: Sequence[Gpu]) -> list[Tier]:
    """One tier per GPU count 1..N of this machine; memory is the smallest total among the GPUs it uses.

    Totals, not free memory: the tier (and so the revision's hash) stays the same while other processes come and
    go; `fit_line` warns when the free memory is short. No price: the machine is already paid for, so the
    cheapest tier that fits is the one with the fewest GPUs.
    """
    tiers = []
    for n in range(1, len(gpus) + 1):
        chosen = _chosen(gpus, n)
        names = sorted({g.name for g in chosen})
        tiers.append(
            Tier(
                name=f"{LOCAL_TIER_PREFIX}{n}",
                device="gpu",
                accelerator=names[0] if len(names) == 1 else " + ".join(names),
                count=n,
                memory_bytes=min(g.total_bytes for g in chosen),
                price_per_hour=0.0,
                bf16=not any(_NO_BF16.search(g.name) for g in chosen),
                note="this machine: GPUs " + ",".join(str(g.index) for g in chosen),
            )
        )
    return tiers


def _gpus_label(chosen: Sequence[Gpu]) -> str:
    free = " / ".join(f"{g.free_bytes / GiB:.1f}" for g in chosen)
    names = sorted({g.name for g in chosen})
    what = names[0] if len(names) == 1 else " + ".join(names)
    if len(chosen) == 1:
        return f"GPU {chosen[0].index} ({what}, {free} GiB free)"
    return f"GPUs {','.join(str(g.index) for g in chosen)} ({len(chosen)} x {what}, {free} GiB free)"


def _short_free(p: Plan, chosen: Sequence[Gpu]) -> str:
    """vLLM refuses to start unless util x total is free on each GPU; say so when another process holds it."""
    need = int(p.gpu_memory_utilization * p.tier.memory_bytes)
    short = [g for g in chosen if g.free_bytes < need]
    if not short:
        return ""
    worst = min(short, key=lambda g: g.free_bytes)
    util = int(worst.free_bytes / worst.total_bytes * 100) / 100
    return (
        f"; but vLLM reserves {p.gpu_memory_utilization:g} x {p.tier.memory_bytes / GiB:.1f} GiB at start and "
        f"GPU {worst.index} has {worst.free_bytes / GiB:.1f} GiB free: free it or set gpu_memory_utilization "
        f"{util:g}"
    )


def fit_line(
    config: dict[str, Any],
    request: SizingRequest,
    gpus: Sequence[Gpu],
    *,
    runtime: RuntimeFacts | None = None,
    name: str = "model",
    tokenizer_max_len: int | None = None,
) -> str:
    """One line: on which of this machine's GPUs the request fits, at which tensor parallel size."""
    if not gpus:
        return "this machine: no GPU here (NVML sees none); a local endpoint with hardware: auto runs on the CPU tier"
    runtime = runtime or RuntimeFacts()
    s = parse_config(config, name=name, tokenizer_max_len=tokenizer_max_len)
    params = count_params(s)
    req = request.model_copy(update={"tier": None})
    tiers = local_tiers(gpus)
    if req.tensor_parallel_size != "auto":
        tiers = [t for t in tiers if t.count == req.tensor_parallel_size]
        if not tiers:
            return f"this machine: {len(gpus)} GPU(s); tensor_parallel_size {req.tensor_parallel_size} needs more"
    plans = [plan_on_tier(s, params, req, t, runtime) for t in tiers]
    for p in plans:
        if p.fits:
            chosen = _chosen(gpus, p.tier.count)
            return f"this machine: {_gpus_label(chosen)}: fits at TP {p.tp}" + _short_free(p, chosen)
    if req.max_model_len is None and s.max_len is not None:
        # What a local `hardware: auto` deploy applies: the fewest GPUs that fit, at the longest context they hold.
        applied, _ = apply_sizing(config, req, tiers, runtime=runtime, name=name, tokenizer_max_len=tokenizer_max_len)
        if applied.fits:
            p = next(p for p in plans if p.tier.name == applied.tier)
            chosen = _chosen(gpus, p.tier.count)
            return (
                f"this machine: {_gpus_label(chosen)}: fits at TP {applied.tensor_parallel_size} with "
                f"--max-model-len {applied.max_model_len}"
                + (" --kv-cache-dtype fp8" if applied.kv_cache_dtype == "fp8" else "")
                + f" (what hardware: auto deploys; not at the model's {s.max_len:,})"
                + _short_free(p, chosen)
            )
    valid = [p for p in plans if p.valid] or plans
    best = max(valid, key=lambda p: (p.kv_available_bytes, p.tier.count))
    chosen = _chosen(gpus, best.tier.count)
    shorter = _max_len_that_fits(s, best) if best.valid and best.kv_available_bytes else 0
    if shorter > 0:
        shorter = round_context(shorter, best.max_model_len)
        return (
            f"this machine: {_gpus_label(chosen)}: fits at TP {best.tp} with --max-model-len {shorter} "
            f"(not at {best.max_model_len:,})" + _short_free(best, chosen)
        )
    return f"this machine: {_gpus_label(chosen)}: does not fit: {best.fit_reason.rstrip('.')}"
