"""`llmhost deploy SPEC` and `llmhost rollback NAME`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def print_result(result: Any) -> None:
    """Smoke tables, drain numbers and the outcome line; exit 1 when nothing went live."""
    from rich.console import Console
    from rich.markdown import Markdown

    console = Console()
    if result.outcome == "refused" and result.sizing_markdown:
        console.print(Markdown(result.sizing_markdown))
    if result.tool_calling and result.outcome != "unchanged":
        console.print(f"tool calling: {result.tool_calling}")
    for rp in result.smoke:
        console.print(Markdown(rp.markdown()))
    for d in result.drain:
        console.print(
            f"drained {d.replica}: waited {d.waited_s}s, up to {d.max_in_flight} request(s) in flight"
            + (" [red](timed out)[/red]" if d.timed_out else "")
        )
    color = {"live": "green", "unchanged": "cyan"}.get(result.outcome, "red")
    console.print(f"[{color}]{result.endpoint}: {result.message}[/{color}] ({result.seconds}s)")
    if result.outcome in {"failed", "refused"}:
        raise typer.Exit(1)


def _run_flow(flow: Any, *args: Any, **kwargs: Any) -> Any:
    state = flow(*args, return_state=True, **kwargs)
    return state.result()  # re-raises the flow's DeployError, which the CLI prints as one line


def register(app: typer.Typer) -> None:
    @app.command("deploy")
    def deploy(
        spec: Path = typer.Argument(..., help="Endpoint spec YAML, e.g. deployments/demo.yaml"),
        force: bool = typer.Option(False, help="Restart the revision even when it is already live."),
        flow: bool = typer.Option(
            False, "--flow", help="Run as the Prefect `deploy` flow (artifacts in the UI)."
        ),
    ) -> None:
        """Plan, size, start, smoke-test and switch an endpoint to a new revision (blue/green)."""
        from tasks.core import quiet
        from tasks.deploy import deploy as do_deploy
        from tasks.deploy import load_spec

        parsed = load_spec(spec)
        # Starting vLLM takes about a minute on a CPU: a start line, a sign of life, an end line.
        with quiet.step(f"deploy {parsed.name}"):
            if flow:
                from flows.deploy import deploy_flow

                result = _run_flow(deploy_flow, parsed, force=force)
            else:
                result = do_deploy(parsed, force=force)
        print_result(result)

    @app.command("rollback")
    def rollback(
        name: str = typer.Argument(..., help="Endpoint name."),
        to: str | None = typer.Option(
            None, "--to", help="Revision hash prefix; default: the previous good one."
        ),
        flow: bool = typer.Option(False, "--flow", help="Run as the Prefect `rollback` flow."),
    ) -> None:
        """Redeploy the previous good revision through the same smoke-tested blue/green path."""
        from tasks.core import quiet
        from tasks.deploy import rollback as do_rollback

        with quiet.step(f"rollback {name}"):
            if flow:
                from flows.deploy import rollback_flow

                result = _run_flow(rollback_flow, name, to=to)
            else:
                result = do_rollback(name, to=to)
        print_result(result)
