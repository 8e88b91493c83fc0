"""Recording a comparison's two sides into MLflow: one after the other (`inline`) vs side by side (`parallel`).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_recording.py              # 3 reps of both modes, checked
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_recording.py --reps 1 --no-check

No server: two synthetic 240-example sides over a real suite (demo_routing), built as benchmarks/trace_logging.py
builds one (outputs, a failed example every 37th, tokens, latency/TTFT, every score), in a fresh sqlite store
under a tmp LLMHOST_HOME. Each repetition records a fresh copy of both sides once per mode, alternating which
mode goes first: `inline` records the candidate then the baseline in this process; `parallel` records the
candidate in a child process (`python -m tasks.evaluate.recording`, started here, its MLflow import included in
the time) while this process records the baseline: what `compare_targets` does on two or more cores. Prints the
wall time of each and the ratio parallel / inline per repetition. With --check (default) the first repetition's
runs are read back (trace_logging.dump_run: spans, attributes, events, assessments, metrics, tags, params) and
the two modes' dumps are compared side by side.

The lifecycle's third mode, `background` (both sides in one child while the fine-tune trains on the other core),
is not timed here: its cost is whatever it adds to the fine-tune, which the demo's step times show.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trace_logging as tl  # noqa: E402  (sets a tmp LLMHOST_HOME before tasks.* reads its settings)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="demo_routing")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-check", dest="check", action="store_false", help="Skip the read-back comparison.")
    ap.add_argument("--journal", default=None, help="Set the sqlite store's journal_mode first (e.g. wal).")
    args = ap.parse_args()

    import mlflow

    from tasks.core.tracking import configure_mlflow, experiment_scope, get_or_create_experiment
    from tasks.evaluate.mlflow_logging import experiment_name
    from tasks.evaluate.recording import SideRecord, record_sides
    from tasks.evaluate.running import _side_run
    from tasks.evaluate.suite import LoadedSuite, load

    loaded = load(args.suite)
    bases = [tl.synthetic_result(loaded, seed=0), tl.synthetic_result(loaded, seed=1)]
    uri = configure_mlflow()
    exp_id = get_or_create_experiment(experiment_name(loaded.suite.name))
    if args.journal:
        import sqlite3

        with contextlib.closing(sqlite3.connect(uri.removeprefix("sqlite:///"))) as db:
            print("journal_mode:", db.execute(f"PRAGMA journal_mode={args.journal}").fetchone()[0])
    print(f"suite {args.suite}: {len(loaded.examples)} examples a side, 2 sides; store {uri}, MLflow "
          f"{mlflow.__version__}, {args.reps} reps", flush=True)

    def sides() -> list[SideRecord]:
        out = []
        for base in bases:
            res = base.model_copy(deep=True)
            res._columns = base.columns
            out.append(SideRecord(loaded, res, _side_run(loaded, res.target, exp_id, None), exp_id))
        return out

    # Untimed warm-up in this process (the first genai.evaluate imports ~2 s of modules, which a flow pays once).
    small = LoadedSuite(suite=loaded.suite, examples=loaded.examples[:8])
    warm = bases[0].model_copy(deep=True, update={"records": [r.model_copy() for r in bases[0].records[:8]]})
    warm._columns = bases[0].columns
    with experiment_scope(exp_id), tl._to_log():
        record_sides([SideRecord(small, warm, _side_run(small, warm.target, exp_id, None), exp_id)], "inline")

    modes = ["inline", "parallel"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    dumps: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.reps):
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            todo = sides()
            with experiment_scope(exp_id), tl._to_log():
                t0 = time.perf_counter()
                record_sides(todo, mode)  # type: ignore[arg-type]
                dt = time.perf_counter() - t0
            times[mode].append(dt)
            print(f"rep {rep + 1} {mode:8s}: {dt:6.2f}s for both sides", flush=True)
            if args.check and mode not in dumps:
                dumps[mode] = [tl.dump_run(s.run_id, exp_id) for s in todo]

    print()
    for mode in modes:
        v = times[mode]
        print(f"{mode:8s}: median {statistics.median(v):6.2f}s  min {min(v):6.2f}s  max {max(v):6.2f}s")
    ratios = [p / i for i, p in zip(times["inline"], times["parallel"], strict=True)]
    print(f"ratio parallel/inline: median {statistics.median(ratios):.3f}  min {min(ratios):.3f}  "
          f"max {max(ratios):.3f}  (per rep: {', '.join(f'{r:.3f}' for r in ratios)})")
    if args.check:
        problems = []
        for side, (a, b) in enumerate(zip(dumps["inline"], dumps["parallel"], strict=True)):
            for d in (a, b):
                d["metrics"].pop("record_s", None)
                # the bootstrap's last bit may differ between processes (its sums' order)
                d["metrics"] = {k: round(v, 9) for k, v in d["metrics"].items()}
            problems += [f"side {side}: {line}" for line in tl.diff(a, b)]
            print(f"side {side}: {a['n_traces']} traces inline, {b['n_traces']} parallel")
        if problems:
            print("CHECK FAILED: the modes stored different runs (before = inline, after = parallel):")
            for line in problems:
                print("  " + line)
            return 1
        print("check: both modes stored the same runs (spans, assessments, metrics, tags, params, artifacts)")
    with contextlib.suppress(Exception):
        mlflow.flush_trace_async_logging()
    return 0


if __name__ == "__main__":
    sys.exit(main())
