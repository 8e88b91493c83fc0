"""Promotion of a hot-loaded adapter: route switch vs blue/green restart, measured side by side in one run.

One run, in a scratch state dir unless LLMHOST_HOME is set: register the demo base, fine-tune it (or take
--version of an adapter already registered), deploy deployments/demo.yaml on the base, hot-load the adapter into the
endpoint (what the lifecycle does to evaluate it), then
  1. promote it: the route switch (`tasks.promote.promote`; a new revision on the running replica), and
  2. deploy the very revision it produced again with force: the blue/green restart promotion used to cost
     (start a replica with --lora-modules, smoke test it, switch, drain the old one).
Each time ends at the first chat completion answered under the endpoint's served name by a live replica.

    .venv/bin/python benchmarks/adapter_redeploy.py [--max-steps 100] [--version models:/demo/2] [--json out.json]
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


def first_completion(endpoint: str, deadline_s: float = 120.0) -> float:
    """Seconds until the endpoint's live revision answers under its served name (polling until it does)."""
    import openai

    from tasks import store

    start = time.monotonic()
    while True:
        rev = next(r for r in store.list_revisions(endpoint) if r.id == store.get_endpoint(endpoint).live_revision_id)
        rows = [r for r in store.list_replicas(endpoint) if r.state == "up"]
        try:
            client = openai.OpenAI(base_url=rows[0].base_url, api_key="unused", max_retries=0, timeout=30)
            client.chat.completions.create(model=rev.served_model_name, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "my invoice is wrong ."}])
            return time.monotonic() - start
        except (openai.NotFoundError, openai.APIConnectionError, IndexError):
            if time.monotonic() - start > deadline_s:
                raise
            time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--version", help="Registered adapter version (models:/NAME/V) of `demo`; skips fine-tuning.")
    ap.add_argument("--max-steps", type=int, default=100, help="Fine-tune steps (the time measured does not "
                    "depend on them).")
    ap.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = ap.parse_args()
    if not args.version:
        # A scratch state dir unless one is set, so the benchmark never touches real registries.
        os.environ.setdefault("LLMHOST_HOME", tempfile.mkdtemp(prefix="llmhost-bench-"))

    from demo.build import build_demo_model
    from tasks.core.settings import PROJECT_ROOT
    from tasks.core.tracking import mlflow_client
    from tasks.deploy import deploy, load_spec, stop_endpoint
    from tasks.deploy.adapters import load_into_endpoint
    from tasks.deploy.promoted import pinned_to
    from tasks.finetune import DataSource, finetune, load_config
    from tasks.promote import current_aliases, promote
    from tasks.register import register_model

    spec = load_spec(ROOT / "deployments" / "demo.yaml").model_copy(update={"name": "bench-promote"})
    numbers: dict[str, object] = {}
    if args.version:
        ref = args.version
    else:
        built = build_demo_model(Path(os.environ.get("LLMHOST_DEMO_CACHE", PROJECT_ROOT / ".llmhost" / "demo")))
        base = register_model(f"path:{built.model_dir}", "demo")
        mlflow_client().set_registered_model_alias("demo", "champion", base.version)
        cfg = load_config(ROOT / "demo" / "finetune.yaml")
        cfg = cfg.model_copy(update={
            "base_model": f"models:/demo/{base.version}", "max_steps": args.max_steps, "progress": False,
            "train": [DataSource(path=built.data_dir / s.path.name, repeat=s.repeat) for s in cfg.train]})
        res = finetune(cfg, log=lambda _m: None)
        ref = f"models:/{res.registered_name}/{res.registered_version}"
    name, version = ref.removeprefix("models:/").split("/")
    champion = current_aliases(name)["champion"]
    try:
        first = deploy(pinned_to(spec, f"models:/{name}/{champion}"), actor="bench")
        assert first.outcome in ("live", "unchanged"), first.message
        numbers["replica_startup_s"] = first.replicas[0].startup_seconds if first.replicas else None
        numbers["hot_load_s"] = load_into_endpoint(spec.name, ref, name=f"v{version}").seconds

        t0 = time.monotonic()
        rec = promote(name, version, spec, actor="bench")
        callable_s = first_completion(spec.name)
        assert rec.serving is not None and rec.serving.method == "route-switch", rec.serving
        numbers["route_switch_s"] = rec.serving.seconds
        numbers["route_switch_callable_s"] = round(time.monotonic() - t0, 3)
        numbers["route_switch_first_answer_s"] = round(callable_s, 3)

        t0 = time.monotonic()
        again = deploy(pinned_to(spec, ref), actor="bench", force=True)
        assert again.outcome == "live", again.message
        first_completion(spec.name)
        numbers["bluegreen_s"] = round(time.monotonic() - t0, 3)
        numbers["bluegreen_replica_startup_s"] = again.replicas[0].startup_seconds
    finally:
        stop_endpoint(spec.name, actor="bench")
    numbers["adapter"] = ref
    numbers["ratio"] = round(float(numbers["bluegreen_s"]) / float(numbers["route_switch_callable_s"]), 1)
    print(f"adapter {ref} (hot-loaded in {numbers['hot_load_s']} s to be evaluated)")
    print(f"route switch:     {numbers['route_switch_callable_s']:.3f} s from promote() to the first answer "
          f"(switch itself {numbers['route_switch_s']:.3f} s, no process started)")
    print(f"blue/green:       {numbers['bluegreen_s']:.1f} s for the same revision restarted "
          f"(replica healthy after {numbers['bluegreen_replica_startup_s']} s)")
    print(f"route switch is {numbers['ratio']}x faster")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
