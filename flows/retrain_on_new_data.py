"""Retrain on new data: fine-tune on the updated dataset -> compare with the champion -> promote."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from flows.gateway import ensure_gateway
from flows.lifecycle_support import finetune_config_for
from flows.tasks import compare_task, finetune_cached, load_adapter_task, promote_task
from tasks.deploy import load_spec
from tasks.finetune import DataSource
from tasks.promote import PromotionPolicy, current_aliases, decide


class RetrainOnDataResult(BaseModel):
    dataset_path: str
    dataset_hash: str
    candidate: str | None
    promoted: bool
    decision: str


@flow(name="retrain-on-new-data", log_prints=True)
def retrain_on_new_data(
    dataset_path: str,
    dataset_hash: str = "",
    model_name: str = "demo",
    endpoint_spec: str = "deployments/demo.yaml",
    finetune_config: str = "demo/finetune.yaml",
    suite: str = "demo_routing",
    max_steps: int | None = None,
    eval_limit: int | None = None,
    policy: PromotionPolicy = PromotionPolicy(),  # noqa: B008
) -> RetrainOnDataResult:
    """Triggered by `llmhost.dataset.updated`: trains on the base config's data plus the new dataset."""
    log = get_run_logger()
    spec = load_spec(endpoint_spec)
    champion = current_aliases(model_name).get("champion")
    if champion is None:
        raise RuntimeError(f"{model_name} has no champion yet: run the lifecycle flow first")
    cfg = finetune_config_for(finetune_config, f"models:/{model_name}/{champion}", max_steps)
    cfg = cfg.model_copy(update={"train": [*cfg.train, DataSource(path=Path(dataset_path))]})
    log.info("fine-tuning %s v%s on %s (hash %s)", model_name, champion, dataset_path, dataset_hash[:12])
    ft = finetune_cached(cfg, quiet=True)
    ensure_gateway()
    adapter = f"v{ft.registered_version}"
    load_adapter_task(spec.name, f"models:/{model_name}/{ft.registered_version}", adapter)
    out = compare_task(suite, f"endpoint:{spec.name}:{adapter}", f"endpoint:{spec.name}", limit=eval_limit,
                       tier="cpu", gateway_key_for=spec.name, artifact_key="lifecycle-eval")
    decision = decide(out.comparison, policy)
    create_markdown_artifact(decision.markdown(), key="retrain-promotion", description="Promotion decision")
    if decision.promote:
        promote_task(model_name, str(ft.registered_version), spec,
                     {"endpoint": spec.name, "eval_runs": sorted(out.run_ids.values()), "dataset_hash": dataset_hash})
    return RetrainOnDataResult(dataset_path=dataset_path, dataset_hash=dataset_hash,
                               candidate=ft.registered_version, promoted=decision.promote, decision=decision.summary)
