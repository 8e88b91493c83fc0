"""An OpenAI-compatible server that answers from memory, to measure what a proxy in front of it costs.

    .venv/bin/python benchmarks/instant_upstream.py --port 9100

Answers POST /v1/chat/completions (plain, or `stream: true` as SSE with the usage chunk that
`stream_options.include_usage` asks for), GET /v1/models and GET /health. Bodies are built once at import,
so the server's own cost per request is uvicorn's HTTP handling and one small JSON parse. It is a bare ASGI
callable rather than a Starlette app because every microsecond it spends is taken from the proxy it measures
on a small machine. tests/test_gateway_workers.py serves it in a thread as its upstream.
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson

MODEL = "instant"
CONTENT = ["Your", " parcel", " is", " on", " its", " way", "."]
USAGE = {"prompt_tokens": 9, "completion_tokens": len(CONTENT), "total_tokens": 9 + len(CONTENT)}
_BASE = {"id": "chatcmpl-instant", "created": 1_700_000_000, "model": MODEL, "system_fingerprint": None}

COMPLETION = orjson.dumps({
    **_BASE, "object": "chat.completion", "usage": USAGE,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(CONTENT)},
                 "logprobs": None, "finish_reason": "stop"}],
})


def _chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
    return b"data: " + orjson.dumps({**_BASE, "object": "chat.completion.chunk", "choices": choices,
                                     "usage": usage}) + b"\n\n"


# One event per token, as vLLM sends them; each is its own body send, so a proxy relays them one by one.
STREAM_EVENTS = (
    [_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])]
    + [_chunk([{"index": 0, "delta": {"content": t}, "logprobs": None, "finish_reason": None}]) for t in CONTENT]
    + [_chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])]
)
USAGE_EVENT = _chunk([], USAGE)
DONE = b"data: [DONE]\n\n"
MODELS = orjson.dumps({"object": "list", "data": [
    {"id": MODEL, "object": "model", "created": 1_700_000_000, "owned_by": "instant"}]})

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


async def _send_whole(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI app: chat completions, the model list and /health, all from memory."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path, method = scope["path"], scope["method"]
    if method == "GET" and path == "/v1/models":
        return await _send_whole(send, 200, MODELS)
    if method == "GET" and path == "/health":
        return await _send_whole(send, 200, b"{}")
    if method != "POST" or path != "/v1/chat/completions":
        return await _send_whole(send, 404, b'{"error": {"message": "not found", "type": "invalid_request_error"}}')
    try:
        payload = orjson.loads(await _read_body(receive))
    except orjson.JSONDecodeError:
        return await _send_whole(send, 400, b'{"error": {"message": "bad JSON", "type": "invalid_request_error"}}')
    if not payload.get("stream"):
        return await _send_whole(send, 200, COMPLETION)
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    for event in STREAM_EVENTS:
        await send({"type": "http.response.body", "body": event, "more_body": True})
    opts = payload.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        await send({"type": "http.response.body", "body": USAGE_EVENT, "more_body": True})
    await send({"type": "http.response.body", "body": DONE, "more_body": False})


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9100)
    args = ap.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, loop="uvloop",
                http="httptools", lifespan="on")


if __name__ == "__main__":
    main()
