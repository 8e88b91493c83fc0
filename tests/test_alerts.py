"""Alerts that reach someone, on a real Prefect server: automations.yaml applied, `nightly-eval` run for real, the
notification caught by a local webhook receiver; and the `lifecycle` deployment started as the UI starts it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from threaded_gateway import ThreadedGateway, wait_for

from tasks.core.settings import PROJECT_ROOT
from tasks.serving.local import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
PREFECT = str(Path(sys.executable).parent / "prefect")


@dataclass
class Receiver:
    """A webhook receiver on a free port, in a thread; keeps every POST body (JSON) it is sent."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Receiver:
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                bodies.append(json.loads(raw or b"{}"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    def wait(self, pred: Any, timeout: float = 120.0, what: str = "a notification") -> dict[str, Any]:
        return wait_for(lambda: next((b for b in list(self.bodies) if pred(b)), None), timeout=timeout, what=what)


@dataclass
class PrefectServer:
    api: str
    env: dict[str, str]

    def run(self, args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, env=self.env, cwd=PROJECT_ROOT, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
def gateway() -> Iterator[ThreadedGateway]:
    """The real gateway in a thread; the nightly flow (a subprocess) finds it through LLMHOST_GATEWAY_PORT."""
    with ThreadedGateway(flush_interval_s=0.1) as gw:
        yield gw


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver,
                   gateway: ThreadedGateway) -> Iterator[PrefectServer]:
    """`prefect server start` on a free port with its own PREFECT_HOME, as `make ui` starts it."""
    tmp = tmp_path_factory.mktemp("prefect-alerts")
    port = free_port()
    env = dict(os.environ)
    env.update({"PREFECT_HOME": str(tmp / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LLMHOST_PROJECT_DIR": str(PROJECT_ROOT),
                "LLMHOST_GATEWAY_PORT": str(gateway.port), "LLMHOST_ALERT_WEBHOOK_URL": receiver.url})
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    with (tmp / "server.log").open("w") as server_log:  # the child keeps its own copy of the fd
        server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                   "--analytics-off"], env=env, stdout=server_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        api = env["PREFECT_API_URL"]

        def healthy() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=180, what=f"the Prefect server (log: {tmp / 'server.log'})")
        yield PrefectServer(api=api, env=env)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _llmhost_automations(api: str) -> list[dict[str, Any]]:
    autos = httpx.post(f"{api}/automations/filter", json={}, timeout=30).json()
    return [a for a in autos if a["name"].startswith("llmhost ")]


@pytest.fixture(scope="module")
def alerts(prefect_server: PrefectServer) -> list[dict[str, Any]]:
    """automations.yaml applied twice, as two `make ui` starts would: the second updates, it does not duplicate."""
    first = prefect_server.run([sys.executable, "-m", "flows.alerts", "apply"], timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "created 'llmhost nightly-eval failed'" in first.stdout, first.stdout
    second = prefect_server.run([sys.executable, "-m", "flows.alerts", "apply"], timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "updated 'llmhost nightly-eval failed'" in second.stdout, second.stdout
    autos = _llmhost_automations(prefect_server.api)
    assert sorted(a["name"] for a in autos) == ["llmhost eval regressed", "llmhost nightly-eval failed"]
    return autos


def test_an_automation_whose_block_is_missing_is_skipped_with_the_fix(prefect_server: PrefectServer,
                                                                       alerts: list[dict[str, Any]], tmp_path: Path):
    import yaml

    autos = yaml.safe_load((PROJECT_ROOT / "automations.yaml").read_text())["automations"][:1]
    autos[0]["name"] = "llmhost to slack"
    autos[0]["actions"][0]["block"] = "slack-webhook/llmhost-alerts"  # README: Slack, before the block exists
    (tmp_path / "slack.yaml").write_text(yaml.safe_dump({"automations": autos}))
    env = {k: v for k, v in prefect_server.env.items() if k != "LLMHOST_ALERT_WEBHOOK_URL"}
    out = subprocess.run([sys.executable, "-m", "flows.alerts", "apply", "--file", str(tmp_path / "slack.yaml")],
                         env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("skipped 'llmhost to slack': no notification block slack-webhook/llmhost-alerts; set "
            "LLMHOST_ALERT_WEBHOOK_URL, or create the block") in out.stdout, out.stdout
    assert "llmhost to slack" not in [a["name"] for a in _llmhost_automations(prefect_server.api)]


def _nightly(server: PrefectServer, **params: Any) -> dict[str, Any]:
    """The `nightly-eval` flow body run for real against the server (a process of its own, as a worker runs it)."""
    code = ("import json, sys; from flows.nightly_eval import nightly_eval; "
            "s = nightly_eval(**json.loads(sys.argv[1]), return_state=True); "
            "print('STATE=' + json.dumps({'id': str(s.state_details.flow_run_id), 'name': s.name, "
            "'type': s.type.value, 'message': s.message, "
            "'result': s.result(raise_on_failure=False) if s.is_completed() else None}))")
    out = server.run([sys.executable, "-c", code, json.dumps(params)], timeout=900)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("STATE=")), None)
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(line.removeprefix("STATE="))


def test_a_failed_nightly_eval_notifies_the_webhook(prefect_server: PrefectServer, receiver: Receiver,
                                                     alerts: list[dict[str, Any]]):
    # A suite that does not exist fails the run after the flow started (frontier checked, gateway up).
    state = _nightly(prefect_server, endpoint="alerts-nowhere", suite="no-such-suite",
                     frontier="url:http://127.0.0.1:9/v1#none", eval_limit=1)
    assert (state["type"], state["name"]) == ("FAILED", "Failed"), state
    body = receiver.wait(lambda b: state["id"] in b.get("body", ""), what="the failed run's notification")
    assert body["subject"] == "llmhost: nightly-eval Failed on endpoint alerts-nowhere", body
    assert "no-such-suite" in body["body"], body  # the state message says why
    assert body["text"].startswith(body["subject"]) and body["source"] == "llmhost"


def test_a_regressed_verdict_sends_one_alert_naming_the_endpoint(prefect_server: PrefectServer, receiver: Receiver,
                                                                 alerts: list[dict[str, Any]], vllm_server):
    from tasks import store
    from tasks.core.tracking import get_or_create_experiment, mlflow_client

    endpoint = "alerts-demo"
    store.attach_server(endpoint, base_url=vllm_server.base_url, served_model="demo", actor="test")
    # Last night the endpoint was READY TO REPLACE. Tonight's frontier is the same model answering directly and no
    # tier is given, so neither cost is known: the cost check cannot pass and the verdict cannot be READY.
    client = mlflow_client()
    run = client.create_run(get_or_create_experiment("llmhost-nightly"), run_name="last night",
                            tags={"llmhost.verdict": "READY TO REPLACE", "llmhost.endpoint": endpoint})
    client.set_terminated(run.info.run_id)

    state = _nightly(prefect_server, endpoint=endpoint, frontier=f"url:{vllm_server.base_url}#demo", eval_limit=4,
                     tier=None)
    assert (state["type"], state["name"]) == ("FAILED", "Regressed"), state
    assert state["message"].startswith("verdict regressed: READY TO REPLACE -> "), state
    body = receiver.wait(lambda b: state["id"] in b.get("body", "") and "regressed" in b.get("subject", ""),
                         what="the regression's notification")
    assert body["subject"].startswith(f"llmhost: endpoint {endpoint} regressed: READY TO REPLACE -> "), body
    assert f"vs url:{vllm_server.base_url}#demo on demo_routing" in body["body"], body
    time.sleep(5)  # the failure automation would have fired by now: a Regressed run is not also a "failed" alert
    about_run = [b for b in receiver.bodies if state["id"] in b.get("body", "")]
    assert len(about_run) == 1, about_run


# ------------------------------------------------------------------------------ the lifecycle, as the UI runs it


@pytest.fixture(scope="module")
def lifecycle_deployment(prefect_server: PrefectServer) -> dict[str, Any]:
    created = prefect_server.run([PREFECT, "work-pool", "create", "llmhost", "--type", "process"], timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    out = prefect_server.run([PREFECT, "--no-prompt", "deploy", "--all"], timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    deps = httpx.post(f"{prefect_server.api}/deployments/filter", json={}, timeout=30).json()
    return next(d for d in deps if d["name"] == "lifecycle")


def _ui_run(api: str, deployment_id: str, parameters: dict[str, Any]) -> httpx.Response:
    """POST what the UI's "Custom run" form sends: the parameters as JSON and a Scheduled state."""
    deadline = time.monotonic() + 60
    while True:  # the server answers 503 while its SQLite is locked (just after `prefect deploy`): retry
        resp = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run", timeout=30, json={
            "parameters": parameters, "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"}})
        if resp.status_code != 503 or time.monotonic() > deadline:
            return resp
        time.sleep(1)


def test_the_lifecycle_deployment_takes_the_ui_form_and_refuses_a_malformed_parameter(
        prefect_server: PrefectServer, lifecycle_deployment: dict[str, Any]):
    from flows.lifecycle_models import LifecycleParams

    dep = lifecycle_deployment
    assert dep["enforce_parameter_schema"], "without it the server takes any parameters the form sends"
    props = dep["parameter_openapi_schema"]["properties"]
    assert list(props) == ["params"], props  # the UI renders LifecycleParams as one form

    form = {"params": {"source": "demo", "model_name": "demo", "suite": "demo_routing", "eval_limit": 8,
                       "finetune_max_steps": 30, "tier": "cpu", "policy": {}}}
    ok = _ui_run(prefect_server.api, dep["id"], form)
    assert ok.status_code == 201, ok.text
    run = ok.json()
    assert run["state"]["type"] == "SCHEDULED" and run["parameters"] == form
    assert LifecycleParams.model_validate(run["parameters"]["params"]).eval_limit == 8

    bad = _ui_run(prefect_server.api, dep["id"], {"params": {**form["params"], "eval_limit": "many"}})
    assert bad.status_code == 409, bad.text
    detail = bad.json()["detail"]
    assert "eval_limit" in detail and "many" in detail, detail  # names the field and the value

    below = _ui_run(prefect_server.api, dep["id"], {"params": {**form["params"], "finetune_max_steps": 0}})
    assert below.status_code == 409, below.text
    assert "finetune_max_steps" in below.json()["detail"], below.text
    runs = httpx.post(f"{prefect_server.api}/flow_runs/filter", timeout=30,
                      json={"deployments": {"id": {"any_": [dep["id"]]}}}).json()
    assert [r["id"] for r in runs] == [run["id"]], "a refused form creates no run"
