"""Streamed answers: SSE events relayed as they arrive from a replica or a provider, metered at the end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.protocol import is_usage_only_chunk, sse_error, usage_of
from gateway.upstream import UpstreamFailed, UpstreamResponse, UpstreamTimeout


class Finisher(Protocol):
    def _finish(self, row: dict[str, Any], t0: float, status: int, prompt: int | None, completion: int | None,
                latency_ms: float | None, ttft_ms: float | None = None,
                usage: dict[str, Any] | None = None) -> Any: ...

    @property
    def meter(self) -> Any: ...


class StreamPassthrough(Response):
    """Relays SSE events as they arrive, drops the usage chunk the client did not ask for, meters at the end.

    Owns the upstream response: it is closed (aborting generation upstream) when the client goes away.
    `release` runs once the stream ends (a replica's in-flight count); `fail_message` words a broken upstream.
    """

    def __init__(self, gw: Finisher, upstream: UpstreamResponse, row: dict[str, Any], t0: float,
                 client_wants_usage: bool, headers: dict[str, str], *, release: Callable[[], None],
                 fail_message: Callable[[Exception], str]):
        # No super().__init__: it would set a body and so a Content-Length of 0.
        self.status_code, self.background = 200, None
        self.init_headers({**headers, "cache-control": "no-cache"})
        self.gw, self.upstream, self.row, self.t0 = gw, upstream, row, t0
        self.release, self.fail_message = release, fail_message
        self.client_wants_usage = client_wants_usage
        self.prompt: int | None = None
        self.completion: int | None = None
        self.usage: dict[str, Any] | None = None
        self.ttft_ms: float | None = None
        self.status = 200
        self.complete = False
        self.finished = False

    async def _events(self) -> AsyncIterator[bytes]:
        buf = b""
        try:
            async for chunk in self.upstream.chunks():
                if self.ttft_ms is None:
                    self.ttft_ms = (time.perf_counter() - self.t0) * 1000.0
                buf += chunk
                cut = buf.rfind(b"\n\n")
                if cut < 0:
                    continue
                complete, buf = buf[: cut + 2], buf[cut + 2:]
                if b'"usage"' not in complete:  # the common case: relay as is, no parsing
                    yield complete
                    continue
                out = []
                for event in complete.split(b"\n\n")[:-1]:
                    if b'"usage"' in event and event.startswith(b"data: {"):
                        try:
                            obj = orjson.loads(event[6:])
                        except orjson.JSONDecodeError:
                            obj = None
                        if isinstance(obj, dict):
                            p, c = usage_of(obj)
                            if p is not None:
                                self.prompt, self.completion, self.usage = p, c, obj["usage"]
                            if not self.client_wants_usage and is_usage_only_chunk(obj):
                                continue
                    out.append(event + b"\n\n")
                if out:
                    yield b"".join(out)
            if buf:
                yield buf
        except (UpstreamTimeout, UpstreamFailed) as exc:
            self.status = 502
            yield sse_error(self.fail_message(exc))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The client's hang-up is watched by a plain asyncio task that cancels this one (anyio's task group and
        # cancel scopes cost about a tenth of the gateway's CPU per streamed request in a py-spy profile).
        me = asyncio.current_task()
        assert me is not None
        gone = False
        done = delivered = False

        async def watch_disconnect() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            # A client that read `[DONE]` and hung up before the upstream's EOF got everything.
            if not done and not delivered:
                self.status = 499  # nginx's "client closed request"
            if not done:
                gone = True
                me.cancel()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for piece in self._events():
                if piece.endswith(b"data: [DONE]\n\n"):
                    await self._finish_durably()  # the client counts the answer complete at [DONE]
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                delivered = delivered or piece.endswith(b"data: [DONE]\n\n")
                # aiohttp hands out buffered data without yielding, and uvicorn drops sends to a gone client
                # silently: yield here so the disconnect watcher runs and aborts the upstream promptly.
                await asyncio.sleep(0)
            done = True
            self.complete = self.status == 200  # a broken upstream connection is not reused
            await self._finish_durably()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone or me.uncancel() > 0:  # the server's cancel, not the watcher's: let it through
                raise
        finally:
            done = True
            watcher.cancel()
            self.upstream.close(complete=self.complete)
            self.release()
            if not self.finished:  # the client went away: metered, with nobody left to wait for the journal
                self.finished = True
                self.gw._finish(self.row, self.t0, self.status, self.prompt, self.completion, None, self.ttft_ms,
                                usage=self.usage)

    async def _finish_durably(self) -> None:
        """Meter once, and wait until the usage row is durable: before the answer's end leaves."""
        if not self.finished:
            self.finished = True
            await self.gw.meter.durable(self.gw._finish(self.row, self.t0, self.status, self.prompt,
                                                        self.completion, None, self.ttft_ms, usage=self.usage))
