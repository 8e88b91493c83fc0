"""`llmhost audit verify|log`: check the hash chain and read the audit log."""

from __future__ import annotations

import typer

from flows.commands._output import json_option

audit_app = typer.Typer(help="The append-only, hash-chained audit log.", no_args_is_help=True)


@audit_app.command("verify", epilog="Example: llmhost audit verify")
def verify() -> None:
    """Recompute the chain; exit 1 and name the first bad entry if any row was edited or removed."""
    from tasks.store import audit

    result = audit.verify()
    if not result.ok:
        raise audit.AuditError(result.summary())
    typer.secho(result.summary(), fg="green")


AUDIT_KEYS = ("seq", "ts", "actor", "action", "subject", "endpoint", "before", "after", "links")


@audit_app.command("log", epilog="Example: llmhost audit log --action deploy. --limit 20 --json")
def log(
    endpoint: str = typer.Option(None, "--endpoint", help="Only entries about this endpoint."),
    action: str = typer.Option(None, "--action", help="Only actions starting with this (key., deploy.)."),
    limit: int = typer.Option(50, "--limit", help="Newest N entries."),
    as_json: bool = json_option("a list of entry objects, oldest first", AUDIT_KEYS,
                                "before, after and links are the recorded JSON values (null when absent)."),
) -> None:
    """Print entries, oldest first (before/after shortened; the full values under --json)."""
    from flows.commands._output import console, emit_json, short, table
    from tasks.store import audit

    rows = audit.entries(endpoint=endpoint, action=action, limit=limit)
    if as_json:
        emit_json([{"seq": e.seq, "ts": e.ts, "actor": e.actor, "action": e.action, "subject": e.subject,
                    "endpoint": e.endpoint, "before": _load(e.before), "after": _load(e.after),
                    "links": _load(e.links)} for e in rows])
        return
    t = table("seq", "time (UTC)", "actor", "action", "subject", "change")
    for e in rows:
        change = f"{e.before} -> {e.after}" if e.before else (e.after or "")
        t.add_row(str(e.seq), e.ts[5:16].replace("T", " "), short(e.actor, 10), short(e.action, 16),
                  short(e.subject, 16), short(change, 14))
    console().print(t)


def _load(value: str | None):  # type: ignore[no-untyped-def]
    import json

    if value is None or value == "":
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
