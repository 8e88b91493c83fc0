"""Plain helpers the lifecycle flows share: first champion, frontier check, fine-tune config, MLflow runs."""

from __future__ import annotations

from pathlib import Path

from flows.lifecycle_models import LifecycleSummary
from tasks.core.errors import ConfigError
from tasks.core.settings import PROJECT_ROOT
from tasks.core.tracking import configure_mlflow, get_or_create_experiment, mlflow_client
from tasks.evaluate.targets import resolve_target
from tasks.finetune import FinetuneConfig, load_config, trainable_base
from tasks.promote import current_aliases
from tasks.store import audit


def ensure_champion(name: str, version: str, *, actor: str) -> str:
    """Sets `champion` to `version` when the model has none yet; returns the champion version."""
    aliases = current_aliases(name)
    if "champion" in aliases:
        return aliases["champion"]
    mlflow_client().set_registered_model_alias(name, "champion", version)
    audit.record(actor, "promote.initial", f"model:{name}", before=None, after={"champion": version})
    return version


def frontier_available(frontier: str | None) -> tuple[bool, str]:
    """Whether the frontier comparison can run (configured, key set), and the line that says so."""
    if not frontier:
        return False, "no frontier configured (set LifecycleParams.frontier, e.g. frontier:gpt-4o-mini)"
    target = resolve_target(frontier)
    try:
        target.api_key()
    except Exception as exc:
        return False, f"skipped the frontier comparison: {exc}"
    return True, f"comparing against {target.label}"


def finetune_config_for(path: str, champion_ref: str, max_steps: int | None) -> FinetuneConfig:
    """The fine-tune config at `path`, training on the champion (or on its base, if it is an adapter)."""
    p = Path(path)
    if not p.is_absolute():
        p = PROJECT_ROOT / p
    if not p.is_file():
        raise ConfigError("finetune_config", path, "give the path of a FinetuneConfig YAML, e.g. demo/finetune.yaml")
    cfg = load_config(p)
    update: dict[str, object] = {"base_model": trainable_base(champion_ref), "progress": False}
    if max_steps:
        update["max_steps"] = max_steps
    return cfg.model_copy(update=update)


def start_parent_run(name: str) -> str:
    """The lifecycle's MLflow run; steps' runs are attached to it with the `mlflow.parentRunId` tag."""
    configure_mlflow()
    exp = get_or_create_experiment("llmhost-lifecycle")
    run = mlflow_client().create_run(exp, run_name=name, tags={"llmhost.kind": "lifecycle"})
    return str(run.info.run_id)


def attach_runs(parent_run_id: str, run_ids: list[str]) -> None:
    """Nests the steps' runs under the lifecycle run in the MLflow UI.

    Pass a comparison's own run only: its two side runs are already nested under it, and re-parenting them here
    would flatten them beside it.
    """
    client = mlflow_client()
    for rid in run_ids:
        if rid and rid != parent_run_id:
            client.set_tag(rid, "mlflow.parentRunId", parent_run_id)


def end_parent_run(run_id: str, summary: LifecycleSummary, status: str = "FINISHED") -> None:
    client = mlflow_client()
    for k, v in {"base_score": summary.base_score, "tuned_score": summary.tuned_score}.items():
        if v is not None:
            client.log_metric(run_id, k, v)
    for t in summary.timings:
        client.log_metric(run_id, f"seconds_{t.step}", t.seconds)
    client.set_tag(run_id, "llmhost.promoted", str(summary.promoted).lower())
    client.log_text(run_id, summary.text(), "summary.txt")
    client.set_terminated(run_id, status)
