"""Lifecycle steps as plain functions: each takes typed inputs and returns a typed, secret-free result.

`flows/lifecycle.py` wraps them in retriable, cached Prefect tasks; the CLI and tests can call them directly.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field

from tasks import store
from tasks.store import audit
from tasks.core.errors import ConfigError, ServingError
from tasks.promote import PromotionPolicy
from tasks.core.settings import PROJECT_ROOT, get_settings


class LifecycleParams(BaseModel):
    """Parameters of one lifecycle run; the Prefect UI renders them as a form."""

    source: str = Field(default="demo", description="'demo' builds the demo model; else path:/hf:/run: SOURCE.")
    model_name: str = Field(default="demo", description="Registered model name in MLflow.")
    endpoint_spec: str = Field(default="deployments/demo.yaml", description="Endpoint spec YAML.")
    suite: str = Field(default="demo_routing", description="Eval suite for champion/candidate/frontier.")
    frontier: str | None = Field(default=None, description="e.g. frontier:gpt-4o-mini; skipped without its key.")
    finetune_config: str = Field(default="demo/finetune.yaml", description="FinetuneConfig YAML.")
    finetune_max_steps: int | None = Field(default=None, ge=1, description="Override the config's max_steps.")
    eval_limit: int | None = Field(default=None, ge=1, description="Evaluate only the first N examples.")
    policy: PromotionPolicy = Field(default_factory=PromotionPolicy)
    tier: str | None = Field(default="cpu", description="Tier for self-hosted cost; None = unknown.")


def resolve_source(source: str) -> str:
    """'demo' -> the built demo model's path: SOURCE (built if missing); anything else as given."""
    if source != "demo":
        return source
    import os

    from demo.build import build_demo_model, default_demo_dir

    # LLMHOST_DEMO_CACHE lets tests and CI share one build across state dirs.
    where = Path(os.environ["LLMHOST_DEMO_CACHE"]) if os.environ.get("LLMHOST_DEMO_CACHE") else default_demo_dir()
    built = build_demo_model(where)
    # demo/finetune.yaml reads {home}/demo/data: write the (deterministic) task data there too.
    from demo.data import write_task_data

    write_task_data(default_demo_dir() / "data")
    return f"path:{built.model_dir}"


def source_digest(source: str) -> str:
    """A content key for caching: the folder's file hashes for path:, the string otherwise."""
    if source.startswith("path:"):
        from demo.build import dir_content_hash

        p = Path(source[5:])
        if p.is_dir():
            return dir_content_hash(p)
    return hashlib.sha256(source.encode()).hexdigest()


def files_digest(paths: list[Path]) -> list[str]:
    """sha256 of each file's bytes: training data edits must invalidate a cached fine-tune."""
    out = []
    for p in paths:
        p = Path(str(p).replace("{home}", str(get_settings().home_abs)))
        out.append(hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else f"missing:{p}")
    return out


def state_instance_id() -> str:
    """A random id written once per state dir: a wiped and recreated dir at the same path gets a new one."""
    import uuid

    settings = get_settings()
    settings.ensure_dirs()
    path = settings.home_abs / "instance-id"
    if not path.exists():
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(uuid.uuid4().hex + "\n")
        try:
            os.link(tmp, path)  # first writer wins; a concurrent one reads the winner's id
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def cache_key(step: str, *parts: str) -> str:
    """Prefect cache key over the MLflow store and this state dir's instance id.

    Prefect keeps its results outside the state dir (~/.prefect), so after `make clean-state` a key of the
    URI alone would hand back versions from the deleted registry.
    """
    ident = [get_settings().mlflow_uri, state_instance_id()]
    h = hashlib.sha256("|".join([*ident, *parts]).encode()).hexdigest()
    return f"llmhost-{step}-{h[:32]}"


def ensure_champion(name: str, version: str, *, actor: str) -> str:
    """Sets `champion` to `version` when the model has none yet; returns the champion version."""
    from tasks.promote import current_aliases
    from tasks.core.tracking import mlflow_client

    aliases = current_aliases(name)
    if "champion" in aliases:
        return aliases["champion"]
    mlflow_client().set_registered_model_alias(name, "champion", version)
    audit.record(actor, "promote.initial", f"model:{name}", before=None, after={"champion": version})
    return version


def gateway_url() -> str:
    s = get_settings()
    return f"http://{s.gateway_host}:{s.gateway_port}"


def ensure_gateway(timeout_s: float = 60.0) -> str:
    """The gateway's URL; starts `llmhost gateway` as a detached process when none answers."""
    url = gateway_url()
    try:
        if httpx.get(f"{url}/health", timeout=2).status_code == 200:
            return url
    except httpx.HTTPError:
        pass
    s = get_settings()
    s.ensure_dirs()
    log = (s.runs_dir / "gateway.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "gateway"], cwd=PROJECT_ROOT, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    (s.home_abs / "gateway.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServingError(f"the gateway exited with code {proc.returncode}; see {s.runs_dir / 'gateway.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            time.sleep(0.5)
    raise ServingError(f"the gateway did not answer {url}/health within {timeout_s:.0f}s; see "
                       f"{s.runs_dir / 'gateway.log'}")


def service_key(endpoint: str, *, user: str = "llmhost-lifecycle") -> str:
    """A fresh key for the lifecycle's own eval calls, granted on `endpoint`; kept in this process only."""
    store.ensure_user(user)
    store.grant(endpoint, user=user, actor="lifecycle")
    from datetime import timedelta

    created = store.create_key(user, expires_in=timedelta(days=1), description="lifecycle eval calls",
                               actor="lifecycle")
    return created.raw


def frontier_available(frontier: str | None) -> tuple[bool, str]:
    if not frontier:
        return False, "no frontier configured (set LifecycleParams.frontier, e.g. frontier:gpt-4o-mini)"
    from tasks.evaluate.targets import resolve_target

    target = resolve_target(frontier)
    try:
        target.api_key()
    except Exception as exc:
        return False, f"skipped the frontier comparison: {exc}"
    return True, f"comparing against {frontier}"


def finetune_config_for(path: str, champion_ref: str, max_steps: int | None) -> Any:
    """The fine-tune config at `path`, training on the champion (or on its base, if it is an adapter)."""
    from tasks.finetune import load_config, trainable_base

    p = Path(path)
    if not p.is_absolute():
        p = PROJECT_ROOT / p
    if not p.is_file():
        raise ConfigError("finetune_config", path, "give the path of a FinetuneConfig YAML, e.g. demo/finetune.yaml")
    cfg = load_config(p)
    update: dict[str, Any] = {"base_model": trainable_base(champion_ref), "progress": False}
    if max_steps:
        update["max_steps"] = max_steps
    return cfg.model_copy(update=update)


class StepTiming(BaseModel):
    step: str
    seconds: float
    note: str = ""


class LifecycleSummary(BaseModel):
    model: str
    champion_before: str
    candidate: str | None = None
    base_score: float | None = None
    tuned_score: float | None = None
    metric: str = "accuracy"
    frontier: str = ""
    frontier_verdict: str | None = Field(default=None, description="Champion vs frontier: READY TO REPLACE / NOT YET.")
    verdict: str | None = Field(default=None, description="Candidate vs champion on the suite's own tolerances.")
    promoted: bool = False
    decision: str = ""
    endpoint: str
    gateway_url: str
    mlflow_uri: str
    parent_run_id: str | None = None
    timings: list[StepTiming] = Field(default_factory=list)

    def text(self) -> str:
        lines = [
            f"model {self.model}: champion was v{self.champion_before}"
            + (f", candidate v{self.candidate}" if self.candidate else ""),
            f"{self.metric}: base {_f(self.base_score)} -> tuned {_f(self.tuned_score)}",
            f"frontier: {self.frontier}" + (f"; champion vs frontier: {self.frontier_verdict}"
                                            if self.frontier_verdict else ""),
            f"suite verdict (candidate vs champion, suite tolerances): {self.verdict or 'n/a'}",
            f"promoted: {'yes' if self.promoted else 'no'} ({self.decision})",
            f"endpoint: {self.gateway_url}/v1 model={self.endpoint}",
            f"MLflow: {self.mlflow_uri} (lifecycle run {self.parent_run_id})",
            "steps: " + ", ".join(f"{t.step} {t.seconds:.0f}s" for t in self.timings),
        ]
        return "\n".join(lines)


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def start_parent_run(name: str) -> str:
    """The lifecycle's MLflow run; steps' runs are attached to it with the `mlflow.parentRunId` tag."""
    from tasks.core.tracking import configure_mlflow, get_or_create_experiment, mlflow_client

    configure_mlflow()
    exp = get_or_create_experiment("llmhost-lifecycle")
    run = mlflow_client().create_run(exp, run_name=name, tags={"llmhost.kind": "lifecycle"})
    return str(run.info.run_id)


def attach_runs(parent_run_id: str, run_ids: list[str]) -> None:
    """Nests the steps' runs under the lifecycle run in the MLflow UI."""
    from tasks.core.tracking import mlflow_client

    client = mlflow_client()
    for rid in run_ids:
        if rid and rid != parent_run_id:
            client.set_tag(rid, "mlflow.parentRunId", parent_run_id)


def end_parent_run(run_id: str, summary: LifecycleSummary, status: str = "FINISHED") -> None:
    from tasks.core.tracking import mlflow_client

    client = mlflow_client()
    for k, v in {"base_score": summary.base_score, "tuned_score": summary.tuned_score}.items():
        if v is not None:
            client.log_metric(run_id, k, v)
    for t in summary.timings:
        client.log_metric(run_id, f"seconds_{t.step}", t.seconds)
    client.set_tag(run_id, "llmhost.promoted", str(summary.promoted).lower())
    client.log_text(run_id, summary.text(), "summary.txt")
    client.set_terminated(run_id, status)

