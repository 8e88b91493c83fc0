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
