"""The one retry policy under the real lifecycle flow: a deterministic deploy failure runs once, a transient one twice.

The spec asks for more KV cache than its tier has, so deploy refuses it at sizing and no vLLM is started. The
gateway is not started either: nothing is served before the refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows import lifecycle as lifecycle_module
from flows import tasks as flow_tasks
from flows.lifecycle import LifecycleParams, lifecycle
from tasks.core.errors import DeployError, TransientError
from tasks.core.settings import PROJECT_ROOT
from tasks.deploy import DeployStartError, EndpointSpec

ENDPOINT = "retry-once"


@pytest.fixture()
def params(demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LifecycleParams:
    """Lifecycle parameters whose deploy is refused at sizing: 100,000 sequences of KV on a 1 GiB tier."""
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(
        "tiers:\n  - {name: tiny-cpu, device: cpu, accelerator: cpu, count: 1, memory_gib: 1,\n"
        "     kv_cache_space_gib: 1, price_per_hour: 0.0}\n"
    )
    monkeypatch.setenv("LLMHOST_TIERS_FILE", str(tiers))
    spec = yaml.safe_load((PROJECT_ROOT / "deployments" / "demo.yaml").read_text())
    spec.update(name=ENDPOINT, model="models:/demo-retry@champion", hardware="tiny-cpu", concurrency=100_000)
    spec_path = tmp_path / f"{ENDPOINT}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(lifecycle_module, "ensure_gateway", lambda: "http://127.0.0.1:1")
    return LifecycleParams(source=f"path:{demo_model_dir}", model_name="demo-retry", endpoint_spec=str(spec_path))


def count_deploys(monkeypatch: pytest.MonkeyPatch, first: Callable[[], None] | None = None) -> list[str]:
    """Counts the calls of the plain deploy step where flows/tasks.py looks it up; `first` runs before call 1."""
    calls: list[str] = []
    real = flow_tasks.deploy

    def counting(spec: EndpointSpec, **kw: Any) -> Any:
        calls.append(spec.name)
        if first is not None and len(calls) == 1:
            first()
        return real(spec, **kw)

    monkeypatch.setattr(flow_tasks, "deploy", counting)
    return calls


def test_a_sizing_refusal_is_not_retried(params: LifecycleParams, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_deploys(monkeypatch)
    with pytest.raises(DeployError, match="does not fit hardware 'tiny-cpu'"):
        lifecycle(params)
    assert calls == [ENDPOINT]  # the deploy task allows one retry, but only for a transient error


def test_a_transient_deploy_error_is_retried(params: LifecycleParams, monkeypatch: pytest.MonkeyPatch) -> None:
    def replica_failed_to_start() -> None:
        raise DeployStartError(f"revision of {ENDPOINT} failed to start; nothing is serving: port taken")

    assert issubclass(DeployStartError, TransientError)
    calls = count_deploys(monkeypatch, first=replica_failed_to_start)
    # The same task with its retry, without the 10 s wait between tries.
    monkeypatch.setattr(lifecycle_module, "deploy_task", flow_tasks.deploy_task.with_options(retry_delay_seconds=0))
    with pytest.raises(DeployError, match="does not fit hardware 'tiny-cpu'"):
        lifecycle(params)
    assert calls == [ENDPOINT, ENDPOINT]  # retried once after the transient error, then refused for good
