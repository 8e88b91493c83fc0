"""`llmhost deploy SPEC` and `llmhost rollback NAME`."""

from __future__ import annotations

from pathlib import Path

import typer


def _print_result(result) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console
    from rich.markdown import Markdown

    console = Console()
    if result.outcome == "refused" and result.sizing_markdown:
        console.print(Markdown(result.sizing_markdown))
    for rp in result.smoke:
        console.print(Markdown(rp.markdown()))
    color = {"live": "green", "unchanged": "cyan"}.get(result.outcome, "red")
    console.print(f"[{color}]{result.endpoint}: {result.message}[/{color}] ({result.seconds}s)")
    if result.outcome in {"failed", "refused"}:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    @app.command("deploy")
    def deploy(
        spec: Path = typer.Argument(..., help="Endpoint spec YAML, e.g. deployments/demo.yaml"),
        force: bool = typer.Option(False, help="Redeploy even when the revision is already live."),
        flow: bool = typer.Option(False, "--flow", help="Run as the Prefect `deploy` flow (artifacts in the UI)."),
    ) -> None:
        """Plan, size, start, smoke-test and switch an endpoint to a new revision (blue/green)."""
        from tasks.endpoints import deploy as do_deploy
        from tasks.endpoints import load_spec

        parsed = load_spec(spec)
        if flow:
            from flows.deploy import deploy_flow

            result = deploy_flow(parsed, force=force)
        else:
            result = do_deploy(parsed, force=force)
        _print_result(result)

    @app.command("rollback")
    def rollback(
        name: str = typer.Argument(..., help="Endpoint name."),
        to: str | None = typer.Option(None, "--to", help="Revision hash prefix; default: the previous good one."),
    ) -> None:
        """Redeploy the previous good revision through the same smoke-tested path."""
        from tasks.endpoints import rollback as do_rollback

        _print_result(do_rollback(name, to=to))
