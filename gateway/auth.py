"""Bearer-key authentication with an in-memory cache of verified keys.

Verifying a key costs one scrypt (tens of ms), so verified keys are cached by the SHA-256 of the raw key (the
raw key itself is never kept or logged). The cache is cleared whenever the store's routes epoch moves, which
every key revocation bumps, so a revoked key stops working on the next request.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

import anyio.to_thread
from sqlalchemy import Engine

from gateway.protocol import ApiError
from tasks.core.errors import AccessError
from tasks.store.keys import KeyInfo, verify_key

_NEGATIVE_TTL_S = 5.0
_MAX_ENTRIES = 10_000


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type="invalid_request_error", code="invalid_api_key",
                    headers={"www-authenticate": "Bearer"})


class KeyCache:
    """sha256(raw key) -> KeyInfo; verification of a new key runs once even under concurrent requests."""

    def __init__(self, engine: Engine, verify: Callable[..., KeyInfo] = verify_key):
        self.engine = engine
        self._verify = verify
        self._good: dict[bytes, KeyInfo] = {}
        self._bad: dict[bytes, tuple[float, str]] = {}
        self._inflight: dict[bytes, asyncio.Future[KeyInfo]] = {}
        self._generation = 0

    def clear(self) -> None:
        # A verification already in flight must not refill the cache with what it read before the change.
        self._generation += 1
        self._good.clear()
        self._bad.clear()
        self._inflight.clear()

    async def authenticate(self, authorization: str | None) -> KeyInfo:
        if not authorization:
            raise _unauthorized("No API key: send `Authorization: Bearer llmh-...` (the OpenAI SDK's "
                                "api_key). Create a key with `llmhost keys create --user YOU`.")
        scheme, _, raw = authorization.partition(" ")
        raw = raw.strip()
        if scheme.lower() != "bearer" or not raw:
            raise _unauthorized("The Authorization header must be `Bearer llmh-...`.")
        digest = hashlib.sha256(raw.encode()).digest()
        info = self._good.get(digest)
        if info is None:
            info = await self._lookup(digest, raw)
        if info.is_expired():
            raise _unauthorized(f"API key {info.prefix}… expired: ask an admin for a new one "
                                "(`llmhost keys create --expires 30d`).")
        return info

    async def _lookup(self, digest: bytes, raw: str) -> KeyInfo:
        bad = self._bad.get(digest)
        if bad is not None and bad[0] > time.monotonic():
            raise _unauthorized(bad[1])
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[KeyInfo] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = fut
        generation = self._generation
        try:
            info = await anyio.to_thread.run_sync(lambda: self._verify(raw, engine=self.engine))
        except AccessError as exc:
            msg = str(exc)
            if len(self._bad) > _MAX_ENTRIES:
                self._bad.clear()
            if generation == self._generation:
                self._bad[digest] = (time.monotonic() + _NEGATIVE_TTL_S, msg)
            fut.set_exception(_unauthorized(msg))
            fut.exception()  # mark retrieved: waiters may not exist
            raise _unauthorized(msg) from None
        except BaseException:
            fut.cancel()
            raise
        finally:
            if self._inflight.get(digest) is fut:
                del self._inflight[digest]
        if len(self._good) > _MAX_ENTRIES:
            self._good.clear()
        if generation == self._generation:
            self._good[digest] = info
        fut.set_result(info)
        return info
