"""Real-thing fixtures: an isolated state dir, Prefect's test harness, the demo model and a vLLM server."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """One real vLLM server on the demo model for the session, served as `demo`.

    LoRA with runtime loading is on, so the fine-tune tests hot-load their adapters here instead of starting a
    second server (each vLLM start costs 50-230 s of the suite's two cores). No tool parser: the smoke tests need a
    replica that refuses tool_choice=auto.
    """
    from tasks.serving.base import VllmArgs
    from tasks.serving.local import LocalTarget

    target = LocalTarget()
    replica = target.start(
        VllmArgs(model=str(demo_model_dir), served_model_name="demo", dtype="float32", max_model_len=1024,
                 enforce_eager=True, max_num_seqs=32, enable_lora=True, max_lora_rank=16, max_loras=2),
        name="test-demo",
    )
    try:
        yield replica
    finally:
        target.stop(replica)


@pytest.fixture(scope="session")
def team_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Team mode's PostgreSQL (tasks.core.team, as `make team-up` starts it) for the session; a test that needs its
    MLflow server calls `team_services.up()`, which starts that too."""
    import shutil
    import tempfile

    from tasks.core.team import TeamServices, postgres_available

    if not postgres_available():
        pytest.skip("PostgreSQL's initdb/pg_ctl/postgres are absent: apt-get install postgresql (.ci/run does)")
    # As root, PostgreSQL runs as another user, who cannot enter pytest's root-only tmp dir; /tmp itself is open.
    pg_root = Path(tempfile.mkdtemp(prefix="llmhost-test-pg-"))
    team = TeamServices(tmp_path_factory.mktemp("team"), pg_root=pg_root)
    try:
        team.up(with_mlflow=False)
        yield team
    finally:
        team.down()
        shutil.rmtree(pg_root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store for one test, as a SQLite file and as a database on team mode's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    import hashlib

    from tasks.store.schema import _engines

    name = "t_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]
    url = request.getfixturevalue("team_services").create_database(name)
    yield url
    engine = _engines.pop(url, None)  # close its connections: the cluster serves the whole session
    if engine is not None:
        engine.dispose()


@pytest.fixture()
def openai_client(vllm_server):
    import openai

    return openai.OpenAI(base_url=vllm_server.base_url, api_key="unused", max_retries=0, timeout=60)


# ------------------------------------------------------------------------------------------------ the lifecycle


@contextlib.contextmanager
def gateway_port_env(port: int) -> Iterator[int]:
    """LLMHOST_GATEWAY_PORT set for the block: where the lifecycle finds (or starts) its gateway process."""
    old = os.environ.get("LLMHOST_GATEWAY_PORT")
    os.environ["LLMHOST_GATEWAY_PORT"] = str(port)
    try:
        yield port
    finally:
        if old is None:
            os.environ.pop("LLMHOST_GATEWAY_PORT", None)
        else:
            os.environ["LLMHOST_GATEWAY_PORT"] = old


@pytest.fixture(scope="session")
def lifecycle_gateway_port() -> Iterator[int]:
    """The port of the lifecycle's own gateway process; it and the demo endpoints stop at the session's end."""
    from tasks.serving.local import free_port

    port = free_port()
    yield port
    from tasks import deploy, store
    from tasks.core.settings import get_settings

    try:
        for ep in store.list_endpoints():
            if ep.name.startswith("demo"):
                deploy.stop_endpoint(ep.name, actor="test")
    finally:  # the gateway process goes even when a stop fails
        pid_file = get_settings().home_abs / "gateway.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid_file.read_text()), 15)


def finetune_runs() -> int:
    """MLflow runs in the fine-tune experiments: a training that really ran leaves one."""
    from tasks.core.tracking import configure_mlflow, mlflow_client

    configure_mlflow()
    client = mlflow_client()
    exps = [e.experiment_id for e in client.search_experiments() if "finetune" in e.name.lower()]
    return len(client.search_runs(exps)) if exps else 0


STANDIN_KEY_ENV = "LLMHOST_STANDIN_KEY"
STANDIN_SECRET = "sk-standin-secret-9d2e7b41"  # noqa: S105 - a test value that must appear nowhere afterwards
HF_TOKEN_SECRET = "hf_llmhostTestToken7c1e5a90d2"  # noqa: S105 - HF_TOKEN during the resumed run: found nowhere after
STANDIN_TEST_STEPS = 40
LIFECYCLE_SATURATION = 16  # the demo runs it at the tier's max_num_seqs (128 on CPU)
LIFECYCLE_EVAL_LIMIT = 80  # four comparisons in the resumed run; 80 examples tell 0.0 from 0.9 apart


@dataclass
class LifecycleRun:
    """What one lifecycle on the demo model did: a run that failed after fine-tuning, then the resumed run."""

    failure: str
    runs_before: int
    runs_after_failure: int
    runs_after_rerun: int
    champion_before: str
    aliases_after: dict[str, str]
    rerun_wall_s: float
    summary: Any
    rerun_started_at: float  # time.time() when the resumed run (the one with the frontier branch) began
    promote_links: dict[str, Any] | None  # the lifecycle's `promote` audit entry, if it promoted
    gateway_keys: list[str]  # the raw gateway keys the resumed run minted (its eval calls' service keys)


@pytest.fixture(scope="session")
def lifecycle_run(demo_model_dir: Path, lifecycle_gateway_port: int) -> LifecycleRun:
    """The demo lifecycle, run once per session and read by several modules (its fine-tune is the demo's 1,200 steps).

    The first run names a suite that does not exist, which is first needed after fine-tuning, so it fails there; the
    second run resumes from Prefect's cache (register and fine-tune are not redone) and goes on to promote or not.
    """
    from flows.lifecycle import LifecycleParams, lifecycle
    from tasks.promote import current_aliases
    from tasks.store import audit

    with gateway_port_env(lifecycle_gateway_port):
        before = finetune_runs()
        try:
            lifecycle(LifecycleParams(suite="no_such_suite"))
            failure = ""
        except Exception as exc:  # noqa: BLE001 - the test asserts on what failed
            failure = f"{type(exc).__name__}: {exc}"
        after_failure = finetune_runs()
        champion_before = current_aliases("demo")["champion"]
        t0 = time.monotonic()
        started_at = time.time()
        # The resumed run takes the frontier branch against the demo's stand-in (trained briefly here: the test
        # is about the branch, not the stand-in's strength), with a "frontier key" set that must leak nowhere.
        # HF_TOKEN is set too (every step and child process sees it), and the gateway keys the run mints for its eval
        # calls are recorded as they are created: none of these values may be written anywhere.
        os.environ[STANDIN_KEY_ENV] = STANDIN_SECRET
        old_hf_token = os.environ.get("HF_TOKEN")
        os.environ["HF_TOKEN"] = HF_TOKEN_SECRET
        from tasks import store

        minted: list[str] = []
        create_key = store.create_key

        def recording_create_key(*args: Any, **kwargs: Any) -> Any:
            created = create_key(*args, **kwargs)
            minted.append(created.raw)
            return created

        store.create_key = recording_create_key  # type: ignore[assignment]
        try:
            summary = lifecycle(LifecycleParams(frontier_standin=True, standin_steps=STANDIN_TEST_STEPS,
                                                eval_limit=LIFECYCLE_EVAL_LIMIT, saturation=LIFECYCLE_SATURATION))
        finally:
            store.create_key = create_key  # type: ignore[assignment]
            os.environ.pop(STANDIN_KEY_ENV, None)
            if old_hf_token is None:
                os.environ.pop("HF_TOKEN", None)
            else:
                os.environ["HF_TOKEN"] = old_hf_token
        wall = time.monotonic() - t0
        promoted = [e for e in audit.entries(action="promote") if e.subject == "model:demo"]
        # Read now: later modules register `demo` again and point its champion alias elsewhere.
        return LifecycleRun(failure=failure, runs_before=before, runs_after_failure=after_failure,
                            runs_after_rerun=finetune_runs(), champion_before=champion_before,
                            aliases_after=current_aliases("demo"), rerun_wall_s=wall, summary=summary,
                            rerun_started_at=started_at,
                            promote_links=json.loads(promoted[-1].links) if summary.promoted and promoted else None,
                            gateway_keys=minted)
