"""Team mode for real: two gateway processes on one PostgreSQL store, and the registry through an MLflow server.

The services are tasks.core.team's, as `make team-up` starts them (tests/conftest.py `team_services`); the store's
own suite also runs on them (tests/test_store_audit.py). The upstream is the instant double of the durability tests.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from test_usage_durability import GatewayProcess, Upstream
from threaded_gateway import wait_for

from flows.cli import main as cli
from tasks import store
from tasks.core.settings import get_settings
from tasks.core.team import TeamServices

MSG = [{"role": "user", "content": "where is my parcel ?"}]


def team_env(team: TeamServices) -> dict[str, str]:
    """The variables team.env exports: what a user gets from `source .llmhost/team/team.env`."""
    found = re.findall(r"^export (\w+)=(.*)$", team.env_file.read_text(), flags=re.M)
    return {k: shlex.split(v)[0] for k, v in found}


@pytest.fixture(scope="module")
def team_module(team_services: TeamServices) -> Iterator[TeamServices]:
    """The store's PostgreSQL serves the whole session; the MLflow server only this module."""
    yield team_services
    team_services.stop_mlflow()


@pytest.fixture()
def team_mode(team_module: TeamServices, monkeypatch: pytest.MonkeyPatch) -> Iterator[TeamServices]:
    """Both services up and this process's environment sourced from team.env; afterwards MLflow is pointed back
    at the session's sqlite store (its URIs are process-wide)."""
    from tasks.core.tracking import configure_mlflow

    team_module.up()
    for k, v in team_env(team_module).items():
        monkeypatch.setenv(k, v)
    try:
        yield team_module
    finally:
        monkeypatch.undo()
        configure_mlflow()


def test_tracking_uri_precedence_and_who_picks_the_artifact_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LLMHOST_TRACKING_URI", raising=False)
    s = get_settings()
    assert s.mlflow_uri == f"sqlite:///{s.home_abs / 'mlflow.db'}" and not s.mlflow_is_server  # the embedded default
    monkeypatch.setenv("LLMHOST_TRACKING_URI", "sqlite:////srv/llmhost/mlflow.db")
    assert get_settings().mlflow_uri == "sqlite:////srv/llmhost/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.internal")  # MLflow's own variable wins
    assert get_settings().mlflow_uri == "https://mlflow.example.internal" and get_settings().mlflow_is_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg://u@db/mlflow")  # opened by MLflow in-process
    assert not get_settings().mlflow_is_server


def test_team_env_and_status(team_mode: TeamServices, capsys: pytest.CaptureFixture[str]) -> None:
    env = team_env(team_mode)
    st = team_mode.state()
    assert st is not None
    assert env == {"LLMHOST_STORE_URL": st.store_url, "MLFLOW_TRACKING_URI": st.tracking_uri}
    assert get_settings().store.startswith("postgresql+psycopg://") and get_settings().mlflow_is_server
    assert cli(["team", "status", "--root", str(team_mode.root), "--pg-root", str(team_mode.pg_root)]) == 0
    assert capsys.readouterr().out.count(": up") == 2


@pytest.mark.slow
def test_two_gateways_share_one_postgres_store(team_mode: TeamServices, llmhost_home: Path) -> None:
    """A key revoked through the store is refused by both gateways on their next request; usage from both adds up."""
    upstream = Upstream()
    endpoint = "team-ep"
    log_path = llmhost_home / "runs" / "team-gateways.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    gateways: list[GatewayProcess] = []
    try:
        store.attach_server(endpoint, base_url=f"http://127.0.0.1:{upstream.port}/v1", served_model="tiny",
                            actor="test")
        store.grant(endpoint, team="team-a", actor="test")
        key = store.create_key("team-user", team="team-a", actor="test")
        with ThreadPoolExecutor(2) as pool:  # both start at once: each waits on its own /health
            gateways = list(pool.map(GatewayProcess, [log_path, log_path]))
        clients = [openai.OpenAI(base_url=f"{g.url}/v1", api_key=key.raw, max_retries=0, timeout=20) for g in gateways]
        calls = (3, 2)
        for client, n in zip(clients, calls, strict=True):
            for _ in range(n):  # the second and later calls are answered from each gateway's key cache
                assert client.chat.completions.create(model=endpoint, messages=MSG).choices[0].message.content \
                    == "shipping"

        def summary() -> store.UsageSummary | None:
            rows = store.summarize_usage(endpoint=endpoint)
            return rows[0] if rows and rows[0].requests == sum(calls) else None

        s = wait_for(summary, timeout=20, what="usage rows from both gateways")
        assert (s.requests, s.errors, s.prompt_tokens, s.completion_tokens) == (5, 0, 25, 10)
        rows = store.list_usage(key_prefix=key.info.prefix)
        assert len({r.request_id for r in rows}) == 5

        store.revoke_key(key.info.prefix, actor="test")  # `llmhost keys revoke`, from anywhere on the team
        for client in reversed(clients):
            with pytest.raises(openai.AuthenticationError, match="revoked"):
                client.chat.completions.create(model=endpoint, messages=MSG)
    finally:
        for g in gateways:
            g.stop()
        upstream.close()
    assert store.summarize_usage(endpoint=endpoint)[0].requests == 5  # a refused key is not metered to the key


@pytest.mark.slow
def test_registry_round_trip_through_the_tracking_server(team_mode: TeamServices, demo_model_dir: Path) -> None:
    """The weights go to the server (proxied artifacts) and come back from it; no client path is recorded."""
    from tasks.core.tracking import get_or_create_experiment, mlflow_client
    from tasks.register import inspect_model_dir, register_model, resolve_model_ref

    result = register_model(f"path:{demo_model_dir}", "team-demo")
    assert result.created and result.version == "1"
    client = mlflow_client()
    assert client.tracking_uri == team_mode.state().tracking_uri  # type: ignore[union-attr]
    exp = client.get_experiment(get_or_create_experiment("team-mode-check"))
    assert exp.artifact_location.startswith("mlflow-artifacts:/"), exp.artifact_location
    run = client.get_run(result.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    mv = client.get_model_version("team-demo", "1")
    assert not mv.source.startswith("file:"), mv.source
    stored = [p for p in team_mode.artifacts.rglob("*.safetensors")]
    assert stored, f"no weights under the server's --artifacts-destination {team_mode.artifacts}"

    resolved = resolve_model_ref("models:/team-demo/1")
    assert inspect_model_dir(resolved.local_dir, label="resolved").content_hash == result.tags["content_hash"]
    assert not str(resolved.local_dir).startswith(str(team_mode.artifacts))  # downloaded over HTTP, not copied
    assert os.environ["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
