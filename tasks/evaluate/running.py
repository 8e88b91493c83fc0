"""Evaluating in MLflow runs: one target in its own run, or two targets as child runs of a comparison run.

What each run records is `mlflow_logging`'s; the requests are `runner`'s. A gateway key given as `api_key`
is passed down to the client and never stored on a target, a result or a run.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from tasks.core.tracking import configure_mlflow, experiment_scope, get_or_create_experiment
from tasks.evaluate.compare import Comparison, compare
from tasks.evaluate.mlflow_logging import experiment_name, log_cost
from tasks.evaluate.recording import (
    RecordMode,
    SideRecord,
    end_run_failed,
    record_side,
    record_sides,
    resolve_record_mode,
    wait_for_background_records,
)
from tasks.evaluate.report import plot, render_markdown
from tasks.evaluate.runner import RunResult, RunStats, measure_saturation, run_suite
from tasks.evaluate.suite import LoadedSuite
from tasks.evaluate.targets import ResolvedTarget, resolve_target


def _side_run(loaded: LoadedSuite, target: ResolvedTarget, exp_id: str, parent_run_id: str | None) -> str:
    """A side's run, created RUNNING and left off the fluent stack: it is resumed to be recorded and ends then.

    Its tags are those `mlflow.start_run` resolves (source, user, git commit) plus the name and, in a comparison,
    the parent.
    """
    import mlflow
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    name = f"{target.spec} v{loaded.suite.version}"
    tags = {MLFLOW_RUN_NAME: name} | ({MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {})
    return mlflow.MlflowClient().create_run(exp_id, run_name=name, tags=resolve_tags(tags)).info.run_id


def _measure(loaded: LoadedSuite, target: ResolvedTarget, exp_id: str, parent_run_id: str | None, *,
             concurrency: int | None, progress: bool, api_key: str | None) -> tuple[RunResult, str]:
    """The side's requests, in its new run; a failure here ends the run FAILED before it is raised.

    What is still being recorded in the background is waited for first: no request is timed beside a recorder.
    """
    wait_for_background_records()
    run_id = _side_run(loaded, target, exp_id, parent_run_id)
    try:
        return run_suite(loaded, target, concurrency=concurrency, progress=progress, api_key=api_key), run_id
    except BaseException:
        end_run_failed(run_id)
        raise


def evaluate_target(
    loaded: LoadedSuite,
    target: ResolvedTarget | str,
    *,
    concurrency: int | None = None,
    progress: bool = True,
    trace: bool = True,
    genai: bool = True,
    nested: bool = False,
    hourly_price: float | None = None,
    tier: str | None = None,
    api_key: str | None = None,
) -> tuple[RunResult, str]:
    """Run the suite against one target inside its own MLflow run; returns the result and the run id.

    `api_key` is the gateway key for an `endpoint:` target; without it, LLMHOST_API_KEY is read. With `nested`,
    the run is a child of the active run.
    """
    import mlflow

    if isinstance(target, str):
        target = resolve_target(target)
    target.api_key(api_key)  # a missing key fails before an MLflow run is created
    configure_mlflow()
    exp_id = get_or_create_experiment(experiment_name(loaded.suite.name))
    parent = mlflow.active_run() if nested else None
    with experiment_scope(exp_id):
        result, run_id = _measure(loaded, target, exp_id, parent.info.run_id if parent else None,
                                  concurrency=concurrency, progress=progress, api_key=api_key)
        record_side(SideRecord(loaded, result, run_id, exp_id, trace=trace, genai=genai,
                               hourly_price=hourly_price, tier=tier))
    return result, run_id


def _saturation(loaded: LoadedSuite, cand: ResolvedTarget, base: ResolvedTarget, concurrency: int,
                api_key: str | None, progress: bool) -> RunStats | None:
    """The self-hosted side's stats under a full load, logged into the active comparison run; None when no side
    is an API (nothing is priced against it) or both are."""
    import mlflow

    hosted = [t for t in (cand, base) if t.self_hosted]
    if len(hosted) != 1:
        return None
    stats = measure_saturation(loaded, hosted[0], concurrency, api_key=api_key, progress=progress)
    mlflow.log_params({"saturation_target": hosted[0].spec, "saturation_concurrency": concurrency})
    mlflow.log_metrics({"saturation_requests": stats.n, "saturation_failed": stats.n_failed,
                        "saturation_throughput_rps": stats.throughput_rps})
    mlflow.log_dict(stats.model_dump(mode="json"), "saturation.json")
    return stats


@dataclass
class ComparisonOutcome:
    comparison: Comparison
    markdown: str
    plot_path: Path
    run_ids: dict[str, str]
    results: tuple[RunResult, RunResult]


def compare_targets(
    loaded: LoadedSuite,
    candidate: str,
    baseline: str,
    *,
    hourly_price: float | None = None,
    tier: str | None = None,
    candidate_precision: str | None = None,
    concurrency: int | None = None,
    progress: bool = True,
    trace: bool = True,
    genai: bool = True,
    out_dir: Path | None = None,
    api_key: str | None = None,
    saturation: int | None = None,
    record: RecordMode | None = None,
) -> ComparisonOutcome:
    """Evaluate both targets (child runs) and log the report and plot into a parent comparison run.

    `api_key` is the gateway key for whichever side is an `endpoint:` target. With `saturation` (a concurrency,
    normally the endpoint's max_num_seqs) and an API on the other side, the self-hosted side is also loaded at
    that concurrency, so the report prices a replica kept full as well as one at the eval's concurrency.

    Both sides (and the saturation load) are measured before either side's run is recorded (`recording`): with
    `record="parallel"` (the default on two or more cores) the candidate's run is recorded by a child process while
    this one records the baseline's; `"inline"` records them one after the other; `"background"` returns once the
    comparison run is logged and leaves both sides to a child process, which the next measurement (or
    `recording.wait_for_background_records`) waits for.
    """
    import mlflow

    cand_t, base_t = resolve_target(candidate), resolve_target(baseline)
    cand_t.api_key(api_key), base_t.api_key(api_key)
    configure_mlflow()
    exp_id = get_or_create_experiment(experiment_name(loaded.suite.name))
    mode = resolve_record_mode(record)  # a bad mode fails before any run is created
    with experiment_scope(exp_id), mlflow.start_run(
        run_name=f"compare {candidate} vs {baseline} v{loaded.suite.version}"
    ) as parent:
        mlflow.set_tags(
            {
                "llmhost.kind": "eval-comparison",
                "llmhost.suite": loaded.suite.name,
                "llmhost.suite_version": loaded.suite.version,
                "llmhost.suite_hash": loaded.content_hash,
            }
        )
        mlflow.log_params({"candidate": candidate, "baseline": baseline})
        measured: list[tuple[RunResult, str]] = []
        try:  # a side whose measurement fails ends its own run FAILED; the ones measured before it end so here
            for t in (cand_t, base_t):
                measured.append(_measure(loaded, t, exp_id, parent.info.run_id, concurrency=concurrency,
                                         progress=progress, api_key=api_key))
            sat = _saturation(loaded, cand_t, base_t, saturation, api_key, progress) if saturation else None
        except BaseException:
            for _, run_id in measured:
                end_run_failed(run_id)
            raise
        (cand_res, cand_run), (base_res, base_run) = measured
        record_sides([SideRecord(loaded, res, run_id, exp_id, trace=trace, genai=genai, hourly_price=hourly_price,
                                 tier=tier) for res, run_id in measured], mode)
        cmp = compare(
            loaded.suite,
            cand_res,
            base_res,
            hourly_price=hourly_price,
            tier=tier,
            candidate_precision=candidate_precision,
            saturation=sat,
        )
        md = render_markdown(cmp)
        out = Path(out_dir or tempfile.mkdtemp(prefix="llmhost-eval-"))
        png = plot(cmp, out / "comparison.png")
        (out / "comparison.md").write_text(md)
        mlflow.log_artifact(str(png))
        mlflow.log_text(md, "comparison.md")
        mlflow.log_dict(cmp.model_dump(mode="json"), "comparison.json")
        log_cost(cmp, out)
        prim = next(m for m in cmp.metrics if m.name == cmp.primary)
        mlflow.log_metrics(
            {
                f"diff_{prim.name}": prim.diff.value,
                f"diff_{prim.name}_ci_low": prim.diff.low,
                f"diff_{prim.name}_ci_high": prim.diff.high,
                "ready_to_replace": float(cmp.verdict.ready),
            }
        )
        mlflow.set_tags(
            {
                "llmhost.verdict": cmp.verdict.headline,
                "llmhost.recommendation": cmp.verdict.recommendation or "",
                "llmhost.candidate_run": cand_run,
                "llmhost.baseline_run": base_run,
            }
        )
        run_ids = {"comparison": parent.info.run_id, "candidate": cand_run, "baseline": base_run}
    return ComparisonOutcome(cmp, md, png, run_ids, (cand_res, base_res))
