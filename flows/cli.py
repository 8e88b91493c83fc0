"""The `llmhost` console script: one subcommand (or group) per lifecycle step.

Each module in `flows/commands/` defines `register(app: typer.Typer) -> None`; they are
discovered here so that steps add commands without touching this file.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from tasks.core.errors import LlmhostError

# `llmhost --help` reads in the order a newcomer uses the commands: the lifecycle, then operating it.
LIFECYCLE = ("register", "models", "size", "deploy", "rollback", "eval", "finetune", "adapters", "promote")
OPERATIONS = ("endpoints", "keys", "access", "usage", "cost", "audit", "gateway", "dashboard", "render", "data", "team",
              "lifecycle", "demo", "demo-serve")  # fmt: skip

# One example per command, shown at the end of its --help; a command may set its own epilog instead.
EXAMPLES = {
    "register": "llmhost register path:.llmhost/demo/model --name demo",
    "size": "llmhost size models:/demo@champion --json",
    "deploy": "llmhost deploy deployments/demo.yaml",
    "rollback": "llmhost rollback demo",
    "eval suites": "llmhost eval suites",
    "eval run": "llmhost eval run demo_routing --target endpoint:demo --limit 20",
    "eval compare": "llmhost eval compare demo_routing --targets endpoint:demo:tuned endpoint:demo",
    "finetune": "llmhost finetune --config demo/finetune.yaml --endpoint demo",
    "adapters load": "llmhost adapters load demo models:/demo/2",
    "adapters unload": "llmhost adapters unload demo models:/demo/2",
    "adapters list": "llmhost adapters list demo",
    "promote": "llmhost promote demo 2 --force",
    "access grant": "llmhost access grant demo --team ml",
    "access revoke": "llmhost access revoke demo --user alice",
    "access list": "llmhost access list demo",
    "cost": "llmhost cost demo --frontier gpt-4o-mini --json",
    "audit at": "llmhost audit at now --endpoint demo",
    "gateway": "llmhost gateway --port 8080",
    "dashboard admin": "llmhost dashboard admin alice",
    "dashboard admins": "llmhost dashboard admins",
    "render k8s": "llmhost render k8s deployments/demo-ray.yaml --namespace llm",
    "data add": "llmhost data add new_rows.jsonl --dataset support",
    "lifecycle": "llmhost lifecycle --eval-limit 50",
    "demo": "llmhost demo",
    "demo-serve": "llmhost demo-serve --question 'Where do I send an invoice question?'",
}


class LifecycleGroup(TyperGroup):
    """Lists commands in LIFECYCLE then OPERATIONS order; any other command follows, alphabetically."""

    def list_commands(self, ctx: Any) -> list[str]:
        order = {name: i for i, name in enumerate(LIFECYCLE + OPERATIONS)}
        return sorted(self.commands, key=lambda n: (order.get(n, len(order)), n))


app = typer.Typer(
    name="llmhost",
    cls=LifecycleGroup,
    help="Self-hosted LLM lifecycle: register, size, deploy, evaluate, fine-tune, promote; then operate it.",
    epilog="Example: llmhost register path:.llmhost/demo/model --name demo && llmhost size models:/demo/1",
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


def _arrange(typer_app: typer.Typer, prefix: str = "") -> None:
    """Put each command in its help panel and give it its example (unless it wrote its own)."""
    for cmd in typer_app.registered_commands:
        name = cmd.name or (cmd.callback.__name__ if cmd.callback else "")
        path = f"{prefix}{name}"
        if not prefix:
            cmd.rich_help_panel = "Lifecycle" if name in LIFECYCLE else "Operations"
        if cmd.epilog is None and path in EXAMPLES:
            cmd.epilog = f"Example: {EXAMPLES[path]}"
    for group in typer_app.registered_groups:
        if group.typer_instance is None:
            continue
        if not prefix:
            group.rich_help_panel = "Lifecycle" if group.name in LIFECYCLE else "Operations"
        _arrange(group.typer_instance, f"{prefix}{group.name} ")


_load_commands()
_arrange(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; library errors become one line on stderr and exit code 1."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if argv is None:  # the console process only: a caller passing argv (tests, embedding) keeps its own logging
        from tasks.core import quiet

        quiet.setup(sys.argv[1:])
    from tasks.core.quiet import announce

    try:
        # Without standalone mode click returns (not raises) a command's `typer.Exit(code)`: keep its code.
        rc = app(args=argv, standalone_mode=False)
    except LlmhostError as exc:  # bad input or a refused step: the one line (the log path only if lines came before)
        if os.environ.get("LLMHOST_RAISE_ERRORS"):
            raise
        typer.secho(f"Error: {exc}", err=True, fg="red")
        return 1
    except typer.Exit as exc:
        announce()
        return exc.exit_code
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        return 1
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        announce()  # an unexpected error: its traceback, and where the libraries' output went
        raise
    announce()
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
