"""`llmhost keys create|list|revoke`: per-user (and per-team) API keys for the gateway."""

from __future__ import annotations

import typer

from flows.commands._output import json_option

keys_app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)


def _fmt(dt) -> str:  # type: ignore[no-untyped-def]
    return dt.strftime("%Y-%m-%d %H:%M") if dt else "-"


@keys_app.command("create", epilog="Example: llmhost keys create --user alice --team ml --expires 30d")
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


KEY_KEYS = ("prefix", "user", "team", "created_at", "expires_at", "revoked_at", "status", "description")


@keys_app.command("list", epilog="Example: llmhost keys list --active --json")
def list_(
    active: bool = typer.Option(False, "--active", help="Hide revoked keys."),
    as_json: bool = json_option("a list of key objects", KEY_KEYS,
                                "Times are ISO 8601 UTC or null; status is active, expired or revoked. "
                                "Raw keys and key hashes are never printed."),
) -> None:
    """List keys by public prefix (secrets are never shown)."""
    from flows.commands._output import console, emit_json, short, table
    from tasks import store

    now = store.utcnow()
    keys = store.list_keys(include_revoked=not active)

    def status(k) -> str:  # type: ignore[no-untyped-def]
        return "revoked" if k.revoked_at else ("expired" if k.is_expired(now) else "active")

    if as_json:
        emit_json([{"prefix": k.prefix, "user": k.user, "team": k.team, "created_at": _iso(k.created_at),
                    "expires_at": _iso(k.expires_at), "revoked_at": _iso(k.revoked_at), "status": status(k),
                    "description": k.description} for k in keys])
        return
    t = table("prefix", "user", "team", "created (UTC)", "expires", "status", "description")
    for k in keys:
        t.add_row(k.prefix, short(k.user, 12), short(k.team, 8), _fmt(k.created_at), _fmt(k.expires_at)[:10],
                  status(k), short(k.description, 12))
    console().print(t)


def _iso(dt) -> str | None:  # type: ignore[no-untyped-def]
    return dt.isoformat() if dt else None


@keys_app.command("revoke", epilog="Example: llmhost keys revoke 1a2b3c4d")
def revoke(prefix: str = typer.Argument(..., help="The key's public prefix (from `keys list`).")) -> None:
    """Revoke a key; running gateways refuse it from the next request on."""
    from tasks import store
    from tasks.store import audit

    info = store.revoke_key(prefix, actor=audit.default_actor())
    typer.secho(f"key {info.prefix} of {info.user} revoked at {_fmt(info.revoked_at)} UTC", fg="yellow")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
