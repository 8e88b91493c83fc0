"""Check llmhost's fine-tune path on a CUDA GPU in a few minutes: LoRA steps + reload check, NVML, weight memory.

Needs only torch, transformers (with accelerate, which its Trainer uses), peft and, for the inventory,
nvidia-ml-py: it runs on a GPU image without pydantic, MLflow or Prefect. The precision and tolerance
decisions are the project's own (tasks/finetune/device.py, loaded by file), so this checks what
`llmhost finetune` will do. Example: python scripts/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
EPILOG = """exit status: 0 every check passed; 1 a check failed; 2 bad arguments or a precision this GPU refuses;
3 no CUDA GPU here: one line says so and nothing was checked (a check that ran nothing is no pass)."""
# The demo base model's shape (demo/build.py DemoModelConfig), built here without its tokenizer or pretraining.
DEMO_SHAPE: dict[str, Any] = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=1, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True,
)


def load_device_module() -> Any:
    """tasks/finetune/device.py by file: importing the tasks.finetune package would pull in pydantic and MLflow."""
    sys.path.insert(0, str(ROOT))  # for tasks.core.errors, which imports nothing
    spec = importlib.util.spec_from_file_location("llmhost_finetune_device", ROOT / "tasks/finetune/device.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def nvml_inventory() -> dict[str, Any]:
    """GPUs as the driver sees them: name, total/used memory and the processes holding memory."""
    try:
        import pynvml
    except ImportError:
        return {"error": "nvidia-ml-py is not installed (pip install nvidia-ml-py)"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return {"error": f"NVML: {e}"}
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_total_gib": round(mem.total / 2**30, 2),
                "memory_used_gib": round(mem.used / 2**30, 2),
                "processes": [{"pid": p.pid, "used_mib": round((p.usedGpuMemory or 0) / 2**20)} for p in procs],
            })
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {"driver": driver.decode() if isinstance(driver, bytes) else driver, "gpus": gpus}
    finally:
        pynvml.nvmlShutdown()


def build_tiny_model(out: Path) -> Path:
    """A seeded, untrained Llama of the demo's shape, saved in fp32 as the demo base is."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**DEMO_SHAPE, dtype="float32")).save_pretrained(out)
    return out


def weight_memory(dev: Any, model_dir: Path, precision: Any) -> tuple[dict[str, Any], Any]:
    """Predicted (parameters from the config x dtype bytes) against torch.cuda.memory_allocated after the load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    params = sum(p.numel() for p in shell.parameters())
    predicted = params * torch.empty((), dtype=dev.torch_dtype(precision)).element_size()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = dev.load_base(model_dir, precision, device="cuda")
    torch.cuda.synchronize()
    measured = torch.cuda.memory_allocated() - before
    # Allocations round up to 512 bytes each and a few fp32 buffers (rotary) load too: allow 5% + 1 MiB.
    ok = abs(measured - predicted) <= 0.05 * predicted + 2**20
    return {"params": params, "dtype": precision.dtype, "predicted_bytes": predicted, "measured_bytes": measured,
            "ratio": round(measured / predicted, 4), "ok": ok}, model


def synthetic_rows(vocab: int, n: int, length: int, seed: int) -> list[dict[str, Any]]:
    """Rows where each token follows from the one before (t -> 5t+7 mod V): a pattern LoRA learns in steps."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for start in torch.randint(0, vocab, (n,), generator=g).tolist():
        ids = [start]
        for _ in range(length - 1):
            ids.append((ids[-1] * 5 + 7) % vocab)
        t = torch.tensor(ids)
        rows.append({"input_ids": t, "labels": t.clone(), "attention_mask": torch.ones_like(t)})
    return rows


def finetune_check(dev: Any, base: Any, model_dir: Path, precision: Any, facts: Any, args: Any) -> dict[str, Any]:
    """LoRA steps through the Trainer, then the reload check: save the adapter, reload it, compare logits."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator

    vocab = base.config.vocab_size
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=16, learning_rate=2e-3,
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False,
            seed=0, **dev.trainer_args(precision, facts, args.gradient_checkpointing),
        )
        trainer = Trainer(model=model, args=targs, train_dataset=synthetic_rows(vocab, 256, 64, 0),
                          data_collator=default_data_collator)
        trainer.remove_callback(PrinterCallback)  # the report below says what matters
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        k = max(1, len(losses) // 4)  # means of the first and last quarters: one noisy step proves nothing
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        model.eval()
        # The probe batch is built on the CPU, as the project's is; logits_on moves it to the model's device.
        probe = default_data_collator(synthetic_rows(vocab, 4, 32, 1))
        probe.pop("labels")
        expected = dev.logits_on(model, probe, precision)
        model.save_pretrained(str(Path(tmp) / "adapter"))
        where = "cuda" if facts.kind == "cuda" else None
        reloaded = PeftModel.from_pretrained(dev.load_base(model_dir, precision, device=where), Path(tmp) / "adapter")
        dev.match_dtypes(reloaded, model)
        tol = dev.reload_tolerance(precision.dtype)
        diff, ok = dev.compare_logits(dev.logits_on(reloaded.eval(), probe, precision), expected, tol)
        with reloaded.disable_adapter():
            adapter_diff, _ = dev.compare_logits(dev.logits_on(reloaded, probe, precision), expected, tol)
    return {
        "steps": args.steps, "seconds": round(seconds, 2), "device": str(dev.model_device(model)),
        "loss_first": round(first, 4), "loss_last": round(last, 4), "loss_fell": last < first,
        "reload_max_abs_diff": diff, "reload_tolerance": str(tol), "reload_ok": ok,
        "adapter_changes_logits_by": adapter_diff,
        "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if facts.kind == "cuda" else None,
    }


def run(args: argparse.Namespace) -> int:
    import torch

    dev = load_device_module()
    report: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    facts = dev.detect_device()
    if facts.kind != "cuda" and not args.cpu:
        print(f"gpu_check: CUDA is absent (torch {torch.__version__}: torch.cuda.is_available() is False); "
              "nothing checked")
        write(args.out, {**report, "result": "no-cuda"})
        return EXIT_NO_CUDA
    if args.cpu:
        facts = dev.DeviceFacts("cpu")
    with tempfile.TemporaryDirectory(prefix="gpu-check-model-") as tmp:
        model_dir = Path(args.model) if args.model else build_tiny_model(Path(tmp) / "model")
        try:
            precision = dev.choose_precision(args.precision, facts.kind, facts.bf16_supported,
                                             dev.read_base_dtype(model_dir))
        except dev.ConfigError as e:
            print(f"gpu_check: {e}")
            return EXIT_USAGE
        report.update(device=facts.name, bf16_supported=facts.bf16_supported, model=args.model or "tiny demo-shape",
                      precision=precision.name, precision_reason=precision.reason)
        if facts.kind == "cuda":
            report["nvml"] = nvml_inventory()
            report["weight_memory"], base = weight_memory(dev, model_dir, precision)
        else:
            base = dev.load_base(model_dir, precision)
        report["finetune"] = finetune_check(dev, base, model_dir, precision, facts, args)
    checks = [report["finetune"]["reload_ok"], report["finetune"]["loss_fell"]]
    checks += [report["weight_memory"]["ok"]] if "weight_memory" in report else []
    report["result"] = "pass" if all(checks) else "fail"
    print_report(report)
    write(args.out, report)
    return EXIT_OK if all(checks) else EXIT_FAILED


def print_report(r: dict[str, Any]) -> None:
    ft = r["finetune"]
    print(f"gpu_check: {r['result'].upper()}  torch {r['torch']} on {r['device']} (bf16: {r['bf16_supported']})")
    for g in r.get("nvml", {}).get("gpus", []):
        print(f"  gpu {g['index']}: {g['name']}, {g['memory_used_gib']}/{g['memory_total_gib']} GiB used, "
              f"{len(g['processes'])} processes")
    if "error" in r.get("nvml", {}):
        print(f"  nvml: {r['nvml']['error']}")
    if "weight_memory" in r:
        w = r["weight_memory"]
        print(f"  weights: {w['params']:,} params in {w['dtype']}: predicted {w['predicted_bytes'] / 2**20:.2f} MiB, "
              f"measured {w['measured_bytes'] / 2**20:.2f} MiB (x{w['ratio']}) {'ok' if w['ok'] else 'MISMATCH'}")
    print(f"  fine-tune: {ft['steps']} steps in {ft['seconds']}s on {ft['device']} in {r['precision']} "
          f"({r['precision_reason']}); loss {ft['loss_first']} -> {ft['loss_last']}")
    print(f"  reload check: max |diff| {ft['reload_max_abs_diff']:.3g} within {ft['reload_tolerance']}: "
          f"{'ok' if ft['reload_ok'] else 'FAILED'} (the adapter itself moves logits by "
          f"{ft['adapter_changes_logits_by']:.3g})")


def write(out: str | None, report: dict[str, Any]) -> None:
    if out:
        Path(out).write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF model folder to fine-tune (default: a tiny model of the demo's shape)")
    ap.add_argument("--steps", type=int, default=40, help="LoRA optimizer steps (default 40)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                    help="as FinetuneConfig.precision (default auto: bf16 where the GPU has it)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="as FinetuneConfig.gradient_checkpointing")
    ap.add_argument("--out", help="write the report as JSON here")
    ap.add_argument("--cpu", action="store_true",
                    help="run the fine-tune and reload check on the CPU in fp32, to test this script without a GPU "
                    "(no NVML or memory check)")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
