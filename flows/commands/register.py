"""`llmhost register SOURCE --name NAME` and `llmhost models list|show|resolve`."""

from __future__ import annotations

import json

import typer

# Shown first in `models show`; the rest follow alphabetically.
_KEY_TAGS = (
    "source", "content_hash", "architectures", "params_total", "params_active", "dtype", "max_context",
    "has_chat_template", "template_supports_tools", "tool_call_format", "vllm_supported", "vllm_reason",
    "trust_remote_code",
)  # fmt: skip


def _tag_table(title: str, tags: dict[str, str]):  # -> rich.table.Table
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key in [k for k in _KEY_TAGS if k in tags] + sorted(k for k in tags if k not in _KEY_TAGS):
        table.add_row(key, tags[key])
    return table


def register(app: typer.Typer) -> None:
    @app.command("register")
    def register_cmd(
        source: str = typer.Argument(..., help="hf:ORG/NAME[@REV], run:RUN_ID[/ARTIFACT_PATH] or path:DIR"),
        name: str = typer.Option(..., "--name", "-n", help="Registered model name in MLflow."),
        force: bool = typer.Option(False, "--force", help="Register even if vLLM cannot serve the arch."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Register a model version in MLflow (reused when the same content is already registered)."""
        from rich.console import Console

        from tasks.register import VersionTags, register_model

        console = Console()
        with console.status(f"registering {source} as {name}..."):
            result = register_model(source, name, force=force)
        if as_json:
            typer.echo(result.model_dump_json(indent=2))
            return
        verb = "registered" if result.created else "already registered (same content hash)"
        console.print(f"{result.name} version {result.version}: {verb}  ->  {result.model_uri}")
        console.print(_tag_table(f"tags of {result.model_uri}", result.tags))
        tags = VersionTags.from_mlflow(result.tags)
        if not tags.vllm_supported:
            console.print(f"[yellow]vllm_supported=false: {tags.vllm_reason or ''}[/yellow]")

    models = typer.Typer(help="Registered models.", no_args_is_help=True)
    app.add_typer(models, name="models")

    @models.command("list")
    def list_cmd(as_json: bool = typer.Option(False, "--json")) -> None:
        """Registered models with their latest version and aliases."""
        from rich.console import Console
        from rich.table import Table

        from tasks.register import VersionTags, list_models

        rows = list_models()
        if as_json:
            typer.echo(json.dumps([r.model_dump() for r in rows], indent=2))
            return
        table = Table("name", "latest", "aliases", "architectures", "params", "dtype", "ctx", "vLLM")
        for r in rows:
            t = VersionTags.from_mlflow(r.tags)
            aliases = ", ".join(f"{a}->{v}" for a, v in sorted(r.aliases.items()))
            params = f"{t.params_total / 1e6:.2f}M" if t.params_total is not None else "?"
            vllm = "" if t.vllm_supported is None else str(t.vllm_supported).lower()
            table.add_row(
                r.name, r.latest_version or "-", aliases, ",".join(t.architectures or []), params,
                t.dtype or "", str(t.max_context or ""), vllm,
            )  # fmt: skip
        Console().print(table)

    @models.command("show")
    def show_cmd(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
        """Every version of NAME with its tags."""
        from rich.console import Console

        from tasks.register import model_versions

        versions = model_versions(name)
        if as_json:
            typer.echo(json.dumps([v.model_dump() for v in versions], indent=2))
            return
        console = Console()
        for v in versions:
            console.print(_tag_table(f"{v.model_uri}  (run {v.run_id})", v.tags))

    @models.command("resolve")
    def resolve_cmd(ref: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VER")) -> None:
        """Print the local Hugging Face folder vLLM would load for REF (downloads it if needed)."""
        from tasks.register import resolve_model_ref

        typer.echo(str(resolve_model_ref(ref).local_dir))
