"""Supervised local replicas: a crashed vLLM comes back on its port; one that keeps crashing is marked failed.

The cheap tests run the real supervisor and the real `LocalTarget` around a stand-in for vLLM (a tiny HTTP
server that `LocalTarget` starts as `python -m vllm.entrypoints.openai.api_server`, found first on PYTHONPATH).
The slow one kills a real vLLM under load through the real gateway and measures the recovery.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from threaded_gateway import ThreadedGateway, wait_for

from tasks import store
from tasks.core.procs import pid_alive
from tasks.deploy.replicas import stop_row
from tasks.serving.base import Replica, VllmArgs
from tasks.serving.local import LocalTarget
from tasks.serving.supervisor import RestartPolicy

SECRET = "llmh-deadbeef-abcdefghijklmnopqrstuvwxyz0123"
FAKE_VLLM = f'''
"""Stands in for vLLM: /health and a one-word chat answer; crashes at start while $FAKE_VLLM_DIR/crash exists."""
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

port = int(sys.argv[sys.argv.index("--port") + 1])
if (Path(os.environ["FAKE_VLLM_DIR"]) / "crash").exists():
    print("INFO starting engine", flush=True)
    print("RuntimeError: engine core died (key {SECRET})", flush=True)
    sys.exit(3)

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({{}})

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self._send({{"id": "c", "object": "chat.completion", "created": 0, "model": "fake",
                    "usage": {{"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
                    "choices": [{{"index": 0, "message": {{"role": "assistant", "content": "billing"}},
                                 "finish_reason": "stop"}}]}})

print(f"INFO serving on port {{port}} as pid {{os.getpid()}}", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''

# Starts a replica the way `llmhost deploy` does, then exits: the replica must outlive its deployer.
DEPLOYER = """
import json, os, sys
from tasks.serving.base import VllmArgs
from tasks.serving.local import LocalTarget
r = LocalTarget(python=sys.executable).start(VllmArgs(model="fake", served_model_name="fake"), name=sys.argv[1],
                                             env={"PYTHONPATH": os.environ["FAKE_VLLM_PATH"]}, timeout_s=30)
print(r.model_dump_json())
"""


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A dir whose `vllm.entrypoints.openai.api_server` is the stand-in; LLMHOST_ settings for quick restarts."""
    mod = tmp_path / "vllm" / "entrypoints" / "openai" / "api_server.py"
    mod.parent.mkdir(parents=True)
    mod.write_text(textwrap.dedent(FAKE_VLLM))
    monkeypatch.setenv("FAKE_VLLM_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_VLLM_PATH", str(tmp_path))
    monkeypatch.setenv("LLMHOST_REPLICA_RESTART_BACKOFF_S", "1.0")
    monkeypatch.setenv("LLMHOST_STOP_GRACE_S", "3")
    return tmp_path


def deploy_elsewhere(endpoint: str) -> tuple[Replica, store.ReplicaRow]:
    """Starts the stand-in from a process that exits, and records it as the endpoint's live replica."""
    out = subprocess.run([sys.executable, "-c", DEPLOYER, f"{endpoint}-r0"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    replica = Replica.model_validate_json(out.strip().splitlines()[-1])
    return replica, register(endpoint, replica)


def register(endpoint: str, replica: Replica) -> store.ReplicaRow:
    store.upsert_endpoint(endpoint, actor="test")
    rev = store.add_revision(endpoint, {"kind": "test", "name": endpoint}, served_model_name=replica.served_model_name,
                             status="ready", actor="test")
    row = store.add_replica(endpoint, rev.id, base_url=replica.base_url, served_model_name=replica.served_model_name,
                            name=replica.name, state="up", pid=replica.pid, log_path=replica.log_path, actor="test")
    store.set_live_revision(endpoint, rev.id, actor="test")
    return row


def vllm_child(supervisor_pid: int | None) -> psutil.Process:
    assert supervisor_pid is not None
    kids = [p for p in psutil.Process(supervisor_pid).children()
            if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())]
    assert len(kids) == 1, kids
    return kids[0]


def state_of(row_id: int, endpoint: str) -> str:
    return next(r.state for r in store.list_replicas(endpoint) if r.id == row_id)


def audit_after(endpoint: str, action: str) -> list[dict[str, Any]]:
    return [json.loads(e.after or "{}") for e in store.audit.entries(endpoint=endpoint, action=action)]


def healthy(replica: Replica) -> bool:
    try:
        return httpx.get(f"{replica.root_url}/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedGateway]:
    monkeypatch.setenv("LLMHOST_HEALTH_INTERVAL_S", "0.5")
    monkeypatch.setenv("LLMHOST_CONNECT_TIMEOUT_S", "1")
    with ThreadedGateway() as gw:
        yield gw


def client_for(gw: ThreadedGateway, endpoint: str) -> openai.OpenAI:
    store.grant(endpoint, team="sup-team", actor="test")
    return gw.client(store.create_key("sup-user", team="sup-team", actor="test").raw)


# ------------------------------------------------------------------------------------------------ cheap


def test_restart_policy_backs_off_and_gives_up_after_n_restarts_in_the_window():
    p = RestartPolicy(max_restarts=3, window_s=100, backoff_s=1, backoff_max_s=3)
    delays = []
    for t in (0, 10, 20):
        delays.append(p.next_delay(t))
        p.restarted(t)
    assert delays == [1, 2, 3]  # doubling, capped
    assert p.next_delay(30) is None  # a fourth crash within 100 s: give up
    assert p.next_delay(111) == 2  # the first restart left the window: one more is allowed, after 2 s


def test_a_killed_replica_comes_back_on_its_port_and_a_stop_is_not_restarted(fake_vllm: Path,
                                                                            gateway: ThreadedGateway):
    replica, row = deploy_elsewhere("sup-crash")
    assert replica.pid and pid_alive(replica.pid) and healthy(replica)  # outlived the process that started it
    client = client_for(gateway, "sup-crash")
    ask = lambda: client.chat.completions.create(model="sup-crash", messages=[{"role": "user", "content": "hi"}])  # noqa: E731
    assert ask().choices[0].message.content == "billing"

    victim = vllm_child(replica.pid)
    victim.send_signal(signal.SIGKILL)
    wait_for(lambda: state_of(row.id, "sup-crash") == "restarting", timeout=10, what="restarting")
    # Down while it waits 1 s to restart: the gateway answers 503 with Retry-After and says why.
    with pytest.raises(openai.InternalServerError) as e503:
        ask()
    assert int(e503.value.response.headers["retry-after"]) >= 1
    assert "restarting" in e503.value.message, e503.value.message

    wait_for(lambda: state_of(row.id, "sup-crash") == "up", timeout=20, what="up again")
    assert healthy(replica) and vllm_child(replica.pid).pid != victim.pid
    wait_for(lambda: _answers(ask), timeout=10, what="the gateway to route to it again")
    [restart] = audit_after("sup-crash", "replica.restart")
    assert restart["attempt"] == 1 and restart["exit_code"] == -signal.SIGKILL and restart["state"] == "restarting"
    [recovered] = audit_after("sup-crash", "replica.recovered")
    assert recovered["state"] == "up" and 1.0 <= recovered["down_s"] < 20

    # A deliberate stop (the deploy path) ends the supervisor and vLLM, and nothing restarts it.
    child = vllm_child(replica.pid)
    stop_row("sup-crash", store.list_replicas("sup-crash")[0], actor="test")
    assert not pid_alive(replica.pid or 0) and not child.is_running()
    time.sleep(1.5)  # longer than the restart backoff
    assert not healthy(replica) and state_of(row.id, "sup-crash") == "stopped"
    assert len(audit_after("sup-crash", "replica.restart")) == 1
    assert "stopped" in Path(replica.log_path or "").read_text().splitlines()[-1]


def _answers(ask: Any) -> bool:
    try:
        return bool(ask().choices)
    except openai.APIStatusError:
        return False


def test_a_replica_that_keeps_crashing_is_marked_failed_with_its_log_tail(
    fake_vllm: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("LLMHOST_REPLICA_MAX_RESTARTS", "2")
    monkeypatch.setenv("LLMHOST_REPLICA_RESTART_BACKOFF_S", "0.2")
    replica, row = deploy_elsewhere("sup-fail")
    (fake_vllm / "crash").touch()  # every restart now dies at start
    vllm_child(replica.pid).send_signal(signal.SIGKILL)
    wait_for(lambda: state_of(row.id, "sup-fail") == "failed", timeout=30, what="failed")
    wait_for(lambda: not pid_alive(replica.pid or 0), timeout=5, what="the supervisor to exit")

    attempts = [(a["attempt"], a["exit_code"]) for a in audit_after("sup-fail", "replica.restart")]
    assert attempts == [(1, -signal.SIGKILL), (2, 3)]
    [failed] = audit_after("sup-fail", "replica.failed")
    assert failed["state"] == "failed" and failed["exit_code"] == 3 and failed["restarts"] == 2
    assert failed["reason"].startswith("RuntimeError: engine core died")
    assert any("giving up after 2 restart(s)" in line for line in failed["log_tail"]), failed["log_tail"]
    assert SECRET not in json.dumps(failed) and "llmh-deadbeef-[redacted]" in failed["reason"]
    assert store.replica_failures("sup-fail")[replica.name]["reason"] == failed["reason"]

    # `endpoints show` names the reason; the gateway's routes leave the failed replica out.
    from flows.cli import main

    os.environ["COLUMNS"] = "200"
    assert main(["endpoints", "show", "sup-fail", "--all"]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "RuntimeError: engine core died" in out, out
    assert store.load_routes()[1]["sup-fail"].replicas == ()


# ------------------------------------------------------------------------------------------------ real vLLM


class Load:
    """One client thread calling the gateway back to back; every outcome is kept with its time."""

    def __init__(self, client: openai.OpenAI, model: str):
        self.client, self.model = client, model
        self.ok_at: list[float] = []  # when an answer arrived
        self.sent_at: list[float] = []  # when that answered request was sent, same order
        self.errors: list[tuple[float, int | None, str | None]] = []  # (time, status, retry-after)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            sent = time.monotonic()
            try:
                self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": f"where is my parcel {i} ?"}],
                    max_tokens=4, temperature=0)
                self.sent_at.append(sent)
                self.ok_at.append(time.monotonic())
            except openai.APIStatusError as exc:
                self.errors.append((time.monotonic(), exc.status_code, exc.response.headers.get("retry-after")))
                time.sleep(0.2)  # what a client honouring Retry-After would do, shortened
            except openai.APIError:
                self.errors.append((time.monotonic(), None, None))
                time.sleep(0.2)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_vllm_serves_again_on_its_port_under_load(demo_model_dir: Path, gateway: ThreadedGateway):
    """Costs one vLLM start and one restart (about 2 min on 2 cores); prints the recovery figures."""
    target = LocalTarget()
    replica = target.start(VllmArgs(model=str(demo_model_dir), served_model_name="sup-demo", dtype="float32",
                                    max_model_len=256, enforce_eager=True), name="sup-real-r0")
    try:
        row = register("sup-real", replica)
        client = client_for(gateway, "sup-real")
        with Load(client, "sup-real") as load:
            wait_for(lambda: len(load.ok_at) >= 5, timeout=60, what="answers before the kill")
            child = vllm_child(replica.pid)
            t_kill = time.monotonic()
            child.send_signal(signal.SIGKILL)
            # The request in flight at the kill may still get its answer just after it: recovery is the first
            # answer to a request sent after the kill.
            def after_kill() -> list[float]:
                return [done for sent, done in zip(load.sent_at, load.ok_at, strict=False) if sent > t_kill]
            wait_for(lambda: bool(after_kill()), timeout=400, what="an answer to a request sent after the kill")
            recovered_s = min(after_kill()) - t_kill
            time.sleep(1.0)
        failed = [e for e in load.errors if e[0] > t_kill]
        answered_before = len([t for t in load.ok_at if t < t_kill])
        print(f"\nreplica recovery: kill -9 -> serving through the gateway {recovered_s:.1f}s; "
              f"{len(failed)} requests failed meanwhile (503 with Retry-After, the client waiting 0.2 s between "
              f"tries); {answered_before} answered before, {len(load.ok_at) - answered_before} after")
        # The request in flight at the kill fails mid-request (502); every later one is a 503 with Retry-After.
        refused = [e for e in failed if e[1] == 503]
        assert refused and all(ra and int(ra) >= 1 for _, _, ra in refused), failed[:5]
        assert len(failed) - len(refused) <= 1 and all(e[1] in (502, 503) for e in failed), failed[:5]
        assert not [e for e in load.errors if e[0] < t_kill]
        assert state_of(row.id, "sup-real") == "up" and healthy(replica)
        assert vllm_child(replica.pid).pid != child.pid  # a new vLLM process, same supervisor, same port
        [restart] = audit_after("sup-real", "replica.restart")
        assert restart["exit_code"] == -signal.SIGKILL
        [recovered] = audit_after("sup-real", "replica.recovered")
        assert recovered["down_s"] <= recovered_s + 1
    finally:
        target.stop(replica)
    assert not pid_alive(replica.pid or 0)
