"""Real-thing fixtures: an isolated state dir, Prefect's test harness, the demo model and a vLLM server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.core.settings import PROJECT_ROOT

# Set before anything imports mlflow/transformers/prefect, so no test reaches for a hub or telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("LLMHOST_RAISE_ERRORS", "")

# The demo model is built once per machine and reused: the build is keyed on its inputs' hash.
DEMO_CACHE = Path(os.environ.get("LLMHOST_DEMO_CACHE", PROJECT_ROOT / ".llmhost" / "demo"))
os.environ["LLMHOST_DEMO_CACHE"] = str(DEMO_CACHE)


@pytest.fixture(scope="session", autouse=True)
def llmhost_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tmp state dir (store, MLflow sqlite, runtime logs) for the whole session."""
    home = tmp_path_factory.mktemp("llmhost-home")
    old = {k: os.environ.get(k) for k in ("LLMHOST_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ["LLMHOST_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    os.environ["MLFLOW_REGISTRY_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(llmhost_home: Path) -> Iterator[None]:
    """Prefect's own test harness: a temporary database behind the ephemeral API."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_build():
    from demo.build import build_demo_model

    return build_demo_model(DEMO_CACHE)


@pytest.fixture(scope="session")
def demo_model_dir(demo_build) -> Path:
    return Path(demo_build.model_dir)


@pytest.fixture(scope="session")
def demo_data_dir(demo_build) -> Path:
    return Path(demo_build.data_dir)


@pytest.fixture(scope="session")
def vllm_server(demo_model_dir: Path):
    """One real vLLM server on the demo model for the session, served as `demo`."""
    from tasks.serving.base import VllmArgs
    from tasks.serving.local import LocalTarget

    target = LocalTarget()
    replica = target.start(
        VllmArgs(model=str(demo_model_dir), served_model_name="demo", dtype="float32", max_model_len=1024,
                 enforce_eager=True, max_num_seqs=32),
        name="test-demo",
    )
    try:
        yield replica
    finally:
        target.stop(replica)


@pytest.fixture()
def openai_client(vllm_server):
    import openai

    return openai.OpenAI(base_url=vllm_server.base_url, api_key="unused", max_retries=0, timeout=60)
