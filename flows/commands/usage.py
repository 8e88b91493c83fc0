"""`llmhost usage`: requests and tokens per endpoint, user, team and key, from the gateway's meter."""

from __future__ import annotations

import typer

from flows.commands._output import json_option

USAGE_KEYS = ("endpoint", "user", "team", "key_prefix", "requests", "errors", "prompt_tokens", "completion_tokens",
              "avg_latency_ms", "avg_ttft_ms", "cost_usd", "reasoning_tokens", "fallback_requests")  # fmt: skip


def register(app: typer.Typer) -> None:
    @app.command("usage", epilog="Example: llmhost usage --since 24h --json")
    def usage(
        endpoint: str = typer.Option(None, "--endpoint", help="Only this endpoint."),
        since: str = typer.Option(None, "--since", help="Window such as 1h, 24h, 7d; default all time."),
        as_json: bool = json_option("a list of objects, one per endpoint/user/team/key", USAGE_KEYS,
                                    "avg_ttft_ms is null when no streamed request measured it; cost_usd is "
                                    "the API spend of external endpoints at the catalog's rates (0 when "
                                    "self-hosted: see `llmhost cost`)."),
    ) -> None:
        """Requests, errors, tokens and mean latency (ms) per endpoint, user, team and key.

        Gateways write usage rows in batches, within about a second of the request.
        """
        from flows.commands._output import console, emit_json, pick, short, table, tokens
        from tasks import store

        start = store.utcnow() - store.parse_duration(since, field_name="--since") if since else None
        rows = store.summarize_usage(endpoint=endpoint, since=start)
        if as_json:
            emit_json([pick(r, USAGE_KEYS) for r in rows])
            return
        title = f"usage{f' of {endpoint}' if endpoint else ''}{f' in the last {since}' if since else ''}"
        t = table("endpoint", "user", "team", "key", "req", "err", "tok in/out", "ms", "TTFT", "$",
                  title=title)
        for r in rows:
            ttft = f"{r.avg_ttft_ms:.0f}" if r.avg_ttft_ms is not None else "-"
            spend = f"{r.cost_usd:.2f}" if r.cost_usd else "-"
            t.add_row(short(r.endpoint, 10), short(r.user, 8), short(r.team, 6), r.key_prefix or "-",
                      str(r.requests), str(r.errors), f"{tokens(r.prompt_tokens)}/{tokens(r.completion_tokens)}",
                      f"{r.avg_latency_ms:.0f}", ttft, spend)
        out = console()
        out.print(t)
        if not rows:
            out.print("no usage recorded yet: call an endpoint through `llmhost gateway` first")
