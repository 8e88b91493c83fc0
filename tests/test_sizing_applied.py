"""Sizing applied to what a spec leaves auto: tier, TP, context, KV dtype and max_num_seqs in the rendered args,
the revision's `sizing` facts, and `llmhost size`'s line on this machine's GPUs. Configs are the public ones in
tests/fixtures/configs written as config.json to tmp dirs; GPU inventories are built lists. No model, no server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tasks import store
from tasks.core.gpus import Gpu
from tasks.deploy import EndpointSpec
from tasks.deploy.plan import RevisionPlan, _vllm_args, _Weights, size_spec
from tasks.deploy.rollout import _Rollout, record_revision, size_plan
from tasks.serving.base import VllmArgs
from tasks.size import GiB, MiB, SizingRequest, estimate_memory, load_tiers
from tasks.size.apply import AUTO_CONTEXT_FLOOR, apply_sizing, round_context
from tasks.size.machine import LOCAL_TIER_PREFIX, fit_line, local_tiers
from tasks.store import audit

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
LLAMA_8B = json.loads((CONFIGS / "llama-3.1-8b.json").read_text())  # 131,072 tokens, 8.03 B params, bf16
TIERS = {t.name: t for t in load_tiers()}


def h100(index: int, used_gib: float = 0.5) -> Gpu:
    return Gpu(index, "NVIDIA H100 80GB HBM3", 81559 * MiB, int(used_gib * GiB), uuid=f"GPU-{index}")


def model_dir(tmp_path: Path, config: str = "llama-3.1-8b.json") -> str:
    d = tmp_path / Path(config).stem
    d.mkdir(exist_ok=True)
    shutil.copy(CONFIGS / config, d / "config.json")
    return str(d)


def spec(**kw: Any) -> EndpointSpec:
    return EndpointSpec.model_validate({"name": "sized", "model": "models:/m/1", **kw})


def rendered(s: EndpointSpec, mdir: str, gpus: list[Gpu] | None = None) -> tuple[VllmArgs, Any]:
    sized, _ = size_spec(s, mdir, gpus=gpus)
    w = _Weights(model_version="m/1", model_dir=mdir, served="sized", base_served="sized", tool_tags={},
                 model_hash={})
    return _vllm_args(s, w, None, sized), sized


def test_tp_auto_is_the_gpus_of_the_cheapest_tier_that_fits():
    # 8B in fp16 is 15 GiB of weights: a 15 GiB T4 cannot hold it, two can (7.5 GiB each).
    t4 = [TIERS["t4-16gb-x1"], TIERS["t4-16gb-x2"], TIERS["t4-16gb-x4"]]
    applied, est = apply_sizing(LLAMA_8B, SizingRequest(concurrency=4), t4)
    assert (applied.tier, applied.tensor_parallel_size, applied.fits) == ("t4-16gb-x2", 2, True)
    assert est.recommendation.tensor_parallel_size == 2 and "--tensor-parallel-size" in est.recommendation.vllm_args
    # The same from this machine's inventory: two T4s make tiers of 1 and 2 GPUs, the fewest that fit win.
    t4s = [Gpu(i, "Tesla T4", 15360 * MiB, 0) for i in range(2)]
    applied, est = apply_sizing(LLAMA_8B, SizingRequest(concurrency=4), local_tiers(t4s))
    assert (applied.tier, applied.tensor_parallel_size) == (f"{LOCAL_TIER_PREFIX}2", 2)
    assert "float16" in est.recommendation.vllm_args  # a T4 has no bfloat16


def test_max_model_len_default_is_the_longest_that_fits_not_the_model_maximum():
    applied, est = apply_sizing(LLAMA_8B, SizingRequest(concurrency=4, tier="l4-24gb-x1"), load_tiers())
    assert est.fits and AUTO_CONTEXT_FLOOR <= applied.max_model_len < 131_072
    assert applied.max_model_len % 1024 == 0 and "max_model_len" in applied.source
    longer = SizingRequest(concurrency=4, tier="l4-24gb-x1", max_model_len=applied.max_model_len + 1024)
    assert not estimate_memory(LLAMA_8B, longer, load_tiers()).fits  # 1,024 more does not fit
    # Where the whole context fits, it is the model's maximum.
    roomy, _ = apply_sizing(LLAMA_8B, SizingRequest(concurrency=1, tier="h200-141gb-x1"), load_tiers())
    assert roomy.max_model_len == 131_072
    assert round_context(7_500, 131_072) == 7_168 and round_context(700, 131_072) == 512
    assert round_context(131_072, 131_072) == 131_072


def test_kv_cache_fp8_only_where_nothing_fits_without_it():
    # 12 sequences of 4,096 tokens need 6 GiB of bf16 KV; an L4 holding 8B's weights has ~3.7 GiB left.
    req = SizingRequest(concurrency=12, tier="l4-24gb-x1")
    applied, est = apply_sizing(LLAMA_8B, req, load_tiers())
    assert applied.kv_cache_dtype == "fp8" and est.fits and "--kv-cache-dtype" in est.recommendation.vllm_args
    roomy, _ = apply_sizing(LLAMA_8B, req.model_copy(update={"tier": "h100-80gb-x1"}), load_tiers())
    assert roomy.kv_cache_dtype == "auto"
    # Nothing fits either way: the closest tier's values, marked unfit (deploy's gate refuses it).
    hopeless, _ = apply_sizing(LLAMA_8B, req.model_copy(update={"concurrency": 500}), load_tiers())
    assert not hopeless.fits and hopeless.kv_cache_dtype == "auto"


def test_auto_fields_take_sizing_values_and_explicit_ones_are_kept(tmp_path: Path):
    mdir = model_dir(tmp_path)
    args, sized = rendered(spec(hardware="h100-80gb-x2", concurrency=8), mdir)
    assert sized.source == ["tensor_parallel_size", "max_model_len", "kv_cache_dtype", "max_num_seqs"]
    assert (args.tensor_parallel_size, args.max_num_seqs, sized.max_model_len) == (2, 1024, args.max_model_len)
    assert args.max_model_len is not None and 32_768 < args.max_model_len < 131_072  # 8 x 131k is 128 GiB of KV
    assert args.kv_cache_dtype == "auto" and "--max-num-seqs" in args.to_cli()
    explicit = {"tensor_parallel_size": 1, "max_model_len": 2048, "kv_cache_dtype": "fp8_e5m2", "max_num_seqs": 3}
    args, sized = rendered(spec(hardware="h100-80gb-x2", concurrency=8, vllm=explicit), mdir)
    assert sized.source == []
    assert (args.tensor_parallel_size, args.max_model_len, args.kv_cache_dtype, args.max_num_seqs) == (
        1, 2048, "fp8_e5m2", 3)


def test_hardware_auto_sizes_on_this_machines_gpus_or_the_cpu_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    mdir = model_dir(tmp_path)
    monkeypatch.setattr("tasks.deploy.plan.has_cuda_gpu", lambda: True)  # as on the machine the inventory is of
    args, sized = rendered(spec(concurrency=4), mdir, gpus=[h100(0), h100(1)])
    assert (sized.tier, sized.device, args.tensor_parallel_size) == (f"{LOCAL_TIER_PREFIX}1", "gpu", 1)
    assert args.dtype == "auto"  # bf16 as config.json says, not the CPU's fp32
    assert "tier" in sized.source and 4096 < sized.max_model_len < 131_072 and args.max_model_len == sized.max_model_len
    # Same machine, same revision args: totals, not the memory other processes use now.
    again, _ = rendered(spec(concurrency=4), mdir, gpus=[h100(0, used_gib=40), h100(1)])
    assert again == args
    monkeypatch.setattr("tasks.deploy.plan.has_cuda_gpu", lambda: False)
    small = model_dir(tmp_path, "qwen2.5-0.5b.json")
    args, sized = rendered(spec(concurrency=4, vllm={"dtype": "float32"}), small, gpus=[])
    assert (sized.tier, sized.device, args.tensor_parallel_size, args.max_num_seqs) == ("cpu", "cpu", 1, 128)
    assert args.max_model_len is not None and args.max_model_len < 32_768  # 1 GiB of CPU KV space by default
    # On ray, auto keeps the catalog's cheapest tier that fits.
    ray, _ = size_spec(spec(target="ray", concurrency=4), mdir)
    assert ray.tier in TIERS and ray.tier != "cpu"


def test_fits_on_line_for_a_given_inventory():
    req = SizingRequest(concurrency=4, max_model_len=8192)
    assert fit_line(LLAMA_8B, req, [h100(0, used_gib=1)]) == (
        "this machine: GPU 0 (NVIDIA H100 80GB HBM3, 78.6 GiB free): fits at TP 1")
    assert fit_line(LLAMA_8B, req, []).startswith("this machine: no GPU here (NVML sees none)")
    a10g = [Gpu(i, "NVIDIA A10G", 23028 * MiB, 300 * MiB) for i in range(2)]
    assert fit_line(LLAMA_8B, req, a10g).endswith("(2 x NVIDIA A10G, 22.2 / 22.2 GiB free): fits at TP 2")
    # No context given: what hardware: auto would deploy; a GPU another process fills is named with the fix.
    line = fit_line(LLAMA_8B, SizingRequest(concurrency=4), [h100(0, used_gib=50)])
    assert "fits at TP 1 with --max-model-len" in line and "(what hardware: auto deploys" in line
    assert "GPU 0 has 29.6 GiB free: free it or set gpu_memory_utilization 0.37" in line
    big = SizingRequest(concurrency=4, max_model_len=8192, dtype="float32")
    assert ": does not fit: " in fit_line(LLAMA_8B, big, [Gpu(0, "NVIDIA L4", 23034 * MiB, 0)])


def test_llmhost_size_prints_the_line_for_this_machine(monkeypatch: pytest.MonkeyPatch, capsys):
    from flows.cli import main

    monkeypatch.setattr("tasks.core.gpus.inventory", lambda: [h100(0)])
    rc = main(["size", "--config", str(CONFIGS / "llama-3.1-8b.json"), "--max-model-len", "8192"])
    out = capsys.readouterr().out
    assert rc == 0 and "this machine: GPU 0 (NVIDIA H100 80GB HBM3, 79.1 GiB free): fits at TP 1" in out


def test_applied_sizing_is_the_revisions_facts_on_show_and_dashboard(tmp_path: Path):
    from gateway.dashboard.overview import overview_of
    from tasks.deploy import describe

    s = spec(name="sized-facts", target="ray", hardware="l4-24gb-x1", concurrency=4)  # ray: a GPU tier here
    sized, est = size_spec(s, model_dir(tmp_path))
    plan = RevisionPlan(endpoint=s.name, content_hash="f" * 64, model_version="m/1", model_dir="/m",
                        served_model_name=s.name, vllm=VllmArgs(model="/m", served_model_name=s.name), runtime="vllm",
                        tool_calling="off", identity={"spec": {"n": 1}}, sizing=sized, estimate=est)
    store.upsert_endpoint(s.name, actor="test")
    record_revision(_Rollout(spec=s, actor="test", plan=plan, live=None, t0=0.0))
    assert [e.action for e in audit.entries(endpoint=s.name)][-2:] == ["revision.facts", "deploy.plan"]
    facts = describe(s.name)[0].facts["sizing"]
    assert facts == {"tier": "l4-24gb-x1", "tensor_parallel_size": 1, "max_model_len": sized.max_model_len,
                     "kv_cache_dtype": "auto", "max_num_seqs": 256,
                     "source": ["tensor_parallel_size", "max_model_len", "kv_cache_dtype", "max_num_seqs"]}
    line = overview_of(store.get_engine(), s.name).revisions[0].sizing or ""
    assert line.startswith("tier l4-24gb-x1 · TP 1 · max_model_len ") and "sizing chose tensor_parallel_size" in line
    # The fit gate checks the very values planning applied.
    gate = size_plan(plan, s)
    assert gate.fits and gate.tier == "l4-24gb-x1" and gate.kv_capacity_tokens == est.kv_capacity_tokens
