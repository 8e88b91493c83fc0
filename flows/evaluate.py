"""Evaluate: a suite against one target, or a candidate against a baseline with the replace verdict."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.tasks import EvalFlowResult, compare_task, evaluate_task
from tasks.core.errors import EvalError

__all__ = ["EvalFlowResult", "evaluate_flow"]


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
        raise EvalError(f"targets={targets!r}: give one target, or two (candidate then baseline)")
    res: EvalFlowResult
    if len(targets) == 1:
        res = evaluate_task(suite, targets[0], concurrency=concurrency, limit=limit, tier=tier,
                            hourly_price=hourly_price)
    else:
        res = compare_task(suite, targets[0], targets[1], concurrency=concurrency, limit=limit, tier=tier,
                           hourly_price=hourly_price, candidate_precision=candidate_precision)
    key = "eval-" + "".join(c if c.isalnum() else "-" for c in res.suite.lower())
    create_markdown_artifact(res.report_markdown, key=key, description=f"Evaluation of {', '.join(targets)}")
    print(f"{res.suite}: {res.verdict or 'evaluated'} runs={res.run_ids}")
    failed = _failed_runs(res.run_ids)
    if failed or res.verdict == "CANNOT TELL":
        # The report is published above; the flow run itself fails, as `llmhost eval run` exits 1.
        raise EvalError(
            f"targets={targets!r}: too many examples failed (above the suite's thresholds.max_error_rate) in "
            f"MLflow runs {failed or res.run_ids}; the report lists each error class with its fix"
        )
    return res


def _failed_runs(run_ids: dict[str, str]) -> list[str]:
    """The MLflow runs that the evaluation marked FAILED (error rate above the suite's max_error_rate)."""
    import mlflow

    from tasks.core.tracking import configure_mlflow

    configure_mlflow()
    client = mlflow.MlflowClient()
    return [rid for rid in run_ids.values() if client.get_run(rid).info.status == "FAILED"]
