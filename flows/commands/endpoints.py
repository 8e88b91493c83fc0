"""`llmhost endpoints attach|list|show|stop`: attach unmanaged vLLM servers, inspect and stop endpoints."""

from __future__ import annotations

import typer

from flows.commands._output import json_option

endpoints_app = typer.Typer(help="Endpoints: the names users call.", no_args_is_help=True)


@endpoints_app.command(
    "attach", epilog="Example: llmhost endpoints attach team-llm --base-url http://gpu1:8001/v1 --served-model qwen"
)
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


ENDPOINT_KEYS = ("name", "status", "owner", "description", "live_revision", "served_model_name", "model_version",
                 "replicas")  # fmt: skip
REPLICA_KEYS = ("name", "state", "url", "target", "kv_cache_tokens")
REVISION_KEYS = ("revision", "status", "live", "model_version", "served_model_name", "adapters", "tool_calling",
                 "reason", "created_at", "facts", "replicas")  # fmt: skip
REVISION_REPLICA_KEYS = ("name", "state", "url", "kv_cache_tokens", "pid", "log_path", "gpus")


@endpoints_app.command("list", epilog="Example: llmhost endpoints list --json")
def list_(
    as_json: bool = json_option(
        "a list of endpoint objects", ENDPOINT_KEYS,
        f"Each of `replicas` (the live revision's, stopped ones too) has keys {', '.join(REPLICA_KEYS)}.",
    ),
) -> None:
    """Endpoints with their live revision and its replicas, one line per running replica."""
    from flows.commands._output import console, emit_json, pick, short, table
    from tasks import store

    endpoints = store.list_endpoints()
    if as_json:
        emit_json([{**pick(e, ENDPOINT_KEYS[:-1]), "replicas": [
            {"name": r.name, "state": r.state, "url": r.base_url, "target": r.target,
             "kv_cache_tokens": r.kv_cache_tokens} for r in e.replicas]} for e in endpoints])
        return
    t = table("endpoint", "status", "live", "model", "replica", "state, KV")
    for e in endpoints:
        running = [r for r in e.replicas if r.state not in ("stopped", "failed")]
        gone = len(e.replicas) - len(running)
        head = [short(e.name, 14), short(e.status, 7), (e.live_revision or "-")[:8], short(_model(e.model_version), 10)]
        lines = [(_host(r.base_url), f"{r.state} {_kv(r.kv_cache_tokens)}") for r in running]
        if gone:
            lines.append((f"+{gone} stopped", ""))
        for i, (url, state) in enumerate(lines or [("-", "")]):
            t.add_row(*(head if i == 0 else [""] * len(head)), short(url, 20), short(state, 11))
    out = console()
    out.print(t)
    out.print("full values: llmhost endpoints show NAME, or --json")


def _model(version: str | None) -> str:
    return version.removeprefix("models:/") if version else "-"


def _host(url: str) -> str:
    """http://127.0.0.1:8001/v1 -> 127.0.0.1:8001: the part that tells replicas apart."""
    rest = url.split("://", 1)[-1]
    return rest.removesuffix("/").removesuffix("/v1")


def facts_text(value: object) -> str:
    """One revision fact (sizing, placement, swap) as `k=v k=v`, in the order it was recorded."""
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items() if v is not None)
    return str(value)


def _kv(tokens_: int | None) -> str:
    from flows.commands._output import tokens

    return tokens(tokens_) if tokens_ else "?"


@endpoints_app.command("show", epilog="Example: llmhost endpoints show demo --all --json")
def show(
    name: str = typer.Argument(..., help="Endpoint name."),
    all_replicas: bool = typer.Option(False, "--all", help="Also list stopped and failed replicas."),
    as_json: bool = json_option(
        "a list of revision objects, newest first", REVISION_KEYS,
        f"Each of `replicas` has keys {', '.join(REVISION_REPLICA_KEYS)}; --all includes stopped ones.",
    ),
) -> None:
    """Every revision of an endpoint, newest first: status, model version, tool calling, replicas."""
    from flows.commands._output import console, emit_json, short, table
    from tasks import store
    from tasks.deploy import describe

    e = store.get_endpoint(name)
    revisions = describe(name)
    if as_json:
        emit_json([{**{k: getattr(rv, k) for k in REVISION_KEYS[:-1]}, "replicas": [
            r.model_dump(include=set(REVISION_REPLICA_KEYS)) for r in rv.replicas
            if all_replicas or r.state not in ("stopped", "failed")]} for rv in revisions])
        return
    out = console()
    out.print(short(f"{e.name} ({e.status}){' - ' + e.description if e.description else ''}", 79), markup=False)
    t = table("revision", "status", "model", "served as", "replica", "state, pid")
    for rv in revisions:
        reps = [r for r in rv.replicas if all_replicas or r.state not in ("stopped", "failed")]
        hidden = len(rv.replicas) - len(reps)
        adapters = f" +{len(rv.adapters)}" if rv.adapters else ""
        head = [rv.revision + ("*" if rv.live else ""), short(rv.status, 7), short(_model(rv.model_version), 9),
                short(rv.served_model_name, 10 - len(adapters)) + adapters]
        lines = [(_host(r.url), f"{r.state} {r.pid or '-'}" + (f" gpu{r.gpus}" if r.gpus else "")) for r in reps]
        if hidden:
            lines.append((f"+{hidden} stopped", ""))
        for i, (url, state) in enumerate(lines or [("-", "")]):
            t.add_row(*(head if i == 0 else [""] * len(head)), short(url, 16), short(state, 12))
    out.print(t)
    failures = store.replica_failures(name)  # what a replica's supervisor recorded when it gave up restarting it
    for rv in revisions[:5]:
        if rv.reason:
            out.print(short(f"{rv.revision[:8]}: {rv.reason}", 79), highlight=False, markup=False)
        for r in rv.replicas:
            if r.state == "failed" and r.name in failures:
                out.print(short(f"{rv.revision[:8]} {r.name} failed: {failures[r.name].get('reason')}", 79),
                          highlight=False, markup=False)
        for topic, value in rv.facts.items():
            out.print(short(f"{rv.revision[:8]} {topic}: {facts_text(value)}", 79), highlight=False, markup=False)
    out.print("* = live revision; +N = LoRA adapters; full values: --json")


@endpoints_app.command("stop", epilog="Example: llmhost endpoints stop demo")
def stop(name: str = typer.Argument(..., help="Endpoint name.")) -> None:
    """Stop every replica of an endpoint; the gateway answers 503 until it is deployed again."""
    from tasks.deploy import stop_endpoint

    n = stop_endpoint(name)
    typer.echo(f"endpoint {name}: stopped {n} replica(s); redeploy with `llmhost deploy SPEC` or "
               f"`llmhost rollback {name}`")


def register(app: typer.Typer) -> None:
    app.add_typer(endpoints_app, name="endpoints")
