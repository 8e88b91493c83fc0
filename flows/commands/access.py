"""`llmhost access grant|revoke|list`: which users and teams may call which endpoint."""

from __future__ import annotations

import typer

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


@access_app.command("list")
def list_(endpoint: str = typer.Argument(None, help="Only this endpoint.")) -> None:
    """List grants."""
    from rich.console import Console
    from rich.table import Table

    from tasks import store

    table = Table("endpoint", "kind", "name")
    for ep, kind, name in store.list_grants(endpoint):
        table.add_row(ep, kind, name)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(access_app, name="access")
