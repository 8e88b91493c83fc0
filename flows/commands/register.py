"""`llmhost register SOURCE --name NAME` and `llmhost models list|show|resolve`."""

from __future__ import annotations

import json

import typer

from flows.commands._output import json_option

REGISTERED_KEYS = ("name", "version", "created", "model_uri", "source", "run_id", "tags")
SUMMARY_KEYS = ("name", "latest_version", "aliases", "tags")

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
    @app.command("register", epilog="Example: llmhost register path:.llmhost/demo/model --name demo")
    def register_cmd(
        source: str = typer.Argument(..., help="hf:ORG/NAME\\[@REV], run:RUN_ID\\[/ARTIFACT_PATH] or path:DIR"),
        name: str = typer.Option(..., "--name", "-n", help="Registered model name in MLflow."),
        force: bool = typer.Option(False, "--force", help="Register even if vLLM cannot serve the arch."),
        as_json: bool = json_option("one object", REGISTERED_KEYS, "tags maps tag name to string value."),
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

    @models.command("list", epilog="Example: llmhost models list --json")
    def list_cmd(
        as_json: bool = json_option("a list of model objects", SUMMARY_KEYS,
                                    "aliases maps alias to version; tags are the latest version's."),
    ) -> None:
        """Registered models with their latest version and aliases."""
        from flows.commands._output import console, short, table
        from tasks.register import VersionTags, list_models

        rows = list_models()
        if as_json:
            typer.echo(json.dumps([r.model_dump(include=set(SUMMARY_KEYS)) for r in rows], indent=2))
            return
        t = table("name", "latest", "aliases", "architecture", "params", "dtype", "ctx", "vLLM")
        for r in rows:
            tg = VersionTags.from_mlflow(r.tags)
            aliases = ",".join(f"{a}:{v}" for a, v in sorted(r.aliases.items()))
            params = f"{tg.params_total / 1e6:.1f}M" if tg.params_total is not None else "?"
            vllm = "" if tg.vllm_supported is None else ("yes" if tg.vllm_supported else "no")
            t.add_row(
                short(r.name, 14), r.latest_version or "-", short(aliases, 18),
                short(",".join(tg.architectures or []), 14), params, short(tg.dtype, 8), str(tg.max_context or ""),
                vllm,
            )  # fmt: skip
        console().print(t)

    @models.command("show", epilog="Example: llmhost models show demo --json")
    def show_cmd(
        name: str = typer.Argument(..., help="Registered model name."),
        as_json: bool = json_option("a list of version objects, oldest first", REGISTERED_KEYS,
                                    "created is always false here; tags maps tag name to string value."),
    ) -> None:
        """Every version of NAME with its tags, then the history of its aliases from the audit log."""
        from rich.console import Console

        from flows.commands._output import short, table
        from tasks.promote import alias_history
        from tasks.register import model_versions

        versions = model_versions(name)
        if as_json:
            typer.echo(json.dumps([v.model_dump(include=set(REGISTERED_KEYS)) for v in versions], indent=2))
            return
        console = Console()
        for v in versions:
            console.print(_tag_table(f"{v.model_uri}  (run {v.run_id})", v.tags))
        history = alias_history(name)
        if history:
            t = table("when (UTC)", "action", "by", "aliases")
            for h in history:
                moves = "; ".join(f"{a} {b or '-'}->{c or '-'}" for a, (b, c) in h.changes.items())
                t.add_row(h.ts[:16].replace("T", " "), h.action, short(h.actor, 12), moves or "-")
            console.print("aliases (champion serves; challenger is under test; previous-champion was replaced):")
            console.print(t)

    @models.command("resolve", epilog="Example: llmhost models resolve models:/demo@champion")
    def resolve_cmd(ref: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VER")) -> None:
        """Print the local Hugging Face folder vLLM would load for REF (downloads it if needed)."""
        from tasks.register import resolve_model_ref

        typer.echo(str(resolve_model_ref(ref).local_dir))
