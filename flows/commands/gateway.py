"""`llmhost gateway`: serve the OpenAI-compatible gateway (keys, access, metering, routing)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("gateway")
    def gateway(
        host: str = typer.Option(None, help="Bind address (default LLMHOST_GATEWAY_HOST, 127.0.0.1)."),
        port: int = typer.Option(None, help="Port (default LLMHOST_GATEWAY_PORT, 8000)."),
        access_log: bool = typer.Option(False, "--access-log/--no-access-log",
                                        help="Log one line per request (usage is metered either way)."),
        log_level: str = typer.Option("info", help="uvicorn log level."),
        workers: int = typer.Option(1, min=1, max=64, help="Gateway processes on the one port (uvicorn "
                                    "workers); each meters and checks revocations on its own."),
    ) -> None:
        """Serve /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models and /metrics."""
        from gateway.app import serve

        serve(host, port, access_log=access_log, log_level=log_level, workers=workers)
