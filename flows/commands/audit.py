"""`llmhost audit verify|log`: check the hash chain and read the audit log."""

from __future__ import annotations

import typer

audit_app = typer.Typer(help="The append-only, hash-chained audit log.", no_args_is_help=True)


@audit_app.command("verify")
def verify() -> None:
    """Recompute the chain; exit 1 and name the first bad entry if any row was edited or removed."""
    from tasks.store import audit

    result = audit.verify()
    if not result.ok:
        raise audit.AuditError(result.summary())
    typer.secho(result.summary(), fg="green")


@audit_app.command("log")
def log(
    endpoint: str = typer.Option(None, "--endpoint", help="Only entries about this endpoint."),
    action: str = typer.Option(None, "--action", help="Only actions starting with this (key., deploy.)."),
    limit: int = typer.Option(50, "--limit", help="Newest N entries."),
) -> None:
    """Print entries, oldest first."""
    from rich.console import Console
    from rich.table import Table

    from tasks.store import audit

    table = Table("seq", "time (UTC)", "actor", "action", "subject", "before", "after")
    for e in audit.entries(endpoint=endpoint, action=action, limit=limit):
        table.add_row(str(e.seq), e.ts[:19].replace("T", " "), e.actor, e.action, e.subject, e.before or "",
                      e.after or "")
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
