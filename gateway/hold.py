"""Holding the requests of an endpoint that is swapping revisions in place (tasks.deploy.swap: hold or sleep).

While the deploy stops (or puts to sleep) the old replicas and starts the new ones, the endpoint's status is
`swapping`. A request that arrives then waits here instead of failing: it re-reads the routes every POLL_S (the
routes epoch on SQLite, the gateway's background poll elsewhere) until the endpoint leaves `swapping`, which the
switch to the new revision (or the old one's return) does, and then routes as usual. After LLMHOST_SWAP_HOLD_S it
gets a 503 with Retry-After instead.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from gateway.protocol import ApiError
from tasks.store.keys import KeyInfo

if TYPE_CHECKING:
    from gateway.proxy import Gateway

POLL_S = 0.2
# A CPU replica starts in 50-90 s and a GPU one in minutes: a client told to come back in 15 s finds the new
# revision within one retry of it serving, without a storm of retries meanwhile.
RETRY_AFTER_S = 15


async def hold_while_swapping(gw: Gateway, name: str, key: KeyInfo) -> float:
    """Waits while endpoint `name` is swapping; the seconds held (0.0 when it was not swapping)."""
    route = gw.routes.get(name)
    if route is None or route.status != "swapping" or not route.allows(key):
        return 0.0  # unknown names and missing grants get their own answers without waiting
    hold_s = gw.settings.swap_hold_s
    t0 = time.monotonic()
    deadline = t0 + hold_s
    while True:
        now = time.monotonic()
        if now >= deadline:
            held = now - t0
            raise ApiError(503, f"Endpoint {name!r} is swapping to revision {route.swap_to or '(unknown)'}; "
                           f"retry in {RETRY_AFTER_S} s (this request was held {held:.0f} s, the gateway's bound, "
                           "LLMHOST_SWAP_HOLD_S).", type="server_error", code="endpoint_swapping",
                           headers={"retry-after": str(RETRY_AFTER_S)})
        await asyncio.sleep(min(POLL_S, deadline - now))
        gw.refresh()
        route = gw.routes.get(name)
        if route is None or route.status != "swapping":
            return time.monotonic() - t0
