"""The sizing answer: the cheapest tier that fits, or the closest one with its refusal and what would fit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tasks.core.errors import ConfigError
from tasks.register.shape import ModelShape, ParamCount, count_params, parse_config
from tasks.size.explain import explain
from tasks.size.kv import blocks_per_request, kv_fits
from tasks.size.plan import (
    MemoryEstimate,
    Plan,
    RuntimeFacts,
    SizingRequest,
    Tier,
    gib,
    plan_all,
    recommend,
)


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
                f"{gib(p.weight_bytes_per_device)} of weights per GPU, KV capacity {p.capacity.tokens:,} "
                "tokens."
            )
    for quant in ("awq", "fp8"):
        if ref.quantization in (quant, "int4") or (quant == "fp8" and ref.quantization in ("awq", "gptq")):
            continue
        r = req.model_copy(update={"quantization": quant})
        p = cheapest(r)
        if p:
            out.append(
                f"**`--quantization {quant}`:** weights {gib(p.weight_bytes)} instead of "
                f"{gib(ref.weight_bytes)}; fits on {where(p)} with {p.capacity.tokens:,} KV tokens."
            )
        else:
            with_shorter_context(f"--quantization {quant}", r, lambda q: f"weights {gib(q.weight_bytes)}")
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
                f"in {gib(q.kv_available_bytes)} of KV space on {where(q)}."
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
            "tiers", [], "the tier catalog is empty; check tasks/size/tiers.yaml and LLMHOST_TIERS_FILE"
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
    estimate = MemoryEstimate(
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
        recommendation=recommend(chosen),
        refusal=None if fits else chosen.fit_reason.strip().rstrip("."),
        suggestions=suggestions,
    )
    estimate.explanation = explain(estimate, s, chosen, plans, runtime)
    return estimate


def not_fit_line(est: MemoryEstimate, name: str) -> str:
    """The one line the CLI exits with when nothing fits; it quotes the first suggestion."""
    first = est.suggestions[0].replace("**", "").replace("`", "") if est.suggestions else ""
    return (
        f"{name} does not fit: {est.recommendation.tier} is the closest tier "
        f"({gib(est.total_bytes)} needed)" + (f"; {first}" if first else "")
    )
