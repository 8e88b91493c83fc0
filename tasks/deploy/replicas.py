"""The replicas of a revision: start them on the spec's target, record them in the store, drain and stop them.

A `local` spec runs one vLLM process per replica (one store row each); a `ray` spec runs one Ray Serve
application (one store row, Serve owns the replica count).
"""

from __future__ import annotations

import time

import httpx
from pydantic import BaseModel

from tasks import store
from tasks.deploy.plan import REPLICA_ENV, RevisionPlan, device_for
from tasks.deploy.spec import EndpointSpec, pinned_spec
from tasks.serving.base import Replica, Target
from tasks.serving.gpus import cluster_gpus, place_for, ray_nodes
from tasks.serving.local import LocalTarget
from tasks.serving.ray import RaySettings, RayTarget


def _as_replica(row: store.ReplicaRow) -> Replica:
    host_port = row.base_url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    return Replica(
        name=row.name,
        base_url=row.base_url,
        host=host or "127.0.0.1",
        port=int(port or 0),
        pid=row.pid,
        log_path=row.log_path,
        served_model_name=row.served_model_name,
        state="up",
        target=row.target,
    )


def target_for(spec: EndpointSpec) -> Target:
    """The serving target a spec names; the ray one carries the spec's cluster address and scaling, and its
    device (for `hardware: auto`, whether the cluster has GPUs)."""
    if spec.target == "ray":
        settings = spec.ray or RaySettings()
        gpus = cluster_gpus(ray_nodes(settings)) if spec.hardware == "auto" else None
        return RayTarget(settings, device=device_for(spec.hardware, gpus))
    return LocalTarget()


def _row_target(endpoint: str, row: store.ReplicaRow) -> Target:
    """The target that runs a stored replica; a Ray application's cluster is in its revision's pinned spec."""
    if row.target != "ray":
        return LocalTarget()
    rev = next(r for r in store.list_revisions(endpoint) if r.id == row.revision_id)
    return target_for(pinned_spec(rev))


def rows_per_revision(spec: EndpointSpec) -> int:
    """Store rows (gateway upstreams) a live revision has: one per process, or one Ray application."""
    return 1 if spec.target == "ray" else spec.replicas


def start_replicas(
    plan: RevisionPlan,
    revision_id: int,
    replicas: int,
    *,
    actor: str,
    register: bool = True,
    target: Target | None = None,
    env: dict[str, str] | None = None,
) -> tuple[list[Replica], list[int]]:
    """Starts every replica of the plan, recorded as `starting`; on a failed start, stops the ones already up.

    `register=False` defers the store rows (used when the revision is already live: rows of a live revision
    take traffic at once, and these have not passed their smoke test yet). `env` adds to REPLICA_ENV.
    First the replicas are placed on GPUs (tasks.serving.gpus): one that cannot be raises PlacementError before
    anything starts or is recorded; a placement is recorded as the revision's `placement` fact.
    """
    target = target or LocalTarget()
    gpus, placement = place_for(target, plan.vllm, replicas)
    if placement is not None:
        store.set_revision_facts(plan.endpoint, revision_id, "placement", placement, actor=actor)
    started: list[Replica] = []
    row_ids: list[int] = []
    try:
        for i in range(replicas):
            name, full_env = f"{plan.endpoint}-{plan.content_hash[:8]}-{i}", {**REPLICA_ENV, **(env or {})}
            if gpus and isinstance(target, LocalTarget):
                r = target.start(plan.vllm, name=name, env=full_env, gpus=gpus[i])
            else:
                r = target.start(plan.vllm, name=name, env=full_env)
            started.append(r)
            if register:
                row_ids.append(register_replica(plan, revision_id, r, "starting", actor).id)
    except Exception:
        for r in started:
            target.stop(r)
        for rid in row_ids:
            store.set_replica_state(rid, "failed", actor=actor)
        raise
    return started, row_ids


def register_replica(plan: RevisionPlan, revision_id: int, r: Replica, state: str, actor: str) -> store.ReplicaRow:
    row = store.add_replica(
        plan.endpoint,
        revision_id,
        base_url=r.base_url,
        served_model_name=r.served_model_name,
        name=r.name,
        state=state,
        kv_cache_tokens=r.kv_cache_tokens,
        pid=r.pid,
        log_path=r.log_path,
        target=r.target,
        gpus=",".join(str(g) for g in r.gpus) or None,
        actor=actor,
    )
    return row


def in_flight(root: str) -> int | None:
    """Running + waiting requests from vLLM's /metrics; None when the replica does not answer."""
    try:
        text = httpx.get(f"{root}/metrics", timeout=2.0).text
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            total += float(line.rsplit(" ", 1)[-1])
    return int(total)


def _wait_idle(root: str, *, quiet_s: float, timeout_s: float) -> tuple[int, bool]:
    """Waits until the replica has had no request in flight for `quiet_s` (or does not answer); (peak, timed out)."""
    deadline, idle_since, peak = time.monotonic() + timeout_s, None, 0
    while True:
        busy = in_flight(root)
        peak = max(peak, busy or 0)
        now = time.monotonic()
        if not busy:
            idle_since = idle_since or now
            if now - idle_since >= quiet_s or busy is None:
                return peak, False
        else:
            idle_since = None
        if now > deadline:
            return peak, True
        time.sleep(0.1)


def stop_row(endpoint: str, row: store.ReplicaRow, *, actor: str) -> None:
    """Stops a stored replica (if llmhost started it) and records it as stopped."""
    if row.managed:
        _row_target(endpoint, row).stop(_as_replica(row))
    store.set_replica_state(row.id, "stopped", actor=actor)


class DrainReport(BaseModel):
    replica: str
    waited_s: float
    max_in_flight: int
    timed_out: bool


def drain_and_stop(
    endpoint: str,
    rows: list[store.ReplicaRow],
    *,
    actor: str,
    reload_s: float = 1.0,
    quiet_s: float = 1.0,
    timeout_s: float = 120.0,
) -> list[DrainReport]:
    """Stops the given (old) replicas once no request can reach them and none is still running on them.

    The route already points elsewhere. Gateways pick that up on their next request (SQLite store) or within
    their 0.25 s epoch poll; `reload_s` covers that, and a request that picked an old replica just before the
    switch shows up in vLLM's running/waiting gauges, which must then stay at 0 for `quiet_s`.
    """
    time.sleep(reload_s)
    reports = []
    for row in rows:
        t0 = time.monotonic()
        peak, timed_out = _wait_idle(row.base_url.removesuffix("/v1"), quiet_s=quiet_s, timeout_s=timeout_s)
        stop_row(endpoint, row, actor=actor)
        reports.append(
            DrainReport(
                replica=row.name,
                waited_s=round(time.monotonic() - t0, 2),
                max_in_flight=peak,
                timed_out=timed_out,
            )
        )
    return reports


def healthy(row: store.ReplicaRow) -> bool:
    """Whether the replica answers /health with 200 now."""
    try:
        return httpx.get(row.base_url.removesuffix("/v1") + "/health", timeout=3.0).status_code == 200
    except httpx.HTTPError:
        return False
