import pytest
from flows import lifecycle as lifecycle_module
from flows import tasks as flow_tasks
from flows.lifecycle import lifecycle
from tasks.core.errors import DeployError
from tests.test_flow_tasks import ENDPOINT, count_deploys, params  # noqa: F401


def test_old_policy_runs_twice(params, monkeypatch):
    calls = count_deploys(monkeypatch)
    monkeypatch.setattr(lifecycle_module, "deploy_task",
                        flow_tasks.deploy_task.with_options(retry_condition_fn=lambda *a: True, retry_delay_seconds=0))
    with pytest.raises(DeployError):
        lifecycle(params)
    assert calls == [ENDPOINT, ENDPOINT]
