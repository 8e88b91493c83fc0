"""Access grants: which users and teams may call an endpoint through the gateway."""

from __future__ import annotations

from sqlalchemy import Engine, select

from tasks.core.errors import ConfigError
from tasks.store.audit import record as audit_record
from tasks.store.endpoints import get_endpoint_row
from tasks.store.keys import get_or_create_name
from tasks.store.schema import AccessGrant, Endpoint, Team, User, bump_epoch, session_scope


def _grant_subject(user: str | None, team: str | None) -> tuple[str, str]:
    if bool(user) == bool(team):
        raise ConfigError("--user/--team", user or team, "give exactly one of --user U or --team T")
    return ("user", user) if user else ("team", team)  # type: ignore[return-value]


def grant(endpoint: str, *, user: str | None = None, team: str | None = None, actor: str = "system",
          engine: Engine | None = None) -> bool:
    """Let a user or team call `endpoint`; False when the grant already existed."""
    kind, who = _grant_subject(user, team)
    with session_scope(engine) as s:
        e = get_endpoint_row(s, endpoint)
        row = get_or_create_name(s, User if kind == "user" else Team, who)
        cond = AccessGrant.user_id == row.id if kind == "user" else AccessGrant.team_id == row.id
        if s.execute(select(AccessGrant.id).where(AccessGrant.endpoint_id == e.id, cond)).first():
            return False
        s.add(AccessGrant(endpoint_id=e.id, user_id=row.id if kind == "user" else None,
                          team_id=row.id if kind == "team" else None, created_by=actor))
        audit_record(actor, "access.grant", f"{kind}:{who}", None, {"endpoint": endpoint, kind: who},
                     session=s, endpoint=endpoint)
        bump_epoch(s)
        return True


def revoke_grant(endpoint: str, *, user: str | None = None, team: str | None = None, actor: str = "system",
                 engine: Engine | None = None) -> bool:
    """Remove a grant; False when there was none."""
    kind, who = _grant_subject(user, team)
    with session_scope(engine) as s:
        e = get_endpoint_row(s, endpoint)
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
        audit_record(actor, "access.revoke", f"{kind}:{who}", {"endpoint": endpoint, kind: who}, None,
                     session=s, endpoint=endpoint)
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
