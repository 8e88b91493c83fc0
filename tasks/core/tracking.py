"""MLflow wiring shared by every step: one tracking/registry URI; experiments get a file:// artifact root under the
state dir unless a tracking server picks its own."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from tasks.core.settings import get_settings

if TYPE_CHECKING:
    from mlflow import MlflowClient


def configure_mlflow() -> str:
    """Point MLflow's tracking and registry at `settings.mlflow_uri`; returns the URI."""
    import mlflow

    settings = get_settings()
    settings.ensure_dirs()
    uri = settings.mlflow_uri
    if uri.startswith("sqlite:"):
        # SQLite takes one writer at a time, and mlflow.genai.evaluate's threads (10 by default) each write the
        # assessments of their trace: on this store the extra threads only contend. With the scorer rate limiter off
        # (mlflow_logging), one worker logged a 240-example side's assessments in 6.90/7.06 s against 7.33/7.15 s with
        # ten (benchmarks/trace_logging.py, 2 alternating rounds, 2 cores). A value set in the environment wins.
        os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_WORKERS", "1")
    # Eval traces are written in one burst after the timed phase, faster than the exporter stores them, and MLflow's
    # async export queue (1,000 tasks by default) drops what overflows it: suites of ~700+ examples lost traces.
    # A queued task is one trace's few KB. A value set in the environment wins (log_traces then drains as it goes).
    os.environ.setdefault("MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE", "20000")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def mlflow_client() -> MlflowClient:
    """A client bound to the configured URIs (also sets the process-wide MLflow URIs)."""
    from mlflow import MlflowClient

    uri = configure_mlflow()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "experiment"


def get_or_create_experiment(name: str) -> str:
    """Experiment id for `name`, creating it if missing.

    A sqlite-backed MLflow would otherwise default artifacts to `./mlruns` relative to the cwd, so such an
    experiment is created with an explicit file:// location under the state dir. A tracking server chooses its
    own (with proxied artifacts, `mlflow-artifacts:/`): a client's local path would exist only on that client.
    """
    client = mlflow_client()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            client.restore_experiment(existing.experiment_id)
        return str(existing.experiment_id)
    from mlflow.exceptions import MlflowException

    settings = get_settings()
    location = None if settings.mlflow_is_server else f"{settings.artifact_root}/{_slug(name)}"
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException:
        # Another process may have created it between the lookup and the create.
        again = client.get_experiment_by_name(name)
        if again is None:
            raise
        return str(again.experiment_id)


@contextmanager
def experiment_scope(experiment_id: str) -> Iterator[None]:
    """`mlflow.set_experiment` for the duration of a block, then the caller's active experiment again.

    `set_experiment` is process-wide (a module global plus MLFLOW_EXPERIMENT_ID in the environment): left
    set, it makes a later `start_run(run_id=...)` in another experiment fail with "active experiment ID does
    not match", so a step that needs an active experiment (traces, genai.evaluate) scopes it here.
    """
    import mlflow
    from mlflow.tracking import fluent

    saved_id, saved_env = fluent._active_experiment_id, os.environ.get("MLFLOW_EXPERIMENT_ID")
    mlflow.set_experiment(experiment_id=experiment_id)
    try:
        yield
    finally:
        fluent._active_experiment_id = saved_id
        if saved_env is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = saved_env
