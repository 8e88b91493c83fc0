"""Replica choice (least outstanding requests among healthy replicas) and the background health loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

from tasks.store.routes import EndpointRoute, ReplicaRoute

log = logging.getLogger("llmhost.gateway.routing")


@dataclass
class ReplicaStatus:
    """In-memory view of one replica. `healthy` is None until the first probe or request says otherwise."""

    outstanding: int = 0
    healthy: bool | None = None
    last_error: str | None = None
    served: int = 0


def root_url(base_url: str) -> str:
    """`http://h:p/v1` -> `http://h:p` (vLLM's /health lives at the root)."""
    return base_url[:-3] if base_url.endswith("/v1") else base_url


class ReplicaPool:
    """Tracks outstanding requests and health per replica id across route reloads."""

    def __init__(self) -> None:
        self.status: dict[int, ReplicaStatus] = {}
        self._rr = 0

    def _st(self, replica_id: int) -> ReplicaStatus:
        st = self.status.get(replica_id)
        if st is None:
            st = self.status[replica_id] = ReplicaStatus()
        return st

    def pick(self, route: EndpointRoute, exclude: Iterable[int] = ()) -> ReplicaRoute | None:
        """The healthy (or not yet probed) replica with the fewest requests in flight; ties rotate."""
        best: ReplicaRoute | None = None
        best_load = 1 << 30
        n = len(route.replicas)
        if n == 0:
            return None
        self._rr = (self._rr + 1) % n
        excluded = set(exclude)
        for i in range(n):
            r = route.replicas[(self._rr + i) % n]
            if r.id in excluded:
                continue
            st = self._st(r.id)
            if st.healthy is False:
                continue
            if st.outstanding < best_load:
                best, best_load = r, st.outstanding
        return best

    def acquire(self, replica_id: int) -> None:
        st = self._st(replica_id)
        st.outstanding += 1
        st.served += 1

    def release(self, replica_id: int) -> None:
        st = self._st(replica_id)
        st.outstanding = max(0, st.outstanding - 1)

    def mark(self, replica_id: int, healthy: bool, error: str | None = None) -> bool:
        """Set health; True when it changed (up<->down, or first observation)."""
        st = self._st(replica_id)
        changed = st.healthy is not healthy
        st.healthy, st.last_error = healthy, (None if healthy else error)
        return changed


async def probe(client: httpx.AsyncClient, replica: ReplicaRoute,
                timeout_s: float) -> tuple[bool, str | None]:
    try:
        resp = await client.get(root_url(replica.base_url) + "/health", timeout=timeout_s)
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if resp.status_code != 200:
        return False, f"/health answered {resp.status_code}"
    return True, None


async def probe_all(
    client: httpx.AsyncClient,
    pool: ReplicaPool,
    replicas: Iterable[ReplicaRoute],
    timeout_s: float,
    on_change: Callable[[ReplicaRoute, bool, str | None], None] | None = None,
) -> None:
    reps = {r.id: r for r in replicas}
    results = await asyncio.gather(*(probe(client, r, timeout_s) for r in reps.values()))
    for r, (ok, err) in zip(reps.values(), results, strict=True):
        if pool.mark(r.id, ok, err):
            log.log(logging.INFO if ok else logging.WARNING, "replica %s (%s) is %s%s", r.name, r.base_url,
                    "up" if ok else "down", f": {err}" if err else "")
            if on_change is not None:
                on_change(r, ok, err)
