"""The real gateway (uvicorn in a thread) before the real vLLM fixture, called with the openai SDK."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from testing_utils import files_holding
from threaded_gateway import ThreadedApp, ThreadedGateway, wait_for

from tasks import store
from tasks.serving.local import free_port
from tasks.store import audit

pytestmark = pytest.mark.slow

LOGGERS = ("llmhost", "gateway", "tasks", "uvicorn", "uvicorn.error", "httpx", "httpcore",
           "sqlalchemy.engine")
RAW_KEYS: list[str] = []  # every raw key this module creates, for the grep at the end
MSG = [{"role": "user", "content": "hi , where is my parcel ?"}]


def new_key(user: str, team: str | None = None) -> str:
    raw = store.create_key(user, team=team, actor="test").raw
    RAW_KEYS.append(raw)
    return raw


def metric(gw: ThreadedGateway, name: str, **labels: str) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Everything the gateway, store and HTTP stack log in this module, at DEBUG, for the raw-key grep."""
    path = tmp_path_factory.mktemp("gwlogs") / "gateway.log"
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    old = {}
    for name in LOGGERS:
        lg = logging.getLogger(name)
        old[name] = lg.level
        lg.setLevel(logging.DEBUG if name != "sqlalchemy.engine" else logging.INFO)
        lg.addHandler(handler)
    yield path
    for name in LOGGERS:
        lg = logging.getLogger(name)
        lg.removeHandler(handler)
        lg.setLevel(old[name])
    handler.close()


@pytest.fixture(scope="module")
def endpoint(vllm_server) -> str:
    """`gw-demo`: the vLLM fixture attached as one replica, open to team `gw-ml`."""
    store.attach_server("gw-demo", base_url=vllm_server.base_url, served_model="demo",
                        adapters={"same": "demo"}, owner="gw-owner", actor="test")
    store.grant("gw-demo", team="gw-ml", actor="test")
    return "gw-demo"


@pytest.fixture(scope="module")
def gateway(log_file: Path, endpoint: str) -> Iterator[ThreadedGateway]:
    with ThreadedGateway(flush_interval_s=0.1, access_log=True) as gw:
        yield gw


@pytest.fixture(scope="module")
def alice(gateway: ThreadedGateway) -> str:
    return new_key("gw-alice", team="gw-ml")


def test_chat_completion_and_streaming_pass_through(gateway: ThreadedGateway, alice: str, endpoint: str):
    client = gateway.client(alice)
    assert [m.id for m in client.models.list()] == ["gw-demo", "gw-demo:same"]

    chat = client.chat.completions.create(model=endpoint, messages=MSG, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0

    comp = client.completions.create(model=endpoint, prompt="the billing team handles", max_tokens=8)
    assert comp.choices[0].text and comp.usage.completion_tokens > 0

    # The gateway adds include_usage for metering; a client that did not ask must not see the extra chunk.
    chunks = list(client.chat.completions.create(model=endpoint, messages=MSG, max_tokens=8, stream=True))
    assert len(chunks) >= 2
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks)

    asked = list(client.chat.completions.create(model=endpoint, messages=MSG, max_tokens=8, stream=True,
                                                stream_options={"include_usage": True}))
    assert asked[-1].usage is not None and asked[-1].usage.completion_tokens > 0 and asked[-1].choices == []

    streamed = list(client.completions.create(model=endpoint, prompt="hello", max_tokens=8, stream=True))
    assert streamed and all(c.usage is None for c in streamed)

    # endpoint:adapter is rewritten to the adapter's served name
    via_adapter = client.chat.completions.create(model=f"{endpoint}:same", messages=MSG, max_tokens=4)
    assert via_adapter.choices[0].message.content is not None


def _held_sse_replica(release: threading.Event, closed: threading.Event | None = None) -> tuple[socket.socket, int]:
    """A replica that sends one SSE event, then holds the rest until `release` is set.

    With `closed`, it instead holds until the gateway drops the connection (how an abort reaches vLLM) and sets it.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    def event(obj: dict) -> bytes:
        return chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            head = conn.recv(65536)
            if head.startswith(b"GET /health"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                conn.close()
                continue
            delta = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "held",
                     "choices": [{"index": 0, "delta": {"content": "first"}, "finish_reason": None}]}
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                         b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n" + event(delta))
            if closed is not None:
                conn.settimeout(30)
                with contextlib.suppress(OSError):
                    while conn.recv(1024):
                        pass
                    closed.set()
                conn.close()
                continue
            release.wait(30)
            last = {**delta, "choices": [{"index": 0, "delta": {"content": " last"}, "finish_reason": "stop"}]}
            usage = {**delta, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                       "total_tokens": 5}}
            conn.sendall(event(last) + event(usage) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return sock, sock.getsockname()[1]


def test_streaming_is_not_buffered(gateway: ThreadedGateway, alice: str):
    """The client gets the first event while the replica still holds back the rest of the stream."""
    release = threading.Event()
    sock, port = _held_sse_replica(release)
    try:
        store.attach_server("gw-held", base_url=f"http://127.0.0.1:{port}/v1", served_model="held", actor="test")
        store.grant("gw-held", team="gw-ml", actor="test")
        stream = gateway.client(alice).chat.completions.create(model="gw-held", messages=MSG, stream=True)
        first = next(iter(stream))
        assert first.choices[0].delta.content == "first" and not release.is_set()
        release.set()
        rest = list(stream)
        assert [c.choices[0].delta.content for c in rest] == [" last"]  # usage chunk stripped
    finally:
        release.set()
        sock.close()


def test_client_leaving_mid_stream_is_a_499_and_aborts_the_upstream(gateway: ThreadedGateway, alice: str):
    """Deterministic: the replica holds the stream open, so the client surely leaves before it ends."""
    closed = threading.Event()
    sock, port = _held_sse_replica(threading.Event(), closed=closed)
    prefix = store.split_key(alice)[0]
    try:
        store.attach_server("gw-abort", base_url=f"http://127.0.0.1:{port}/v1", served_model="held", actor="test")
        store.grant("gw-abort", team="gw-ml", actor="test")
        body = {"model": "gw-abort", "messages": MSG, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                          headers={"authorization": f"Bearer {alice}"}, timeout=60) as resp:
            first = next(line for line in resp.iter_lines() if line.startswith("data:"))
            assert '"first"' in first  # then leave; closing the response drops the connection
        assert closed.wait(20), "the gateway kept the upstream stream open after the client left"
        (row,) = wait_for(lambda: store.list_usage(key_prefix=prefix, endpoint="gw-abort"), what="usage row")
        assert row.status_code == 499 and row.stream and row.ttft_ms is not None
        wait_for(lambda: all(st.outstanding == 0 for st in gateway.gw.pool.status.values()), what="release")
    finally:
        sock.close()


def test_client_leaving_a_vllm_stream_frees_the_replica(gateway: ThreadedGateway, endpoint: str):
    """Against the real server. The demo model makes ~1 token/ms, so a loaded machine may relay the whole
    stream (through [DONE]) before it sees the hang-up; then the row is a complete 200, otherwise a 499."""
    raw = new_key("gw-hal", team="gw-ml")
    prefix = store.split_key(raw)[0]
    body = {"model": endpoint, "messages": MSG, "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {raw}"}, timeout=60) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 5:
                break  # leave after a few events; closing the response drops the connection
    (row,) = wait_for(lambda: store.list_usage(key_prefix=prefix), what="usage row")
    assert row.stream and row.ttft_ms is not None
    if row.status_code == 200:
        assert row.completion_tokens == 900
    else:
        assert row.status_code == 499
    wait_for(lambda: all(st.outstanding == 0 for st in gateway.gw.pool.status.values()), what="release")
    after = gateway.client(raw).chat.completions.create(model=endpoint, messages=MSG, max_tokens=4)
    assert after.choices[0].message.content is not None


def test_usage_is_metered_for_streamed_and_plain_requests(gateway: ThreadedGateway, endpoint: str):
    raw = new_key("gw-bob", team="gw-ml")
    prefix = store.split_key(raw)[0]
    client = gateway.client(raw)
    plain = client.chat.completions.create(model=endpoint, messages=MSG, max_tokens=6)
    list(client.chat.completions.create(model=endpoint, messages=MSG, max_tokens=6, stream=True))

    rows = wait_for(lambda: (r := store.list_usage(key_prefix=prefix)) and len(r) >= 2 and r, what="usage")
    by_stream = {r.stream: r for r in rows}
    assert set(by_stream) == {False, True}
    for r in rows:
        assert (r.user, r.team, r.endpoint, r.status_code) == ("gw-bob", "gw-ml", endpoint, 200)
        assert r.prompt_tokens and r.prompt_tokens > 0 and r.completion_tokens and r.completion_tokens > 0
        assert r.revision_id is not None and r.replica_id is not None and r.latency_ms > 0
    assert by_stream[False].prompt_tokens == plain.usage.prompt_tokens
    assert by_stream[False].completion_tokens == plain.usage.completion_tokens
    assert by_stream[True].ttft_ms is not None and 0 < by_stream[True].ttft_ms <= by_stream[True].latency_ms


def test_errors_are_openai_shaped_and_say_what_to_do(gateway: ThreadedGateway, alice: str, endpoint: str,
                                                       vllm_server):
    # 401: no key, and a wrong one
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": endpoint, "messages": MSG})
    assert resp.status_code == 401 and "keys create" in resp.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError) as e401:
        gateway.client("llmh-0123abcd-" + "x" * 43).chat.completions.create(model=endpoint, messages=MSG)
    assert e401.value.status_code == 401

    # 403: a valid key whose user and team have no grant
    outsider = new_key("gw-mallory", team="gw-other")
    with pytest.raises(openai.PermissionDeniedError) as e403:
        gateway.client(outsider).chat.completions.create(model=endpoint, messages=MSG, max_tokens=4)
    assert "access grant gw-demo" in e403.value.message
    assert gateway.client(outsider).models.list().data == []

    # 404: unknown endpoint, unknown adapter
    with pytest.raises(openai.NotFoundError) as e404:
        gateway.client(alice).chat.completions.create(model="gw-nope", messages=MSG, max_tokens=4)
    assert "/v1/models" in e404.value.message
    with pytest.raises(openai.NotFoundError):
        gateway.client(alice).chat.completions.create(model=f"{endpoint}:nope", messages=MSG, max_tokens=4)

    # 503 + Retry-After: the only replica is down (a port nothing listens on)
    closed = f"http://127.0.0.1:{free_port()}/v1"
    store.attach_server("gw-down", base_url=closed, served_model="demo", actor="test")
    store.grant("gw-down", team="gw-ml", actor="test")
    with pytest.raises(openai.InternalServerError) as e503:
        gateway.client(alice).chat.completions.create(model="gw-down", messages=MSG, max_tokens=4)
    assert e503.value.status_code == 503
    assert int(e503.value.response.headers["retry-after"]) >= 1
    assert "no healthy replica" in e503.value.message

    # Upstream 4xx pass through unchanged: vLLM's own context-length error
    long_msg = [{"role": "user", "content": "where is my parcel ? " * 400}]
    direct = httpx.post(f"{vllm_server.base_url}/chat/completions",
                        json={"model": "demo", "messages": long_msg, "max_tokens": 4})
    via = httpx.post(f"{gateway.url}/v1/chat/completions", headers={"authorization": f"Bearer {alice}"},
                     json={"model": endpoint, "messages": long_msg, "max_tokens": 4})
    assert direct.status_code == via.status_code == 400
    assert via.json()["error"]["message"] == direct.json()["error"]["message"]
    assert "maximum context length" in via.json()["error"]["message"]


def test_replica_failing_mid_request_is_a_502(gateway: ThreadedGateway, alice: str):
    """A 'replica' that accepts the request and then drops the connection."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    port = sock.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            head = conn.recv(65536)
            if head.startswith(b"GET /health"):  # healthy to the probe; drops every real request
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        store.attach_server("gw-flaky", base_url=f"http://127.0.0.1:{port}/v1", served_model="demo",
                            actor="test")
        store.grant("gw-flaky", team="gw-ml", actor="test")
        resp = httpx.post(f"{gateway.url}/v1/chat/completions", headers={"authorization": f"Bearer {alice}"},
                          json={"model": "gw-flaky", "messages": MSG, "max_tokens": 4}, timeout=30)
        assert resp.status_code == 502
        err = resp.json()["error"]
        assert err["code"] == "replica_failed" and "gw-flaky" in err["message"]
    finally:
        sock.close()


def test_revoked_key_and_grant_stop_working_immediately(gateway: ThreadedGateway, endpoint: str):
    from flows.cli import main

    raw = new_key("gw-carol", team="gw-ml")
    client = gateway.client(raw)
    # Twice: the second answer comes from the gateway's key cache, which the revocation must not outlive.
    for _ in range(2):
        assert client.chat.completions.create(model=endpoint, messages=MSG, max_tokens=2).choices
    assert main(["keys", "revoke", store.split_key(raw)[0]]) == 0
    with pytest.raises(openai.AuthenticationError) as exc:
        client.chat.completions.create(model=endpoint, messages=MSG, max_tokens=2)
    assert "revoked" in exc.value.message

    raw2 = new_key("gw-dave")
    store.grant(endpoint, user="gw-dave", actor="test")
    client2 = gateway.client(raw2)
    assert client2.chat.completions.create(model=endpoint, messages=MSG, max_tokens=2).choices
    store.revoke_grant(endpoint, user="gw-dave", actor="test")
    with pytest.raises(openai.PermissionDeniedError):
        client2.chat.completions.create(model=endpoint, messages=MSG, max_tokens=2)


def test_two_replicas_share_load(gateway: ThreadedGateway, vllm_server):
    """The same vLLM server attached twice (127.0.0.1 and localhost) is two replicas of one revision."""
    store.attach_server("gw-pair", base_url=vllm_server.base_url, served_model="demo", actor="test")
    _, rep2 = store.attach_server("gw-pair", base_url=f"http://localhost:{vllm_server.port}/v1",
                                  served_model="demo", actor="test")
    replicas = store.list_replicas("gw-pair")
    assert len(replicas) == 2 and rep2.id in {r.id for r in replicas}
    raw = new_key("gw-erin", team="gw-ml")
    store.grant("gw-pair", user="gw-erin", actor="test")
    prefix = store.split_key(raw)[0]
    client = gateway.client(raw)
    for _ in range(10):
        client.chat.completions.create(model="gw-pair", messages=MSG, max_tokens=2)
    rows = wait_for(lambda: (r := store.list_usage(key_prefix=prefix)) and len(r) >= 10 and r, what="usage")
    per_replica = {r.id: sum(1 for u in rows if u.replica_id == r.id) for r in replicas}
    assert sum(per_replica.values()) == 10
    assert all(n >= 3 for n in per_replica.values()), per_replica


def test_metrics_count_what_was_sent(gateway: ThreadedGateway, alice: str, endpoint: str):
    ok = {"endpoint": endpoint, "status": "200"}
    before = {
        "ok": metric(gateway, "llmhost_gateway_requests_total", **ok),
        "lat": metric(gateway, "llmhost_gateway_request_latency_seconds_count", **ok),
        "completion": metric(gateway, "llmhost_gateway_completion_tokens_total", endpoint=endpoint),
        "err404": metric(gateway, "llmhost_gateway_errors_total", status="404"),
    }
    client = gateway.client(alice)
    completion_tokens = 0
    for i in range(3):
        r = client.chat.completions.create(model=endpoint, messages=MSG, max_tokens=3 + i)
        completion_tokens += r.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gw-missing", messages=MSG)
    assert metric(gateway, "llmhost_gateway_requests_total", **ok) - before["ok"] == 3
    assert metric(gateway, "llmhost_gateway_request_latency_seconds_count", **ok) - before["lat"] == 3
    assert (metric(gateway, "llmhost_gateway_completion_tokens_total", endpoint=endpoint)
            - before["completion"]) == completion_tokens
    assert metric(gateway, "llmhost_gateway_errors_total", status="404") - before["err404"] == 1
    assert metric(gateway, "llmhost_gateway_replica_up", endpoint=endpoint) == 1


def test_new_user_flow_with_the_cli(gateway: ThreadedGateway, endpoint: str, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch):
    """keys create -> access grant -> call with the SDK (streaming too) -> `llmhost usage` shows it."""
    from flows.cli import main

    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal, so rich does not fold table cells

    assert main(["keys", "create", "--user", "gw-frank", "--expires", "30d"]) == 0
    raw = capsys.readouterr().out.strip().splitlines()[-1]
    RAW_KEYS.append(raw)
    assert main(["access", "grant", endpoint, "--user", "gw-frank"]) == 0
    client = gateway.client(raw)
    client.chat.completions.create(model=endpoint, messages=MSG, max_tokens=4)
    list(client.chat.completions.create(model=endpoint, messages=MSG, max_tokens=4, stream=True))
    prefix = store.split_key(raw)[0]
    wait_for(lambda: len(store.list_usage(key_prefix=prefix)) >= 2, what="usage rows")
    capsys.readouterr()
    assert main(["usage", "--endpoint", endpoint, "--since", "1h"]) == 0
    out = capsys.readouterr().out
    assert "gw-frank" in out and prefix in out
    assert main(["audit", "log", "--endpoint", endpoint]) == 0
    assert "access.grant" in capsys.readouterr().out


def test_pending_usage_is_flushed_on_shutdown(endpoint: str, log_file: Path):
    raw = new_key("gw-gina", team="gw-ml")
    prefix = store.split_key(raw)[0]
    with ThreadedGateway(flush_interval_s=3600, access_log=True) as gw:
        gw.client(raw).chat.completions.create(model=endpoint, messages=MSG, max_tokens=2)
        assert store.list_usage(key_prefix=prefix) == []  # still pending in memory
    assert len(store.list_usage(key_prefix=prefix)) == 1


def test_audit_chain_verifies_after_all_of_the_above():
    result = audit.verify()
    assert result.ok, result.summary()
    assert result.entries >= 10


def test_raw_keys_never_reach_the_store_logs_or_audit(gateway: ThreadedGateway, log_file: Path):
    from tasks.core.settings import get_settings

    assert len(RAW_KEYS) >= 8
    db = Path(get_settings().home_abs) / "llmhost.db"
    db_files = list(db.parent.glob("llmhost.db*"))
    assert db in db_files
    secrets = {f"raw key {i}'s secret": raw.split("-", 2)[2].encode() for i, raw in enumerate(RAW_KEYS)}
    assert files_holding(db_files, secrets) == []
    logs = log_file.read_bytes()
    assert b"POST /v1/chat/completions" in logs or b"/v1/chat/completions" in logs  # the log did capture
    audit_text = "\n".join(f"{e.actor} {e.subject} {e.before} {e.after} {e.links}" for e in audit.entries())
    for raw in RAW_KEYS:
        secret = raw.split("-", 2)[2]
        assert secret.encode() not in logs, "raw key secret found in the logs"
        assert secret not in audit_text
        assert store.split_key(raw)[0] in audit_text  # the public prefix is there, so the search was real


def test_a_gateway_that_owns_its_process_freezes_what_startup_made_and_one_in_a_shared_process_does_not() -> None:
    """`llmhost gateway` moves its startup objects out of the collector's sight (gc.freeze); the tests' gateways,
    many in one process, leave the collector alone."""
    from gateway.app import create_app

    gc.unfreeze()
    shared = ThreadedApp(create_app(), what="gateway")
    try:
        assert httpx.get(f"http://127.0.0.1:{shared.port}/health").status_code == 200
        assert gc.get_freeze_count() == 0
    finally:
        shared.close()
    owner = ThreadedApp(create_app(freeze_gc=True), what="gateway")
    try:
        assert httpx.get(f"http://127.0.0.1:{owner.port}/health").status_code == 200
        assert gc.get_freeze_count() > 10_000  # the modules, the app and its caches
    finally:
        owner.close()
        gc.unfreeze()
