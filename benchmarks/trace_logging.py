"""MLflow logging of one eval side: `log_traces` and `log_genai_assessments`, before vs after, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/trace_logging.py                 # 3 reps, both arms
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/trace_logging.py --arms after --reps 1 --no-check

No server: a synthetic `RunResult` over a real suite (demo_routing, 240 examples, loaded as the CLI loads it)
with outputs, tool calls (for a tool suite), a few failed examples, token counts, latency/TTFT and every score
(`score_all`, as the runner computes them). MLflow points at a fresh sqlite store and artifact dir under a tmp
LLMHOST_HOME, configured by `configure_mlflow` and the suite's experiment exactly as `evaluate_target` does.

Arms: "before" is tasks/evaluate/mlflow_logging.py as committed at --before-rev (default: the commit before
this change, read with `git show`); "after" is whatever tasks.evaluate.mlflow_logging holds now. Each repetition
runs both arms, each in a fresh MLflow run of the same store, alternating which goes first. Each arm times, as
`evaluate_target` runs them: log_traces, then log_result (params/metrics/table, untimed), then log_genai_assessments.
With --check (default) the first repetition of each arm is read back from the store (spans, span inputs,
outputs, attributes, events and times; assessments; the run's metrics, tags and inputs) and the two arms'
normalised dumps are compared, so a faster "after" that logs something different shows up as a diff.
Both arms first run once, untimed, on 8 examples (the first genai.evaluate of a process imports ~2 s of modules).
A failed example (every 37th) also leaves its last score unscored, so the Feedback(error=...) path is compared.

Found (MLflow 3.17.2, sqlite, 2 cores, 240 examples): log_genai_assessments 21.4-21.7 s -> 6.5-6.8 s. ~19 s of
it was genai.evaluate's scorer rate limiter (10 calls/s per scorer, adaptive; meant for LLM judges) pacing
960 calls that only return precomputed scores; plus ~1 s of per-trace `get_trace` reads before it. log_traces
(~7 s) is MLflow's per-trace store writes (start_trace + log_spans, ~25 ms CPU each, GIL-bound); larger
MLFLOW_ASYNC_TRACE_LOGGING_MAX_SPAN_BATCH_SIZE looked faster but makes log_spans lose races with start_trace
("Could not create trace_info ... spans will be dropped"), so it is left at MLflow's default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
_HOME = tempfile.mkdtemp(prefix="llmhost-bench-trace-")
os.environ["LLMHOST_HOME"] = _HOME  # before tasks.* reads its settings
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("LLMHOST_TRACKING_URI", None)

from tasks.evaluate.runner import ExampleRecord, RunResult  # noqa: E402
from tasks.evaluate.suite import LoadedSuite  # noqa: E402

# ---------------------------------------------------------------------------------------------- "before"

BEFORE_REV = "f204e097cbdb7529ccc1cd1927f02a4d225f9868"  # the last commit before the change this measures


def load_before(rev: str) -> Any:
    """tasks/evaluate/mlflow_logging.py as committed at `rev`, imported as its own module beside the current one.

    Its imports resolve against this tree, as the frozen copy it replaces did; `git show` needs the full history
    (not a shallow clone).
    """
    import importlib.util
    import subprocess

    rel = "tasks/evaluate/mlflow_logging.py"
    try:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True, text=True,
                              check=True).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--before-rev {rev}: git cannot show {rel} there ({exc.stderr.strip()}); "
                         "fetch the full history or name a commit this clone has") from exc
    path = Path(_HOME) / f"mlflow_logging_{rev[:12]}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"mlflow_logging_{rev[:12]}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- data


def synthetic_result(loaded: LoadedSuite, *, fail_every: int = 37, seed: int = 0) -> RunResult:
    """A run as the runner would return it: ~85% right answers, a failed request every `fail_every` examples."""
    import random

    from tasks.evaluate.metrics import ModelOutput, score_all
    from tasks.evaluate.runner import compute_stats, request_params
    from tasks.evaluate.targets import ResolvedTarget, TargetInfo

    rng = random.Random(seed)
    suite = loaded.suite
    labels: list[str] = []
    for m in suite.metrics:
        labels += list(getattr(m, "labels", None) or [])
    target = ResolvedTarget(spec="url:http://127.0.0.1:8001/v1#demo", kind="url", base_url="http://127.0.0.1:8001/v1",
                            model="demo")
    t0 = time.time_ns() - 60 * 10**9
    records, outputs = [], []
    for i, ex in enumerate(loaded.examples):
        started = t0 + i * 20_000_000
        if fail_every and i % fail_every == fail_every - 1:
            records.append(ExampleRecord(index=i, id=ex.id, ok=False, error="HTTP 503: upstream overloaded",
                                         error_class="503 server error", retries=2))
            outputs.append(ModelOutput(failed=True))
            continue
        right = rng.random() < 0.85
        tool_calls: list[dict[str, Any]] = []
        if "tool" in ex.row:  # a tool suite: the answer is a call
            name = ex.row["tool"] if right else "open_ticket"
            tool_calls = [{"id": f"call_{i}", "name": name, "arguments": json.dumps(ex.row.get("arguments", {}))}]
            text = ""
        else:
            gold = str(ex.row.get("queue", ""))
            text = gold if right else rng.choice([x for x in labels if x != gold] or ["unknown"])
        latency = 0.2 + rng.random() * 0.6
        records.append(ExampleRecord(
            index=i, id=ex.id, ok=True, output=text, tool_calls=tool_calls,
            finish_reason="tool_calls" if tool_calls else "stop", latency_s=latency, ttft_s=latency * 0.3,
            tokens_in=60 + rng.randrange(20), tokens_out=2 + rng.randrange(6), retries=0, started_ns=started,
        ))
        outputs.append(ModelOutput(text=text, tool_calls=tool_calls))
    per_ex, cols = score_all(suite, outputs, [ex.row for ex in loaded.examples])
    for r, s in zip(records, per_ex, strict=True):
        r.scores = s
        if not r.ok:  # as an LLM judge leaves a failed example: unscored, so its assessment is an error
            r.scores[suite.score_names[-1]] = None
            r.judge_notes[suite.score_names[-1]] = "judge failed: HTTP 503"
    res = RunResult(
        suite_name=suite.name, suite_version=suite.version, suite_hash=loaded.content_hash, target=target,
        info=TargetInfo(revision_hash="0123456789ab"), records=records,
        stats=compute_stats(records, 5.0, 8, Counter()), generation=suite.generation,
        request_params=request_params(suite.generation, suite.prompt), max_error_rate=0.1,
    )
    res._columns = cols
    return res


# ---------------------------------------------------------------------------------------------- read back


def _norm_span(s: Any, t0: int) -> dict[str, Any]:
    attrs = {k: v for k, v in s.attributes.items() if k not in ("mlflow.traceRequestId",)}
    if isinstance(attrs.get("mlflow.spanStartTimeNs"), int):  # wall clock for a failed example's span
        attrs["mlflow.spanStartTimeNs"] -= t0
    return {
        "name": s.name, "type": s.span_type, "parent": s.parent_id is not None, "status": str(s.status.status_code),
        "start": s.start_time_ns - t0, "end": s.end_time_ns - t0, "inputs": s.inputs, "outputs": s.outputs,
        "attributes": attrs, "events": [(e.name, e.timestamp - t0) for e in s.events],
    }


def dump_run(run_id: str, exp_id: str) -> dict[str, Any]:
    """What the store holds for one run, with ids and wall-clock-dependent values normalised away."""
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    traces = mlflow.search_traces(locations=[exp_id], run_id=run_id, return_type="list", max_results=10_000)
    out_traces = []
    for t in traces:
        spans = sorted(t.data.spans, key=lambda s: (s.parent_id is not None, s.name))
        t0 = spans[0].start_time_ns
        assessments = []
        for a in sorted(t.info.assessments, key=lambda a: a.name):
            fb = a.feedback
            assessments.append({
                "name": a.name, "type": type(a).__name__,
                "value": fb.value if fb else None, "rationale": a.rationale,
                "error": (fb.error.error_message if fb and fb.error else None),
                "error_code": (fb.error.error_code if fb and fb.error else None),
                "source": (a.source.source_type, a.source.source_id),
                "span_is_root": a.span_id == spans[0].span_id,
                "metadata": {k: ("<run>" if v == run_id else v) for k, v in (a.metadata or {}).items()},
                "source_run": (a.metadata or {}).get("mlflow.assessment.sourceRunId") == run_id,
                "valid": a.valid,
            })
        meta = {k: v for k, v in t.info.trace_metadata.items()}
        out_traces.append({
            "example": spans[0].inputs.get("example_id") if isinstance(spans[0].inputs, dict) else None,
            "state": str(t.info.state), "request_time_rel": t.info.request_time - t0 // 10**6,
            # ms from ns end points: rounds either way by one depending on the absolute times
            "execution_ms_ok": abs(t.info.execution_duration - (spans[0].end_time_ns - t0) / 1e6) <= 1,
            "source_run": meta.get("mlflow.sourceRun") == run_id,
            "metadata": {k: ("<run>" if v == run_id else v) for k, v in meta.items()},
            "tags": {k: v for k, v in t.info.tags.items() if k != "mlflow.artifactLocation"},
            "spans": [_norm_span(s, t0) for s in spans],
            "assessments": assessments,
        })
    out_traces.sort(key=lambda d: str(d["example"]))
    skip_metrics = {"trace_logging_s", "genai_assessment_s"}
    tags = {k: v for k, v in run.data.tags.items()
            if k not in ("mlflow.runName", "mlflow.user", "mlflow.source.name", "mlflow.source.type",
                         "mlflow.source.git.commit")}
    datasets = run.inputs.dataset_inputs if run.inputs else []
    return {
        "n_traces": len(traces),
        "traces": out_traces,
        "metrics": {k: v for k, v in run.data.metrics.items() if k not in skip_metrics},
        "tags": tags,
        "params": run.data.params,
        "inputs": sorted((d.dataset.name, d.dataset.source_type) for d in datasets),
        "artifacts": sorted(a.path for a in client.list_artifacts(run_id)),
    }


def diff(a: Any, b: Any, path: str = "", out: list[str] | None = None, limit: int = 40) -> list[str]:
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'after' if k not in a else 'before'}")
            else:
                diff(a[k], b[k], f"{path}.{k}", out, limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff(x, y, f"{path}[{i}]", out, limit)
    elif a != b:
        out.append(f"{path}: before={a!r:.200} after={b!r:.200}")
    return out


# ---------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def _to_log() -> Any:
    """genai.evaluate's banner and tqdm bar into a file, as the CLI's log file takes them in `make demo`."""
    with open(Path(_HOME) / "genai.log", "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="demo_routing")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--arms", default="before,after", help="Comma-separated: before, after.")
    ap.add_argument("--before-rev", default=BEFORE_REV, help="The commit whose mlflow_logging.py is the before arm.")
    ap.add_argument("--no-check", dest="check", action="store_false", help="Skip the read-back comparison.")
    ap.add_argument("--no-genai", dest="genai", action="store_false", help="Time log_traces only.")
    args = ap.parse_args()

    import mlflow

    from tasks.core.tracking import configure_mlflow, experiment_scope, get_or_create_experiment
    from tasks.evaluate import mlflow_logging
    from tasks.evaluate.suite import load

    loaded = load(args.suite)
    base = synthetic_result(loaded)
    uri = configure_mlflow()
    exp_id = get_or_create_experiment(mlflow_logging.experiment_name(loaded.suite.name))
    print(f"suite {args.suite}: {len(loaded.examples)} examples, scores {loaded.suite.score_names}")
    print(f"store {uri}, MLflow {mlflow.__version__}, {args.reps} reps", flush=True)

    before = load_before(args.before_rev) if "before" in args.arms else mlflow_logging
    impls = {
        "before": (before.log_traces, before.log_genai_assessments),
        "after": (mlflow_logging.log_traces, mlflow_logging.log_genai_assessments),
    }
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    # Untimed warm-up of each arm on a few examples: the first genai.evaluate in a process imports the
    # Databricks SDK, openai autolog hooks etc. (~2 s), which only the first side of a demo pays.
    small = LoadedSuite(suite=loaded.suite, examples=loaded.examples[:8])
    for arm in arms:
        log_traces, log_genai = impls[arm]
        warm = base.model_copy(deep=True, update={"records": [r.model_copy() for r in base.records[:8]]})
        warm._columns = base.columns
        with experiment_scope(exp_id), mlflow.start_run(run_name=f"{arm} warm-up"):
            log_traces(warm, small)
            if args.genai:
                with _to_log():
                    log_genai(warm, small)
    times: dict[str, dict[str, list[float]]] = {a: {"traces": [], "genai": []} for a in arms}
    dumps: dict[str, dict[str, Any]] = {}
    for rep in range(args.reps):
        order = arms if rep % 2 == 0 else arms[::-1]
        for arm in order:
            log_traces, log_genai = impls[arm]
            result = base.model_copy(deep=True)
            result._columns = base.columns
            with experiment_scope(exp_id), mlflow.start_run(run_name=f"{arm} rep{rep}") as run:
                t0 = time.perf_counter()
                log_traces(result, loaded)
                dt_tr = time.perf_counter() - t0
                mlflow.log_metric("trace_logging_s", dt_tr)
                mlflow_logging.log_result(result, loaded)
                dt_ga = float("nan")
                if args.genai:
                    t0 = time.perf_counter()
                    with _to_log():
                        n = log_genai(result, loaded)
                    dt_ga = time.perf_counter() - t0
                    mlflow.log_metric("genai_assessment_s", dt_ga)
                    mlflow.set_tag("llmhost.genai_traces", str(n))
            times[arm]["traces"].append(dt_tr)
            times[arm]["genai"].append(dt_ga)
            print(f"rep {rep + 1} {arm:6s}: log_traces {dt_tr:6.2f}s  log_genai_assessments {dt_ga:6.2f}s  "
                  f"total {dt_tr + dt_ga:6.2f}s", flush=True)
            if args.check and arm not in dumps:
                dumps[arm] = dump_run(run.info.run_id, exp_id)

    print()
    for arm in arms:
        for k in ("traces", "genai"):
            v = times[arm][k]
            print(f"{arm:6s} {k:6s}: median {statistics.median(v):6.2f}s  min {min(v):6.2f}s  max {max(v):6.2f}s")
    if {"before", "after"} <= set(arms):
        for k in ("traces", "genai", "total"):
            if k == "total":
                b = [x + y for x, y in zip(times["before"]["traces"], times["before"]["genai"], strict=True)]
                a = [x + y for x, y in zip(times["after"]["traces"], times["after"]["genai"], strict=True)]
            else:
                b, a = times["before"][k], times["after"][k]
            ratios = [y / x for x, y in zip(b, a, strict=True)]
            print(f"ratio after/before {k:6s}: median {statistics.median(ratios):.3f}  "
                  f"min {min(ratios):.3f}  max {max(ratios):.3f}  (per rep: {', '.join(f'{r:.3f}' for r in ratios)})")
    if args.check and {"before", "after"} <= set(dumps):
        d = diff(dumps["before"], dumps["after"])
        for arm in ("before", "after"):
            dump = dumps[arm]
            ts = dump["traces"]
            print(f"{arm}: spans/trace {sorted({len(t['spans']) for t in ts})}, "
                  f"assessments/trace {sorted({len(t['assessments']) for t in ts})} "
                  f"({sorted({a['name'] for t in ts for a in t['assessments']})}), "
                  f"errors {sum(1 for t in ts for a in t['assessments'] if a['error'])}; "
                  f"run metrics {len(dump['metrics'])} (genai: {sorted(k for k in dump['metrics'] if '/' in k)}), "
                  f"runType={dump['tags'].get('mlflow.runType')}, inputs {dump['inputs']}")
        print(f"\nread-back check: {dumps['before']['n_traces']} vs {dumps['after']['n_traces']} traces; "
              + ("IDENTICAL" if not d else f"{len(d)}+ differences:"))
        for line in d:
            print("  " + line)
    elif args.check and dumps:
        (arm, dump), = list(dumps.items())[:1]
        print(f"\nread-back ({arm}): {dump['n_traces']} traces, metrics {sorted(dump['metrics'])[:8]}...")
    with contextlib.suppress(Exception):
        mlflow.flush_trace_async_logging(terminate=True)
    shutil.rmtree(_HOME, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
