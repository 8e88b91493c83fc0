"""Users, teams and API keys: a key is stored as a salt and scrypt hash; its public prefix names it."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tasks.core.errors import AccessError, ConfigError, GatewayError
from tasks.store.audit import record as audit_record
from tasks.store.schema import ApiKey, Team, User, bump_epoch, session_scope, utcnow

KEY_PREFIX = "llmh"
_KEY_RE = re.compile(r"^llmh-([0-9a-f]{8})-([A-Za-z0-9_\-]{20,})$")
# scrypt cost: ~16 MiB and tens of ms per verify. Keys carry 256 random bits, so this is defence in depth
# against a leaked table; the gateway caches verified keys in memory so the cost is paid once per key.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def get_or_create_name(s: Session, model: type[User] | type[Team], name: str) -> Any:
    """The user or team row named `name`, added on first use."""
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
        return get_or_create_name(s, User, name)


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
        u = get_or_create_name(s, User, user)
        t = get_or_create_name(s, Team, team) if team else None
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
        audit_record(actor, "key.create", f"key:{prefix}", None, _key_public(info), session=s, user=u.name,
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


def get_key(prefix: str, *, engine: Engine | None = None) -> KeyInfo | None:
    """The key with this public prefix, revoked or expired ones included; None when there is none."""
    with session_scope(engine) as s:
        row = s.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
        return _key_info(s, row) if row is not None else None


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
            audit_record(actor, "key.revoke", f"key:{prefix}", before, _key_public(info), session=s,
                         user=info.user, team=info.team)
            bump_epoch(s)
        return _key_info(s, row)


def list_keys(*, include_revoked: bool = True, engine: Engine | None = None) -> list[KeyInfo]:
    with session_scope(engine) as s:
        q = select(ApiKey).order_by(ApiKey.created_at)
        if not include_revoked:
            q = q.where(ApiKey.revoked_at.is_(None))
        return [_key_info(s, row) for row in s.execute(q).scalars()]

