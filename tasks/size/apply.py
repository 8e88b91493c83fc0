"""Apply the sizing recommendation to what an endpoint spec leaves `auto`: tier, TP, context, KV dtype, batch.

The choices, in order (an explicit value is never changed; it only narrows the search):
- tier: the pinned one, else the cheapest that fits `concurrency` sequences of a working context
  (AUTO_CONTEXT_FLOOR tokens, or the model's maximum when that is shorter).
- kv_cache_dtype: fp8 only where no allowed GPU tier fits without it; otherwise auto (the model dtype).
- tensor_parallel_size: sizing's `auto`, every GPU of the chosen tier. A tier is paid for whole, and the
  cheapest tier that fits is already the one with the fewest GPUs that fit (this machine's tiers count 1..N).
- max_model_len: the longest context whose `concurrency` sequences fit the chosen tier's KV space, capped at the
  model's maximum and rounded down to a multiple of 1,024 (of 256 below that), never the model's maximum by
  default when it does not fit.
- max_num_seqs: vLLM's default on the tier (what it would pick anyway), at least `concurrency`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks.register.shape import count_params, parse_config
from tasks.size.estimate import _max_len_that_fits, estimate_memory
from tasks.size.plan import MemoryEstimate, RuntimeFacts, SizingRequest, Tier, plan_on_tier

AUTO_CONTEXT_FLOOR = 4096  # the shortest context `max_model_len: auto` settles for when picking a tier

AutoField = Literal["tier", "tensor_parallel_size", "max_model_len", "kv_cache_dtype", "max_num_seqs"]


class AppliedSizing(BaseModel):
    """The values a revision runs with, and which of them sizing chose (the spec left them auto)."""

    tier: str
    device: Literal["cpu", "gpu"]
    tensor_parallel_size: int = Field(ge=1)
    max_model_len: int = Field(gt=0)
    kv_cache_dtype: Literal["auto", "fp8"]
    max_num_seqs: int = Field(gt=0)
    source: list[AutoField] = Field(default_factory=list, description="The fields that were auto.")
    fits: bool = Field(description="False: nothing fits; these are the closest tier's values (deploy refuses).")

    def facts(self) -> dict[str, Any]:
        """The revision's `sizing` facts topic."""
        return self.model_dump(mode="json", exclude={"device", "fits"})


def round_context(tokens: int, model_max: int) -> int:
    """The model's maximum when it fits; else rounded down to a multiple of 1,024 (256, 16 below those)."""
    if tokens >= model_max:
        return model_max
    for step in (1024, 256, 16):
        if tokens >= step:
            return tokens // step * step
    return tokens


def apply_sizing(
    config: dict[str, Any],
    request: SizingRequest,
    tiers: list[Tier],
    *,
    runtime: RuntimeFacts | None = None,
    name: str = "model",
    tokenizer_max_len: int | None = None,
    tier_is_auto: bool | None = None,
) -> tuple[AppliedSizing, MemoryEstimate]:
    """Sizing's choice for every auto field of `request`, and the estimate of exactly those values.

    `tier_is_auto` says whether the spec left the tier to sizing (default: `request.tier is None`); a local spec
    on a machine without GPUs pins the CPU tier although its spec says auto.
    """
    runtime = runtime or RuntimeFacts()
    s = parse_config(config, name=name, tokenizer_max_len=tokenizer_max_len)
    auto_len = request.max_model_len is None
    source: list[AutoField] = []
    if tier_is_auto if tier_is_auto is not None else request.tier is None:
        source.append("tier")
    probe = request
    if auto_len and s.max_len is not None:
        probe = request.model_copy(update={"max_model_len": min(AUTO_CONTEXT_FLOOR, s.max_len)})
    kw: dict[str, Any] = {"runtime": runtime, "name": name, "tokenizer_max_len": tokenizer_max_len}
    est = estimate_memory(config, probe, tiers, **kw)
    allowed = [t for t in tiers if request.tier in (None, t.name)]
    if not est.fits and request.kv_cache_dtype == "auto" and any(t.device == "gpu" for t in allowed):
        fp8 = estimate_memory(config, probe.model_copy(update={"kv_cache_dtype": "fp8"}), tiers, **kw)
        if fp8.fits:
            probe, est = probe.model_copy(update={"kv_cache_dtype": "fp8"}), fp8
    rec = est.recommendation
    if est.fits and auto_len and s.max_len is not None:
        # The tier is chosen; now the longest context its KV space holds at this concurrency.
        tier = next(t for t in tiers if t.name == rec.tier)
        pinned = probe.model_copy(
            update={"tier": rec.tier, "tensor_parallel_size": rec.tensor_parallel_size, "max_model_len": s.max_len}
        )
        full = plan_on_tier(s, count_params(s), pinned, tier, runtime)
        length = round_context(s.max_len if full.fits else _max_len_that_fits(s, full), s.max_len)
        est = estimate_memory(config, pinned.model_copy(update={"max_model_len": length}), tiers, **kw)
        rec = est.recommendation
    if request.tensor_parallel_size == "auto":
        source.append("tensor_parallel_size")
    if auto_len:
        source.append("max_model_len")
    if request.kv_cache_dtype == "auto":
        source.append("kv_cache_dtype")
    if request.max_num_seqs is None:
        source.append("max_num_seqs")
    device = next((t.device for t in tiers if t.name == rec.tier), "gpu" if rec.gpus else "cpu")
    applied = AppliedSizing(
        tier=rec.tier,
        device=device,
        tensor_parallel_size=rec.tensor_parallel_size,
        max_model_len=rec.max_model_len,
        kv_cache_dtype="fp8" if rec.kv_cache_dtype == "fp8" else "auto",
        max_num_seqs=request.max_num_seqs or rec.max_num_seqs,
        source=source,
        fits=est.fits,
    )
    return applied, est
