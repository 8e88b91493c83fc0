"""The local target against a real vLLM process of the demo model."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from tasks.core.errors import ReplicaStartError
from tasks.core.procs import free_port
from tasks.core.settings import get_settings
from tasks.serving import local
from tasks.serving.base import VllmArgs
from tasks.serving.local import LocalTarget, error_summary, parse_startup_log

pytestmark = pytest.mark.slow


def test_chat_completion_reports_usage(openai_client):
    resp = openai_client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello , i need help with my invoice ."}],
        max_tokens=24, temperature=0)
    assert resp.choices[0].message.content.strip()
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0


def test_streamed_chat_completion_ends_with_finish_reason(openai_client):
    stream = openai_client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "who can i talk to about a parcel ?"}],
        max_tokens=24, temperature=0, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces).strip()
    assert finish in {"stop", "length"}


def test_replica_reports_kv_cache_from_vllm_log(vllm_server):
    assert vllm_server.state == "up"
    assert vllm_server.kv_cache_tokens and vllm_server.kv_cache_tokens > 0
    assert vllm_server.max_concurrency and vllm_server.max_concurrency > 0
    assert LocalTarget().status(vllm_server) == "up"


def test_bad_start_raises_typed_error_with_vllm_message(demo_model_dir):
    target = LocalTarget()
    args = VllmArgs(model=str(demo_model_dir), served_model_name="too-long", dtype="float32",
                    max_model_len=1_000_000, enforce_eager=True)
    with pytest.raises(ReplicaStartError) as info:
        target.start(args, name="bad-start")
    err = info.value
    assert "max_model_len" in str(err) or "max_model_len" in err.log_tail
    assert "1000000" in err.log_tail
    assert err.log_path and os.path.exists(err.log_path)


def test_stop_leaves_no_process_behind(demo_model_dir):
    target = LocalTarget()
    replica = target.start(
        VllmArgs(model=str(demo_model_dir), served_model_name="short-lived", dtype="float32",
                 max_model_len=256, enforce_eager=True), name="stop-check")
    parent = psutil.Process(replica.pid)
    family = [parent, *parent.children(recursive=True)]
    assert len(family) >= 1
    target.stop(replica)
    time.sleep(0.5)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    with pytest.raises(ProcessLookupError):
        os.killpg(replica.pid, 0)
    assert target.status(replica) == "stopped"


class _Anything(BaseHTTPRequestHandler):
    """Another process's server: 200 to every GET, /health included."""

    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def other_server() -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Anything)
    _Anything.hits = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_a_port_taken_before_vllm_binds_it_is_not_taken_for_the_replica(demo_model_dir, other_server, monkeypatch):
    """A free port is drawn seconds before vLLM binds it, so another process can take it meanwhile. Its /health
    answer is not the replica's: the start waits for vLLM's own socket, and draws another port when vLLM fails
    to bind. Here the first drawn port is the other server's, and the second try runs into vLLM's own refusal of
    the arguments (a quick end, not a full start), which shows it got past the port."""
    taken = other_server.server_address[1]
    drawn = iter([taken])
    monkeypatch.setattr(local, "free_port", lambda host: next(drawn, None) or free_port(host))
    args = VllmArgs(model=str(demo_model_dir), served_model_name="port-race", dtype="float32",
                    max_model_len=1_000_000, enforce_eager=True)
    with pytest.raises(ReplicaStartError) as info:
        LocalTarget().start(args, name="port-race")
    assert "1000000" in info.value.log_tail and f"-{taken}-" not in str(info.value.log_path)
    first = [p for p in get_settings().runs_dir.glob(f"port-race-{taken}-*.log")]
    assert len(first) == 1 and "Address already in use" in first[0].read_text(errors="replace")
    assert "/health" in _Anything.hits  # it answered 200 while vLLM was still importing, and was not believed
    # A port the caller chose is not drawn again: the one-line error says why vLLM ended.
    _Anything.hits.clear()
    with pytest.raises(ReplicaStartError, match="Address already in use"):
        LocalTarget().start(args.model_copy(update={"max_model_len": 256}), name="port-given", port=taken)
    assert "/health" in _Anything.hits


def test_parse_startup_log_reads_cpu_and_gpu_lines():
    text = ("INFO [kv_cache_utils.py] CPU KV cache size: 1,048,576 tokens\n"
            "INFO Maximum concurrency for 1,024 tokens per request: 1024.00x\n")
    assert parse_startup_log(text) == {"kv_cache_tokens": 1048576, "max_concurrency": 1024.0}
    assert parse_startup_log("GPU KV cache size: 12 tokens")["kv_cache_tokens"] == 12


def test_error_summary_prefers_the_exception_line():
    tail = "INFO starting\nTraceback (most recent call last):\n  File x\nValueError: KV cache is too big\nINFO bye"
    assert error_summary(tail) == "ValueError: KV cache is too big"


def test_error_summary_keeps_the_reason_of_a_pydantic_validation_error():
    """vLLM's configs are pydantic: the error line only says 'validation error for ModelConfig', the reason
    is on the indented line below it (as vLLM 0.32 logs it for a --max-model-len past the model's positions)."""
    tail = (
        "INFO 12-02 10:20:01 [utils.py:253] non-default args: {'max_model_len': 999999}\n"
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
        "  Value error, User-specified max_model_len (999999) is greater than the derived max_model_len "
        "(max_position_embeddings=1024.0 or model_max_length=None in model's config.json). "
        "[type=value_error, input_value=ArgsKwargs((), {}), input_type=ArgsKwargs]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n"
    )
    assert error_summary(tail) == (
        "ValidationError: 1 validation error for ModelConfig: Value error, User-specified max_model_len (999999) "
        "is greater than the derived max_model_len (max_position_embeddings=1024.0 or model_max_length=None in "
        "model's config.json)."
    )
