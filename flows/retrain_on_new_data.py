"""Retrain on new data: fine-tune on the updated dataset -> compare with the champion -> promote."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from tasks.promote import PromotionPolicy


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
    from flows.lifecycle import evaluate, finetune, load_adapter, promote
    from tasks import lifecycle as steps
    from tasks.deploy import load_spec
    from tasks.finetune import DataSource
    from tasks.promote import current_aliases, decide

    log = get_run_logger()
    spec = load_spec(endpoint_spec)
    champion = current_aliases(model_name).get("champion")
    if champion is None:
        raise RuntimeError(f"{model_name} has no champion yet: run the lifecycle flow first")
    cfg = steps.finetune_config_for(finetune_config, f"models:/{model_name}/{champion}", max_steps)
    cfg = cfg.model_copy(update={"train": [*cfg.train, DataSource(path=Path(dataset_path))]})
    log.info("fine-tuning %s v%s on %s (hash %s)", model_name, champion, dataset_path, dataset_hash[:12])
    ft = finetune(cfg)
    steps.ensure_gateway()
    os.environ["LLMHOST_API_KEY"] = steps.service_key(spec.name)
    adapter = f"v{ft.registered_version}"
    load_adapter(spec.name, f"models:/{model_name}/{ft.registered_version}", adapter)
    out = evaluate(suite, f"endpoint:{spec.name}:{adapter}", f"endpoint:{spec.name}", eval_limit, "cpu")
    decision = decide(out["comparison"], policy)
    create_markdown_artifact(decision.markdown(), key="retrain-promotion", description="Promotion decision")
    if decision.promote:
        promote(model_name, str(ft.registered_version), endpoint_spec,
                {"endpoint": spec.name, "eval_runs": sorted(out["run_ids"].values()), "dataset_hash": dataset_hash})
    return RetrainOnDataResult(dataset_path=dataset_path, dataset_hash=dataset_hash,
                               candidate=ft.registered_version, promoted=decision.promote, decision=decision.summary)
