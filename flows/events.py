"""Prefect events the lifecycle emits; deployments with a matching trigger (prefect.yaml) run on them."""

from __future__ import annotations

from prefect.events import emit_event

from tasks.finetune import DatasetUpdate

EVENT = "llmhost.dataset.updated"


def emit_dataset_updated(update: DatasetUpdate) -> str | None:
    """Announce rows added to a dataset (`retrain-on-new-data` runs on it); returns the event id."""
    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"llmhost.dataset.{update.dataset}", "prefect.resource.name": update.dataset},
        payload={"dataset": update.dataset, "path": update.path, "hash": update.hash, "rows": update.rows},
    )
    return str(event.id) if event else None


REGRESSED = "llmhost.eval.regressed"


def emit_eval_regressed(endpoint: str, *, was: str, now: str, reasons: list[str], frontier: str,
                        suite: str) -> str | None:
    """Announce an endpoint's verdict got worse (automations.yaml alerts on it); returns the event id.

    Emitted inside the flow run, so the run, its flow and deployment are attached as related resources.
    """
    event = emit_event(
        event=REGRESSED,
        resource={"prefect.resource.id": f"llmhost.endpoint.{endpoint}", "prefect.resource.name": endpoint},
        payload={"endpoint": endpoint, "was": was, "now": now, "reasons": reasons, "frontier": frontier,
                 "suite": suite},
    )
    return str(event.id) if event else None
