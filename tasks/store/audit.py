"""Append-only, hash-chained audit log in the store.

Each entry's hash is sha256(previous hash + canonical JSON of the entry, its sequence number included), so an
edited, deleted or reordered row breaks the chain from that row on and `verify()` names it. Truncating the
newest entries cannot be seen from the table alone; keep `verify()`'s head hash elsewhere if that matters.
Deploy, promote and rollback call `record(...)` just as key and access changes do.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tasks.core.errors import LlmhostError
from tasks.store.schema import AuditEntry, get_engine, session_scope

GENESIS = "0" * 64
_SECRET_FIELDS = re.compile(r"(secret|password|passwd|token|api_key|apikey|raw_key|authorization)$", re.I)
_RAW_KEY = re.compile(r"llmh-([0-9a-f]{8})-[A-Za-z0-9_\-]{20,}")
_append_lock = threading.Lock()


class AuditError(LlmhostError):
    """The audit chain does not verify, or an entry could not be appended."""


def default_actor() -> str:
    """Who is acting: LLMHOST_ACTOR, else the OS user."""
    actor = os.environ.get("LLMHOST_ACTOR")
    if actor:
        return actor
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def scrub(value: Any) -> Any:
    """Defence in depth: secrets never reach the log, even if a caller passes one by mistake."""
    if isinstance(value, dict):
        return {k: "[redacted]" if isinstance(k, str) and _SECRET_FIELDS.search(k) and v is not None
                else scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return _RAW_KEY.sub(r"llmh-\1-[redacted]", value)
    return value


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def _body(seq: int, ts: str, actor: str, action: str, subject: str, endpoint: str | None, before: str | None,
          after: str | None, links: str, prev: str) -> str:
    return _canon({"seq": seq, "ts": ts, "actor": actor, "action": action, "subject": subject,
                   "endpoint": endpoint, "before": before, "after": after, "links": links, "prev": prev})


def entry_hash(e: AuditEntry) -> str:
    body = _body(e.seq, e.ts, e.actor, e.action, e.subject, e.endpoint, e.before, e.after, e.links,
                 e.prev_hash)
    return hashlib.sha256((e.prev_hash + "\n" + body).encode()).hexdigest()


def _append(s: Session, actor: str, action: str, subject: str, before: Any, after: Any,
            links: dict[str, Any]) -> AuditEntry:
    last = s.execute(select(AuditEntry.seq, AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1)).first()
    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    clean_links = {k: v for k, v in scrub(links).items() if v is not None}
    endpoint = clean_links.get("endpoint")
    entry = AuditEntry(
        seq=seq, ts=datetime.now(UTC).isoformat(timespec="microseconds"), actor=scrub(actor), action=action,
        subject=scrub(subject), endpoint=str(endpoint) if endpoint is not None else None,
        before=_canon(scrub(before)) if before is not None else None,
        after=_canon(scrub(after)) if after is not None else None,
        links=_canon(clean_links), prev_hash=prev, hash="",
    )
    entry.hash = entry_hash(entry)
    s.add(entry)
    s.flush()
    return entry


def record(
    actor: str | None,
    action: str,
    subject: str,
    before: Any = None,
    after: Any = None,
    *,
    session: Session | None = None,
    engine: Engine | None = None,
    **links: Any,
) -> AuditEntry:
    """Append one entry. Pass `session` to commit it atomically with the change it describes.

    `links` name related things for filtering and reading (endpoint=, revision=, model_version=, run_id=...).
    """
    actor = actor or default_actor()
    if session is not None:
        return _append(session, actor, action, subject, before, after, links)
    last_exc: Exception | None = None
    # Another process may take the same sequence number between our read and insert; the primary key
    # refuses the second one, and we retry on the new head.
    for _ in range(8):
        try:
            with _append_lock, session_scope(engine or get_engine()) as s:
                return _append(s, actor, action, subject, before, after, links)
        except IntegrityError as exc:
            last_exc = exc
    raise AuditError(f"could not append audit entry {action!r} after 8 tries ({last_exc}); retry the command")


@dataclass(frozen=True)
class Verification:
    ok: bool
    entries: int
    head: str
    bad_seq: int | None = None
    problem: str | None = None

    def summary(self) -> str:
        if self.ok:
            return f"audit chain OK: {self.entries} entries, head {self.head[:16]}"
        return f"audit chain BROKEN at seq {self.bad_seq}: {self.problem}"


def verify(*, engine: Engine | None = None) -> Verification:
    """Walk the chain in order; the first entry whose hash, link or sequence does not match breaks it."""
    prev, expected_seq, n = GENESIS, 1, 0
    with session_scope(engine) as s:
        for e in s.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars():
            if e.seq != expected_seq:
                return Verification(False, n, prev, expected_seq,
                                    f"entry {expected_seq} is missing (next is {e.seq}): a row was deleted")
            if e.prev_hash != prev:
                return Verification(False, n, prev, e.seq,
                                    "prev_hash does not match the entry before: a row was replaced/removed")
            if entry_hash(e) != e.hash:
                return Verification(False, n, prev, e.seq,
                                    f"content does not match its hash: {e.action} {e.subject} was edited")
            prev, expected_seq, n = e.hash, expected_seq + 1, n + 1
    return Verification(True, n, prev)


def entries(*, endpoint: str | None = None, action: str | None = None, limit: int | None = None,
            engine: Engine | None = None) -> list[AuditEntry]:
    """Newest last; `limit` keeps the newest N."""
    with session_scope(engine) as s:
        q = select(AuditEntry)
        if endpoint:
            q = q.where(AuditEntry.endpoint == endpoint)
        if action:
            q = q.where(AuditEntry.action.startswith(action))
        q = q.order_by(AuditEntry.seq.desc())
        if limit:
            q = q.limit(limit)
        return list(reversed(s.execute(q).scalars().all()))


def count(*, engine: Engine | None = None) -> int:
    with session_scope(engine) as s:
        return int(s.execute(select(func.count()).select_from(AuditEntry)).scalar_one())
