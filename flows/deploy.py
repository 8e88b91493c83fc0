"""Deploy an endpoint spec: plan the revision, size it, start replicas, smoke-test, switch blue/green."""

from __future__ import annotations

from prefect import flow

from flows.tasks import deploy_task, rollback_task
from tasks.deploy import DeployResult, EndpointSpec, load_spec


@flow(name="deploy", log_prints=True)
def deploy_flow(spec: str | EndpointSpec, force: bool = False) -> DeployResult:
    """Deploys `spec` (a spec YAML path, or a parsed spec) and publishes sizing and smoke artifacts.

    A refused or failed revision fails the flow run (DeployError); the artifacts carry the evidence.
    """
    return deploy_task(load_spec(spec) if isinstance(spec, str) else spec, force=force)


@flow(name="rollback", log_prints=True)
def rollback_flow(name: str, to: str | None = None) -> DeployResult:
    """Redeploys the previous good revision of `name` (or revision `to`) through the smoke-tested path."""
    return rollback_task(name, to=to)
