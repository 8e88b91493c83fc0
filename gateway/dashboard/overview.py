"""The Overview tab: an endpoint's revisions (spec, vLLM arguments, who made each live), smoke runs and events."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml
from sqlalchemy import Engine

from tasks.store.routes import audit_entries, get_endpoint, list_revisions


@dataclass
class RevisionRow:
    id: int
    hash: str
    status: str
    live: bool
    model_version: str | None
    served_model_name: str
    created_by: str
    created_at: datetime
    reason: str | None
    deployed_by: str | None = None
    deployed_at: str | None = None
    spec_yaml: str = ""
    vllm_args: str | None = None
    runtime: str | None = None
    tool_calling: str | None = None
    sizing: str | None = None


@dataclass
class SmokeRun:
    ts: str
    actor: str
    revision: str | None
    passed: bool
    replicas: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Overview:
    name: str
    status: str
    owner: str | None
    description: str | None
    usage_notes: str | None
    live: RevisionRow | None
    revisions: list[RevisionRow]
    smoke: list[SmokeRun]
    events: list[dict[str, Any]]


def _loads(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def render_spec(spec: dict[str, Any]) -> tuple[str, str | None, str | None, str | None]:
    """(spec as YAML, vLLM args line, runtime, tool-calling decision) of a stored revision spec.

    Deployed revisions store the plan's identity ({"spec": ..., "vllm": ..., "runtime": ...}); attached
    servers store a small dict, shown as it is.
    """
    inner = spec.get("spec") if isinstance(spec.get("spec"), dict) else spec
    text = yaml.safe_dump(inner, sort_keys=False, default_flow_style=False, allow_unicode=True).strip()
    vllm = spec.get("vllm") if isinstance(spec.get("vllm"), dict) else None
    args = None
    if vllm:
        parts = []
        for k, v in vllm.items():
            if v in (None, False, "", [], {}) or k in ("extra_args",):
                continue
            flag = "--" + k.replace("_", "-")
            if v is True:
                parts.append(flag)
            elif isinstance(v, dict):
                parts.append(f"{flag} " + " ".join(f"{a}={b}" for a, b in v.items()))
            else:
                parts.append(f"{flag} {v}")
        parts += [str(a) for a in vllm.get("extra_args") or []]
        args = " ".join(parts)
    return text, args, spec.get("runtime"), spec.get("tool_calling")


def sizing_line(facts: dict[str, Any] | None) -> str | None:
    """A revision's applied sizing (its `sizing` facts) in one line, naming what sizing chose for the spec."""
    sz = (facts or {}).get("sizing")
    if not isinstance(sz, dict):
        return None
    parts = [f"tier {sz.get('tier')}", f"TP {sz.get('tensor_parallel_size')}"]
    if sz.get("max_model_len"):
        parts.append(f"max_model_len {int(sz['max_model_len']):,}")
    parts += [f"KV {sz.get('kv_cache_dtype')}", f"max_num_seqs {sz.get('max_num_seqs')}"]
    auto = sz.get("source") or []
    return " · ".join(parts) + (f" (sizing chose {', '.join(auto)}; the spec left them auto)" if auto else "")


def overview_of(engine: Engine, name: str) -> Overview:
    e = get_endpoint(name, engine=engine)
    entries = audit_entries(endpoint=name, engine=engine)
    # who made each revision live, and when: the route changes in the audit log
    went_live: dict[str, tuple[str, str]] = {}
    for a in entries:
        if a.action == "endpoint.route":
            after = _loads(a.after) or {}
            h = after.get("live_revision") if isinstance(after, dict) else None
            if h:
                went_live[h] = (a.actor, a.ts)
    revisions = []
    for rev in reversed(list_revisions(name, engine=engine)):
        text, args, runtime, tools = render_spec(rev.spec or {})
        by, at = went_live.get(rev.content_hash[:12], (None, None))
        revisions.append(
            RevisionRow(
                rev.id,
                rev.content_hash[:12],
                rev.status,
                rev.id == e.live_revision_id,
                rev.model_version,
                rev.served_model_name,
                rev.created_by,
                rev.created_at,
                rev.reason,
                by,
                _short_ts(at),
                text,
                args,
                runtime,
                tools,
                sizing_line(rev.facts),
            )
        )
    smoke = []
    for a in reversed(entries):
        if a.action != "deploy.smoke":
            continue
        after = _loads(a.after) or {}
        links = _loads(a.links) or {}
        smoke.append(
            SmokeRun(
                _short_ts(a.ts) or a.ts,
                a.actor,
                links.get("revision"),
                bool(after.get("passed")),
                list(after.get("replicas") or []),
            )
        )
    events = [
        {
            "ts": _short_ts(a.ts),
            "actor": a.actor,
            "action": a.action,
            "subject": a.subject,
            "revision": (_loads(a.links) or {}).get("revision"),
        }
        for a in reversed(entries[-30:])
    ]
    live = next((r for r in revisions if r.live), None)
    return Overview(e.name, e.status, e.owner, e.description, e.usage_notes, live, revisions, smoke[:10], events)


def _short_ts(iso: str | None) -> str | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso

