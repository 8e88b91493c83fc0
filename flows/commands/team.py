"""`llmhost team up|down|status`: team mode's PostgreSQL and MLflow server under the state dir (make team-up)."""

from __future__ import annotations

from pathlib import Path

import typer

team_app = typer.Typer(help="Team mode: a PostgreSQL store and an MLflow tracking server (docs/team_mode.md).",
                       no_args_is_help=True)

ROOT_HELP = "Where they live (default: $LLMHOST_HOME/team)."


def _argv(action: str, root: Path | None, pg_root: Path | None = None) -> list[str]:
    argv = [action]
    if root:
        argv += ["--root", str(root)]
    if pg_root:
        argv += ["--pg-root", str(pg_root)]
    return argv


@team_app.command("up", epilog="Example: llmhost team up --mlflow-port 5000")
def up(
    root: Path = typer.Option(None, "--root", help=ROOT_HELP),
    pg_root: Path = typer.Option(None, "--pg-root", help="PostgreSQL's folder (default: ROOT/pg)."),
    pg_port: int = typer.Option(None, "--pg-port", help="Default: the last one used, else a free one."),
    mlflow_port: int = typer.Option(None, "--mlflow-port", help="Default: the last one used, else a free one."),
) -> None:
    """Start PostgreSQL and `mlflow server` (whichever is not running) and write team.env to source."""
    from tasks.core.team import main

    argv = _argv("up", root, pg_root)
    argv += ["--pg-port", str(pg_port)] if pg_port else []
    argv += ["--mlflow-port", str(mlflow_port)] if mlflow_port else []
    raise typer.Exit(main(argv))


@team_app.command("down", epilog="Example: llmhost team down")
def down(root: Path = typer.Option(None, "--root", help=ROOT_HELP),
         pg_root: Path = typer.Option(None, "--pg-root", help="PostgreSQL's folder (default: ROOT/pg).")) -> None:
    """Stop both; their data stays."""
    from tasks.core.team import main

    raise typer.Exit(main(_argv("down", root, pg_root)))


@team_app.command("status", epilog="Example: llmhost team status")
def status(root: Path = typer.Option(None, "--root", help=ROOT_HELP),
           pg_root: Path = typer.Option(None, "--pg-root", help="PostgreSQL's folder (default: ROOT/pg).")) -> None:
    """Whether each service is up; exit 1 unless both are."""
    from tasks.core.team import main

    raise typer.Exit(main(_argv("status", root, pg_root)))


def register(app: typer.Typer) -> None:
    app.add_typer(team_app, name="team")
