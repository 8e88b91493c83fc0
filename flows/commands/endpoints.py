"""`llmhost endpoints attach|list|show|stop`: attach unmanaged vLLM servers, inspect and stop endpoints."""

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
    from tasks.store import attach_server, audit

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
    """Endpoints with their live revision and its replicas (state, URL, KV capacity)."""
    from rich.console import Console
    from rich.table import Table

    from tasks import store

    table = Table("endpoint", "status", "live revision", "served model", "model version",
                  "replicas (state, KV tokens)", "owner")
    for e in store.list_endpoints():
        running = [r for r in e.replicas if r.state not in ("stopped", "failed")]
        gone = len(e.replicas) - len(running)
        reps = "\n".join(f"{r.base_url} ({r.state}, {_kv(r.kv_cache_tokens)})" for r in running)
        reps = (reps + (f"\n+{gone} stopped (endpoints show --all)" if gone else "")).strip() or "-"
        table.add_row(e.name, e.status, e.live_revision or "-", e.served_model_name or "-",
                      e.model_version or "-", reps, e.owner or "-")
    Console().print(table)


def _kv(tokens: int | None) -> str:
    return f"{tokens:,} KV tokens" if tokens else "KV ?"


@endpoints_app.command("show")
def show(
    name: str = typer.Argument(..., help="Endpoint name."),
    all_replicas: bool = typer.Option(False, "--all", help="Also list stopped and failed replicas."),
) -> None:
    """Every revision of an endpoint, newest first: status, model version, tool calling, replicas."""
    from rich.console import Console
    from rich.table import Table

    from tasks import store
    from tasks.deploy import describe

    e = store.get_endpoint(name)
    console = Console()
    console.print(f"[bold]{e.name}[/bold] ({e.status}){' - ' + e.description if e.description else ''}")
    table = Table("revision", "status", "model version", "served as", "tool calling", "replicas", "reason")
    for rv in describe(name):
        reps = [r for r in rv.replicas if all_replicas or r.state not in ("stopped", "failed")]
        cell = "\n".join(f"{r.url} ({r.state}, {_kv(r.kv_cache_tokens)}, pid {r.pid})" for r in reps)
        hidden = len(rv.replicas) - len(reps)
        cell = (cell + (f"\n+{hidden} stopped" if hidden else "")).strip() or "-"
        mark = " *" if rv.live else ""
        adapters = f" (+{', '.join(sorted(rv.adapters))})" if rv.adapters else ""
        table.add_row(rv.revision + mark, rv.status, rv.model_version or "-", rv.served_model_name + adapters,
                      rv.tool_calling or "-", cell, (rv.reason or "")[:300])
    console.print(table)
    console.print("* = live revision")


@endpoints_app.command("stop")
def stop(name: str = typer.Argument(..., help="Endpoint name.")) -> None:
    """Stop every replica of an endpoint; the gateway answers 503 until it is deployed again."""
    from tasks.deploy import stop_endpoint

    n = stop_endpoint(name)
    typer.echo(f"endpoint {name}: stopped {n} replica(s); redeploy with `llmhost deploy SPEC` or "
               f"`llmhost rollback {name}`")


def register(app: typer.Typer) -> None:
    app.add_typer(endpoints_app, name="endpoints")
