"""Evaluating in MLflow runs: one target in its own run, or two targets as child runs of a comparison run.

What each run records is `mlflow_logging`'s; the requests are `runner`'s. A gateway key given as `api_key`
is passed down to the client and never stored on a target, a result or a run.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.core.tracking import configure_mlflow, experiment_scope, get_or_create_experiment
from tasks.evaluate.compare import Comparison, compare
from tasks.evaluate.mlflow_logging import experiment_name, log_cost, log_genai_assessments, log_result, log_traces
from tasks.evaluate.report import plot, render_markdown
from tasks.evaluate.runner import RunResult, RunStats, measure_saturation, run_suite
from tasks.evaluate.suite import LoadedSuite
from tasks.evaluate.targets import ResolvedTarget, resolve_target


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

    `api_key` is the gateway key for an `endpoint:` target; without it, LLMHOST_API_KEY is read.
    """
    import mlflow

    if isinstance(target, str):
        target = resolve_target(target)
    target.api_key(api_key)  # a missing key fails before an MLflow run is created
    configure_mlflow()
    exp_id = get_or_create_experiment(experiment_name(loaded.suite.name))
    run_name = f"{target.spec} v{loaded.suite.version}"
    with experiment_scope(exp_id), mlflow.start_run(run_name=run_name, nested=nested) as run:
        result = run_suite(loaded, target, concurrency=concurrency, progress=progress, api_key=api_key)
        if trace:
            t0 = time.perf_counter()
            log_traces(result, loaded)
            mlflow.log_metric("trace_logging_s", time.perf_counter() - t0)
        log_result(result, loaded, hourly_price=hourly_price, tier=tier)
        if trace and genai:
            t0 = time.perf_counter()
            n = log_genai_assessments(result, loaded)
            mlflow.log_metric("genai_assessment_s", time.perf_counter() - t0)
            mlflow.set_tag("llmhost.genai_traces", str(n))
    if result.failed:
        # After the `with`: ending a nested run inside it would end its parent too.
        mlflow.MlflowClient().set_terminated(run.info.run_id, status="FAILED")
    return result, run.info.run_id


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
) -> ComparisonOutcome:
    """Evaluate both targets (child runs) and log the report and plot into a parent comparison run.

    `api_key` is the gateway key for whichever side is an `endpoint:` target. With `saturation` (a concurrency,
    normally the endpoint's max_num_seqs) and an API on the other side, the self-hosted side is also loaded at
    that concurrency, so the report prices a replica kept full as well as one at the eval's concurrency.
    """
    import mlflow

    cand_t, base_t = resolve_target(candidate), resolve_target(baseline)
    cand_t.api_key(api_key), base_t.api_key(api_key)
    configure_mlflow()
    exp_id = get_or_create_experiment(experiment_name(loaded.suite.name))
    kw = dict(
        concurrency=concurrency,
        progress=progress,
        trace=trace,
        genai=genai,
        nested=True,
        hourly_price=hourly_price,
        tier=tier,
        api_key=api_key,
    )
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
        cand_res, cand_run = evaluate_target(loaded, cand_t, **kw)  # type: ignore[arg-type]
        base_res, base_run = evaluate_target(loaded, base_t, **kw)  # type: ignore[arg-type]
        sat = _saturation(loaded, cand_t, base_t, saturation, api_key, progress) if saturation else None
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
