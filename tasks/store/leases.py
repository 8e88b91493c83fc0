"""One deploy at a time per endpoint: a lease row held from plan to drain, taken over when its holder died."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete
from sqlalchemy.exc import IntegrityError

from tasks.core.errors import DeployError
from tasks.core.procs import pid_alive
from tasks.store.schema import DeployLease, get_engine, session_scope, utcnow


class DeployInProgress(DeployError):
    """Another deploy of the same endpoint holds the lease."""


_held_leases = threading.local()  # .by_endpoint: the leases this thread holds, for re-entry


def _lease_is_stale(lease: DeployLease, now: datetime) -> bool:
    """Expired, or held by a process on this host that is gone (a deploy killed with SIGKILL)."""
    return lease.expires_at <= now or (lease.host == socket.gethostname() and not pid_alive(lease.pid))


@contextmanager
def deploy_lease(endpoint: str, *, actor: str, ttl_s: float = 3600.0,
                 engine: Engine | None = None) -> Iterator[DeployLease]:
    """Hold the endpoint's deploy lease for the block; a second deploy is refused with who holds it and since when.

    A lease whose holder died on this host, or which is older than `ttl_s`, is taken over.
    """
    held_here: dict[str, DeployLease] = _held_leases.__dict__.setdefault("by_endpoint", {})
    if endpoint in held_here:  # re-entrant within a thread: rollback holds it around its deploy
        yield held_here[endpoint]
        return
    now = utcnow()
    fields = dict(endpoint=endpoint, holder=actor, host=socket.gethostname(), pid=os.getpid(),
                  acquired_at=now, expires_at=now + timedelta(seconds=ttl_s))
    eng = engine or get_engine()
    for _ in range(3):
        try:
            with session_scope(eng) as s:
                held = s.get(DeployLease, endpoint, with_for_update=True)
                if held is not None and not _lease_is_stale(held, now):
                    raise DeployInProgress(
                        f"endpoint {endpoint!r} is being deployed by {held.holder} (pid {held.pid} on "
                        f"{held.host}) since {held.acquired_at:%Y-%m-%d %H:%M:%S} UTC: wait for that deploy to "
                        f"finish, then retry (a lease left by a crashed deploy expires at "
                        f"{held.expires_at:%H:%M:%S} UTC)"
                    )
                if held is not None:
                    s.delete(held)
                    s.flush()
                s.add(DeployLease(**fields))
            break
        except IntegrityError:  # another deploy inserted its lease between our read and our insert
            continue
    else:
        raise DeployInProgress(f"endpoint {endpoint!r}: another deploy took the lease at the same moment; retry")
    me = held_here[endpoint] = DeployLease(**fields)  # detached: the row is this lease's record
    try:
        yield me
    finally:
        del held_here[endpoint]
        with session_scope(eng) as s:
            s.execute(delete(DeployLease).where(DeployLease.endpoint == endpoint, DeployLease.pid == me.pid,
                                                DeployLease.host == me.host,
                                                DeployLease.acquired_at == me.acquired_at))
