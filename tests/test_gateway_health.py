"""The gateway's health verdicts: a replica that is slow on /health keeps serving; one that is gone gets a 503.

A busy CPU vLLM can take longer than the probe timeout to answer /health while it still answers requests (the
CI failure this covers: a 503 "no healthy replica" in the middle of a background merge that saturated both
cores). The replica here is a small OpenAI-compatible double whose /health can be made slow, attached as an
endpoint; the real gateway runs under uvicorn and is called through the openai SDK.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from threaded_gateway import ThreadedApp, ThreadedGateway, wait_for

from gateway.routing import ReplicaStatus
from tasks import store

MSG = [{"role": "user", "content": "where is my parcel ?"}]
TEAM = "health-team"


class SlowHealthReplica:
    """Answers chat at once; /health sleeps `health_delay_s` (0: at once)."""

    def __init__(self) -> None:

        self.health_delay_s = 0.0
        self.health_calls = 0

        async def health(request: Request) -> Response:
            self.health_calls += 1
            await asyncio.sleep(self.health_delay_s)
            return JSONResponse({})

        async def chat(request: Request) -> Response:
            body = await request.json()
            return JSONResponse({
                "id": "chatcmpl-h", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "shipping"},
                             "finish_reason": "stop"}]})

        app = Starlette(routes=[Route("/health", health), Route("/v1/chat/completions", chat, methods=["POST"])])
        self._served = ThreadedApp(app, what="replica double")
        self.base_url = f"http://127.0.0.1:{self._served.port}/v1"

    def close(self) -> None:
        self._served.close()


@pytest.fixture
def fast_probes(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedGateway]:
    """A gateway probing every 0.2 s with a 0.5 s /health timeout (the defaults are 5 s and 5 s)."""
    monkeypatch.setenv("LLMHOST_HEALTH_INTERVAL_S", "0.2")
    monkeypatch.setenv("LLMHOST_CONNECT_TIMEOUT_S", "0.5")
    with ThreadedGateway() as gw:
        yield gw


def _replica(gw: ThreadedGateway, name: str) -> ReplicaStatus:
    """The gateway's in-memory view of the endpoint's only replica."""
    route = gw.gw.routes.get(name)
    if route is None or not route.replicas:
        return ReplicaStatus()
    return gw.gw.pool.status.get(route.replicas[0].id) or ReplicaStatus()


def _status(gw: ThreadedGateway, name: str) -> bool | None:
    return _replica(gw, name).healthy


def test_a_replica_slow_on_health_keeps_serving_and_a_gone_one_answers_503(fast_probes: ThreadedGateway):
    gw = fast_probes
    replica = SlowHealthReplica()
    try:
        store.attach_server("slow-health", base_url=replica.base_url, served_model="demo", actor="test")
        store.grant("slow-health", team=TEAM, actor="test")
        client = gw.client(store.create_key("health-user", team=TEAM, actor="test").raw)
        ask = lambda: client.chat.completions.create(model="slow-health", messages=MSG, max_tokens=4)  # noqa: E731
        assert ask().choices[0].message.content == "shipping"
        wait_for(lambda: _status(gw, "slow-health") is True, timeout=10, what="the first probe")

        # /health now takes 1.5 s against a 0.5 s probe timeout: two timeouts in a row are not a verdict.
        replica.health_delay_s = 1.5
        wait_for(lambda: _replica(gw, "slow-health").slow_probes >= 1, timeout=10, what="a slow probe")
        assert _status(gw, "slow-health") is True
        assert ask().choices[0].message.content == "shipping"

        # The third timeout in a row marks it down (LLMHOST_HEALTH_SLOW_PROBES=3); requests still reach it,
        # because it is the only replica left and it accepts connections.
        wait_for(lambda: _status(gw, "slow-health") is False, timeout=15, what="the down verdict")
        for _ in range(5):
            assert ask().choices[0].message.content == "shipping"

        # Once /health is quick again, the replica is up again.
        replica.health_delay_s = 0.0
        wait_for(lambda: _status(gw, "slow-health") is True, timeout=15, what="the up verdict")
    finally:
        replica.close()

    # Gone for real: the connection is refused, so the answer is the 503 with Retry-After and the last error.
    with pytest.raises(openai.InternalServerError) as e503:
        ask()
    assert e503.value.status_code == 503
    assert int(e503.value.response.headers["retry-after"]) >= 1
    assert "no healthy replica" in e503.value.message and "last error: ConnectFailed" in e503.value.message
    wait_for(lambda: _status(gw, "slow-health") is False, timeout=10, what="the probe's down verdict")
