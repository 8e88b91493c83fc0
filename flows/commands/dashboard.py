"""`llmhost dashboard admin|admins`: who sees every endpoint in the gateway's dashboard (/ui)."""

from __future__ import annotations

import typer

dashboard_app = typer.Typer(help="The gateway's dashboard at /ui.", no_args_is_help=True)


@dashboard_app.command("admin")
def admin(
    user: str = typer.Argument(..., help="User name (as in `llmhost keys create --user`)."),
    remove: bool = typer.Option(False, "--remove", help="Take the admin flag away instead."),
) -> None:
    """Let USER see every endpoint in the dashboard (or stop that with --remove); audited."""
    from gateway.dashboard.auth import set_admin
    from tasks.store import audit

    changed = set_admin(user, not remove, actor=audit.default_actor())
    if changed:
        typer.echo(f"{user} {'is no longer' if remove else 'is now'} a dashboard admin")
    else:
        typer.echo(f"{user} was already {'not ' if remove else ''}a dashboard admin")


@dashboard_app.command("admins")
def admins(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead: a list of user names (strings)."),
) -> None:
    """List dashboard admins, one per line."""
    from gateway.dashboard.auth import list_admins

    names = list_admins()
    if as_json:
        import json

        typer.echo(json.dumps(list(names), indent=2))
        return
    for name in names:
        typer.echo(name)


def register(app: typer.Typer) -> None:
    app.add_typer(dashboard_app, name="dashboard")
