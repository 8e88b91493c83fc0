"""The sizing explanation: Markdown rendered from a typed estimate and the plans behind it."""

from __future__ import annotations

from tasks.register.shape import DTYPE_BYTES, ModelShape
from tasks.size.plan import MemoryEstimate, Plan, RuntimeFacts, gib

_CPU_OVERHEAD_TEXT = "two processes with torch ~2 GiB + profile-run activations"


def _num(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.2f} B"
    if n >= 10**6:
        return f"{n / 1e6:.2f} M"
    return f"{n:,}"


def explain(est: MemoryEstimate, s: ModelShape, p: Plan, plans: list[Plan], runtime: RuntimeFacts) -> str:
    """Every term of `est` with its formula and numbers, on the chosen plan `p`, then the other tiers."""
    fits = est.fits
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
        f"{'' if s.tie_word_embeddings else ' + lm_head'} | {est.params_total:,} ({_num(est.params_total)}) |"
    )
    if s.moe:
        lines.append(
            f"| active parameters | total - routed experts x (1 - {s.moe.top_k}/{s.moe.num_experts}) "
            f"| {est.params_active:,} ({_num(est.params_active)}) |"
        )
    lines.append(f"| weights | {p.weight_formula} | {gib(p.weight_bytes)} ({p.weight_bytes:,} B) |")
    if p.tp > 1:
        lines.append(
            f"| weights / GPU | weights / tensor_parallel_size {p.tp} | {gib(p.weight_bytes_per_device)} |"
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
        f"| {gib(p.kv_bytes_total)} |"
    )
    if p.tier.device == "cpu":
        lines.append(
            f"| KV space | VLLM_CPU_KVCACHE_SPACE (LLMHOST_CPU_KVCACHE_SPACE_GIB) | "
            f"{gib(p.kv_available_bytes)} ({p.kv_available_bytes:,} B) |"
        )
        lines.append(
            f"| runtime overhead | {'given' if p.overhead_overridden else _CPU_OVERHEAD_TEXT} "
            f"| {gib(p.overhead_bytes_per_device)} |"
        )
    else:
        if p.overhead_overridden:
            lines.append(f"| overhead / GPU | given (--overhead-gib) | {gib(p.overhead_bytes_per_device)} |")
        else:
            lines.append(
                f"| overhead / GPU | non-torch {gib(p.non_torch_bytes)} + activations "
                f"{p.max_num_batched_tokens:,}"
                f" tokens x ((3 x intermediate + qkv)/tp + 4 x hidden) x {min(DTYPE_BYTES[p.dtype], 4)} B + "
                f"sampler {p.max_num_seqs} seqs x vocab x 8 B = {gib(p.activation_bytes)} + CUDA graphs "
                f"{gib(p.cuda_graph_bytes)} | {gib(p.overhead_bytes_per_device)} |"
            )
        lines.append(
            f"| KV space / GPU | {p.gpu_memory_utilization:g} x {gib(p.tier.memory_bytes)} - weights/GPU - "
            f"overhead | {gib(p.kv_available_bytes)} |"
        )
    lines.append(
        f"| KV capacity | floor(KV space / block bytes) = {cap.num_blocks:,} blocks; "
        f"int({cap.num_blocks:,} / {cap.blocks_per_request:,} x {p.max_model_len:,}) | "
        f"**{cap.tokens:,} tokens** ({cap.max_concurrency:.2f}x at {p.max_model_len:,}) |"
    )
    lines.append(
        f"| total | weights + KV for requests + overhead x {p.tier.count if p.tier.device == 'gpu' else 1} "
        f"device(s) | {gib(est.total_bytes)} |"
    )
    lines.append("")
    if fits:
        lines.append(
            f"**Recommendation:** `{p.tier.name}` ({p.tier.count} x {p.tier.accelerator}, "
            f"${p.tier.price_per_hour:g}/h), tensor_parallel_size {p.tp}, max_model_len "
            f"{p.max_model_len:,}, max_num_seqs {p.max_num_seqs}."
        )
    else:
        lines.append(f"**Does not fit:** {est.refusal}.")
        lines += ["", "### What would make it fit", ""] + [f"- {x}" for x in est.suggestions]
    lines += ["", "```", "vllm serve MODEL " + " ".join(est.recommendation.vllm_args), "```", ""]
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
