"""Dashboard sign-in: an API key is verified once, then a signed cookie names the key by its public prefix.

The cookie holds no secret: only the key's prefix and when it was signed, signed with a server secret
(itsdangerous). Every page re-reads the key's row, so a revoked or expired key ends its sessions at once.
Admins (a flag per user, kept in the dashboard's own table and audited) see every endpoint.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import Engine, select

from gateway.dashboard.tables import DashboardAdmin, dashboard_session, ensure_tables
from tasks.core.errors import ConfigError
from tasks.core.settings import get_settings
from tasks.store import audit
from tasks.store.keys import get_key, verify_key
from tasks.store.schema import get_engine

COOKIE = "llmhost_ui"
SESSION_MAX_AGE_S = 12 * 3600
_SALT = "llmhost-dashboard-session"


def session_secret() -> str:
    """LLMHOST_DASHBOARD_SECRET, else a random secret kept in the state dir (0600), created on first use.

    Kept on disk so sessions survive a gateway restart and several gateway processes on one state dir agree.
    """
    env = os.environ.get("LLMHOST_DASHBOARD_SECRET")
    if env:
        return env
    path = Path(get_settings().home_abs) / "dashboard_secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race; use its secret
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the key's user and team, and whether the user is an admin."""

    prefix: str
    user: str
    team: str | None
    admin: bool


class Sessions:
    def __init__(self, engine: Engine, secret: str | None = None):
        self.engine = engine
        self.signer = URLSafeTimedSerializer(secret or session_secret(), salt=_SALT)

    def login(self, raw_key: str) -> tuple[Viewer, str]:
        """Verify a raw key (AccessError when invalid) and return the viewer and the cookie value."""
        info = verify_key(raw_key.strip(), engine=self.engine)
        viewer = Viewer(info.prefix, info.user, info.team, is_admin(info.user, engine=self.engine))
        return viewer, self.signer.dumps({"p": info.prefix})

    def viewer(self, cookie: str | None) -> Viewer | None:
        """The viewer of a cookie whose signature, age and key are still good; None otherwise."""
        if not cookie:
            return None
        try:
            data = self.signer.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except BadSignature:
            return None
        prefix = data.get("p") if isinstance(data, dict) else None
        if not isinstance(prefix, str):
            return None
        info = get_key(prefix, engine=self.engine)
        if info is None or info.revoked_at is not None or info.is_expired():
            return None
        return Viewer(info.prefix, info.user, info.team, is_admin(info.user, engine=self.engine))


# ------------------------------------------------------------------------------------------ admins


def is_admin(user: str, *, engine: Engine | None = None) -> bool:
    engine = engine or get_engine()
    ensure_tables(engine)
    with dashboard_session(engine) as s:
        return s.get(DashboardAdmin, user) is not None


def set_admin(user: str, admin: bool = True, *, actor: str = "system", engine: Engine | None = None) -> bool:
    """Give or take a user's admin flag (audited); False when it was already so."""
    if not user or not user.strip():
        raise ConfigError("user", user, "give a user name, e.g. `llmhost dashboard admin alice`")
    engine = engine or get_engine()
    ensure_tables(engine)
    with dashboard_session(engine) as s:
        row = s.get(DashboardAdmin, user)
        if (row is not None) == admin:
            return False
        if admin:
            s.add(DashboardAdmin(user=user, granted_by=actor))
        else:
            s.delete(row)
        audit.record(
            actor, "user.admin", f"user:{user}", {"admin": not admin}, {"admin": admin}, session=s, user=user
        )
        return True


def list_admins(*, engine: Engine | None = None) -> list[str]:
    engine = engine or get_engine()
    ensure_tables(engine)
    with dashboard_session(engine) as s:
        return list(s.execute(select(DashboardAdmin.user).order_by(DashboardAdmin.user)).scalars())
