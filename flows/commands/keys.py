"""`llmhost keys create|list|revoke`: per-user (and per-team) API keys for the gateway."""

from __future__ import annotations

import typer

keys_app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)


def _fmt(dt) -> str:  # type: ignore[no-untyped-def]
    return dt.strftime("%Y-%m-%d %H:%M") if dt else "-"


@keys_app.command("create")
def create(
    user: str = typer.Option(..., "--user", help="Who the key belongs to (created on first use)."),
    team: str = typer.Option(None, "--team", help="Team the key bills to and takes grants from."),
    expires: str = typer.Option(None, "--expires", help="Lifetime such as 30d, 12h; default never."),
    description: str = typer.Option(None, "--description", help="Free text, e.g. what the key is for."),
) -> None:
    """Create a key. The raw key is printed once; only its salted hash is stored."""
    from tasks import store
    from tasks.store import audit

    ttl = store.parse_duration(expires, field_name="--expires") if expires else None
    created = store.create_key(user, team=team, expires_in=ttl, description=description,
                               actor=audit.default_actor())
    info = created.info
    typer.echo(created.raw)
    typer.secho(f"key {info.prefix} for user {info.user}{f', team {info.team}' if info.team else ''}"
                f"{f', expires {_fmt(info.expires_at)} UTC' if info.expires_at else ''}. "
                "Copy it now: it is not shown again.", err=True, fg="green")


@keys_app.command("list")
def list_(active: bool = typer.Option(False, "--active", help="Hide revoked keys.")) -> None:
    """List keys by public prefix (secrets are never shown)."""
    from rich.console import Console
    from rich.table import Table

    from tasks import store

    table = Table("prefix", "user", "team", "created", "expires", "status", "description")
    now = store.utcnow()
    for k in store.list_keys(include_revoked=not active):
        status = "revoked" if k.revoked_at else ("expired" if k.is_expired(now) else "active")
        table.add_row(k.prefix, k.user, k.team or "-", _fmt(k.created_at), _fmt(k.expires_at), status,
                      k.description or "")
    Console().print(table)


@keys_app.command("revoke")
def revoke(prefix: str = typer.Argument(..., help="The key's public prefix (from `keys list`).")) -> None:
    """Revoke a key; running gateways refuse it from the next request on."""
    from tasks import store
    from tasks.store import audit

    info = store.revoke_key(prefix, actor=audit.default_actor())
    typer.secho(f"key {info.prefix} of {info.user} revoked at {_fmt(info.revoked_at)} UTC", fg="yellow")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
