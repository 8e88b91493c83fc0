"""The `llmhost` console script: one subcommand (or group) per lifecycle step.

Each module in `flows/commands/` defines `register(app: typer.Typer) -> None`; they are
discovered here so that steps add commands without touching this file.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import typer

from tasks.core.errors import LlmhostError

app = typer.Typer(
    name="llmhost",
    help="Self-hosted LLM lifecycle: register, size, deploy, smoke, evaluate, fine-tune, promote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _load_commands() -> None:
    from flows import commands

    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"flows.commands.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_load_commands()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; library errors become one line on stderr and exit code 1."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        app(args=argv, standalone_mode=False)
    except LlmhostError as exc:
        if os.environ.get("LLMHOST_RAISE_ERRORS"):
            raise
        typer.secho(f"Error: {exc}", err=True, fg="red")
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        return 1
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
