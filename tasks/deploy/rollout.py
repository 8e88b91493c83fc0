"""Deploy a spec, one function per stage: plan -> size -> start -> smoke -> switch (blue/green) -> drain.

Traffic moves to a new revision only after every replica passes its smoke test; the old revision keeps serving
until then, and is drained before it is stopped. Every stage is an audit entry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks import store
from tasks.core.errors import ConfigError, DeployError, PlacementError, ReplicaStartError, TransientError
from tasks.deploy.external import check_fallback, plan_external
from tasks.deploy.plan import RevisionPlan, plan_revision, sizing_request
from tasks.deploy.replicas import (
    DrainReport,
    drain_and_stop,
    healthy,
    register_replica,
    rows_per_revision,
    start_replicas,
    target_for,
)
from tasks.deploy.spec import EndpointSpec
from tasks.deploy.swap import begin_swap, finish_swap
from tasks.deploy.vllm_args import check_extra_args
from tasks.serving.base import Replica, Target
from tasks.serving.local import has_cuda_gpu
from tasks.size import size_model
from tasks.smoke import SmokeReport, run_smoke
from tasks.store import audit

Outcome = Literal["live", "unchanged", "failed", "refused"]


class DeployStartError(DeployError, TransientError):
    """A replica of the new revision did not start; the old revision keeps serving (retryable)."""


class SizingOutcome(BaseModel):
    fits: bool
    tier: str
    explanation: str
    reason: str | None = Field(default=None, description="Why it was refused, one line.")
    kv_capacity_tokens: int | None = None
    weight_bytes: int = Field(default=0, description="Per replica; with overhead_bytes, what a swap needs free.")
    overhead_bytes: int = 0


class DeployResult(BaseModel):
    endpoint: str
    revision: str
    outcome: Outcome
    message: str
    previous: str | None = Field(default=None, description="The revision that was live before (short hash).")
    replicas: list[Replica] = Field(default_factory=list)
    smoke: list[SmokeReport] = Field(default_factory=list)
    sizing_markdown: str | None = None
    tool_calling: str | None = None
    drain: list[DrainReport] = Field(default_factory=list)
    swap: dict[str, Any] | None = Field(default=None, description="How it replaced the live revision (its swap fact).")
    seconds: float = 0.0


def live_revision(endpoint: str) -> store.EndpointRevision | None:
    """The endpoint's live revision row, or None."""
    e = store.get_endpoint(endpoint)
    if e.live_revision_id is None:
        return None
    return next((r for r in store.list_revisions(endpoint) if r.id == e.live_revision_id), None)


@dataclass
class _Rollout:
    """One deploy in progress: the spec, its plan, the revision it replaces and (once recorded) its own row."""

    spec: EndpointSpec
    actor: str
    plan: RevisionPlan
    live: store.EndpointRevision | None
    t0: float
    rev_id: int = 0
    target: Target | None = None
    replicas: list[Replica] = field(default_factory=list)
    row_ids: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # on top of REPLICA_ENV (sleep mode's dev routes)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def short(self) -> str:
        return self.plan.content_hash[:12]

    @property
    def old_hash(self) -> str | None:
        return self.live.content_hash if self.live else None

    @property
    def same(self) -> bool:
        """The planned revision is the live one (a --force restart, or a repair of missing replicas)."""
        return self.old_hash == self.plan.content_hash

    @property
    def old_keeps(self) -> str:
        return "the old revision keeps serving" if self.old_hash else "nothing is serving"

    def record(self, action: str, after: dict[str, Any], **kw: Any) -> None:
        audit.record(self.actor, action, f"endpoint:{self.name}", after=after, endpoint=self.name,
                     revision=self.short, **kw)

    def set_status(self, status: str, reason: str | None) -> None:
        store.set_revision_status(self.name, self.rev_id, status, reason=reason, actor=self.actor)

    def result(self, outcome: Outcome, message: str, **kw: Any) -> DeployResult:
        return DeployResult(
            endpoint=self.name,
            revision=self.short,
            outcome=outcome,
            message=message,
            previous=self.old_hash[:12] if self.old_hash else None,
            tool_calling=self.plan.tool_calling,
            seconds=round(time.monotonic() - self.t0, 1),
            **kw,
        )


def deploy(spec: EndpointSpec, *, actor: str | None = None, force: bool = False) -> DeployResult:
    """Plan -> size -> start -> smoke -> switch (blue/green) -> drain the old revision; each stage audited.

    One deploy per endpoint at a time: a second one (another shell, a scheduled retrain) is refused with
    `store.DeployInProgress`, naming the holder, before it creates anything.
    """
    actor = actor or audit.default_actor()
    if spec.target != "external":  # a bad vLLM argument is refused before anything is recorded or started
        check_extra_args(spec.vllm.extra_args)
    with store.deploy_lease(spec.name, actor=actor):
        if spec.target == "external":
            return deploy_external(spec, actor=actor, force=force)
        ro = plan(spec, actor=actor)
        if not force and (unchanged := already_live(ro)):
            return unchanged
        record_revision(ro)
        sizing = size(ro)
        if not sizing.fits:
            return refuse(ro, sizing)
        swap = begin_swap(ro, sizing)  # where both revisions cannot run at once, the old one stops or sleeps
        try:
            start(ro)
            reports = smoke(ro)
        except Exception:
            finish_swap(ro, swap, served=False)
            raise
        if not all(rp.passed for rp in reports):
            failed = discard(ro, reports, sizing)
            finish_swap(ro, swap, served=False)
            return failed
        old_rows = switch(ro)
        finish_swap(ro, swap, served=True)
        paused = f" (swap: {swap.strategy}, clients held {swap.pause_s:g} s)" if swap.in_place else ""
        return ro.result("live", _live_message(ro) + paused, replicas=ro.replicas, smoke=reports,
                         sizing_markdown=sizing.explanation, drain=drain(ro, old_rows), swap=swap.facts())


# ---------------------------------------------------------------------------------------------- stages


def apply_access(spec: EndpointSpec, *, actor: str) -> None:
    for user in spec.access.users:
        store.grant(spec.name, user=user, actor=actor)
    for team in spec.access.teams:
        store.grant(spec.name, team=team, actor=actor)


def plan(spec: EndpointSpec, *, actor: str) -> _Rollout:
    """Plan: the revision (nothing recorded about it yet), then the endpoint's row and grants.

    The revision is resolved first so that a spec naming an unknown model or adapter creates nothing.
    """
    t0 = time.monotonic()
    check_fallback(spec)
    planned = plan_revision(spec)
    store.upsert_endpoint(
        spec.name, description=spec.description, usage_notes=spec.usage_notes, owner=spec.owner,
        fallback=spec.fallback or "", actor=actor,
    )
    apply_access(spec, actor=actor)
    return _Rollout(spec=spec, actor=actor, plan=planned, live=live_revision(spec.name), t0=t0)


def already_live(ro: _Rollout) -> DeployResult | None:
    """The `unchanged` result when the planned revision is live on enough healthy replicas, else None."""
    if not ro.same:
        return None
    up = [r for r in store.list_replicas(ro.name) if r.state == "up" and healthy(r)]
    if not (up and len(up) >= rows_per_revision(ro.spec) and store.get_endpoint(ro.name).status == "active"):
        return None
    ro.record("deploy.noop", {"revision": ro.short, "replicas": len(up)})
    return ro.result(
        "unchanged",
        f"revision {ro.short} is already live on {len(up)} healthy replica(s); "
        "nothing to do (change the spec, or pass --force to restart it)",
    )


def record_revision(ro: _Rollout) -> None:
    """The planned revision's row (pending) and its deploy.plan audit entry."""
    p = ro.plan
    rev = store.add_revision(
        ro.name,
        p.identity,
        served_model_name=p.served_model_name,
        adapters=p.adapters,
        model_version=p.model_version,
        status="pending",
        actor=ro.actor,
    )
    ro.rev_id = rev.id
    if p.sizing is not None and (rev.facts or {}).get("sizing") != p.sizing.facts():
        store.set_revision_facts(ro.name, rev.id, "sizing", p.sizing.facts(), actor=ro.actor)
    ro.record(
        "deploy.plan",
        {
            "revision": ro.short,
            "model_version": p.model_version,
            "base_version": p.base_version,
            "served_model_name": p.served_model_name,
            "tool_calling": p.tool_calling,
            "runtime": p.runtime,
            "args": p.vllm.to_cli()[2:],
        },
        before={"revision": ro.old_hash[:12] if ro.old_hash else None},
        model_version=p.model_version,
    )


def size_plan(plan: RevisionPlan, spec: EndpointSpec) -> SizingOutcome:
    """The fit gate on the values planning applied (plan.sizing); a plan without them is sized from the spec."""
    estimate = plan.estimate or size_model(plan.model_dir, sizing_request(spec))
    chosen = estimate.recommendation.tier
    if not estimate.fits:
        why = estimate.refusal
        reason = f"does not fit hardware {chosen!r}" + (f": {why}" if why else "")
        return SizingOutcome(fits=False, tier=chosen, explanation=estimate.explanation, reason=reason)
    if spec.target == "local" and estimate.recommendation.gpus > 0 and not has_cuda_gpu():
        return SizingOutcome(
            fits=False,
            tier=chosen,
            explanation=estimate.explanation,
            reason=f"hardware {chosen!r} is a GPU tier, but this machine has no GPU "
            "(nvidia-smi lists none); use hardware: cpu or auto here",
        )
    return SizingOutcome(
        fits=True,
        tier=chosen,
        explanation=estimate.explanation,
        kv_capacity_tokens=estimate.kv_capacity_tokens,
        weight_bytes=estimate.weight_bytes,
        overhead_bytes=estimate.overhead_bytes,
    )


def size(ro: _Rollout) -> SizingOutcome:
    """Size: a refused request (bad tier, bad value) fails the revision and is raised; a misfit is returned."""
    try:
        sizing = size_plan(ro.plan, ro.spec)
    except ConfigError as exc:
        ro.set_status("failed", f"sizing refused it: {exc}")
        ro.record("deploy.size", {"fits": False, "error": str(exc)})
        raise
    ro.record(
        "deploy.size",
        {
            "fits": sizing.fits,
            "tier": sizing.tier,
            "reason": sizing.reason,
            "kv_capacity_tokens": sizing.kv_capacity_tokens,
        },
    )
    return sizing


def refuse(ro: _Rollout, sizing: SizingOutcome) -> DeployResult:
    """A revision that does not fit: failed before anything started."""
    ro.set_status("failed", sizing.reason)
    return ro.result(
        "refused",
        f"revision {ro.short} {sizing.reason}; nothing was started"
        f"{' and the old revision keeps serving' if ro.old_hash else ''}",
        sizing_markdown=sizing.explanation,
    )


def start(ro: _Rollout) -> None:
    """Start: place every replica of the revision on GPUs, then start it; a replica that cannot be placed or
    started fails the revision, and the old one keeps serving."""
    ro.set_status("starting", "")
    try:
        ro.target = target_for(ro.spec)
        ro.replicas, ro.row_ids = start_replicas(
            ro.plan, ro.rev_id, rows_per_revision(ro.spec), actor=ro.actor, register=not ro.same, target=ro.target,
            env=ro.env,
        )
    except Exception as exc:
        why = "placement refused it" if isinstance(exc, PlacementError) else "replica start failed"
        ro.set_status("failed", f"{why}: {exc}"[:2000])
        ro.record("deploy.start", {"ok": False, "error": str(exc)[:2000]})
        if not isinstance(exc, ReplicaStartError):
            raise
        raise DeployStartError(f"revision {ro.short} failed to start; {ro.old_keeps}: {exc}") from exc
    ro.record(
        "deploy.start",
        {
            "ok": True,
            "replicas": [
                {"url": r.base_url, "pid": r.pid, "kv_cache_tokens": r.kv_cache_tokens,
                 "startup_seconds": r.startup_seconds}
                for r in ro.replicas
            ],
        },
    )


def smoke(ro: _Rollout) -> list[SmokeReport]:
    """Smoke: every new replica, as the gateway will call it."""
    p = ro.plan
    reports = [
        run_smoke(r.base_url, p.served_model_name, ro.spec.smoke, tool_calling=p.vllm.enable_auto_tool_choice,
                  tool_call_parser=p.tool_call_parser)
        for r in ro.replicas
    ]
    ro.record(
        "deploy.smoke",
        {
            "passed": all(rp.passed for rp in reports),
            "replicas": [
                {
                    "url": rp.base_url,
                    "checks": [
                        {"name": c.name, "passed": c.passed, "detail": c.detail, "seconds": c.seconds}
                        for c in rp.checks
                    ],
                }
                for rp in reports
            ],
        },
    )
    return reports


def discard(ro: _Rollout, reports: list[SmokeReport], sizing: SizingOutcome) -> DeployResult:
    """A failed smoke test: stop the new replicas, fail the revision (unless it is the live one)."""
    failed = sorted({f"{c.name}: {c.detail}" for rp in reports for c in rp.failures()})
    assert ro.target is not None  # set by start()
    for r in ro.replicas:
        ro.target.stop(r)
    for rid in ro.row_ids:
        store.set_replica_state(rid, "stopped", actor=ro.actor)
    reason = "smoke test failed: " + "; ".join(failed)
    if not ro.same:
        ro.set_status("failed", reason)
    ro.record("deploy.failed", {"reason": reason})
    return ro.result(
        "failed",
        f"revision {ro.short} {reason}; new replicas stopped; {ro.old_keeps}",
        smoke=reports,
        replicas=ro.replicas,
        sizing_markdown=sizing.explanation,
    )


def switch(ro: _Rollout) -> list[store.ReplicaRow]:
    """Switch: mark the new replicas up, then point the route at the revision (one epoch bump each).

    Returns the rows to drain: the old revision's, or (restarting the live revision) its previous replicas.
    """
    name, actor = ro.name, ro.actor
    if ro.same:
        old_rows = [r for r in store.list_replicas(name, ro.rev_id) if r.state not in ("stopped", "failed")]
        for r in ro.replicas:
            register_replica(ro.plan, ro.rev_id, r, "up", actor)
    else:
        live_rows = store.list_replicas(name, ro.live.id) if ro.live else []
        old_rows = [r for r in live_rows if r.state not in ("stopped", "failed")]
        for rid in ro.row_ids:
            store.set_replica_state(rid, "up", actor=actor)
    store.set_live_revision(name, ro.rev_id, reason="smoke tests passed", actor=actor)
    ro.set_status("live", "smoke tests passed")
    if store.get_endpoint(name).status != "active":
        store.upsert_endpoint(name, status="active", actor=actor)
    return old_rows


def drain(ro: _Rollout, old_rows: list[store.ReplicaRow]) -> list[DrainReport]:
    """Drain: stop the replaced replicas once no request is in flight on them."""
    if not old_rows:
        return []
    drained = drain_and_stop(ro.name, old_rows, actor=ro.actor)
    ro.record(
        "deploy.drain",
        {"revision": ro.short, "drained": [d.model_dump() for d in drained]},
        before={"revision": ro.old_hash[:12] if ro.old_hash else None},
    )
    return drained


def deploy_external(spec: EndpointSpec, *, actor: str, force: bool = False) -> DeployResult:
    """An external endpoint: record its revision (no replicas, no smoke: the key lives on the gateway host) and
    route to it; replicas of a self-hosted revision it replaces are drained."""
    t0 = time.monotonic()
    store.upsert_endpoint(spec.name, description=spec.description, usage_notes=spec.usage_notes, owner=spec.owner,
                          fallback="", actor=actor)
    apply_access(spec, actor=actor)
    p = plan_external(spec)
    live = live_revision(spec.name)
    short, old = p.content_hash[:12], (live.content_hash[:12] if live else None)
    ext = p.external
    where = f"{ext['provider']} {ext['model']} at {ext['base_url']}"

    def result(outcome: Outcome, message: str, **kw: Any) -> DeployResult:
        return DeployResult(endpoint=spec.name, revision=short, outcome=outcome, message=message, previous=old,
                            seconds=round(time.monotonic() - t0, 1), **kw)

    same = live is not None and live.content_hash == p.content_hash
    if same and not force and store.get_endpoint(spec.name).status == "active":
        return result("unchanged", f"revision {short} already routes to {where}; nothing to do")
    rev = store.add_revision(spec.name, p.identity, served_model_name=p.served_model_name, status="pending",
                             actor=actor)
    audit.record(actor, "deploy.plan", f"endpoint:{spec.name}", before={"revision": old},
                 after={"revision": short, "external": {k: v for k, v in ext.items() if k != "dialects"}},
                 endpoint=spec.name, revision=short)
    old_rows = [r for r in store.list_replicas(spec.name, live.id) if r.state not in ("stopped", "failed")] \
        if live is not None and not same else []
    store.set_live_revision(spec.name, rev.id, reason=f"external: {where}", actor=actor)
    if store.get_endpoint(spec.name).status != "active":
        store.upsert_endpoint(spec.name, status="active", actor=actor)
    drained = drain_and_stop(spec.name, old_rows, actor=actor) if old_rows else []
    key = ext["api_key_env"] or ext["api_key_file"]
    return result("live", f"revision {short} is live: the gateway routes {spec.name!r} to {where}, with the key "
                  f"from {key} on the gateway host", drain=drained)


def _live_message(ro: _Rollout) -> str:
    ray = ro.spec.target == "ray"
    where = f"Ray Serve application {ro.replicas[0].name}" if ray else f"{len(ro.replicas)} replica(s)"
    drained = f"; {ro.old_hash[:12]} drained and stopped" if ro.old_hash and not ro.same else ""
    return f"revision {ro.short} is live on {where}{drained}"
