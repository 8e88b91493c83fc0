"""Fine-tuning on any device, checked on the CPU: the precision table (GPU cases given as inputs), the reload
tolerance per dtype, refusals before anything is logged, gradient checkpointing, and scripts/gpu_check.py."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import small_config

from tasks.core.errors import ConfigError
from tasks.finetune import DataSource, FinetuneConfig, config_hash, finetune, load_training_data, preflight
from tasks.finetune.device import (
    DeviceFacts,
    Precision,
    Tolerance,
    base_dtype,
    check_qlora,
    choose_precision,
    reload_tolerance,
    trainer_args,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
A100 = DeviceFacts("cuda", True, "NVIDIA A100")
T4 = DeviceFacts("cuda", False, "Tesla T4")
CPU = DeviceFacts("cpu")


# ---------------------------------------------------------------------------------------------- decisions


@pytest.mark.parametrize(
    ("requested", "device", "base", "want"),
    [
        # auto on a CPU is fp32, whatever the base was saved in
        ("auto", CPU, "bfloat16", "fp32"),
        ("auto", CPU, None, "fp32"),
        ("fp32", CPU, "float16", "fp32"),
        # auto on a bf16 GPU: the base's own half dtype, else bf16
        ("auto", A100, "bfloat16", "bf16"),
        ("auto", A100, "float32", "bf16"),
        ("auto", A100, None, "bf16"),
        ("auto", A100, "float16", "fp16"),  # fp16 weights load without a lossy cast to bf16
        # auto on a GPU without bf16: fp16 with loss scaling, as vLLM serves a bf16 model there
        ("auto", T4, "bfloat16", "fp16"),
        ("auto", T4, "float32", "fp16"),
        # an explicit choice the hardware has is honoured as asked
        ("fp16", A100, "bfloat16", "fp16"),
        ("fp32", A100, "bfloat16", "fp32"),
        ("bf16", A100, "float16", "bf16"),
        ("fp32", T4, None, "fp32"),
    ],
)
def test_precision_table(requested, device: DeviceFacts, base, want):
    p = choose_precision(requested, device.kind, device.bf16_supported, base)
    assert p.name == want and p.reason.startswith(requested)
    assert p.loss_scaling == (want == "fp16") and p.mixed == (want != "fp32")


@pytest.mark.parametrize(("requested", "device"), [("bf16", CPU), ("fp16", CPU), ("bf16", T4)])
def test_precision_the_hardware_lacks_is_refused_with_one_line(requested, device: DeviceFacts):
    with pytest.raises(ConfigError) as exc:
        choose_precision(requested, device.kind, device.bf16_supported, "float32")
    msg = str(exc.value)
    assert msg.startswith(f"precision='{requested}' is invalid:") and "precision: auto" in msg and "\n" not in msg


def test_base_dtype_reads_both_config_spellings():
    assert base_dtype({"dtype": "bfloat16"}) == "bfloat16"
    assert base_dtype({"torch_dtype": "torch.float16"}) == "float16"
    assert base_dtype({}) is None


def test_reload_tolerance_per_dtype():
    assert reload_tolerance("float32") == Tolerance(atol=1e-4, rtol=0.0)
    assert reload_tolerance("torch.float16") == Tolerance(atol=2**-6, rtol=2**-8)
    assert reload_tolerance("bfloat16") == Tolerance(atol=2**-3, rtol=2**-5)
    with pytest.raises(ConfigError, match="dtype='int8' is invalid"):
        reload_tolerance("int8")


def test_trainer_arguments_follow_the_precision():
    bf16, fp16 = Precision("bf16", "x"), Precision("fp16", "x")
    assert trainer_args(bf16, A100, False) == {
        "bf16": True, "fp16": False, "use_cpu": False, "gradient_checkpointing": False,
        "gradient_checkpointing_kwargs": None,
    }
    args = trainer_args(fp16, T4, True)  # fp16=True is what turns on the Trainer's loss scaler
    assert args["fp16"] and not args["bf16"] and args["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert trainer_args(Precision("fp32", "x"), CPU, False)["use_cpu"] is True


def test_qlora_decision():
    check_qlora(False, CPU, False)
    check_qlora(True, A100, True)
    for device, bnb, fix in ((CPU, True, "needs a CUDA GPU"), (A100, False, "pip install bitsandbytes")):
        with pytest.raises(ConfigError) as exc:
            check_qlora(True, device, bnb)
        assert str(exc.value).startswith("qlora=True is invalid:") and fix in str(exc.value)


def test_config_hash_is_unchanged_for_configs_written_before_precision_existed():
    cfg = FinetuneConfig(base_model="models:/x/1", train=[DataSource(path=Path("train.jsonl"))])
    # The hash this config had before `precision` and `gradient_checkpointing` were fields.
    assert config_hash(cfg) == "b74ab7264b0d8ce6c7db95aad7a18842efb0dca07387326a30670d0d1a73a457"
    assert config_hash(cfg.model_copy(update={"gradient_checkpointing": True})) == config_hash(cfg)
    assert config_hash(cfg.model_copy(update={"precision": "bf16"})) != config_hash(cfg)


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("field", "value"), [("qlora", True), ("precision", "bf16"), ("precision", "fp16")])
def test_cpu_refusals_come_before_anything_is_loaded_or_logged(demo_data_dir: Path, field: str, value):
    from tasks.core.tracking import mlflow_client

    cfg = small_config(demo_data_dir, "models:/never-registered/1", experiment=f"refused-{field}-{value}")
    cfg = cfg.model_copy(update={field: value})
    with pytest.raises(ConfigError) as exc:
        preflight(cfg, device=CPU)
    assert str(exc.value).startswith(f"{field}={value!r} is invalid:") and "\n" not in str(exc.value)
    if _no_cuda():
        with pytest.raises(ConfigError, match=f"^{field}="):
            finetune(cfg)
        client = mlflow_client()
        assert client.get_experiment_by_name(cfg.experiment) is None
        assert not client.search_registered_models(filter_string="name = 'never-registered'")


def _no_cuda() -> bool:
    from tasks.finetune.device import detect_device

    return detect_device().kind == "cpu"


# ---------------------------------------------------------------------------------------------- torch, on the CPU


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_tolerance_passes_a_faithful_reload_and_fails_reinitialised_base_weights(
    demo_model_dir: Path, demo_data_dir: Path, tmp_path: Path, name: str
):
    """The reload path of publish.py on the CPU, in each dtype: same device, same dtypes, same autocast."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer

    from tasks.finetune import read_chat_rows
    from tasks.finetune.device import compare_logits, load_base, logits_on, match_dtypes
    from tasks.finetune.publish import _probe_inputs

    precision = Precision(name, "test")  # type: ignore[arg-type]
    tol = reload_tolerance(precision.dtype)
    torch.manual_seed(0)
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear", init_lora_weights=False)
    trained = get_peft_model(load_base(demo_model_dir, precision), lora).eval()
    enc = _probe_inputs(AutoTokenizer.from_pretrained(demo_model_dir), read_chat_rows(
        DataSource(path=demo_data_dir / "train.jsonl"))[:4])
    expected = logits_on(trained, enc, precision)
    trained.save_pretrained(str(tmp_path))
    reloaded = PeftModel.from_pretrained(load_base(demo_model_dir, Precision("fp32", "mlflow's own")), tmp_path)
    match_dtypes(reloaded, trained)
    assert {p.dtype for n, p in reloaded.named_parameters() if "lora_" not in n} == {getattr(torch, precision.dtype)}
    assert compare_logits(logits_on(reloaded.eval(), enc, precision), expected, tol) == (0.0, True)
    # MLflow issue #23761: q/v base weights re-initialised on reload.
    for module_name, module in reloaded.named_modules():
        if module_name.endswith(("q_proj.base_layer", "v_proj.base_layer")):
            torch.nn.init.normal_(module.weight, std=0.02)
    diff, ok = compare_logits(logits_on(reloaded, enc, precision), expected, tol)
    assert not ok and diff > 1.0


def test_gradient_checkpointing_is_honoured_and_leaves_the_losses_alone(demo_model_dir: Path, demo_data_dir: Path):
    from tasks.finetune import train_lora

    runs = {}
    for gc in (False, True):
        cfg = small_config(demo_data_dir, "models:/x/1", max_steps=2, eval_fraction=0.02, gradient_checkpointing=gc)
        out = train_lora(cfg, load_training_data(cfg), demo_model_dir, device=CPU)
        assert out.model.base_model.model.is_gradient_checkpointing is gc
        assert out.precision.name == "fp32" and out.device == "cpu"
        runs[gc] = [loss for _, loss in out.history.train]
    assert len(runs[True]) == 2 and runs[True] == pytest.approx(runs[False], abs=1e-5)


# ---------------------------------------------------------------------------------------------- gpu_check.py


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_gpu_check_imports_only_what_the_gpu_image_has():
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "peft", "pynvml", "bitsandbytes"}
    assert _imported_roots(SCRIPT) <= allowed
    # The script loads device.py by file; it may add only tasks.core.errors, which imports nothing.
    assert _imported_roots(ROOT / "tasks/finetune/device.py") <= allowed | {"tasks"}
    assert _imported_roots(ROOT / "tasks/core/errors.py") <= set(sys.stdlib_module_names)


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_3(tmp_path: Path):
    if not _no_cuda():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "report.json"
    probe = (
        "import runpy, sys\n"
        "script, sys.argv = sys.argv[1], ['gpu_check.py', '--out', sys.argv[2]]\n"
        "try:\n    runpy.run_path(script, run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'pydantic', 'mlflow', 'prefect', 'sqlalchemy'})\n"
        "print('loaded:', bad); sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 3, proc.stderr
    assert lines[0].startswith("gpu_check: CUDA is absent") and lines[0].endswith("nothing checked")
    assert lines[1] == "loaded: []"
    assert json.loads(out.read_text())["result"] == "no-cuda"


def test_gpu_check_runs_its_fine_tune_and_reload_check_with_cpu_flag(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "report.json"
    assert gpu_check.main(["--cpu", "--steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    ft = report["finetune"]
    assert report["result"] == "pass" and report["precision"] == "fp32" and ft["device"] == "cpu"
    assert ft["reload_ok"] and ft["reload_max_abs_diff"] == 0.0 and ft["adapter_changes_logits_by"] > 1e-3
