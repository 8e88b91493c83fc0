"""Deploy an endpoint spec: plan the revision, size it, start replicas, smoke-test, switch blue/green."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks import endpoints
from tasks.endpoints import DeployResult, EndpointSpec


@task(retries=1, retry_delay_seconds=10)
def deploy_task(spec: EndpointSpec, force: bool = False) -> DeployResult:
    # One retry: a replica start can fail transiently (port race, slow first start); validation never retries.
    return endpoints.deploy(spec, force=force)


@flow(name="deploy", log_prints=True)
def deploy_flow(spec: EndpointSpec, force: bool = False) -> DeployResult:
    """Deploys `spec` and publishes the sizing explanation and the smoke table as artifacts."""
    result = deploy_task(spec, force=force)
    if result.sizing_markdown:
        create_markdown_artifact(result.sizing_markdown, key=f"sizing-{spec.name}".lower(),
                                 description=f"Sizing of {spec.name} revision {result.revision}")
    rows = [{"replica": rp.base_url, "check": c.name, "passed": c.passed, "detail": c.detail}
            for rp in result.smoke for c in rp.checks]
    if rows:
        create_table_artifact(rows, key=f"smoke-{spec.name}".lower(),
                              description=f"Smoke tests of {spec.name} revision {result.revision}")
    print(result.message)
    if result.outcome in {"failed", "refused"}:
        raise RuntimeError(result.message)
    return result
