"""Retrain: contamination check -> LoRA fine-tune (logged, reload-checked, registered) -> hot-load."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from flows.tasks import contamination_task, finetune_task, load_adapter_task
from tasks.deploy.adapters import AdapterChange
from tasks.finetune import FinetuneConfig, FinetuneResult


class RetrainResult(BaseModel):
    finetune: FinetuneResult
    contamination: str
    adapter: AdapterChange | None = Field(default=None, description="Set when an endpoint was given.")


def _report(res: RetrainResult) -> str:
    f = res.finetune
    lines = [
        f"# LoRA fine-tune of {f.base_name} v{f.base_version}",
        "",
        f"- {res.contamination}",
        f"- {f.rows} rows (dataset {f.dataset_hash[:12]}), {f.steps} steps in {f.train_seconds:.1f}s",
        f"- train loss {f.first_loss:.3f} -> {f.last_loss:.3f}; held-out loss {f.eval_loss_before} -> "
        f"{f.eval_loss_after}",
        f"- reload check: max |logit diff| {f.reload_max_abs_diff:.2e}",
        f"- MLflow run `{f.run_id}`; registered version: {f.registered_name} v{f.registered_version}",
    ]
    if res.adapter:
        a = res.adapter
        lines.append(
            f"- served on `{a.endpoint}` as `{a.endpoint}:{a.adapter}` by {a.method} in {a.seconds:.2f}s "
            f"{a.note}"
        )
    return "\n".join(lines)


@flow(name="retrain", log_prints=True)
def retrain(
    config: FinetuneConfig, endpoint: str | None = None, adapter_name: str | None = None
) -> RetrainResult:
    """Fine-tune `config.base_model` with LoRA; with `endpoint`, serve the new version there, no restart."""
    logger = get_run_logger()
    contamination = contamination_task(config)
    logger.info(contamination)
    result = finetune_task(config)
    change = None
    if endpoint and result.registered_version:
        change = load_adapter_task(
            endpoint, f"models:/{result.registered_name}/{result.registered_version}", adapter_name
        )
    out = RetrainResult(finetune=result, contamination=contamination, adapter=change)
    create_markdown_artifact(
        markdown=_report(out), key="retrain-report", description="LoRA fine-tune summary"
    )
    return out
