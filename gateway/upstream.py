"""The HTTP client the gateway uses to talk to replicas on the request path.

It is aiohttp rather than httpx: measured here on the same loopback load (2,000 requests, concurrency 16),
httpx's pooled transport spent 0.92-1.00 ms of CPU per request and aiohttp 0.15 ms. Most of httpx's cost is
httpcore checking every idle pooled connection with a select() on each request, plus anyio layers. On a small
machine that shares its cores with vLLM, that CPU is taken straight from vLLM's throughput. httpx still does
the health probes, where cost does not matter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp


class ConnectFailed(Exception):
    """The replica could not be reached; nothing was sent, so another replica may be tried."""


class UpstreamTimeout(Exception):
    """The replica accepted the request but did not answer within the read timeout."""


class UpstreamFailed(Exception):
    """The connection broke after the request was sent."""


class UpstreamResponse:
    """Status, content type and body (whole or streamed) of one replica answer."""

    __slots__ = ("_resp",)

    def __init__(self, resp: aiohttp.ClientResponse):
        self._resp = resp

    @property
    def status_code(self) -> int:
        return self._resp.status

    @property
    def content_type(self) -> str | None:
        return self._resp.headers.get("content-type")

    def header(self, name: str) -> str | None:
        return self._resp.headers.get(name)

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except TimeoutError as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"{type(exc).__name__}: {exc}") from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """Bytes as they arrive (no re-chunking, no buffering)."""
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"{type(exc).__name__}: {exc}") from exc

    def close(self, *, complete: bool) -> None:
        """Return the connection to the pool when the body was read; otherwise drop it (aborts upstream)."""
        if complete:
            self._resp.release()
        else:
            self._resp.close()


class Upstream:
    """One pooled client for all replicas; create and close it inside the event loop."""

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float, keepalive_s: float = 4.0):
        # vLLM's uvicorn drops idle keep-alive connections after 5 s; reusing one just as it closes would fail
        # a request that never reached the replica, so idle connections are retired a second earlier.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=keepalive_s),
            timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """Send and wait for the status line and headers."""
        try:
            resp = await self._session.post(url, data=body, headers=headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"{type(exc).__name__}: {exc}") from exc
        return UpstreamResponse(resp)

    async def close(self) -> None:
        await self._session.close()
