"""`llmhost access grant|revoke|list`: which users and teams may call which endpoint."""

from __future__ import annotations

import typer

access_app = typer.Typer(help="Endpoint access for users and teams.", no_args_is_help=True)


@access_app.command("grant")
def grant(
    endpoint: str = typer.Argument(..., help="Endpoint name."),
    user: str = typer.Option(None, "--user", help="User to let in."),
    team: str = typer.Option(None, "--team", help="Team to let in."),
) -> None:
    """Let a user or a team call ENDPOINT (takes effect on the next request)."""
    from tasks import store
    from tasks.store import audit

    new = store.grant(endpoint, user=user, team=team, actor=audit.default_actor())
    who = f"user {user}" if user else f"team {team}"
    typer.echo(f"{who} {'may now call' if new else 'could already call'} {endpoint}")


@access_app.command("revoke")
def revoke(
    endpoint: str = typer.Argument(..., help="Endpoint name."),
    user: str = typer.Option(None, "--user", help="User to remove."),
    team: str = typer.Option(None, "--team", help="Team to remove."),
) -> None:
    """Remove a user's or team's grant on ENDPOINT."""
    from tasks import store
    from tasks.store import audit

    removed = store.revoke_grant(endpoint, user=user, team=team, actor=audit.default_actor())
    who = f"user {user}" if user else f"team {team}"
    typer.echo(f"{who} {'removed from' if removed else 'had no grant on'} {endpoint}")


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
