"""The control-plane store: users, teams, API keys, endpoints, revisions, replicas, grants, usage, audit.

SQLite under the state dir by default (`settings.store`), any SQLAlchemy URL where set. Lifecycle steps and
the gateway share it through the plain functions below; each takes an optional `engine` from `get_engine()`.
Every change to keys, access and routes writes an audit entry in the same transaction (see tasks.store.audit), and
bumps the `routes` epoch that the gateway checks per request, so revocations take effect immediately.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from tasks.core.errors import AccessError, ConfigError, DeployError, GatewayError
from tasks.core.settings import get_settings

KEY_PREFIX = "llmh"
_KEY_RE = re.compile(r"^llmh-([0-9a-f]{8})-([A-Za-z0-9_\-]{20,})$")
# scrypt cost: ~16 MiB and tens of ms per verify. Keys carry 256 random bits, so this is defence in depth
# against a leaked table; the gateway caches verified keys in memory so the cost is paid once per key.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
ROUTES_EPOCH = "routes"
ENDPOINT_STATUSES = ("active", "disabled", "stopped")
REVISION_STATUSES = ("pending", "starting", "deploying", "ready", "live", "retired", "failed", "stopped")
REPLICA_STATES = ("starting", "up", "down", "failed", "stopped")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC (SQLite keeps no zone) and hands back aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use datetime.now(UTC)")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """A key is stored as salt + scrypt hash; `prefix` is public and used for lookup and in usage rows."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True, index=True)
    salt: Mapped[str] = mapped_column(String(64))
    key_hash: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    team_id: Mapped[int | None] = mapped_column(ForeignKey("teams.id"))
    description: Mapped[str | None] = mapped_column(String(500))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Endpoint(Base):
    __tablename__ = "endpoints"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    usage_notes: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(32), default="active")
    live_revision_id: Mapped[int | None] = mapped_column(
        ForeignKey("endpoint_revisions.id", use_alter=True, name="fk_endpoint_live_revision")
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class EndpointRevision(Base):
    """One immutable config of an endpoint, identified by the hash of its spec."""

    __tablename__ = "endpoint_revisions"
    __table_args__ = (UniqueConstraint("endpoint_id", "content_hash"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("endpoints.id"), index=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    served_model_name: Mapped[str] = mapped_column(String(300))
    adapters: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    model_version: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(32), default="pending")
    reason: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ReplicaRow(Base):
    __tablename__ = "replicas"
    __table_args__ = (UniqueConstraint("revision_id", "base_url"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    revision_id: Mapped[int] = mapped_column(ForeignKey("endpoint_revisions.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    target: Mapped[str] = mapped_column(String(64), default="local")
    base_url: Mapped[str] = mapped_column(String(500))
    served_model_name: Mapped[str] = mapped_column(String(300))
    state: Mapped[str] = mapped_column(String(32), default="starting")
    kv_cache_tokens: Mapped[int | None] = mapped_column(Integer)
    pid: Mapped[int | None] = mapped_column(Integer)
    log_path: Mapped[str | None] = mapped_column(String(1000))
    managed: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class AccessGrant(Base):
    """Endpoint x (user | team). Exactly one of user_id / team_id is set."""

    __tablename__ = "access_grants"
    __table_args__ = (UniqueConstraint("endpoint_id", "user_id", "team_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("endpoints.id"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    team_id: Mapped[int | None] = mapped_column(ForeignKey("teams.id"))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UsageRecord(Base):
    """One gateway request. Names are denormalised so that rows outlive renamed or deleted keys."""

    __tablename__ = "usage_records"
    id: Mapped[int] = mapped_column(primary_key=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    key_prefix: Mapped[str | None] = mapped_column(String(16), index=True)
    user: Mapped[str | None] = mapped_column(String(200))
    team: Mapped[str | None] = mapped_column(String(200))
    endpoint: Mapped[str | None] = mapped_column(String(200), index=True)
    adapter: Mapped[str | None] = mapped_column(String(200))
    revision_id: Mapped[int | None] = mapped_column(Integer)
    replica_id: Mapped[int | None] = mapped_column(Integer)
    route: Mapped[str] = mapped_column(String(64))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    status_code: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)


class AuditEntry(Base):
    """Append-only, hash-chained: `hash` = sha256(prev_hash + canonical body). See tasks.store.audit."""

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ts: Mapped[str] = mapped_column(String(40))
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100), index=True)
    subject: Mapped[str] = mapped_column(String(300))
    endpoint: Mapped[str | None] = mapped_column(String(200), index=True)
    before: Mapped[str | None] = mapped_column(Text)
    after: Mapped[str | None] = mapped_column(Text)
    links: Mapped[str] = mapped_column(Text, default="{}")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class DeployLease(Base):
    """One deploy at a time per endpoint: held from plan to drain; its own table so old stores gain it."""

    __tablename__ = "deploy_leases"
    endpoint: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(300))
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Meta(Base):
    """Small counters; `routes` is bumped by every key/access/route change so gateways reload their caches."""

    __tablename__ = "meta"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


# ---------------------------------------------------------------------------------------------------------
# Engine and sessions

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the gateway's usage writer and the CLI work side by side; busy_timeout waits, not fails.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def get_engine(url: str | None = None) -> Engine:
    """The engine for `url` (default `settings.store`), created once per URL with tables in place."""
    url = url or get_settings().store
    with _engines_lock:
        engine = _engines.get(url)
        if engine is not None:
            return engine
        if url.startswith("sqlite:///"):
            path = url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        except Exception as exc:  # bad URL or missing driver
            raise ConfigError("LLMHOST_STORE_URL", url, f"not a usable SQLAlchemy URL ({exc})") from exc
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(engine)
        with Session(engine) as s, s.begin():
            if s.get(Meta, ROUTES_EPOCH) is None:
                s.add(Meta(name=ROUTES_EPOCH, value=0))
        _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """Close every cached engine (tests switch state dirs)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session in one transaction, committed on success; objects stay readable after commit."""
    maker = sessionmaker(bind=engine or get_engine(), expire_on_commit=False)
    with maker() as s, s.begin():
        yield s


def bump_epoch(s: Session) -> None:
    s.execute(update(Meta).where(Meta.name == ROUTES_EPOCH).values(value=Meta.value + 1))


def routes_epoch(engine: Engine | None = None) -> int:
    with (engine or get_engine()).connect() as c:
        return int(c.execute(select(Meta.value).where(Meta.name == ROUTES_EPOCH)).scalar_one())


def _audit(s: Session, actor: str, action: str, subject: str, before: Any, after: Any, **links: Any) -> None:
    from tasks.store import audit  # audit imports this package; import here to keep the cycle one-way at load

    audit.record(actor, action, subject, before, after, session=s, **links)


# ---------------------------------------------------------------------------------------------------------
# Durations


_DUR_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_DUR_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, *, field_name: str = "duration") -> timedelta:
    """'90s', '15m', '1h', '30d', '2w' -> timedelta."""
    m = _DUR_RE.match(text or "")
    if not m:
        raise ConfigError(field_name, text, "use a number and a unit of s, m, h, d or w, e.g. 30d or 1h")
    return timedelta(seconds=float(m.group(1)) * _DUR_UNITS[m.group(2)])


# ---------------------------------------------------------------------------------------------------------
# Users, teams, keys


def _get_or_create(s: Session, model: type[User] | type[Team], name: str) -> Any:
    if not name or not name.strip():
        raise ConfigError(model.__tablename__[:-1], name, "give a non-empty name")
    row = s.execute(select(model).where(model.name == name)).scalar_one_or_none()
    if row is None:
        row = model(name=name)
        s.add(row)
        s.flush()
    return row


def ensure_user(name: str, *, engine: Engine | None = None) -> User:
    with session_scope(engine) as s:
        return _get_or_create(s, User, name)


def ensure_team(name: str, *, engine: Engine | None = None) -> Team:
    with session_scope(engine) as s:
        return _get_or_create(s, Team, name)


def hash_secret(secret: str, salt: str) -> str:
    digest = hashlib.scrypt(secret.encode(), salt=bytes.fromhex(salt), dklen=32, **_SCRYPT)
    return f"scrypt:{_SCRYPT['n']}:{_SCRYPT['r']}:{_SCRYPT['p']}:{digest.hex()}"


def _check_secret(secret: str, salt: str, stored: str) -> bool:
    algo, n, r, p, _ = stored.split(":")
    if algo != "scrypt":
        return False
    digest = hashlib.scrypt(secret.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    return hmac.compare_digest(f"{algo}:{n}:{r}:{p}:{digest.hex()}", stored)


def split_key(raw: str) -> tuple[str, str]:
    """(prefix, secret) of a well-formed key; AccessError otherwise. Never echoes the key."""
    m = _KEY_RE.match(raw or "")
    if not m:
        raise AccessError("API key is malformed: keys look like llmh-<8 hex>-<secret>; create one with "
                          "`llmhost keys create --user U`.")
    return m.group(1), m.group(2)


@dataclass(frozen=True)
class KeyInfo:
    """What a verified key grants; safe to cache and log (no secret)."""

    key_id: int
    prefix: str
    user: str
    team: str | None
    expires_at: datetime | None
    revoked_at: datetime | None = None
    created_at: datetime | None = None
    description: str | None = None

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and (now or utcnow()) >= self.expires_at


@dataclass(frozen=True)
class CreatedKey:
    """The raw key is here once, for the creator to copy; it is stored only as a salted hash."""

    raw: str
    info: KeyInfo


def create_key(
    user: str,
    *,
    team: str | None = None,
    expires_in: timedelta | None = None,
    description: str | None = None,
    actor: str = "system",
    engine: Engine | None = None,
) -> CreatedKey:
    """Create a key for `user` (and `team`), creating both names on first use."""
    if expires_in is not None and expires_in.total_seconds() <= 0:
        raise ConfigError("expires", expires_in, "give a positive duration such as 30d")
    with session_scope(engine) as s:
        u = _get_or_create(s, User, user)
        t = _get_or_create(s, Team, team) if team else None
        for _ in range(5):
            prefix = secrets.token_hex(4)
            if s.execute(select(ApiKey.id).where(ApiKey.prefix == prefix)).first() is None:
                break
        else:  # pragma: no cover - 2^32 prefixes
            raise GatewayError("could not find a free key prefix after 5 tries; retry the command")
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        now = utcnow()
        row = ApiKey(
            prefix=prefix, salt=salt, key_hash=hash_secret(secret, salt), user_id=u.id,
            team_id=t.id if t else None, description=description, created_by=actor, created_at=now,
            expires_at=now + expires_in if expires_in else None,
        )
        s.add(row)
        s.flush()
        info = KeyInfo(row.id, prefix, u.name, t.name if t else None, row.expires_at, None, now, description)
        _audit(s, actor, "key.create", f"key:{prefix}", None, _key_public(info), user=u.name,
               team=t.name if t else None)
        bump_epoch(s)
    return CreatedKey(raw=f"{KEY_PREFIX}-{prefix}-{secret}", info=info)


def _key_public(info: KeyInfo) -> dict[str, Any]:
    return {
        "prefix": info.prefix, "user": info.user, "team": info.team,
        "expires_at": info.expires_at.isoformat() if info.expires_at else None,
        "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None,
    }


def _key_info(s: Session, row: ApiKey) -> KeyInfo:
    user = s.get(User, row.user_id)
    team = s.get(Team, row.team_id) if row.team_id else None
    return KeyInfo(row.id, row.prefix, user.name if user else "?", team.name if team else None,
                   row.expires_at, row.revoked_at, row.created_at, row.description)


def verify_key(raw: str, *, engine: Engine | None = None) -> KeyInfo:
    """KeyInfo of a valid, unrevoked, unexpired key; AccessError (without the key) otherwise."""
    prefix, secret = split_key(raw)
    with session_scope(engine) as s:
        row = s.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
        if row is None or not _check_secret(secret, row.salt, row.key_hash):
            raise AccessError(f"API key {prefix}… is not valid: check for typos, or create a key with "
                              "`llmhost keys create --user U`.")
        info = _key_info(s, row)
    if info.revoked_at is not None:
        raise AccessError(f"API key {prefix}… was revoked at {info.revoked_at:%Y-%m-%d %H:%M} UTC: "
                          "ask an admin for a new one (`llmhost keys create`).")
    if info.is_expired():
        raise AccessError(f"API key {prefix}… expired at {info.expires_at:%Y-%m-%d %H:%M} UTC: "
                          "ask an admin for a new one (`llmhost keys create --expires 30d`).")
    return info


def revoke_key(prefix: str, *, actor: str = "system", engine: Engine | None = None) -> KeyInfo:
    prefix = prefix.removeprefix(f"{KEY_PREFIX}-").split("-")[0]
    with session_scope(engine) as s:
        row = s.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
        if row is None:
            raise AccessError(f"no key with prefix {prefix!r}: list keys with `llmhost keys list`.")
        before = _key_public(_key_info(s, row))
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            s.flush()
            info = _key_info(s, row)
            _audit(s, actor, "key.revoke", f"key:{prefix}", before, _key_public(info), user=info.user,
                   team=info.team)
            bump_epoch(s)
        return _key_info(s, row)


def list_keys(*, include_revoked: bool = True, engine: Engine | None = None) -> list[KeyInfo]:
    with session_scope(engine) as s:
        q = select(ApiKey).order_by(ApiKey.created_at)
        if not include_revoked:
            q = q.where(ApiKey.revoked_at.is_(None))
        return [_key_info(s, row) for row in s.execute(q).scalars()]


# ---------------------------------------------------------------------------------------------------------
# Endpoints, revisions, replicas


def spec_hash(spec: dict[str, Any]) -> str:
    """Content hash of a revision spec: sha256 of canonical JSON, so equal specs get equal ids."""
    canon = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def _endpoint_public(e: Endpoint) -> dict[str, Any]:
    return {"name": e.name, "description": e.description, "usage_notes": e.usage_notes, "owner": e.owner,
            "status": e.status, "live_revision_id": e.live_revision_id}


def _get_endpoint(s: Session, name: str) -> Endpoint:
    e = s.execute(select(Endpoint).where(Endpoint.name == name)).scalar_one_or_none()
    if e is None:
        raise GatewayError(f"endpoint {name!r} does not exist: list them with `llmhost endpoints list`, or "
                           "register one with `llmhost endpoints attach NAME --base-url URL "
                           "--served-model M`.")
    return e


def get_endpoint(name: str, *, engine: Engine | None = None) -> Endpoint:
    with session_scope(engine) as s:
        return _get_endpoint(s, name)


def upsert_endpoint(
    name: str,
    *,
    description: str | None = None,
    usage_notes: str | None = None,
    owner: str | None = None,
    status: str | None = None,
    actor: str = "system",
    engine: Engine | None = None,
) -> Endpoint:
    """Create the endpoint or update the fields given (None leaves a field as it is)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name or ""):
        raise ConfigError("endpoint", name,
                          "use letters, digits, '.', '_' or '-' (no ':'; it separates adapters)")
    if status is not None and status not in ENDPOINT_STATUSES:
        raise ConfigError("status", status, f"use one of {', '.join(ENDPOINT_STATUSES)}")
    with session_scope(engine) as s:
        e = s.execute(select(Endpoint).where(Endpoint.name == name)).scalar_one_or_none()
        before = _endpoint_public(e) if e else None
        if e is None:
            e = Endpoint(name=name, status=status or "active")
            s.add(e)
        for attr, val in (("description", description), ("usage_notes", usage_notes), ("owner", owner),
                          ("status", status)):
            if val is not None:
                setattr(e, attr, val)
        s.flush()
        after = _endpoint_public(e)
        if after != before:
            _audit(s, actor, "endpoint.create" if before is None else "endpoint.update", f"endpoint:{name}",
                   before, after, endpoint=name)
            bump_epoch(s)
        return e


def add_revision(
    endpoint: str,
    spec: dict[str, Any],
    *,
    served_model_name: str,
    adapters: dict[str, str] | None = None,
    model_version: str | None = None,
    status: str = "pending",
    reason: str | None = None,
    actor: str = "system",
    engine: Engine | None = None,
) -> EndpointRevision:
    """Add an immutable revision (or return the existing one with the same content hash)."""
    if status not in REVISION_STATUSES:
        raise ConfigError("status", status, f"use one of {', '.join(REVISION_STATUSES)}")
    chash = spec_hash(spec)
    with session_scope(engine) as s:
        e = _get_endpoint(s, endpoint)
        existing = s.execute(select(EndpointRevision).where(
            EndpointRevision.endpoint_id == e.id, EndpointRevision.content_hash == chash
        )).scalar_one_or_none()
        if existing is not None:
            return existing
        rev = EndpointRevision(
            endpoint_id=e.id, content_hash=chash, spec=spec, served_model_name=served_model_name,
            adapters=dict(adapters or {}), model_version=model_version, status=status, reason=reason,
            created_by=actor,
        )
        s.add(rev)
        s.flush()
        _audit(s, actor, "revision.create", f"endpoint:{endpoint}", None,
               {"revision": chash[:12], "served_model_name": served_model_name,
                "model_version": model_version, "adapters": rev.adapters, "status": status},
               endpoint=endpoint, revision=chash[:12])
        return rev


def _get_revision(s: Session, endpoint: Endpoint, revision: int | str) -> EndpointRevision:
    q = select(EndpointRevision).where(EndpointRevision.endpoint_id == endpoint.id)
    if isinstance(revision, int):
        q = q.where(EndpointRevision.id == revision)
    else:
        q = q.where(EndpointRevision.content_hash.startswith(revision))
    rows = s.execute(q).scalars().all()
    if len(rows) != 1:
        raise GatewayError(f"revision {revision!r} of endpoint {endpoint.name!r} "
                           f"{'is ambiguous' if rows else 'does not exist'}: see `llmhost endpoints list`.")
    return rows[0]


def set_revision_status(
    endpoint: str, revision: int | str, status: str, *, reason: str | None = None, actor: str = "system",
    engine: Engine | None = None,
) -> EndpointRevision:
    if status not in REVISION_STATUSES:
        raise ConfigError("status", status, f"use one of {', '.join(REVISION_STATUSES)}")
    with session_scope(engine) as s:
        e = _get_endpoint(s, endpoint)
        rev = _get_revision(s, e, revision)
        before = {"status": rev.status, "reason": rev.reason}
        rev.status, rev.reason = status, reason if reason is not None else rev.reason
        _audit(s, actor, "revision.status", f"endpoint:{endpoint}", before,
               {"status": rev.status, "reason": rev.reason}, endpoint=endpoint,
               revision=rev.content_hash[:12])
        return rev


def set_live_revision(
    endpoint: str, revision: int | str, *, reason: str | None = None, actor: str = "system",
    engine: Engine | None = None,
) -> EndpointRevision:
    """Point the endpoint's traffic at `revision` (id or content-hash prefix); the old live one is retired."""
    with session_scope(engine) as s:
        e = _get_endpoint(s, endpoint)
        rev = _get_revision(s, e, revision)
        old = s.get(EndpointRevision, e.live_revision_id) if e.live_revision_id else None
        if old is not None and old.id == rev.id:
            return rev
        if old is not None:
            old.status = "retired"
        e.live_revision_id = rev.id
        rev.status = "live"
        if reason:
            rev.reason = reason
        s.flush()
        _audit(s, actor, "endpoint.route", f"endpoint:{endpoint}",
               {"live_revision": old.content_hash[:12] if old else None},
               {"live_revision": rev.content_hash[:12], "reason": reason}, endpoint=endpoint,
               revision=rev.content_hash[:12], model_version=rev.model_version)
        bump_epoch(s)
        return rev


def list_revisions(endpoint: str, *, engine: Engine | None = None) -> list[EndpointRevision]:
    with session_scope(engine) as s:
        e = _get_endpoint(s, endpoint)
        return list(s.execute(select(EndpointRevision).where(EndpointRevision.endpoint_id == e.id)
                              .order_by(EndpointRevision.id)).scalars())


def add_replica(
    endpoint: str,
    revision: int | str,
    *,
    base_url: str,
    served_model_name: str,
    name: str | None = None,
    state: str = "starting",
    target: str = "local",
    kv_cache_tokens: int | None = None,
    pid: int | None = None,
    log_path: str | None = None,
    managed: bool = True,
    actor: str = "system",
    engine: Engine | None = None,
) -> ReplicaRow:
    """Register a replica (a running vLLM server) of a revision; the same base URL twice is a no-op."""
    base_url = base_url.rstrip("/")
    if not re.match(r"^https?://[^/]+", base_url):
        raise ConfigError("base_url", base_url, "give the server's OpenAI base URL, e.g. http://127.0.0.1:8001/v1")
    if not base_url.endswith("/v1"):
        base_url += "/v1"
    if state not in REPLICA_STATES:
        raise ConfigError("state", state, f"use one of {', '.join(REPLICA_STATES)}")
    with session_scope(engine) as s:
        e = _get_endpoint(s, endpoint)
        rev = _get_revision(s, e, revision)
        row = s.execute(select(ReplicaRow).where(ReplicaRow.revision_id == rev.id,
                                                 ReplicaRow.base_url == base_url)).scalar_one_or_none()
        if row is not None:
            return row
        row = ReplicaRow(
            revision_id=rev.id, name=name or f"{endpoint}-{rev.content_hash[:8]}", target=target,
            base_url=base_url, served_model_name=served_model_name, state=state,
            kv_cache_tokens=kv_cache_tokens, pid=pid, log_path=log_path, managed=managed,
        )
        s.add(row)
        s.flush()
        _audit(s, actor, "replica.add", f"endpoint:{endpoint}", None,
               {"replica": row.name, "base_url": base_url, "served_model_name": served_model_name,
                "state": state}, endpoint=endpoint, revision=rev.content_hash[:12])
        bump_epoch(s)
        return row


def set_replica_state(
    replica_id: int, state: str, *, pid: int | None = None, audit: bool = True, bump: bool = True,
    actor: str = "system", engine: Engine | None = None,
) -> ReplicaRow:
    """Record a replica's state. The gateway's health loop passes audit=False, bump=False (observations)."""
    if state not in REPLICA_STATES:
        raise ConfigError("state", state, f"use one of {', '.join(REPLICA_STATES)}")
    with session_scope(engine) as s:
        row = s.get(ReplicaRow, replica_id)
        if row is None:
            raise GatewayError(f"replica id {replica_id} does not exist: see `llmhost endpoints list`.")
        before = row.state
        if before == state and pid is None:
            return row
        row.state = state
        if pid is not None:
            row.pid = pid
        s.flush()
        if audit:
            rev = s.get(EndpointRevision, row.revision_id)
            ep = s.get(Endpoint, rev.endpoint_id) if rev else None
            _audit(s, actor, "replica.state", f"replica:{row.name}", {"state": before}, {"state": state},
                   endpoint=ep.name if ep else None, revision=rev.content_hash[:12] if rev else None)
        if bump:
            bump_epoch(s)
        return row


def list_replicas(endpoint: str, revision: int | str | None = None, *,
                  engine: Engine | None = None) -> list[ReplicaRow]:
    """Replicas of `revision` (default: the live one)."""
    with session_scope(engine) as s:
        e = _get_endpoint(s, endpoint)
        if revision is None:
            if e.live_revision_id is None:
                return []
            revision = e.live_revision_id
        rev = _get_revision(s, e, revision)
        return list(s.execute(select(ReplicaRow).where(ReplicaRow.revision_id == rev.id)
                              .order_by(ReplicaRow.id)).scalars())


@dataclass
class EndpointView:
    name: str
    status: str
    owner: str | None
    description: str | None
    live_revision: str | None
    served_model_name: str | None
    model_version: str | None
    replicas: list[ReplicaRow] = field(default_factory=list)


def list_endpoints(*, engine: Engine | None = None) -> list[EndpointView]:
    with session_scope(engine) as s:
        out = []
        for e in s.execute(select(Endpoint).order_by(Endpoint.name)).scalars():
            rev = s.get(EndpointRevision, e.live_revision_id) if e.live_revision_id else None
            reps = list(s.execute(select(ReplicaRow).where(ReplicaRow.revision_id == rev.id)
                                  .order_by(ReplicaRow.id)).scalars()) if rev else []
            out.append(EndpointView(e.name, e.status, e.owner, e.description,
                                    rev.content_hash[:12] if rev else None,
                                    rev.served_model_name if rev else None,
                                    rev.model_version if rev else None, reps))
        return out


def attach_server(
    name: str,
    *,
    base_url: str,
    served_model: str,
    adapters: dict[str, str] | None = None,
    description: str | None = None,
    owner: str | None = None,
    actor: str = "system",
    engine: Engine | None = None,
) -> tuple[EndpointRevision, ReplicaRow]:
    """Register a vLLM server llmhost does not manage as a replica of endpoint `name`.

    The revision's spec is the served model and adapters (not the URL), so attaching a second server of the
    same model adds a replica to the live revision, while a different model makes a new live revision.
    """
    upsert_endpoint(name, description=description, owner=owner, actor=actor, engine=engine)
    spec = {"kind": "attached", "served_model_name": served_model,
            "adapters": dict(sorted((adapters or {}).items()))}
    rev = add_revision(name, spec, served_model_name=served_model, adapters=adapters, status="ready",
                       reason="attached with `llmhost endpoints attach`", actor=actor, engine=engine)
    rep = add_replica(name, rev.id, base_url=base_url, served_model_name=served_model, state="up",
                      target="external", managed=False, name=f"{name}-ext-{_url_tag(base_url)}", actor=actor,
                      engine=engine)
    if rep.state in ("stopped", "failed"):
        set_replica_state(rep.id, "up", actor=actor, engine=engine)
    rev = set_live_revision(name, rev.id, reason="attached", actor=actor, engine=engine)
    return rev, rep


def _url_tag(url: str) -> str:
    m = re.match(r"^https?://([^/]+)", url)
    return re.sub(r"[^A-Za-z0-9]+", "-", m.group(1) if m else url).strip("-")


# ---------------------------------------------------------------------------------------------------------
# Access grants


def _grant_subject(user: str | None, team: str | None) -> tuple[str, str]:
    if bool(user) == bool(team):
        raise ConfigError("--user/--team", user or team, "give exactly one of --user U or --team T")
    return ("user", user) if user else ("team", team)  # type: ignore[return-value]


def grant(endpoint: str, *, user: str | None = None, team: str | None = None, actor: str = "system",
          engine: Engine | None = None) -> bool:
    """Let a user or team call `endpoint`; False when the grant already existed."""
    kind, who = _grant_subject(user, team)
    with session_scope(engine) as s:
        e = _get_endpoint(s, endpoint)
        row = _get_or_create(s, User if kind == "user" else Team, who)
        cond = AccessGrant.user_id == row.id if kind == "user" else AccessGrant.team_id == row.id
        if s.execute(select(AccessGrant.id).where(AccessGrant.endpoint_id == e.id, cond)).first():
            return False
        s.add(AccessGrant(endpoint_id=e.id, user_id=row.id if kind == "user" else None,
                          team_id=row.id if kind == "team" else None, created_by=actor))
        _audit(s, actor, "access.grant", f"{kind}:{who}", None, {"endpoint": endpoint, kind: who},
               endpoint=endpoint)
        bump_epoch(s)
        return True


def revoke_grant(endpoint: str, *, user: str | None = None, team: str | None = None, actor: str = "system",
                 engine: Engine | None = None) -> bool:
    """Remove a grant; False when there was none."""
    kind, who = _grant_subject(user, team)
    with session_scope(engine) as s:
        e = _get_endpoint(s, endpoint)
        if kind == "user":
            uid = s.execute(select(User.id).where(User.name == who)).scalar_one_or_none()
            cond = AccessGrant.user_id == uid
        else:
            uid = s.execute(select(Team.id).where(Team.name == who)).scalar_one_or_none()
            cond = AccessGrant.team_id == uid
        if uid is None:
            return False
        g = s.execute(select(AccessGrant).where(AccessGrant.endpoint_id == e.id, cond)).scalar_one_or_none()
        if g is None:
            return False
        s.delete(g)
        _audit(s, actor, "access.revoke", f"{kind}:{who}", {"endpoint": endpoint, kind: who}, None,
               endpoint=endpoint)
        bump_epoch(s)
        return True


def list_grants(endpoint: str | None = None, *, engine: Engine | None = None) -> list[tuple[str, str, str]]:
    """(endpoint, 'user'|'team', name) triples."""
    with session_scope(engine) as s:
        q = (select(Endpoint.name, User.name, Team.name)
             .select_from(AccessGrant)
             .join(Endpoint, Endpoint.id == AccessGrant.endpoint_id)
             .outerjoin(User, User.id == AccessGrant.user_id)
             .outerjoin(Team, Team.id == AccessGrant.team_id)
             .order_by(Endpoint.name))
        if endpoint:
            q = q.where(Endpoint.name == endpoint)
        return [(ep, "user" if u else "team", u or t) for ep, u, t in s.execute(q)]


# ---------------------------------------------------------------------------------------------------------
# Routing snapshot (what the gateway caches)


@dataclass(frozen=True)
class ReplicaRoute:
    id: int
    name: str
    base_url: str
    served_model_name: str
    state: str


@dataclass(frozen=True)
class EndpointRoute:
    name: str
    status: str
    owner: str | None
    created_at: datetime
    revision_id: int | None
    revision_hash: str | None
    served_model_name: str | None
    adapters: dict[str, str]
    replicas: tuple[ReplicaRoute, ...]
    users: frozenset[str]
    teams: frozenset[str]

    def allows(self, key: KeyInfo) -> bool:
        return key.user in self.users or (key.team is not None and key.team in self.teams)


def load_routes(*, engine: Engine | None = None) -> tuple[int, dict[str, EndpointRoute]]:
    """(epoch, endpoint name -> route) in one read; replicas that were stopped or failed are left out."""
    with session_scope(engine) as s:
        epoch = int(s.execute(select(Meta.value).where(Meta.name == ROUTES_EPOCH)).scalar_one())
        grants: dict[int, tuple[set[str], set[str]]] = {}
        q = (select(AccessGrant.endpoint_id, User.name, Team.name).select_from(AccessGrant)
             .outerjoin(User, User.id == AccessGrant.user_id).outerjoin(Team, Team.id == AccessGrant.team_id))
        for eid, u, t in s.execute(q):
            users, teams = grants.setdefault(eid, (set(), set()))
            if u:
                users.add(u)
            if t:
                teams.add(t)
        routes: dict[str, EndpointRoute] = {}
        for e in s.execute(select(Endpoint)).scalars():
            rev = s.get(EndpointRevision, e.live_revision_id) if e.live_revision_id else None
            reps: tuple[ReplicaRoute, ...] = ()
            if rev is not None:
                reps = tuple(
                    ReplicaRoute(r.id, r.name, r.base_url, r.served_model_name, r.state)
                    for r in s.execute(select(ReplicaRow).where(ReplicaRow.revision_id == rev.id)
                                       .order_by(ReplicaRow.id)).scalars()
                    if r.state not in ("stopped", "failed")
                )
            users, teams = grants.get(e.id, (set(), set()))
            routes[e.name] = EndpointRoute(
                name=e.name, status=e.status, owner=e.owner, created_at=e.created_at,
                revision_id=rev.id if rev else None, revision_hash=rev.content_hash if rev else None,
                served_model_name=rev.served_model_name if rev else None,
                adapters=dict(rev.adapters or {}) if rev else {}, replicas=reps,
                users=frozenset(users), teams=frozenset(teams),
            )
        return epoch, routes


# ---------------------------------------------------------------------------------------------------------
# Usage

USAGE_FIELDS = ("ts", "key_prefix", "user", "team", "endpoint", "adapter", "revision_id", "replica_id",
                "route", "stream", "status_code", "prompt_tokens", "completion_tokens", "latency_ms",
                "ttft_ms")


def add_usage(records: Sequence[dict[str, Any]], *, engine: Engine | None = None) -> int:
    """Insert usage rows in one statement (the gateway batches them off the request path)."""
    if not records:
        return 0
    rows = [{k: r.get(k) for k in USAGE_FIELDS} for r in records]
    with session_scope(engine) as s:
        s.execute(insert(UsageRecord), rows)
    return len(rows)


def list_usage(*, endpoint: str | None = None, since: datetime | None = None, key_prefix: str | None = None,
               limit: int | None = None, engine: Engine | None = None) -> list[UsageRecord]:
    with session_scope(engine) as s:
        q = select(UsageRecord).order_by(UsageRecord.ts)
        if endpoint:
            q = q.where(UsageRecord.endpoint == endpoint)
        if since:
            q = q.where(UsageRecord.ts >= since)
        if key_prefix:
            q = q.where(UsageRecord.key_prefix == key_prefix)
        if limit:
            q = q.limit(limit)
        return list(s.execute(q).scalars())


@dataclass
class UsageSummary:
    endpoint: str | None
    user: str | None
    team: str | None
    key_prefix: str | None
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    avg_latency_ms: float
    avg_ttft_ms: float | None


def summarize_usage(*, endpoint: str | None = None, since: datetime | None = None,
                    engine: Engine | None = None) -> list[UsageSummary]:
    """Per endpoint x user x team x key: requests, errors (status >= 400), tokens, mean latency and TTFT."""
    with session_scope(engine) as s:
        err = func.sum(case((UsageRecord.status_code >= 400, 1), else_=0))
        q = (select(UsageRecord.endpoint, UsageRecord.user, UsageRecord.team, UsageRecord.key_prefix,
                    func.count(), err, func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
                    func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
                    func.avg(UsageRecord.latency_ms), func.avg(UsageRecord.ttft_ms))
             .group_by(UsageRecord.endpoint, UsageRecord.user, UsageRecord.team, UsageRecord.key_prefix)
             .order_by(UsageRecord.endpoint, UsageRecord.user))
        if endpoint:
            q = q.where(UsageRecord.endpoint == endpoint)
        if since:
            q = q.where(UsageRecord.ts >= since)
        return [UsageSummary(ep, u, t, k, int(n), int(e or 0), int(p), int(c), float(lat or 0.0),
                             float(tt) if tt is not None else None)
                for ep, u, t, k, n, e, p, c, lat, tt in s.execute(q)]


# ---------------------------------------------------------------------------------------------------------
# Deploy leases


class DeployInProgress(DeployError):
    """Another deploy of the same endpoint holds the lease."""


_held_leases = threading.local()  # .by_endpoint: the leases this thread holds, for re-entry


def _lease_is_stale(lease: DeployLease, now: datetime) -> bool:
    """Expired, or held by a process on this host that is gone (a deploy killed with SIGKILL)."""
    from tasks.serving.local import pid_alive

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
