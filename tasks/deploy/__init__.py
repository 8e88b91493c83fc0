"""Deploy: endpoint specs as immutable revisions, rolled out blue/green (plan -> size -> start -> smoke -> switch)."""

from tasks.deploy.ops import describe, render_k8s, rollback, stop_endpoint
from tasks.deploy.plan import (
    ARCH_TOOL_PARSERS,
    RevisionPlan,
    choose_tool_calling,
    plan_revision,
    size_spec,
    sizing_request,
)
from tasks.deploy.rollout import DeployResult, DeployStartError, deploy
from tasks.deploy.spec import EndpointSpec, load_spec, pinned_spec

__all__ = [
    "ARCH_TOOL_PARSERS",
    "DeployResult",
    "DeployStartError",
    "EndpointSpec",
    "RevisionPlan",
    "choose_tool_calling",
    "deploy",
    "describe",
    "load_spec",
    "pinned_spec",
    "plan_revision",
    "render_k8s",
    "rollback",
    "size_spec",
    "sizing_request",
    "stop_endpoint",
]
