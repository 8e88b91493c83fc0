"""Promotion: decide with a policy on paired eval evidence, change what serves, then move MLflow aliases; audited.

The aliases follow MLflow's convention: `champion` is the version that serves, `challenger` the candidate under
test, `previous-champion` the champion a promotion replaced (what rollback restores). Serving changes first and
the alias moves only once it succeeded, so the registry never names a champion nothing serves.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from tasks.core.errors import ConfigError, PromotionError
from tasks.core.tracking import mlflow_client
from tasks.deploy.promoted import ServingChange, serve_version
from tasks.deploy.spec import EndpointSpec
from tasks.evaluate.compare import Comparison, MetricComparison
from tasks.store import audit


class PromotionPolicy(BaseModel):
    """When a candidate may replace the champion. Intervals come from the paired bootstrap of the comparison."""

    suite: str | None = Field(default=None, description=(
        "Eval suite the evidence must come from (its metric names are this policy's); None accepts any suite."))
    must_improve: list[str] = Field(default_factory=lambda: ["accuracy"],
                                    description="Metrics whose paired difference must be > min_improvement.")
    min_improvement: float = Field(default=0.0, ge=0, description="Lower CI bound of the gain must exceed this.")
    guards: dict[str, float] = Field(default_factory=dict,
                                     description="Metric -> largest allowed drop (lower CI bound >= -drop).")
    guard_others: float | None = Field(default=0.05, ge=0,
                                       description="Allowed drop for every other metric; None = no guard.")
    confidence: float = Field(default=0.95, gt=0.5, lt=1, description=(
        "Level of the paired bootstrap intervals every improvement and guard is judged on."))
    max_latency_p95_ratio: float | None = Field(default=2.0, gt=0, description="Candidate p95 / champion p95.")
    max_latency_p95_s: float | None = Field(default=None, gt=0)


class PolicyCheck(BaseModel):
    name: str
    ok: bool
    detail: str


class Decision(BaseModel):
    promote: bool
    summary: str
    checks: list[PolicyCheck]

    def markdown(self) -> str:
        rows = [f"| {c.name} | {'ok' if c.ok else '**fails**'} | {c.detail} |" for c in self.checks]
        head = "**PROMOTE**" if self.promote else "**KEEP CHAMPION**"
        return "\n".join([f"{head}: {self.summary}", "", "| rule | result | numbers |", "|---|---|---|", *rows])


def _find(metrics: list[MetricComparison], name: str) -> MetricComparison:
    for m in metrics:
        if m.name == name:
            return m
    raise ConfigError("policy.metric", name, f"use one of the suite's metrics: {', '.join(m.name for m in metrics)}")


def decide(cmp: Comparison, policy: PromotionPolicy) -> Decision:
    """Promote only when every must-improve metric gains at the policy's confidence and no guard fires.

    The intervals are the comparison's paired bootstrap read at `policy.confidence`; evidence from a suite
    other than `policy.suite` (when set) is refused.
    """
    if policy.suite is not None and cmp.suite != policy.suite:
        raise ConfigError("policy.suite", policy.suite, f"the evidence is from suite {cmp.suite!r}; compare on "
                          f"{policy.suite!r}, or set policy.suite to {cmp.suite!r} (or None for any suite)")
    checks: list[PolicyCheck] = []
    for name in policy.must_improve:
        m = _find(cmp.metrics, name)
        d = m.diff_at(policy.confidence)
        ok = math.isfinite(d.low) and d.low > policy.min_improvement
        checks.append(PolicyCheck(name=f"{name} improves", ok=ok, detail=(
            f"{m.candidate.value:.3f} vs {m.baseline.value:.3f}: diff {d.value:+.3f}, "
            f"{policy.confidence:.0%} CI [{d.low:+.3f}, {d.high:+.3f}] must be > {policy.min_improvement:g}")))
    guarded = dict(policy.guards)
    if policy.guard_others is not None:
        for m in cmp.metrics:
            if m.name not in policy.must_improve:
                guarded.setdefault(m.name, policy.guard_others)
    for name, drop in sorted(guarded.items()):
        d = _find(cmp.metrics, name).diff_at(policy.confidence)
        if not math.isfinite(d.low):
            continue
        checks.append(PolicyCheck(name=f"{name} guard", ok=d.low >= -drop, detail=(
            f"diff {d.value:+.3f}, CI low {d.low:+.3f} must be >= -{drop:g}")))
    cand_p95, base_p95 = cmp.candidate.stats.latency_p95_s, cmp.baseline.stats.latency_p95_s
    if policy.max_latency_p95_ratio is not None and cand_p95 and base_p95:
        r = cand_p95 / base_p95
        checks.append(PolicyCheck(name="latency p95 ratio", ok=r <= policy.max_latency_p95_ratio, detail=(
            f"{cand_p95:.3f}s / {base_p95:.3f}s = {r:.2f}x (limit {policy.max_latency_p95_ratio:g}x)")))
    if policy.max_latency_p95_s is not None and cand_p95 is not None:
        checks.append(PolicyCheck(name="latency p95", ok=cand_p95 <= policy.max_latency_p95_s,
                                  detail=f"{cand_p95:.3f}s (limit {policy.max_latency_p95_s:g}s)"))
    failed = [c for c in checks if not c.ok]
    promote = not failed
    summary = ("candidate beats the champion under the policy" if promote
               else "; ".join(f"{c.name}: {c.detail}" for c in failed))
    return Decision(promote=promote, summary=summary, checks=checks)


CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


class PromotionRecord(BaseModel):
    model: str
    champion: str
    previous: str | None
    forced: bool
    at: datetime
    endpoint: str | None = None
    revision: str | None = None
    serving: ServingChange | None = Field(default=None, description="How the endpoint came to serve it.")
    merge_log: str | None = Field(default=None, description=(
        "serve_promoted: merged: the log of the background merge-and-redeploy that was started."))


def current_aliases(name: str) -> dict[str, str]:
    rm = mlflow_client().get_registered_model(name)
    return {k: str(v) for k, v in (rm.aliases or {}).items()}


def _check_version(name: str, version: str) -> None:
    try:
        mlflow_client().get_model_version(name, str(version))
    except Exception as exc:
        raise ConfigError(
            "version", f"{name}/{version}", f"register it first; see `llmhost models show {name}`"
        ) from exc


def mark_challenger(name: str, version: str, *, actor: str) -> None:
    """`challenger` -> the candidate now under test; audited."""
    _check_version(name, version)
    before = current_aliases(name).get(CHALLENGER)
    if before == str(version):
        return
    mlflow_client().set_registered_model_alias(name, CHALLENGER, str(version))
    audit.record(actor, "alias.challenger", f"model:{name}", before={CHALLENGER: before},
                 after={CHALLENGER: str(version)})


def move_aliases(name: str, version: str, *, actor: str, forced: bool = False,
                 evidence: dict[str, Any] | None = None) -> PromotionRecord:
    """champion -> version, previous-champion -> the replaced champion; one audit entry links the evidence.

    A `challenger` alias on the promoted version goes: it is no longer under test.
    """
    _check_version(name, version)
    client = mlflow_client()
    before = current_aliases(name)
    previous = before.get(CHAMPION)
    if previous == str(version):
        raise PromotionError(f"{name}/{version} is already the champion: nothing to promote")
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if previous is not None:
        client.set_registered_model_alias(name, PREVIOUS, previous)
    if before.get(CHALLENGER) == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)
    keys = (CHAMPION, CHALLENGER, PREVIOUS)
    audit.record(actor, "promote.forced" if forced else "promote", f"model:{name}",
                 before={k: before.get(k) for k in keys}, after={k: v for k, v in current_aliases(name).items()
                                                                  if k in keys},
                 **(evidence or {}))
    return PromotionRecord(model=name, champion=str(version), previous=previous, forced=forced,
                           at=datetime.now(UTC))


def promote(name: str, version: str, spec: EndpointSpec, *, actor: str, forced: bool = False,
            evidence: dict[str, Any] | None = None) -> PromotionRecord:
    """Serve `version` on the spec's endpoint, then move the aliases: one audited step, in that order.

    An adapter the live replicas already run (the lifecycle hot-loads the candidate to evaluate it) is served by
    a route switch with no restart; anything else by a blue/green deploy. If serving fails, the aliases stay.
    With `serve_promoted: merged`, merged weights then replace an adapter in the background
    (`tasks.promote_merged`).
    """
    _check_version(name, version)
    if current_aliases(name).get(CHAMPION) == str(version):
        raise PromotionError(f"{name}/{version} is already the champion: nothing to promote")
    serving = serve_version(spec, f"models:/{name}/{version}", actor=actor)
    links = {**(evidence or {}), "endpoint": spec.name, "revision": serving.revision,
             "serving": serving.method, "serving_seconds": serving.seconds, "restarted": serving.restarted}
    record = move_aliases(name, version, actor=actor, forced=forced, evidence=links)
    record = record.model_copy(update={"endpoint": spec.name, "revision": serving.revision, "serving": serving})
    if spec.serve_promoted == "merged" and _is_adapter(name, version):
        from tasks.promote_merged import start_merged_rollout  # it imports this module

        record.merge_log = start_merged_rollout(name, version, spec, actor=actor).log_path
    return record


def _is_adapter(name: str, version: str) -> bool:
    return dict(mlflow_client().get_model_version(name, str(version)).tags).get("adapter") == "true"


def rollback_aliases(name: str, *, actor: str) -> PromotionRecord:
    """Restores the previous champion (the `previous-champion` alias) as champion; the two swap."""
    before = current_aliases(name)
    if PREVIOUS not in before:
        raise PromotionError(f"{name} has no {PREVIOUS} alias: there is no previous champion to restore")
    client = mlflow_client()
    client.set_registered_model_alias(name, CHAMPION, before[PREVIOUS])
    if CHAMPION in before:
        client.set_registered_model_alias(name, PREVIOUS, before[CHAMPION])
    audit.record(actor, "rollback", f"model:{name}", before=before,
                 after={CHAMPION: before[PREVIOUS], PREVIOUS: before.get(CHAMPION)})
    return PromotionRecord(model=name, champion=before[PREVIOUS], previous=before.get(CHAMPION),
                           forced=False, at=datetime.now(UTC))


class AliasChange(BaseModel):
    """One audited move of a model's aliases: who, when, why (the action) and each alias before -> after."""

    ts: str
    actor: str
    action: str
    changes: dict[str, tuple[str | None, str | None]] = Field(description="alias -> (version before, after).")
    endpoint: str | None = None


ALIAS_ACTIONS = ("promote", "promote.forced", "promote.initial", "rollback", "alias.challenger")


def alias_history(name: str) -> list[AliasChange]:
    """Every audited alias move of model `name`, oldest first, read back from the audit chain."""
    out: list[AliasChange] = []
    for e in audit.entries():
        if e.subject != f"model:{name}" or e.action not in ALIAS_ACTIONS:
            continue
        before = json.loads(e.before) if e.before else {}
        after = json.loads(e.after) if e.after else {}
        before, after = before if isinstance(before, dict) else {}, after if isinstance(after, dict) else {}
        changes = {k: (_str(before.get(k)), _str(after.get(k))) for k in sorted({*before, *after})
                   if _str(before.get(k)) != _str(after.get(k))}
        out.append(AliasChange(ts=e.ts, actor=e.actor, action=e.action, changes=changes,
                               endpoint=_links(e).get("endpoint")))
    return out


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def _links(entry: Any) -> dict[str, Any]:
    out = json.loads(entry.links or "{}")
    if entry.endpoint:
        out.setdefault("endpoint", entry.endpoint)
    return out


class ServedAt(BaseModel):
    endpoint: str
    at: datetime
    revision: str | None
    model_version: str | None
    routed_at: str | None
    routed_by: str | None
    promotion: dict[str, Any] | None = Field(default=None, description="The promotion entry and its eval runs.")


def served_at(endpoint: str, at: datetime) -> ServedAt:
    """What served `endpoint` at `at`, and on which eval evidence: read back from the audit chain."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    stamp = at.isoformat()
    route = None
    promos: list[Any] = []
    for e in audit.entries(endpoint=None):
        if e.ts > stamp:
            break
        if e.action == "endpoint.route" and e.endpoint == endpoint:
            route = e
        if e.action.startswith("promote") or e.action == "rollback":
            promos.append(e)
    model_name = (_links(route).get("model_version") or "").split("/")[0] if route is not None else ""
    related = [p for p in promos if p.endpoint == endpoint or (model_name and p.subject == f"model:{model_name}")]
    promo = related[-1] if related else None
    if route is None:
        return ServedAt(endpoint=endpoint, at=at, revision=None, model_version=None, routed_at=None, routed_by=None)
    links = _links(route)
    return ServedAt(endpoint=endpoint, at=at, revision=links.get("revision"), model_version=links.get("model_version"),
                    routed_at=route.ts, routed_by=route.actor,
                    promotion=None if promo is None else {"action": promo.action, "ts": promo.ts,
                                                          "actor": promo.actor, "subject": promo.subject,
                                                          "after": promo.after, **_links(promo)})
