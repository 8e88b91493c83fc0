"""`llmhost access grant|revoke|list`: which users and teams may call which endpoint."""

from __future__ import annotations

import typer

from flows.commands._output import json_option

access_app = typer.Typer(help="Endpoint access for users and teams.", no_args_is_help=True)


def _change(allow: bool, endpoint: str, user: str | None, team: str | None) -> None:
    from tasks import store
    from tasks.store import audit

    change = store.grant if allow else store.revoke_grant
    changed = change(endpoint, user=user, team=team, actor=audit.default_actor())
    said = ("may now call", "could already call") if allow else ("removed from", "had no grant on")
    typer.echo(f"{f'user {user}' if user else f'team {team}'} {said[0] if changed else said[1]} {endpoint}")


@access_app.command("grant")
def grant(endpoint: str = typer.Argument(..., help="Endpoint name."),
          user: str = typer.Option(None, "--user", help="User to let in."),
          team: str = typer.Option(None, "--team", help="Team to let in.")) -> None:
    """Let a user or a team call ENDPOINT (takes effect on the next request)."""
    _change(True, endpoint, user, team)


@access_app.command("revoke")
def revoke(endpoint: str = typer.Argument(..., help="Endpoint name."),
           user: str = typer.Option(None, "--user", help="User to remove."),
           team: str = typer.Option(None, "--team", help="Team to remove.")) -> None:
    """Remove a user's or team's grant on ENDPOINT."""
    _change(False, endpoint, user, team)


GRANT_KEYS = ("endpoint", "kind", "name")


@access_app.command("list")
def list_(
    endpoint: str = typer.Argument(None, help="Only this endpoint."),
    as_json: bool = json_option("a list of grant objects", GRANT_KEYS, "kind is user or team."),
) -> None:
    """List grants."""
    from flows.commands._output import console, emit_json, short, table
    from tasks import store

    grants = store.list_grants(endpoint)
    if as_json:
        emit_json([dict(zip(GRANT_KEYS, g, strict=True)) for g in grants])
        return
    t = table("endpoint", "kind", "name")
    for ep, kind, name in grants:
        t.add_row(short(ep, 30), kind, short(name, 30))
    console().print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(access_app, name="access")
