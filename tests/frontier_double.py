"""A local test double of a hosted frontier API (OpenAI's chat completions), run in a thread on a free port.

It stands in for the one thing these tests cannot reach from here: a provider's hosted API. Its behaviour is
built from the providers' documentation and their documented error bodies, not from our own code:
- reasoning models (OpenAI's reasoning guide): `max_tokens` answers 400 `unsupported_parameter` ("Use
  'max_completion_tokens' instead"); `temperature`/`top_p` other than 1 answer 400 `unsupported_value`;
  `presence_penalty`, `frequency_penalty`, `logprobs`, `top_logprobs` and `logit_bias` answer 400
  `unsupported_parameter`; usage reports `completion_tokens_details.reasoning_tokens`, which count against
  `max_completion_tokens` (a budget spent on reasoning ends with `finish_reason: length` and no text);
- rate limits: 429 with `Retry-After` (and OpenAI's `x-ratelimit-reset-*` headers), each from a script;
- faults: 5xx answers and streams without the `usage` chunk.
Every request body and the time it arrived are kept in `requests`, so tests assert what was really sent.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request  # at module level: the route annotations are resolved from here

REFUSED_BY_REASONING = ("presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "logit_bias")


@dataclass
class DoubleModel:
    """One served model and how it behaves."""

    reasoning: bool = False
    reasoning_tokens: int = 8
    usage: bool = True
    fail_status: int | None = None  # every request answers this status (5xx)
    answer: Callable[[list[dict[str, Any]]], str] = lambda messages: "billing"


@dataclass
class Recorded:
    model: str
    body: dict[str, Any]
    at: float
    status: int


def _error(status: int, message: str, type_: str, param: str | None, code: str | None,
           headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def reasoning_violation(body: dict[str, Any]) -> tuple[str, str, str] | None:
    """(message, param, code) of OpenAI's 400 for a reasoning model's refused parameter, or None."""
    if "max_tokens" in body:
        return (
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "max_tokens",
            "unsupported_parameter",
        )
    for p in ("temperature", "top_p"):
        if p in body and float(body[p]) != 1.0:
            return (
                f"Unsupported value: '{p}' does not support {body[p]} with this model. "
                "Only the default (1) value is supported.",
                p,
                "unsupported_value",
            )
    for p in REFUSED_BY_REASONING:
        if p in body:
            return (f"Unsupported parameter: '{p}' is not supported with this model.", p, "unsupported_parameter")
    return None


@dataclass
class FrontierDouble:
    """The API app under uvicorn on a free port; use as a context manager."""

    models: dict[str, DoubleModel]
    api_key: str = "sk-double-secret"
    rate_limits: list[dict[str, str]] = field(default_factory=list)  # headers of the next 429s, in order
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        import uvicorn

        from tasks.serving.local import free_port

        self.port = free_port()
        self._lock = threading.Lock()
        self.server = uvicorn.Server(
            uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FrontierDouble:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "frontier double did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def sent(self, model: str, status: int | None = None) -> list[Recorded]:
        return [r for r in self.requests if r.model == model and (status is None or r.status == status)]

    def _app(self) -> Any:
        from fastapi.responses import StreamingResponse

        app = FastAPI()

        def authorized(request: Request) -> bool:
            return request.headers.get("authorization") == f"Bearer {self.api_key}"

        @app.get("/v1/models")
        async def models(request: Request) -> Any:
            if not authorized(request):
                return _error(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")
            return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "double"}
                                               for m in self.models]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            name = str(body.get("model"))
            spec = self.models.get(name)

            def record(status: int) -> None:
                with self._lock:
                    self.requests.append(Recorded(name, body, time.monotonic(), status))

            if not authorized(request):
                record(401)
                return _error(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")
            if spec is None:
                record(404)
                return _error(404, f"The model `{name}` does not exist.", "invalid_request_error", None,
                              "model_not_found")
            with self._lock:
                limited = self.rate_limits.pop(0) if self.rate_limits else None
            if limited is not None:
                record(429)
                return _error(429, "Rate limit reached for requests.", "requests", None, "rate_limit_exceeded",
                              headers=limited)
            if spec.fail_status:
                record(spec.fail_status)
                return _error(spec.fail_status, "The server had an error while processing your request.",
                              "server_error", None, None)
            if spec.reasoning and (bad := reasoning_violation(body)):
                record(400)
                return _error(400, bad[0], "invalid_request_error", bad[1], bad[2])
            record(200)
            return StreamingResponse(self._stream(name, spec, body), media_type="text/event-stream")

        return app

    def _stream(self, name: str, spec: DoubleModel, body: dict[str, Any]) -> Any:
        text = spec.answer(body.get("messages") or [])
        budget = int(body.get("max_completion_tokens") or body.get("max_tokens") or 10**6)
        reasoning = spec.reasoning_tokens if spec.reasoning else 0
        visible = max(0, min(len(text.split()) or 1, budget - reasoning))
        finish = "stop" if visible else "length"
        content = text if visible else ""

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, usage: Any = None,
                  choices: bool = True) -> str:
            obj = {"id": "chatcmpl-double", "object": "chat.completion.chunk", "created": int(time.time()),
                   "model": name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
                   if choices else [], "usage": usage}
            return f"data: {json.dumps(obj)}\n\n"

        async def gen() -> Any:
            yield chunk({"role": "assistant", "content": ""})
            if content:
                yield chunk({"content": content})
            yield chunk({}, finish)
            if spec.usage and (body.get("stream_options") or {}).get("include_usage"):
                prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages") or []) // 4
                completion = visible + reasoning
                usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion,
                         "completion_tokens_details": {"reasoning_tokens": reasoning}}
                yield chunk({}, usage=usage, choices=False)
            yield "data: [DONE]\n\n"

        return gen()
