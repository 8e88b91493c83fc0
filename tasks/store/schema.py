"""The store's schema: the engine per URL, the ORM tables, the `routes` epoch, sessions and time helpers.

SQLite under the state dir by default (`settings.store`), any SQLAlchemy URL where set. Every change to keys,
access and routes bumps the `routes` epoch in the same transaction; the gateway checks it per request, so
revocations take effect immediately.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
    create_engine,
    event,
    inspect,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from tasks.core.errors import ConfigError
from tasks.core.settings import get_settings

ROUTES_EPOCH = "routes"



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
    # An external endpoint that answers when this one has no healthy replica (off when None): the request's
    # data then leaves the network, so only the endpoint's spec turns it on.
    fallback: Mapped[str | None] = mapped_column(String(200))
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
    # What the revision ran with beyond its spec, keyed by topic: "sizing" (the applied recommendation),
    # "placement" (the GPUs), "swap" (the swap strategy and its measured pause). Not part of the identity.
    facts: Mapped[dict[str, Any] | None] = mapped_column(JSON)
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
    gpus: Mapped[str | None] = mapped_column(String(200))  # CUDA_VISIBLE_DEVICES of a local GPU replica
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
    # External endpoints (frontier APIs): the provider, its reasoning tokens (already inside completion_tokens),
    # the cost at the catalog's rates, and, for an answer served by a fallback, the external endpoint that did.
    provider: Mapped[str | None] = mapped_column(String(64))
    reasoning_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    fallback: Mapped[str | None] = mapped_column(String(200))
    # Set by the gateway per answered request; unique so that a row written twice (journal replay after a crash,
    # a retried flush) is stored once. NULL in rows from before it existed, which a unique index allows.
    request_id: Mapped[str | None] = mapped_column(String(64), unique=True)


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
        with _schema_lock(engine):
            Base.metadata.create_all(engine)
            _add_missing_columns(engine)
        with Session(engine) as s, s.begin():
            if s.get(Meta, ROUTES_EPOCH) is None:
                s.add(Meta(name=ROUTES_EPOCH, value=0))
        _engines[url] = engine
        return engine


# Any constant: the PostgreSQL advisory lock that serializes schema creation across processes.
_SCHEMA_LOCK_KEY = 0x6C6C6D68  # "llmh"


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """On PostgreSQL, one process at a time creates the tables: two gateways starting on a fresh team store
    otherwise race in CREATE TABLE (a UniqueViolation on pg_type, seen in the two-gateway test). SQLite's own
    file lock already serializes it."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as lock:
        lock.execute(sql_text("SELECT pg_advisory_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
        lock.commit()
        try:
            yield
        finally:
            lock.execute(sql_text("SELECT pg_advisory_unlock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            lock.commit()


def _add_missing_columns(engine: Engine) -> None:
    """Add the nullable columns a store made by an older llmhost lacks (create_all adds tables, not columns)."""
    insp = inspect(engine)
    with engine.begin() as c:
        for table in Base.metadata.sorted_tables:
            if not insp.has_table(table.name):
                continue
            have = {col["name"] for col in insp.get_columns(table.name)}
            for col in table.columns:
                if col.name not in have and col.nullable and not col.primary_key:
                    ddl = col.type.compile(dialect=engine.dialect)
                    c.execute(sql_text(f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {ddl}'))
                    if col.unique:  # ADD COLUMN cannot carry UNIQUE on SQLite; an index does (NULLs allowed)
                        c.execute(sql_text(f'CREATE UNIQUE INDEX IF NOT EXISTS "uq_{table.name}_{col.name}" '
                                           f'ON {table.name} ("{col.name}")'))


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session in one transaction, committed on success; objects stay readable after commit."""
    maker = sessionmaker(bind=engine or get_engine(), expire_on_commit=False)
    with maker() as s, s.begin():
        yield s


def bump_epoch(s: Session) -> None:
    s.execute(update(Meta).where(Meta.name == ROUTES_EPOCH).values(value=Meta.value + 1))


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
