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
    slow_probes: int = 0  # consecutive /health probes that timed out


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    error: str | None = None
    timed_out: bool = False


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
        """The healthy (or not yet probed) replica with the fewest requests in flight; ties rotate.

        When the probes mark every replica left down, try those anyway (Envoy's "panic" routing): a probe
        verdict can be stale or wrong (a /health that timed out on a saturated CPU while requests were being
        answered), and a replica that is really gone refuses the connection at once, which excludes it for
        this request and ends in the 503 all the same.
        """
        n = len(route.replicas)
        if n == 0:
            return None
        self._rr = (self._rr + 1) % n
        excluded = set(exclude)
        best: ReplicaRoute | None = None  # least loaded healthy (or unprobed) replica
        panic: ReplicaRoute | None = None  # least loaded of those marked down
        best_load = panic_load = 1 << 30
        for i in range(n):  # one pass, no allocation: this runs on every request
            r = route.replicas[(self._rr + i) % n]
            if r.id in excluded:
                continue
            st = self._st(r.id)
            if st.healthy is False:
                if st.outstanding < panic_load:
                    panic, panic_load = r, st.outstanding
            elif st.outstanding < best_load:
                best, best_load = r, st.outstanding
        return best or panic

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
        if healthy:
            st.slow_probes = 0
        return changed

    def mark_probe(self, replica_id: int, result: ProbeResult, slow_threshold: int) -> bool:
        """Record a /health probe; True when the replica's health changed.

        A refused connection or a non-200 answer is definite: down at once. A probe that timed out only says
        the replica was slow to answer /health (a busy CPU replica often is), so it takes `slow_threshold`
        timeouts in a row, as Kubernetes' failureThreshold does.
        """
        if result.ok:
            return self.mark(replica_id, True)
        st = self._st(replica_id)
        if result.timed_out:
            st.slow_probes += 1
            if st.slow_probes < slow_threshold and st.healthy is not False:
                return False
        return self.mark(replica_id, False, result.error)


async def probe(client: httpx.AsyncClient, replica: ReplicaRoute, timeout_s: float) -> ProbeResult:
    try:
        resp = await client.get(root_url(replica.base_url) + "/health", timeout=timeout_s)
    except httpx.TimeoutException as exc:
        return ProbeResult(False, f"/health did not answer within {timeout_s:g}s ({type(exc).__name__})",
                           timed_out=True)
    except httpx.HTTPError as exc:
        return ProbeResult(False, f"{type(exc).__name__}: {exc}")
    if resp.status_code != 200:
        return ProbeResult(False, f"/health answered {resp.status_code}")
    return ProbeResult(True)


async def probe_all(
    client: httpx.AsyncClient,
    pool: ReplicaPool,
    replicas: Iterable[ReplicaRoute],
    timeout_s: float,
    on_change: Callable[[ReplicaRoute, bool, str | None], None] | None = None,
    slow_threshold: int = 3,
) -> None:
    reps = {r.id: r for r in replicas}
    results = await asyncio.gather(*(probe(client, r, timeout_s) for r in reps.values()))
    for r, res in zip(reps.values(), results, strict=True):
        ok, err = res.ok, res.error
        if pool.mark_probe(r.id, res, slow_threshold):
            log.log(logging.INFO if ok else logging.WARNING, "replica %s (%s) is %s%s", r.name, r.base_url,
                    "up" if ok else "down", f": {err}" if err else "")
            if on_change is not None:
                on_change(r, ok, err)
