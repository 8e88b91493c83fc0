"""The fine-tune path on a CUDA GPU: `make test-gpu` runs these (pytest -m gpu -rs); without CUDA they skip.

Each trains the demo model for a handful of steps, so the module takes well under a minute on a GPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import small_config

from tasks.finetune import finetune, load_training_data, train_lora
from tasks.finetune.device import bnb_importable, detect_device, reload_tolerance

DEVICE = detect_device()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.kind != "cuda", reason="needs CUDA (torch.cuda.is_available() is False)"),
]
ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "gpu-demo"


@pytest.fixture(scope="module")
def base_version(demo_model_dir: Path):
    from tasks.register import register_model

    return register_model(f"path:{demo_model_dir}", MODEL_NAME)


def test_finetune_on_cuda_trains_in_the_gpus_precision_and_passes_the_reload_check(base_version, demo_data_dir):
    """The issue's crash: the model trained on CUDA while the reload check's probe batch stayed on the CPU."""
    from tasks.core.tracking import mlflow_client

    cfg = small_config(demo_data_dir, f"models:/{MODEL_NAME}/{base_version.version}", max_steps=8)
    res = finetune(cfg)
    want = "bf16" if DEVICE.bf16_supported else "fp16"  # the demo base is saved in fp32
    assert res.precision == want and res.registered_version is not None
    run = mlflow_client().get_run(res.run_id)
    tol = reload_tolerance(run.data.params["train_dtype"])
    assert run.data.params["reload_atol"] == str(tol.atol) and run.data.params["reload_rtol"] == str(tol.rtol)
    assert run.data.tags["llmhost.precision"].startswith("auto: ") and DEVICE.name == run.data.tags["llmhost.device"]
    assert math.isfinite(res.reload_max_abs_diff) and res.last_loss < res.first_loss


def test_fp16_with_loss_scaling_and_gradient_checkpointing_on_cuda(demo_model_dir: Path, demo_data_dir: Path):
    import torch

    cfg = small_config(demo_data_dir, "models:/x/1", max_steps=6, precision="fp16", gradient_checkpointing=True)
    out = train_lora(cfg, load_training_data(cfg), demo_model_dir)
    params = dict(out.model.named_parameters())
    assert {p.device.type for p in params.values()} == {"cuda"}
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}  # what the scaler unscales
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {torch.float16}
    assert out.model.base_model.model.is_gradient_checkpointing
    losses = [v for _, v in out.history.train]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.skipif(not bnb_importable(), reason="QLoRA needs bitsandbytes, which is not installed")
def test_qlora_trains_and_its_adapter_reloads_onto_the_4bit_base(base_version, demo_data_dir: Path):
    cfg = small_config(demo_data_dir, f"models:/{MODEL_NAME}/{base_version.version}", max_steps=6, qlora=True)
    res = finetune(cfg)
    assert res.registered_version is not None and math.isfinite(res.reload_max_abs_diff)


def test_gpu_check_script_passes(tmp_path: Path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gpu_check.py"), "--steps", "40", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["result"] == "pass" and report["precision"] == ("bf16" if DEVICE.bf16_supported else "fp16")
    assert report["weight_memory"]["ok"] and report["finetune"]["device"].startswith("cuda")
    assert report["nvml"].get("gpus") or "not installed" in report["nvml"].get("error", "")
