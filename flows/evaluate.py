"""Evaluate: a suite against one target, or a candidate against a baseline with the replace verdict."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from tasks.evaluate.compare import pass_checks, summarize
from tasks.evaluate.mlflow_log import compare_targets, evaluate_target
from tasks.evaluate.suite import load


class EvalFlowResult(BaseModel):
    suite: str
    targets: list[str]
    run_ids: dict[str, str]
    verdict: str | None = Field(default=None, description="READY TO REPLACE / NOT YET (two targets only).")
    recommendation: str | None = None
    report_markdown: str


# No task retries: the runner already retries each request on 429/5xx/timeouts (bounded and counted), and
# re-running a whole suite would re-bill a frontier API for examples that already succeeded.
@task(retries=0)
def run_one(
    suite: str,
    target: str,
    concurrency: int | None,
    limit: int | None,
    tier: str | None,
    hourly_price: float | None,
) -> EvalFlowResult:
    loaded = load(suite, limit=limit)
    result, run_id = evaluate_target(
        loaded, target, concurrency=concurrency, progress=False, tier=tier, hourly_price=hourly_price
    )
    sums = summarize(result)
    lines = [
        f"# {loaded.suite.name} v{loaded.suite.version} @ `{target}`",
        "",
        "| score | value | 95% CI |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v.value:.3f} | [{v.low:.3f}, {v.high:.3f}] |" for k, v in sums.items()]
    lines += [
        "",
        *[
            f"- {'PASS' if c.ok else 'FAIL'} {c.score} {c.value:.3f} (minimum {c.minimum:g})"
            for c in pass_checks(loaded.suite, sums)
        ],
    ]
    s = result.stats
    lines.append(
        f"- {s.n_ok}/{s.n} ok; latency p50 {s.latency_p50_s or 0:.3f}s, p95 {s.latency_p95_s or 0:.3f}s; "
        f"TTFT p50 {s.ttft_p50_s or 0:.3f}s; {s.throughput_rps:.2f} req/s"
    )
    return EvalFlowResult(
        suite=loaded.suite.name,
        targets=[target],
        run_ids={target: run_id},
        report_markdown="\n".join(lines) + "\n",
    )


@task(retries=0)
def run_pair(
    suite: str,
    candidate: str,
    baseline: str,
    concurrency: int | None,
    limit: int | None,
    tier: str | None,
    hourly_price: float | None,
    candidate_precision: str | None,
) -> EvalFlowResult:
    loaded = load(suite, limit=limit)
    outcome = compare_targets(
        loaded,
        candidate,
        baseline,
        concurrency=concurrency,
        progress=False,
        tier=tier,
        hourly_price=hourly_price,
        candidate_precision=candidate_precision,
    )
    v = outcome.comparison.verdict
    return EvalFlowResult(
        suite=loaded.suite.name,
        targets=[candidate, baseline],
        run_ids=outcome.run_ids,
        verdict=v.headline,
        recommendation=v.recommendation,
        report_markdown=outcome.markdown,
    )


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    suite: str = "demo_routing",
    targets: list[str] = ["endpoint:demo"],  # noqa: B006 - Prefect renders the default in the run form
    concurrency: int | None = None,
    limit: int | None = None,
    tier: str | None = None,
    hourly_price: float | None = None,
    candidate_precision: str | None = None,
) -> EvalFlowResult:
    """One target: scores and pass thresholds. Two targets (candidate, baseline): the replace verdict."""
    if len(targets) not in (1, 2):
        from tasks.core.errors import EvalError

        raise EvalError(f"targets={targets!r}: give one target, or two (candidate then baseline)")
    if len(targets) == 1:
        res = run_one(suite, targets[0], concurrency, limit, tier, hourly_price)
    else:
        res = run_pair(
            suite, targets[0], targets[1], concurrency, limit, tier, hourly_price, candidate_precision
        )
    key = "eval-" + "".join(c if c.isalnum() else "-" for c in res.suite.lower())
    create_markdown_artifact(res.report_markdown, key=key, description=f"Evaluation of {', '.join(targets)}")
    print(f"{res.suite}: {res.verdict or 'evaluated'} runs={res.run_ids}")
    return res
