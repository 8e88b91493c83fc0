"""Promotion of a hot-loaded adapter: route switch vs blue/green restart, measured side by side in one run.

One run, in a scratch state dir unless LLMHOST_HOME is set: register the demo base, fine-tune it (or take
--version of an adapter already registered), deploy deployments/demo.yaml on the base, hot-load the adapter into the
endpoint (what the lifecycle does to evaluate it), then
  1. promote it: the route switch (`tasks.promote.promote`; a new revision on the running replica), and
  2. deploy the very revision it produced again with force: the blue/green restart promotion used to cost
     (start a replica with --lora-modules, smoke test it, switch, drain the old one).
Each time ends at the first chat completion answered under the endpoint's served name by a live replica.
Then, merged vs adapter throughput:
  3. merge the adapter with `tasks.finetune.merge.merge_adapter_version` (what `serve_promoted: merged` serves;
     it registers the merged version, so with --version it lands in the real registry), and start a second replica
     on the merged weights with the live revision's own vLLM args (re-planned by `plan_revision` and checked
     against the running replica's command line), LoRA flags removed;
  4. with both replicas up, load one at a time, alternating which goes first over --runs rounds: --requests
     demo routing requests (streamed, temperature 0, max_tokens fixed with ignore_eos, so both arms generate the
     same tokens; vLLM's generation_tokens_total on each replica confirms it) at --concurrency, straight to vLLM.
     Prints req/s and output tokens/s per arm and run, and merged/adapter per run with mean, min and max.

    .venv/bin/python benchmarks/adapter_redeploy.py [--max-steps 100] [--version models:/demo/2] [--json out.json]
                                                    [--runs 3] [--requests 64] [--concurrency 4] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def generated_tokens(base_url: str) -> float:
    """vLLM's generation_tokens_total on one replica (summed over its label sets)."""
    import httpx

    from gateway.dashboard.sampler import parse_vllm_metrics

    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10, trust_env=False).text
    return parse_vllm_metrics(text).get("generation_tokens_total", 0.0)


def load_arm(base_url: str, model: str, requests: list[list[dict[str, str]]], params: dict,
             concurrency: int) -> dict[str, float]:
    """req/s and output tokens/s of one load; the tokens are the replica's own count, which must be max_tokens each."""
    from benchmarks.eval_throughput import plain_load

    before = generated_tokens(base_url)
    rps = asyncio.run(plain_load(base_url, model, requests, params, concurrency))
    want = len(requests) * params["max_tokens"]
    # The counter is updated as the engine's outputs are processed: the last answer can arrive just before it is.
    deadline = time.monotonic() + 5.0
    while (tokens := generated_tokens(base_url) - before) < want and time.monotonic() < deadline:
        time.sleep(0.1)
    if tokens != want:
        raise SystemExit(f"{model} at {base_url} generated {tokens:.0f} tokens for {len(requests)} requests, not "
                         f"{want} ({params['max_tokens']} each): the arms would not compare equal work; check "
                         "that this vLLM honours ignore_eos")
    return {"rps": round(rps, 3), "tok_s": round(tokens * rps / len(requests), 1)}


def without_bind(cli: list[str]) -> list[str]:
    """A vLLM command line without its --host and --port options (`--port P` or `--port=P`), wherever they are."""
    out: list[str] = []
    skip = False
    for a in cli:
        if skip:
            skip = False
        elif a in ("--host", "--port"):
            skip = True
        elif not a.startswith(("--host=", "--port=")):
            out.append(a)
    return out


def merged_vs_adapter(endpoint: str, ref: str, live_args: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Merge the adapter the endpoint serves, start a replica on the merged weights, and load both in turn."""
    from demo.data import ROUTING_SYSTEM_PROMPT, routing_rows
    from tasks import store
    from tasks.deploy import pinned_spec, plan_revision
    from tasks.deploy.plan import REPLICA_ENV
    from tasks.deploy.rollout import live_revision
    from tasks.finetune.merge import merge_adapter_version
    from tasks.register import resolve_model_ref
    from tasks.serving.local import LocalTarget

    rev = live_revision(endpoint)
    assert rev is not None and rev.model_version == ref.removeprefix("models:/"), rev
    row = next(r for r in store.list_replicas(endpoint) if r.state == "up")
    planned = plan_revision(pinned_spec(rev))
    served_args = without_bind(live_args)  # the target adds --host H --port P when it starts the replica
    if planned.vllm.to_cli() != served_args:
        raise SystemExit(f"re-planned args of revision {rev.content_hash[:12]} differ from the running replica's:\n"
                         f"  {planned.vllm.to_cli()}\n  {served_args}")
    t0 = time.monotonic()
    merged = merge_adapter_version(ref)
    merge_s = round(time.monotonic() - t0, 1)
    m = merged.merged
    merged_args = planned.vllm.model_copy(update={
        "model": str(resolve_model_ref(f"models:/{m.name}/{m.version}").local_dir),
        "served_model_name": f"{m.name}-v{m.version}",
        "enable_lora": False, "lora_modules": {}, "max_lora_rank": None, "max_loras": None})
    print(f"merged {ref} in {merge_s} s (merge, register, reload and compare) -> models:/{m.name}/{m.version}; "
          "starting a replica on it ...", flush=True)

    rows = routing_rows("eval")
    requests = [[{"role": "system", "content": ROUTING_SYSTEM_PROMPT},
                 {"role": "user", "content": rows[i % len(rows)]["message"]}] for i in range(args.requests)]
    params = {"max_tokens": args.max_tokens, "temperature": 0, "extra_body": {"ignore_eos": True}}
    target = LocalTarget()
    replica = target.start(merged_args, name=f"{endpoint}-merged", env=dict(REPLICA_ENV))
    try:
        arms = {"adapter": (row.base_url, rev.served_model_name), "merged": (replica.base_url,
                                                                             merged_args.served_model_name)}
        for url, model in arms.values():  # warm-up
            load_arm(url, model, requests[:16], params, args.concurrency)
        runs: list[dict[str, Any]] = []
        for r in range(args.runs):
            # Alternate which arm goes first, so that drift in the machine's load does not favour one.
            order = ("adapter", "merged") if r % 2 == 0 else ("merged", "adapter")
            got = {arm: load_arm(*arms[arm], requests, params, args.concurrency) for arm in order}
            runs.append({"run": r + 1, **{f"{arm}_{k}": v for arm in arms for k, v in got[arm].items()},
                         "ratio": round(got["merged"]["rps"] / got["adapter"]["rps"], 3)})
    finally:
        target.stop(replica)
    ratios = [float(x["ratio"]) for x in runs]
    return {"merge_s": merge_s, "merged_version": f"models:/{m.name}/{m.version}",
            "merge_max_abs_diff": merged.max_abs_diff, "merged_replica_startup_s": replica.startup_seconds,
            "concurrency": args.concurrency, "requests": args.requests, "max_tokens": args.max_tokens,
            "runs": runs, "ratio_mean": round(sum(ratios) / len(ratios), 3), "ratio_min": min(ratios),
            "ratio_max": max(ratios)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--version", help="Registered adapter version (models:/NAME/V) of `demo`; skips fine-tuning.")
    ap.add_argument("--max-steps", type=int, default=100, help="Fine-tune steps (the time measured does not "
                    "depend on them).")
    ap.add_argument("--runs", type=int, default=3, help="Merged vs adapter: rounds, each loading both arms.")
    ap.add_argument("--requests", type=int, default=64, help="Merged vs adapter: requests per arm and round.")
    ap.add_argument("--concurrency", type=int, default=4, help="Merged vs adapter: requests in flight.")
    ap.add_argument("--max-tokens", type=int, default=16, help="Merged vs adapter: tokens generated per request "
                    "(exactly, with ignore_eos).")
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
    numbers: dict[str, Any] = {}
    if args.version:
        ref = args.version
    else:
        built = build_demo_model(Path(os.environ.get("LLMHOST_DEMO_CACHE", PROJECT_ROOT / ".llmhost" / "demo")))
        base = register_model(f"path:{built.model_dir}", "demo")
        mlflow_client().set_registered_model_alias("demo", "champion", base.version)
        cfg = load_config(ROOT / "demo" / "finetune.yaml")
        cfg = cfg.model_copy(update={
            "base_model": f"models:/demo/{base.version}", "max_steps": args.max_steps, "progress": False,
            "train": [DataSource(path=built.data_dir / Path(str(s.path)).name, repeat=s.repeat) for s in cfg.train]})
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
        numbers["merged_vs_adapter"] = merged_vs_adapter(spec.name, ref, again.replicas[0].args, args)
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
    mva = numbers["merged_vs_adapter"]
    print(f"\nmerged vs adapter, straight to vLLM: {mva['requests']} requests per arm and run at concurrency "
          f"{mva['concurrency']}, {mva['max_tokens']} output tokens each")
    print(f"merge: {mva['merge_s']} s -> {mva['merged_version']} (max logit diff {mva['merge_max_abs_diff']:.1e}); "
          f"merged replica healthy after {mva['merged_replica_startup_s']} s")
    print(f"{'run':>3} {'adapter req/s':>14} {'tok/s':>7} {'merged req/s':>13} {'tok/s':>7} {'merged/adapter':>15}")
    for r in mva["runs"]:
        print(f"{r['run']:>3} {r['adapter_rps']:14.2f} {r['adapter_tok_s']:7.1f} {r['merged_rps']:13.2f} "
              f"{r['merged_tok_s']:7.1f} {r['ratio']:15.3f}")
    print(f"merged/adapter throughput: mean {mva['ratio_mean']:.3f} (min {mva['ratio_min']:.3f}, "
          f"max {mva['ratio_max']:.3f}) over {len(mva['runs'])} runs")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
