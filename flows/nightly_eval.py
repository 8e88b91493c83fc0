"""Nightly: evaluate the champion endpoint against the frontier; alert when the verdict regresses."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.gateway import ensure_gateway
from flows.lifecycle_support import frontier_available
from flows.tasks import compare_task
from tasks.core.tracking import get_or_create_experiment, mlflow_client


@flow(name="nightly-eval", log_prints=True)
def nightly_eval(endpoint: str = "demo", suite: str = "demo_routing", frontier: str = "frontier:gpt-4o-mini",
                 eval_limit: int | None = None, tier: str | None = "cpu") -> str:
    """Compares endpoint:<endpoint> with the frontier; fails (and says why) when READY turns into NOT YET."""
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
    previous = client.search_runs([exp], order_by=["start_time DESC"], max_results=1)
    run = client.create_run(exp, run_name=f"nightly {endpoint} vs {frontier}",
                            tags={"llmhost.verdict": verdict.headline, "llmhost.endpoint": endpoint})
    client.set_terminated(run.info.run_id)
    was = previous[0].data.tags.get("llmhost.verdict") if previous else None
    report = f"# Nightly eval: {verdict.headline} (previous: {was or 'none'})\n\n{out.report_markdown}"
    create_markdown_artifact(report, key="nightly-eval", description=f"{endpoint} vs {frontier}")
    if was == "READY TO REPLACE" and not verdict.ready:
        raise RuntimeError(f"verdict regressed: READY TO REPLACE -> {verdict.headline}: " + "; ".join(verdict.reasons))
    return verdict.headline
