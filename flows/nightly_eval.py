"""Nightly: evaluate the champion endpoint against the frontier; alert when the verdict regresses."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed, State

from flows.events import emit_eval_regressed
from flows.gateway import ensure_gateway
from flows.lifecycle_support import frontier_available
from flows.tasks import compare_task
from tasks.core.tracking import get_or_create_experiment, mlflow_client

# Best first. CANNOT TELL (an eval run failed) ranks last: a night that cannot judge the endpoint is news.
VERDICT_RANK = {"READY TO REPLACE": 2, "NOT YET": 1, "CANNOT TELL": 0}
# The final state of a regressed run: Failed-type, so the UI shows it red, but with its own name (and so its own
# event, `prefect.flow-run.Regressed`) so that automations.yaml sends one regression alert, not two.
REGRESSED_STATE = "Regressed"


def regressed(was: str | None, now: str) -> bool:
    """Whether verdict `now` is worse than `was` (no or unknown previous verdict: not a regression)."""
    if was not in VERDICT_RANK or now not in VERDICT_RANK:
        return False
    return VERDICT_RANK[now] < VERDICT_RANK[was]


@flow(name="nightly-eval", log_prints=True)
def nightly_eval(endpoint: str = "demo", suite: str = "demo_routing", frontier: str = "frontier:gpt-4o-mini",
                 eval_limit: int | None = None, tier: str | None = "cpu") -> str | State[Any]:
    """Compares endpoint:<endpoint> with the frontier; a worse verdict than last night's ends the run Regressed.

    A regression also emits `llmhost.eval.regressed` for the endpoint, which automations.yaml turns into an alert.
    """
    log = get_run_logger()
    ok, why = frontier_available(frontier)
    if not ok:
        create_markdown_artifact(f"# Nightly eval skipped\n\n{why}", key="nightly-eval")
        log.warning(why)
        return "skipped"
    ensure_gateway()
    out = compare_task(suite, f"endpoint:{endpoint}", frontier, limit=eval_limit, tier=tier,
                       gateway_key_for=endpoint, artifact_key="lifecycle-eval")
    verdict = out.comparison.verdict
    client = mlflow_client()
    exp = get_or_create_experiment("llmhost-nightly")
    # Last night's verdict for this endpoint: nights of other endpoints share the experiment.
    previous = client.search_runs([exp], filter_string=f"tags.`llmhost.endpoint` = '{endpoint}'",
                                  order_by=["start_time DESC"], max_results=1)
    run = client.create_run(exp, run_name=f"nightly {endpoint} vs {frontier}",
                            tags={"llmhost.verdict": verdict.headline, "llmhost.endpoint": endpoint,
                                  "llmhost.frontier": frontier})
    client.set_terminated(run.info.run_id)
    was = previous[0].data.tags.get("llmhost.verdict") if previous else None
    report = f"# Nightly eval: {verdict.headline} (previous: {was or 'none'})\n\n{out.report_markdown}"
    create_markdown_artifact(report, key="nightly-eval", description=f"{endpoint} vs {frontier}")
    if was is not None and regressed(was, verdict.headline):
        emit_eval_regressed(endpoint, was=was, now=verdict.headline, reasons=verdict.reasons, frontier=frontier,
                            suite=suite)
        message = f"verdict regressed: {was} -> {verdict.headline}: " + "; ".join(verdict.reasons)
        log.error(message)
        return Failed(name=REGRESSED_STATE, message=message)
    return verdict.headline
