"""`llmhost usage`: requests and tokens per endpoint, user, team and key, from the gateway's meter."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("usage")
    def usage(
        endpoint: str = typer.Option(None, "--endpoint", help="Only this endpoint."),
        since: str = typer.Option(None, "--since", help="Window such as 1h, 24h, 7d; default all time."),
    ) -> None:
        """Print a usage table (gateways write rows in batches, within about a second)."""
        from rich.console import Console
        from rich.table import Table

        from tasks import store

        start = store.utcnow() - store.parse_duration(since, field_name="--since") if since else None
        rows = store.summarize_usage(endpoint=endpoint, since=start)
        title = f"usage{f' of {endpoint}' if endpoint else ''}{f' in the last {since}' if since else ''}"
        table = Table("endpoint", "user", "team", "key", "requests", "errors", "prompt tok", "completion tok",
                      "avg latency ms", "avg TTFT ms", title=title)
        for r in rows:
            ttft = f"{r.avg_ttft_ms:.1f}" if r.avg_ttft_ms is not None else "-"
            table.add_row(r.endpoint or "-", r.user or "-", r.team or "-", r.key_prefix or "-",
                          str(r.requests), str(r.errors), str(r.prompt_tokens), str(r.completion_tokens),
                          f"{r.avg_latency_ms:.1f}", ttft)
        console = Console()
        console.print(table)
        if not rows:
            console.print("no usage recorded yet: call an endpoint through `llmhost gateway` first")
