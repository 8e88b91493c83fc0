"""External endpoints: one llmhost key and one base URL for a self-hosted and a hosted (frontier) model.

The real gateway runs in a thread and is called with the openai SDK. The hosted API is a local double (below),
and the self-hosted side is a second double attached as an OpenAI-compatible server, so no vLLM starts here.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from fastapi import FastAPI, Request  # at module level: the route annotations are resolved from here
from fastapi.responses import JSONResponse, StreamingResponse
from testing_utils import files_holding
from threaded_gateway import ThreadedGateway, wait_for

from tasks import store
from tasks.core.errors import ConfigError
from tasks.deploy import EndpointSpec, deploy
from tasks.serving.local import free_port

PROVIDER_KEY = "sk-provider-" + os.urandom(12).hex()  # what the scan at the end looks for
KEY_ENV = "LLMHOST_TEST_PROVIDER_KEY"
SELF, EXT, REASONER, DOWN = "ext-self", "ext-mini", "ext-reasoner", "ext-down"
MSG = [{"role": "user", "content": "hi , where is my parcel ?"}]


@dataclass
class ApiDouble:
    """Stands in for a hosted OpenAI-compatible API, which cannot be reached from here (and for an attached server).

    tests/frontier_double.py answers every request as a stream; the SDK's plain calls need a JSON body, so this
    double answers both, from OpenAI's documented shapes: `usage` with `completion_tokens_details.reasoning_tokens`
    for reasoning models, which refuse `max_tokens` with 400 `unsupported_parameter`; scripted 429s with
    `Retry-After`; 5xx on demand. With `api_key` None it takes no key (an attached vLLM-like server, with /health).
    """

    api_key: str | None
    reasoning_models: tuple[str, ...] = ()
    answer: str = "shipping"
    scripted: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # next answers' status, headers
    seen: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self._app(), host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ApiDouble:
        self.thread.start()
        wait_for(lambda: self.server.started, what="API double start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def _app(self) -> Any:
        app = FastAPI()

        def error(status: int, message: str, type_: str, code: str | None, param: str | None = None,
                  headers: dict[str, str] | None = None) -> JSONResponse:
            return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                                status_code=status, headers=headers)

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            self.seen.append({"body": body, "authorization": request.headers.get("authorization")})
            if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
            if self.scripted:
                status, headers = self.scripted.pop(0)
                if status == 429:
                    return error(429, "Rate limit reached for requests.", "requests", "rate_limit_exceeded",
                                 headers=headers)
                return error(status, "The server had an error while processing your request.", "server_error",
                             None, headers=headers)
            reasoning = body.get("model") in self.reasoning_models
            if reasoning and "max_tokens" in body:
                return error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                             "'max_completion_tokens' instead.", "invalid_request_error", "unsupported_parameter",
                             "max_tokens")
            prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages") or []) // 4
            hidden = 8 if reasoning else 0
            usage = {"prompt_tokens": prompt, "completion_tokens": 1 + hidden, "total_tokens": prompt + 1 + hidden,
                     "completion_tokens_details": {"reasoning_tokens": hidden}}
            base = {"id": "chatcmpl-double", "created": int(time.time()), "model": body.get("model")}
            if not body.get("stream"):
                return {**base, "object": "chat.completion", "usage": usage, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": self.answer},
                     "finish_reason": "stop"}]}

            def chunk(delta: dict[str, Any] | None, finish: str | None = None, use: Any = None) -> str:
                choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
                obj = {**base, "object": "chat.completion.chunk", "choices": choices, "usage": use}
                return f"data: {json.dumps(obj)}\n\n"

            async def gen() -> Any:
                yield chunk({"role": "assistant", "content": ""})
                yield chunk({"content": self.answer})
                yield chunk({}, "stop")
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield chunk(None, use=usage)
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        return app


@pytest.fixture(scope="module")
def provider() -> Iterator[ApiDouble]:
    with ApiDouble(api_key=PROVIDER_KEY, reasoning_models=("double-reasoner",), answer="billing") as d:
        yield d


@pytest.fixture(scope="module")
def self_hosted() -> Iterator[ApiDouble]:
    with ApiDouble(api_key=None, answer="shipping") as d:
        yield d


@pytest.fixture(scope="module")
def world(provider: ApiDouble, self_hosted: ApiDouble, llmhost_home: Path) -> Iterator[dict[str, str]]:
    """Catalog entries pointing at the provider double, its key in the gateway's environment, four endpoints."""
    catalog = llmhost_home / "frontiers.yaml"  # merged over eval_suites/frontiers.yaml
    entry = {"base_url": provider.base_url, "api_key_env": KEY_ENV, "prices_as_of": "2026-12-01",
             "pricing_url": "https://example.invalid/pricing"}
    catalog.write_text(yaml.safe_dump({"frontiers": {
        "double-mini": {**entry, "model": "double-mini", "price_in_per_1m": 0.15, "price_out_per_1m": 0.60},
        "double-reasoner": {**entry, "model": "double-reasoner", "reasoning": True, "price_in_per_1m": 1.0,
                            "price_out_per_1m": 4.0},
    }}))
    os.environ[KEY_ENV] = PROVIDER_KEY
    for name, frontier in ((EXT, "double-mini"), (REASONER, "double-reasoner")):
        res = deploy(EndpointSpec(name=name, target="external", frontier=frontier, owner="ext-owner",
                                  access={"teams": ["ext-team"]}), actor="test")
        assert res.outcome == "live" and not res.replicas, res
        assert KEY_ENV in res.message and PROVIDER_KEY not in res.message
    store.attach_server(SELF, base_url=self_hosted.base_url, served_model="tiny", actor="test")
    store.grant(SELF, team="ext-team", actor="test")
    # A self-hosted endpoint whose only replica is down (nothing listens on its port).
    store.attach_server(DOWN, base_url=f"http://127.0.0.1:{free_port()}/v1", served_model="gone", actor="test")
    store.grant(DOWN, team="ext-team", actor="test")
    keys = {"alice": store.create_key("ext-alice", team="ext-team", actor="test").raw,
            "bob": store.create_key("ext-bob", actor="test").raw}
    yield keys
    os.environ.pop(KEY_ENV, None)
    catalog.unlink()


@pytest.fixture(scope="module")
def gateway(world: dict[str, str]) -> Iterator[ThreadedGateway]:
    with ThreadedGateway(flush_interval_s=0.1) as gw:
        yield gw


def rows_for(endpoint: str, n: int) -> list[store.UsageRecord]:
    return wait_for(lambda: (r := store.list_usage(endpoint=endpoint)) and len(r) >= n and r,
                    what=f"{n} usage rows of {endpoint}")


def test_one_key_one_client_calls_self_hosted_and_external(gateway: ThreadedGateway, world: dict[str, str],
                                                           provider: ApiDouble, self_hosted: ApiDouble) -> None:
    client = gateway.client(world["alice"])
    assert {m.id for m in client.models.list()} >= {SELF, EXT, REASONER}
    mine = client.chat.completions.with_raw_response.create(model=SELF, messages=MSG, max_tokens=4)
    theirs = client.chat.completions.with_raw_response.create(model=EXT, messages=MSG, max_tokens=4)
    assert mine.parse().choices[0].message.content == "shipping"
    assert theirs.parse().choices[0].message.content == "billing"
    assert theirs.headers["x-llmhost-provider"] == "openai" and "x-llmhost-replica" not in theirs.headers
    # The provider got its own key and model name from the gateway; the self-hosted server got no key at all.
    assert provider.seen[-1]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert provider.seen[-1]["body"]["model"] == "double-mini"
    assert self_hosted.seen[-1]["authorization"] is None
    assert PROVIDER_KEY not in theirs.http_response.text and PROVIDER_KEY not in str(theirs.headers)


def test_access_grants_apply_to_both(gateway: ThreadedGateway, world: dict[str, str]) -> None:
    bob = gateway.client(world["bob"])
    assert not {m.id for m in bob.models.list()} & {SELF, EXT}
    for model in (SELF, EXT):
        with pytest.raises(openai.PermissionDeniedError, match="has no access"):
            bob.chat.completions.create(model=model, messages=MSG)
    store.grant(EXT, user="ext-bob", actor="test")
    assert bob.chat.completions.create(model=EXT, messages=MSG).choices[0].message.content == "billing"
    with pytest.raises(openai.PermissionDeniedError):
        bob.chat.completions.create(model=SELF, messages=MSG)
    store.revoke_grant(EXT, user="ext-bob", actor="test")
    with pytest.raises(openai.PermissionDeniedError):
        bob.chat.completions.create(model=EXT, messages=MSG)


def test_usage_rows_carry_provider_tokens_and_cost(gateway: ThreadedGateway, world: dict[str, str]) -> None:
    client = gateway.client(world["alice"])
    done = client.chat.completions.create(model=EXT, messages=MSG)
    client.chat.completions.create(model=SELF, messages=MSG)
    ext = [r for r in rows_for(EXT, 1) if r.user == "ext-alice" and r.status_code == 200][-1]
    assert ext.provider == "openai" and ext.prompt_tokens == done.usage.prompt_tokens
    assert ext.cost_usd == pytest.approx((ext.prompt_tokens * 0.15 + ext.completion_tokens * 0.60) / 1e6)
    own = [r for r in rows_for(SELF, 1) if r.status_code == 200][-1]
    assert own.provider is None and own.cost_usd is None and own.prompt_tokens is not None
    summary = {s.endpoint: s for s in store.summarize_usage() if s.user == "ext-alice"}
    assert summary[EXT].cost_usd > 0 and summary[SELF].cost_usd == 0


def test_streaming_meters_usage_and_reasoning_rules_apply(gateway: ThreadedGateway, world: dict[str, str],
                                                          provider: ApiDouble) -> None:
    client = gateway.client(world["alice"])
    chunks = list(client.chat.completions.create(model=EXT, messages=MSG, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "billing"
    assert not [c for c in chunks if c.usage]  # not asked for: the gateway's own usage chunk is stripped
    assert provider.seen[-1]["body"]["stream_options"] == {"include_usage": True}
    own = list(client.chat.completions.create(model=SELF, messages=MSG, stream=True,
                                              stream_options={"include_usage": True}))
    assert own[-1].usage is not None and "".join(c.choices[0].delta.content or "" for c in own if c.choices) \
        == "shipping"
    # A client's max_tokens to a reasoning model is renamed by the catalog's rules, not refused.
    before = len(store.list_usage(endpoint=REASONER))
    chunks = list(client.chat.completions.create(model=REASONER, messages=MSG, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))
    sent = provider.seen[-1]["body"]
    assert "max_tokens" not in sent and sent["max_completion_tokens"] >= 16
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens_details.reasoning_tokens == 8
    row = rows_for(REASONER, before + 1)[-1]
    assert row.stream and row.reasoning_tokens == 8 and row.completion_tokens == usage.completion_tokens
    assert row.cost_usd == pytest.approx((row.prompt_tokens * 1.0 + row.completion_tokens * 4.0) / 1e6)


def test_provider_errors_say_where_they_came_from(gateway: ThreadedGateway, world: dict[str, str],
                                                  provider: ApiDouble) -> None:
    client = gateway.client(world["alice"])
    provider.scripted += [(429, {"Retry-After": "7"}), (500, {})]
    with pytest.raises(openai.RateLimitError, match="provider") as limited:
        client.chat.completions.create(model=EXT, messages=MSG)
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(openai.InternalServerError, match=r"provider \(openai, model double-mini\)"):
        client.chat.completions.create(model=EXT, messages=MSG, stream=True)


def test_missing_provider_key_is_a_503_naming_the_variable(gateway: ThreadedGateway, world: dict[str, str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(openai.InternalServerError) as missing:
        gateway.client(world["alice"]).chat.completions.create(model=EXT, messages=MSG)
    assert missing.value.status_code == 503
    assert KEY_ENV in missing.value.message and "\n" not in missing.value.message


def metric(gw: ThreadedGateway, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(httpx.get(f"{gw.url}/metrics").text)
               for s in fam.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_fallback_is_off_by_default_and_marked_when_on(gateway: ThreadedGateway, world: dict[str, str]) -> None:
    client = gateway.client(world["alice"])
    with pytest.raises(openai.InternalServerError, match="no healthy replica") as off:
        client.chat.completions.create(model=DOWN, messages=MSG)
    assert off.value.status_code == 503
    with pytest.raises(ConfigError, match="own fallback"):
        store.upsert_endpoint(DOWN, fallback=DOWN, actor="test")
    store.upsert_endpoint(DOWN, fallback=EXT, actor="test")
    try:
        raw = client.chat.completions.with_raw_response.create(model=DOWN, messages=MSG)
        assert raw.headers["x-llmhost-fallback"] == EXT and raw.parse().choices[0].message.content == "billing"
        streamed = list(client.chat.completions.create(model=DOWN, messages=MSG, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "billing"
        rows = [r for r in rows_for(DOWN, 3) if r.fallback]
        assert len(rows) >= 2 and all(r.fallback == EXT and r.cost_usd for r in rows)
        assert {s.endpoint: s for s in store.summarize_usage(endpoint=DOWN)}[DOWN].fallback_requests >= 2
        wait_for(lambda: metric(gateway, "llmhost_gateway_fallback_requests_total", endpoint=DOWN,
                                fallback=EXT) >= 2, what="fallback metric")
    finally:
        store.upsert_endpoint(DOWN, fallback="", actor="test")
    with pytest.raises(openai.InternalServerError, match="no healthy replica"):
        client.chat.completions.create(model=DOWN, messages=MSG)


def test_spec_validation_and_redeploy() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        EndpointSpec(name="x", target="external")
    with pytest.raises(ValueError, match="fallback is for self-hosted"):
        EndpointSpec(name="x", target="external", frontier="gpt-4o-mini", fallback="y")
    with pytest.raises(ValueError, match="target: external"):
        EndpointSpec(name="x", model="models:/m@champion", frontier="gpt-4o-mini")
    spec = EndpointSpec(name="ext-url", target="external", base_url="http://127.0.0.1:9/v1", model="m",
                        api_key_env=KEY_ENV)
    assert deploy(spec, actor="test").outcome == "live"
    assert deploy(spec, actor="test").outcome == "unchanged"


def test_dashboard_lists_external_endpoints_with_provider_and_price(gateway: ThreadedGateway,
                                                                    world: dict[str, str]) -> None:
    with httpx.Client(base_url=gateway.url, follow_redirects=True) as ui:
        assert ui.post("/ui/login", data={"api_key": world["alice"], "next": "/ui"}).status_code == 200
        index = ui.get("/ui").text
        assert 'data-provider="openai"' in index and "$0.15 in / $0.6 out per 1M tokens" in index
        health = ui.get(f"/ui/endpoints/{EXT}/health").text
        assert 'id="provider"' in health and 'id="replicas"' not in health
        assert 'id="replicas"' in ui.get(f"/ui/endpoints/{SELF}/health").text


def test_provider_key_is_nowhere_in_the_state_dir(gateway: ThreadedGateway, llmhost_home: Path) -> None:
    """Run last: every file under LLMHOST_HOME (store, WAL, audit, MLflow, logs) is scanned for the key."""
    time.sleep(0.3)  # the meter's last flush
    needle = PROVIDER_KEY.encode()
    scanned = [p for p in llmhost_home.rglob("*") if p.is_file()]
    assert any(p.name.startswith("llmhost.db") for p in scanned)
    assert files_holding(scanned, {"the provider key": needle}) == []
    for entry in store.audit.entries():
        assert PROVIDER_KEY not in json.dumps([entry.before, entry.after, entry.links], default=str)


def test_a_store_made_before_these_columns_gains_them(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, inspect, text

    from tasks.store.schema import Base, get_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    Base.metadata.create_all(old)
    with old.begin() as c:
        for table, col in (("usage_records", "cost_usd"), ("usage_records", "fallback"), ("endpoints", "fallback")):
            c.execute(text(f"ALTER TABLE {table} DROP COLUMN {col}"))
    old.dispose()
    insp = inspect(get_engine(url))
    assert {"cost_usd", "fallback", "provider"} <= {c["name"] for c in insp.get_columns("usage_records")}
    assert "fallback" in {c["name"] for c in insp.get_columns("endpoints")}
