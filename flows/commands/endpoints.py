"""`llmhost endpoints attach|list`: register vLLM servers llmhost does not manage, and list endpoints."""

from __future__ import annotations

import typer

endpoints_app = typer.Typer(help="Endpoints: the names users call.", no_args_is_help=True)


@endpoints_app.command("attach")
def attach(
    name: str = typer.Argument(..., help="Endpoint name users will send as `model`."),
    base_url: str = typer.Option(..., "--base-url", help="The server's OpenAI base URL, e.g. http://h:8001/v1."),
    served_model: str = typer.Option(..., "--served-model", help="The server's --served-model-name."),
    adapter: list[str] = typer.Option(
        [], "--adapter", help="ADAPTER=SERVED_NAME of a LoRA it serves; call it as model='NAME:ADAPTER'."),
    description: str = typer.Option(None, help="What the endpoint is for."),
    owner: str = typer.Option(None, help="Who answers for it."),
) -> None:
    """Register an existing vLLM server as an endpoint replica (run again with another URL to add one)."""
    from tasks import audit
    from tasks.store import attach_server

    adapters = {}
    for item in adapter:
        a, sep, served = item.partition("=")
        adapters[a] = served if sep else a
    rev, rep = attach_server(name, base_url=base_url, served_model=served_model, adapters=adapters,
                             description=description, owner=owner, actor=audit.default_actor())
    typer.echo(f"endpoint {name}: revision {rev.content_hash[:12]} is live; "
               f"replica {rep.name} -> {rep.base_url}")


@endpoints_app.command("list")
def list_() -> None:
    """Endpoints with their live revision and replicas."""
    from rich.console import Console
    from rich.table import Table

    from tasks import store

    table = Table("endpoint", "status", "live revision", "served model", "model version", "replicas", "owner")
    for e in store.list_endpoints():
        reps = "\n".join(f"{r.base_url} ({r.state})" for r in e.replicas) or "-"
        table.add_row(e.name, e.status, e.live_revision or "-", e.served_model_name or "-",
                      e.model_version or "-", reps, e.owner or "-")
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(endpoints_app, name="endpoints")
