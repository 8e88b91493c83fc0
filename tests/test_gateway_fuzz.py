"""Schemathesis against the gateway's own OpenAPI document (/openapi.json), authenticated, on a real gateway.

The gateway runs under uvicorn with two endpoints whose replicas are OpenAI-compatible doubles: `fuzz` answers
(and refuses malformed bodies with a 400, as vLLM does), `fuzz-broken` answers every request with a 500. The
fuzzer covers the OpenAI routes, /v1/models, the dashboard's pages and its admin API (Prometheus discovery),
with an admin key and a dashboard session. A 5xx counts against the gateway unless it carries
`x-llmhost-upstream-status` (relayed from the replica): the result must be no 5xx of the gateway's own.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from threaded_gateway import ThreadedApp, ThreadedGateway, wait_for

from gateway.proxy import UPSTREAM_STATUS
from tasks import store

TEAM = "fuzz-team"
ENDPOINTS = ("fuzz", "fuzz-broken")
EXAMPLES_PER_OPERATION = 20


def _double(broken: bool) -> Starlette:
    """An OpenAI-compatible replica double: 400 on a body vLLM would refuse; `broken` answers 500 to everything."""

    async def health(request: Request) -> Response:
        return JSONResponse({})

    def answer(kind: str):  # type: ignore[no-untyped-def]
        async def handle(request: Request) -> Response:
            if broken:
                return JSONResponse({"object": "error", "message": "boom", "type": "InternalServerError",
                                     "code": 500}, status_code=500)
            try:
                body = await request.json()
            except ValueError:
                body = None
            need = {"chat": "messages", "completions": "prompt", "embeddings": "input"}[kind]
            if not isinstance(body, dict) or need not in body:
                return JSONResponse({"object": "error", "message": f"{need} is required", "type": "BadRequestError",
                                     "code": 400}, status_code=400)
            usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            if kind == "embeddings":
                return JSONResponse({"object": "list", "model": body.get("model"), "usage": usage,
                                     "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 1.0]}]})
            choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": "billing"},
                                       "finish_reason": "stop"} if kind == "chat"
                                      else {"index": 0, "text": "billing", "finish_reason": "stop"})
            if body.get("stream") is True:
                chunk = {"id": "x", "object": "chunk", "created": int(time.time()), "model": body.get("model"),
                         "choices": [choice]}
                tail = {"id": "x", "object": "chunk", "choices": [], "usage": usage}
                import json

                data = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(tail)}\n\ndata: [DONE]\n\n"
                return Response(data, media_type="text/event-stream")
            return JSONResponse({"id": "x", "object": kind, "created": int(time.time()), "model": body.get("model"),
                                 "usage": usage, "choices": [choice]})

        return handle

    return Starlette(routes=[
        Route("/health", health),
        Route("/v1/chat/completions", answer("chat"), methods=["POST"]),
        Route("/v1/completions", answer("completions"), methods=["POST"]),
        Route("/v1/embeddings", answer("embeddings"), methods=["POST"]),
    ])


@pytest.fixture(scope="module")
def fuzz_gateway() -> Iterator[tuple[ThreadedGateway, str]]:
    """A gateway with the two endpoints live and an admin key granted on both."""
    from gateway.dashboard.auth import set_admin

    mp = pytest.MonkeyPatch()
    mp.setenv("LLMHOST_HEALTH_INTERVAL_S", "0.5")
    doubles = [ThreadedApp(_double(broken=name != "fuzz"), what=f"{name} double") for name in ENDPOINTS]
    try:
        for name, double in zip(ENDPOINTS, doubles, strict=True):
            store.attach_server(name, base_url=f"http://127.0.0.1:{double.port}/v1", served_model="tiny",
                                actor="test")
            store.grant(name, team=TEAM, actor="test")
        key = store.create_key("fuzz-admin", team=TEAM, actor="test").raw
        with ThreadedGateway() as gw:
            set_admin("fuzz-admin", actor="test", engine=gw.gw.engine)
            for name in ENDPOINTS:
                wait_for(lambda n=name: _healthy(gw, n), timeout=15, what=f"{name} healthy")
            yield gw, key
    finally:
        for d in doubles:
            d.close()
        mp.undo()


def _healthy(gw: ThreadedGateway, name: str) -> bool:
    route = gw.gw.routes.get(name)
    return bool(route and route.replicas and gw.gw.pool.status.get(route.replicas[0].id)
                and gw.gw.pool.status[route.replicas[0].id].healthy)


def test_relayed_upstream_5xx_is_labelled_and_the_gateways_own_is_not(fuzz_gateway):
    gw, key = fuzz_gateway
    auth = {"authorization": f"Bearer {key}"}
    msg = [{"role": "user", "content": "hi"}]
    broken = httpx.post(f"{gw.url}/v1/chat/completions", headers=auth, json={"model": "fuzz-broken", "messages": msg})
    assert broken.status_code == 500 and broken.headers[UPSTREAM_STATUS] == "500", broken.text
    ok = httpx.post(f"{gw.url}/v1/chat/completions", headers=auth, json={"model": "fuzz", "messages": msg})
    assert ok.status_code == 200 and UPSTREAM_STATUS not in ok.headers
    bad = httpx.post(f"{gw.url}/v1/chat/completions", headers=auth, json={"model": "fuzz"})
    assert bad.status_code == 400 and bad.headers[UPSTREAM_STATUS] == "400", bad.text
    # What schemathesis does not send: bodies that are not JSON objects, or whose `model` is not a string.
    for body in (b"{not json", b"[]", b'"x"', b'{"model": 3}', b'{"model": null}', b"\xff\xfe", b""):
        own = httpx.post(f"{gw.url}/v1/chat/completions", headers=auth, content=body)
        assert own.status_code == 400 and UPSTREAM_STATUS not in own.headers, (body, own.status_code, own.text)


def test_schemathesis_finds_no_5xx_of_the_gateways_own(fuzz_gateway, record_property):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    gw, key = fuzz_gateway
    doc = httpx.get(f"{gw.url}/openapi.json").json()
    # The OpenAI routes' `model` is any string in the document; the fuzzer draws it from the live endpoints (and
    # an adapter of one, and a name that is none) so that its bodies reach the replicas, not only the 404.
    names = [*ENDPOINTS, "fuzz:no-adapter", "no-such-endpoint"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        schema["properties"]["model"] = {"type": "string", "enum": names}
    for page in ("overview", "calling", "usage", "health"):
        doc["paths"][f"/ui/endpoints/{{name}}/{page}"]["get"]["parameters"][0]["schema"] = {
            "type": "string", "enum": [*ENDPOINTS, "no-such-endpoint"]}
    login = httpx.post(f"{gw.url}/ui/login", data={"api_key": key, "next": "/ui"}, follow_redirects=False)
    assert login.status_code == 303, login.text
    cookie = login.cookies["llmhost_ui"]

    statuses: Counter[int] = Counter()
    own_5xx: list[str] = []
    relayed_5xx = 0
    t0 = time.monotonic()
    api = schemathesis.openapi.from_dict(doc)
    import requests

    with requests.Session() as session:
        for result in api.get_all_operations():
            op = result.ok()

            # Valid bodies and, where the document constrains anything, bodies that break it (wrong types, missing
            # fields): the gateway passes bodies through, so both must end in a 2xx/4xx, never a 5xx of its own.
            strategy = op.as_strategy()
            with contextlib.suppress(Exception):  # an operation with nothing to break has no negative cases
                strategy = strategy | op.as_strategy(GenerationMode.NEGATIVE)

            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def check(case: Any) -> None:
                nonlocal relayed_5xx
                resp = case.call(base_url=gw.url, session=session, headers={"authorization": f"Bearer {key}"},
                                 cookies={"llmhost_ui": cookie}, allow_redirects=False, timeout=30)
                statuses[resp.status_code] += 1
                if resp.status_code >= 500:
                    if UPSTREAM_STATUS in resp.headers:
                        relayed_5xx += 1
                    else:
                        own_5xx.append(f"{case.method} {case.formatted_path} {case.body!r:.200} -> "
                                       f"{resp.status_code}: {resp.text[:300]}")

            check()
    cases = sum(statuses.values())
    line = (f"schemathesis: {cases} cases over {len(doc['paths'])} paths in {time.monotonic() - t0:.1f}s; "
            f"statuses {dict(sorted(statuses.items()))}; gateway 5xx {len(own_5xx)}; relayed upstream 5xx "
            f"{relayed_5xx}")
    print(line)
    record_property("schemathesis", line)
    assert not own_5xx, own_5xx[:5]
    assert cases >= 100 and relayed_5xx > 0 and statuses[200] > 0, line
