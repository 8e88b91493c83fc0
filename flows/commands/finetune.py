"""`llmhost finetune --config finetune.yaml` and `llmhost adapters load|unload|list ENDPOINT ...`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune_cmd(
        config: Path = typer.Option(..., "--config", "-c", help="Fine-tune YAML (see demo/finetune.yaml)."),
        endpoint: str | None = typer.Option(
            None, "--endpoint", help="Hot-load the new version into this endpoint."
        ),
        adapter_name: str | None = typer.Option(
            None, "--adapter-name", help="Served name (default NAME-vVERSION)."
        ),
        max_steps: int | None = typer.Option(None, "--max-steps", help="Override the config's steps."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Fine-tune a registered model with LoRA (flow `retrain`) and register the adapter version."""
        from flows.retrain import retrain
        from tasks.finetune import load_config

        cfg = load_config(config)
        if max_steps is not None:
            cfg = cfg.model_copy(update={"max_steps": max_steps})
        result = retrain(cfg, endpoint=endpoint, adapter_name=adapter_name)
        if as_json:
            typer.echo(result.model_dump_json(indent=2))
            return
        f = result.finetune
        typer.echo(result.contamination)
        typer.echo(
            f"trained {f.steps} steps in {f.train_seconds:.1f}s: train loss {f.first_loss:.3f} -> "
            f"{f.last_loss:.3f}, held-out loss {f.eval_loss_before} -> {f.eval_loss_after}"
        )
        typer.echo(f"reload check: max |logit diff| {f.reload_max_abs_diff:.2e}; MLflow run {f.run_id}")
        if f.registered_version:
            typer.echo(
                f"registered {f.registered_name} version {f.registered_version} "
                f"(adapter on v{f.base_version})  ->  models:/{f.registered_name}/{f.registered_version}"
            )
        if result.adapter:
            a = result.adapter
            typer.echo(
                f"serving as {a.endpoint}:{a.adapter} ({a.method}, {a.seconds:.2f}s) {a.note}".rstrip()
            )

    adapters = typer.Typer(help="LoRA adapters on running endpoints (no restart).", no_args_is_help=True)
    app.add_typer(adapters, name="adapters")

    @adapters.command("load")
    def load_cmd(
        endpoint: str = typer.Argument(..., help="Endpoint name."),
        version: str = typer.Argument(..., help="Adapter version: N, NAME/N or models:/NAME/N."),
        name: str | None = typer.Option(None, "--name", help="Served name (default NAME-vVERSION)."),
        no_restart: bool = typer.Option(
            False, "--no-restart", help="Fail instead of redeploying blue/green."
        ),
    ) -> None:
        """Load an adapter version into the endpoint's running replicas; callable as ENDPOINT:NAME."""
        from tasks.deploy.adapters import load_into_endpoint

        c = load_into_endpoint(endpoint, version, name=name, allow_restart=not no_restart)
        typer.echo(
            f"{c.version} is callable as {endpoint}:{c.adapter} ({c.method}, {c.seconds:.2f}s on "
            f"{len(c.replicas)} replica(s)) {c.note}".rstrip()
        )

    @adapters.command("unload")
    def unload_cmd(
        endpoint: str = typer.Argument(..., help="Endpoint name."),
        version: str = typer.Argument(
            ..., help="Adapter version (N, NAME/N, models:/NAME/N) or served name."
        ),
        no_restart: bool = typer.Option(
            False, "--no-restart", help="Fail instead of redeploying blue/green."
        ),
    ) -> None:
        """Unload an adapter from the endpoint's running replicas."""
        from tasks.deploy.adapters import unload_from_endpoint

        c = unload_from_endpoint(endpoint, version, allow_restart=not no_restart)
        typer.echo(f"unloaded {endpoint}:{c.adapter} ({c.method}, {c.seconds:.2f}s) {c.note}".rstrip())

    @adapters.command("list")
    def list_cmd(
        endpoint: str = typer.Argument(..., help="Endpoint name."),
        as_json: bool = typer.Option(
            False, "--json",
            help="Print JSON instead: one object; keys: endpoint, adapters (adapter name -> served name on the "
            "live revision), replicas (a list; keys: url, served (list, or null when unreachable), error).",
        ),
    ) -> None:
        """Adapters the endpoint's live revision serves, and what each replica reports."""
        from tasks import store
        from tasks.serving.lora import served_adapters

        e = store.get_endpoint(endpoint)
        revs = [r for r in store.list_revisions(endpoint) if r.id == e.live_revision_id]
        known = dict(revs[0].adapters or {}) if revs else {}
        if as_json:
            import json

            replicas = []
            for r in store.list_replicas(endpoint):
                try:
                    replicas.append({"url": r.base_url, "served": list(served_adapters(r.base_url)), "error": None})
                except Exception as exc:  # a down replica should not hide the others
                    replicas.append({"url": r.base_url, "served": None, "error": type(exc).__name__})
            typer.echo(json.dumps({"endpoint": endpoint, "adapters": known, "replicas": replicas}, indent=2))
            return
        typer.echo(f"{endpoint}: " + (", ".join(f"{endpoint}:{k}" for k in sorted(known)) or "no adapters"))
        for r in store.list_replicas(endpoint):
            try:
                typer.echo(f"  {r.base_url}: {', '.join(served_adapters(r.base_url)) or '-'}")
            except Exception as exc:  # a down replica should not hide the others
                typer.echo(f"  {r.base_url}: unreachable ({type(exc).__name__})")
