"""The one set of Prefect tasks: each wraps a plain lifecycle step and retries only on a transient error.

A refusal, a failed smoke test, a sizing refusal or a validation error would fail the same way again, so it
fails the task at once; `tasks.core.retry.retry_transient` is the only retry condition used here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from demo.standin import DEFAULT_STEPS, StandinServed, serve_standin
from flows.caching import CACHE_FOR, finetune_key, register_key
from flows.gateway import service_key
from tasks.core.errors import DeployError
from tasks.core.retry import retry_transient
from tasks.deploy import DeployResult, EndpointSpec, deploy, rollback
from tasks.deploy.adapters import AdapterChange, load_into_endpoint
from tasks.evaluate.compare import Comparison
from tasks.evaluate.recording import RecordMode
from tasks.evaluate.report import render_run_markdown
from tasks.evaluate.running import compare_targets, evaluate_target
from tasks.evaluate.suite import load
from tasks.finetune import FinetuneConfig, FinetuneResult, check_contamination, finetune, load_training_data
from tasks.promote import PromotionRecord, promote
from tasks.register import RegisteredVersion, register_model
from tasks.size import MemoryEstimate, SizingRequest, size_model

P = ParamSpec("P")
R = TypeVar("R")


def step_task(
    name: str, *, retries: int = 0, retry_delay_seconds: float = 0
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """`@task` with the one retry policy: up to `retries` more tries, and only after a transient error."""
    return task(name=name, retries=retries, retry_delay_seconds=retry_delay_seconds,
                retry_condition_fn=retry_transient)


# ---------------------------------------------------------------------------------------------- register


@step_task("register", retries=2, retry_delay_seconds=10)
def register_model_task(source: str, name: str, force: bool = False) -> RegisteredVersion:
    return register_model(source, name, force=force)


# Cached on the source's content, so a lifecycle rerun after a failure does not register again.
register_model_cached: Task[..., RegisteredVersion] = register_model_task.with_options(
    cache_key_fn=register_key, cache_expiration=CACHE_FOR, persist_result=True)


# ---------------------------------------------------------------------------------------------- size


@step_task("size")  # local file reads and arithmetic: nothing transient to retry
def size_task(model_ref: str, request: SizingRequest, artifact_key: str | None = None) -> MemoryEstimate:
    """Sizes the model and publishes the estimate's explanation as a markdown artifact."""
    estimate = size_model(model_ref, request)
    create_markdown_artifact(markdown=estimate.explanation, key=artifact_key,
                             description=f"Memory sizing of {Path(model_ref).name}")
    return estimate


# ---------------------------------------------------------------------------------------------- deploy


def _publish(result: DeployResult) -> None:
    """The sizing explanation (markdown) and the smoke results (table) as Prefect artifacts."""
    key = result.endpoint.lower().replace("_", "-").replace(".", "-")
    if result.sizing_markdown:
        create_markdown_artifact(result.sizing_markdown, key=f"sizing-{key}",
                                 description=f"Sizing of {result.endpoint} revision {result.revision}")
    rows = [
        {"revision": result.revision, "replica": rp.base_url, "check": c.name,
         "result": "pass" if c.passed else "FAIL", "detail": c.detail, "seconds": c.seconds}
        for rp in result.smoke
        for c in rp.checks
    ]
    if rows:
        create_table_artifact(rows, key=f"smoke-{key}",
                              description=f"Smoke tests of {result.endpoint} revision {result.revision}: "
                                          f"{result.outcome}")


def _checked(result: DeployResult) -> DeployResult:
    """Publishes the evidence; a refused or failed revision fails the task (and is not retried)."""
    _publish(result)
    print(result.message)
    if result.outcome in {"failed", "refused"}:
        raise DeployError(f"{result.endpoint}: {result.message}")
    return result


@step_task("deploy", retries=1, retry_delay_seconds=10)
def deploy_task(spec: EndpointSpec, force: bool = False) -> DeployResult:
    return _checked(deploy(spec, force=force))


@step_task("rollback", retries=1, retry_delay_seconds=10)
def rollback_task(name: str, to: str | None = None) -> DeployResult:
    return _checked(rollback(name, to=to))


@step_task("load-adapter", retries=2, retry_delay_seconds=5)
def load_adapter_task(endpoint: str, version: str, name: str | None = None) -> AdapterChange:
    return load_into_endpoint(endpoint, version, name=name)


# ---------------------------------------------------------------------------------------------- evaluate


class EvalFlowResult(BaseModel):
    suite: str
    targets: list[str]
    run_ids: dict[str, str]
    verdict: str | None = Field(default=None, description="READY TO REPLACE / NOT YET (two targets only).")
    recommendation: str | None = None
    report_markdown: str


class ComparisonRun(EvalFlowResult):
    comparison: Comparison = Field(description="Candidate vs baseline: every metric, the checks, the verdict.")


def _gateway_key(endpoint: str | None) -> str | None:
    """A fresh gateway key granted on `endpoint`, minted inside the task: it is never a task parameter."""
    return service_key(endpoint) if endpoint else None


# No retries: the runner already retries each request on 429/5xx/timeouts (bounded and counted), and
# re-running a whole suite would re-bill a frontier API for examples that already succeeded.
@step_task("evaluate")
def evaluate_task(suite: str, target: str, *, concurrency: int | None = None, limit: int | None = None,
                  tier: str | None = None, hourly_price: float | None = None,
                  gateway_key_for: str | None = None) -> EvalFlowResult:
    """One target: scores with intervals and pass thresholds. `gateway_key_for`: the endpoint to mint a key on."""
    loaded = load(suite, limit=limit)
    result, run_id = evaluate_target(loaded, target, concurrency=concurrency, progress=False, tier=tier,
                                     hourly_price=hourly_price, api_key=_gateway_key(gateway_key_for))
    return EvalFlowResult(suite=loaded.suite.name, targets=[target], run_ids={target: run_id},
                          report_markdown=render_run_markdown(loaded.suite, target, result))


@step_task("compare")
def compare_task(suite: str, candidate: str, baseline: str, *, concurrency: int | None = None,
                 limit: int | None = None, tier: str | None = None, hourly_price: float | None = None,
                 candidate_precision: str | None = None, gateway_key_for: str | None = None,
                 artifact_key: str | None = None, saturation: int | None = None,
                 record: RecordMode | None = None) -> ComparisonRun:
    """Candidate vs baseline with the replace verdict; with `artifact_key`, the report is published.

    `record="background"` leaves the two side runs' records to a child process (`compare_targets`); the flow
    collects it with `recording.wait_for_background_records`.
    """
    loaded = load(suite, limit=limit)
    outcome = compare_targets(loaded, candidate, baseline, concurrency=concurrency, progress=False, tier=tier,
                              hourly_price=hourly_price, candidate_precision=candidate_precision,
                              api_key=_gateway_key(gateway_key_for), saturation=saturation, record=record)
    if artifact_key:
        create_markdown_artifact(outcome.markdown, key=artifact_key,
                                 description=f"{candidate} vs {baseline} on {suite}")
    v = outcome.comparison.verdict
    return ComparisonRun(suite=loaded.suite.name, targets=[candidate, baseline], run_ids=outcome.run_ids,
                          verdict=v.headline, recommendation=v.recommendation, report_markdown=outcome.markdown,
                          comparison=outcome.comparison)


@step_task("frontier-standin", retries=1, retry_delay_seconds=5)
def standin_task(endpoint: str, steps: int | None = None) -> StandinServed:
    """The demo's frontier stand-in (local): built once per machine, served by `endpoint`'s vLLM as one more
    model, and entered in the frontier catalog priced as a hosted API (demo/standin.py)."""
    return serve_standin(endpoint, steps=steps or DEFAULT_STEPS, log=lambda _m: None)


# ---------------------------------------------------------------------------------------------- fine-tune


@step_task("contamination-check")
def contamination_task(config: FinetuneConfig) -> str:
    """Refuses (ContaminationError) before any training when eval rows are in the training data."""
    if config.contamination.skip:
        return "contamination check skipped"
    return check_contamination(load_training_data(config).train, config.contamination).summary()


# No retries: a failed training run is not transient I/O, and retrying would double the MLflow runs.
@step_task("fine-tune")
def finetune_task(config: FinetuneConfig, quiet: bool = False) -> FinetuneResult:
    return finetune(config, log=(lambda _m: None) if quiet else print)


# Cached on the config and the training files' bytes, so a lifecycle rerun does not train again.
finetune_cached: Task[..., FinetuneResult] = finetune_task.with_options(
    cache_key_fn=finetune_key, cache_expiration=CACHE_FOR, persist_result=True)


# ---------------------------------------------------------------------------------------------- promote


@step_task("promote")  # a second try after the aliases moved would be refused as "already the champion"
def promote_task(model: str, version: str, spec: EndpointSpec, evidence: dict[str, Any]) -> PromotionRecord:
    """Serves the version (a route switch to the hot-loaded adapter, else blue/green), then moves the aliases."""
    record = promote(model, version, spec, actor="lifecycle", evidence=evidence)
    if record.serving is not None:
        print(f"promoted {model}/{version} on {spec.name}: {record.serving.method} in {record.serving.seconds:.1f}s"
              + (f" ({record.serving.note})" if record.serving.note else ""))
    return record
