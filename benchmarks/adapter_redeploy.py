"""Time to make a new LoRA adapter callable: hot-load into a running vLLM vs restarting the replica with it.

Both paths end the same way: the first successful chat completion against the adapter's name. One run:
register the demo base model, fine-tune it (or take --version of an adapter already registered), start one
LoRA-enabled replica, hot-load, then restart the replica with the adapter in --lora-modules. Optionally
(--eval) scores base and tuned on the held-out demo suites through the evaluation runner.

    .venv/bin/python benchmarks/adapter_redeploy.py [--max-steps 500] [--eval] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def first_completion(base_url: str, model: str, deadline_s: float = 120.0) -> float:
    """Seconds until `model` answers a chat completion on `base_url` (polling while it is not ready)."""
    import openai

    from demo.data import ROUTING_SYSTEM_PROMPT

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
    start = time.monotonic()
    while True:
        try:
            client.chat.completions.create(
                model=model,
                max_tokens=4,
                temperature=0,
                messages=[
                    {"role": "system", "content": ROUTING_SYSTEM_PROMPT},
                    {"role": "user", "content": "hey team , something is off with my invoice ."},
                ],
            )
            return time.monotonic() - start
        except (openai.NotFoundError, openai.APIConnectionError):
            if time.monotonic() - start > deadline_s:
                raise
            time.sleep(0.05)


def scores(base_url: str, models: list[str]) -> dict[str, dict[str, float]]:
    from tasks.evaluate.runner import run_suite
    from tasks.evaluate.suite import load

    out: dict[str, dict[str, float]] = {}
    for suite, metric in (("demo_routing", "exact_match"), ("demo_tools", "tool_call")):
        loaded = load(suite)
        for model in models:
            result = run_suite(loaded, f"url:{base_url}#{model}", progress=False, concurrency=4)
            vals = [r.scores[metric] for r in result.records if r.scores.get(metric) is not None]
            out.setdefault(model, {})[f"{suite}.{metric}"] = round(sum(vals) / len(vals), 3) if vals else 0.0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--version", help="Registered adapter version (models:/NAME/V); skips fine-tuning.")
    ap.add_argument("--max-steps", type=int, default=None, help="Override demo/finetune.yaml's steps.")
    ap.add_argument("--eval", action="store_true", help="Score base vs tuned on the held-out demo suites.")
    ap.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = ap.parse_args()
    if not args.version:
        # A scratch state dir unless one is set, so the benchmark never touches real registries.
        os.environ.setdefault("LLMHOST_HOME", tempfile.mkdtemp(prefix="llmhost-bench-"))

    from demo.build import build_demo_model
    from tasks.core.settings import PROJECT_ROOT
    from tasks.deploy.adapters import hot_load, restart_with_adapters
    from tasks.deploy.resolve import resolve_adapter
    from tasks.finetune import DataSource, finetune, load_config
    from tasks.register import register_model
    from tasks.serving.base import VllmArgs
    from tasks.serving.local import LocalTarget

    numbers: dict[str, object] = {}
    if args.version:
        ref = args.version
    else:
        built = build_demo_model(
            Path(os.environ.get("LLMHOST_DEMO_CACHE", PROJECT_ROOT / ".llmhost" / "demo"))
        )
        base = register_model(f"path:{built.model_dir}", "demo")
        cfg = load_config(ROOT / "demo" / "finetune.yaml")
        cfg = cfg.model_copy(
            update={
                "base_model": f"models:/demo/{base.version}",
                "train": [DataSource(path=built.data_dir / s.path.name, repeat=s.repeat) for s in cfg.train],
                **({"max_steps": args.max_steps} if args.max_steps else {}),
            }
        )
        res = finetune(cfg)
        ref = f"models:/{res.registered_name}/{res.registered_version}"
        numbers.update(
            finetune_steps=res.steps,
            finetune_seconds=res.train_seconds,
            eval_loss_before=res.eval_loss_before,
            eval_loss_after=res.eval_loss_after,
        )
    adapter = resolve_adapter(ref)
    from tasks.register import resolve_model_ref

    base_dir = resolve_model_ref(f"models:/{adapter.name}/{adapter.base_version}").local_dir
    vargs = VllmArgs(
        model=str(base_dir),
        served_model_name="base",
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        max_num_seqs=16,
        enable_lora=True,
        max_lora_rank=max(16, adapter.lora_rank),
        enable_auto_tool_choice=True,
        tool_call_parser="hermes",
    )
    target = LocalTarget()
    replica = target.start(vargs, name="bench-lora")
    try:
        numbers["replica_startup_s"] = replica.startup_seconds
        first_completion(replica.base_url, "base")
        t0 = time.monotonic()
        change = hot_load(replica, adapter, name="tuned")
        first_completion(replica.base_url, "tuned")
        numbers["hot_load_api_s"] = change.seconds
        numbers["hot_load_callable_s"] = round(time.monotonic() - t0, 3)
        if args.eval:
            numbers["scores"] = scores(replica.base_url, ["base", "tuned"])
        t0 = time.monotonic()
        replica, healthy_s = restart_with_adapters(
            target, replica, vargs, {"tuned": adapter.adapter_dir}, name="bench-lora-restart"
        )
        first_completion(replica.base_url, "tuned")
        numbers["restart_healthy_s"] = round(healthy_s, 2)
        numbers["restart_callable_s"] = round(time.monotonic() - t0, 3)
    finally:
        target.stop(replica)
    numbers["adapter"] = ref
    numbers["speedup"] = round(
        float(numbers["restart_callable_s"]) / float(numbers["hot_load_callable_s"]), 1
    )
    print(f"adapter {ref}")
    print(
        f"hot-load: {numbers['hot_load_callable_s']:.3f} s to callable "
        f"(API call {numbers['hot_load_api_s']:.3f} s)"
    )
    print(
        f"restart:  {numbers['restart_callable_s']:.1f} s to callable "
        f"(healthy after {numbers['restart_healthy_s']} s)"
    )
    print(
        f"hot-load is {numbers['speedup']}x faster; target < 5 s: "
        f"{'met' if float(numbers['hot_load_callable_s']) < 5 else 'MISSED'}"
    )
    if "scores" in numbers:
        for model, sc in numbers["scores"].items():  # type: ignore[union-attr]
            print(f"{model:>6}: " + ", ".join(f"{k} {v:.3f}" for k, v in sc.items()))
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
