"""Deploy an endpoint spec: plan the revision, size it, start replicas, smoke-test, switch blue/green."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks import deploy as endpoints
from tasks.deploy import DeployResult, DeployStartError, EndpointSpec
from tasks.core.errors import DeployError


def _start_failed(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only a replica that failed to start (port race, slow first start under load).

    A refused or invalid spec, or a failed smoke test, would fail the same way again.
    """
    try:
        state.result()
    except DeployStartError:
        return True
    except Exception:
        return False
    return False


@task(name="deploy-revision", retries=1, retry_delay_seconds=10, retry_condition_fn=_start_failed)
def deploy_task(spec: EndpointSpec, force: bool = False) -> DeployResult:
    return endpoints.deploy(spec, force=force)


@task(name="rollback-revision", retries=1, retry_delay_seconds=10, retry_condition_fn=_start_failed)
def rollback_task(name: str, to: str | None = None) -> DeployResult:
    return endpoints.rollback(name, to=to)


def publish(result: DeployResult) -> None:
    """The sizing explanation (markdown) and the smoke results (table) as Prefect artifacts."""
    key = result.endpoint.lower().replace("_", "-").replace(".", "-")
    if result.sizing_markdown:
        create_markdown_artifact(
            result.sizing_markdown,
            key=f"sizing-{key}",
            description=f"Sizing of {result.endpoint} revision {result.revision}",
        )
    rows = [
        {
            "revision": result.revision,
            "replica": rp.base_url,
            "check": c.name,
            "result": "pass" if c.passed else "FAIL",
            "detail": c.detail,
            "seconds": c.seconds,
        }
        for rp in result.smoke
        for c in rp.checks
    ]
    if rows:
        create_table_artifact(
            rows,
            key=f"smoke-{key}",
            description=f"Smoke tests of {result.endpoint} revision {result.revision}: {result.outcome}",
        )


@flow(name="deploy", log_prints=True)
def deploy_flow(spec: str | EndpointSpec, force: bool = False) -> DeployResult:
    """Deploys `spec` (a spec YAML path, or a parsed spec) and publishes sizing and smoke artifacts."""
    parsed = endpoints.load_spec(spec) if isinstance(spec, str) else spec
    result = deploy_task(parsed, force=force)
    publish(result)
    print(result.message)
    if result.outcome in {"failed", "refused"}:
        # The flow run shows as failed in the UI; the artifacts above carry the evidence.
        raise DeployError(f"{result.endpoint}: {result.message}")
    return result


@flow(name="rollback", log_prints=True)
def rollback_flow(name: str, to: str | None = None) -> DeployResult:
    """Redeploys the previous good revision of `name` (or revision `to`) through the smoke-tested path."""
    result = rollback_task(name, to=to)
    publish(result)
    print(result.message)
    if result.outcome in {"failed", "refused"}:
        # The flow run shows as failed in the UI; the artifacts above carry the evidence.
        raise DeployError(f"{result.endpoint}: {result.message}")
    return result
