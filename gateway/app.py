"""Builds the gateway ASGI app: OpenAI-compatible /v1 routes, /metrics, /health and /openapi.json.

Proxied routes skip FastAPI (see GatewayApp) and do no body validation: the gateway passes bodies through,
and validating them would cost time on every request and duplicate vLLM's own checks.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from gateway.dashboard import mount as mount_dashboard
from gateway.openapi import openapi_document
from gateway.protocol import ApiError
from gateway.proxy import Gateway, error_response
from tasks.core.settings import Settings, get_settings
from tasks.store import get_engine

log = logging.getLogger("llmhost.gateway")


def create_app(store_url: str | None = None, settings: Settings | None = None, *,
               flush_interval_s: float = 0.5,
               usage_journal: Literal["write", "fdatasync", "off"] | None = None,
               freeze_gc: bool = False) -> GatewayApp:
    """The gateway app over the store at `store_url` (default: settings.store).

    `usage_journal` (see gateway.metering.Meter): "write" survives a killed gateway, "fdatasync" a power cut
    too, at one disk sync per group of requests; "off" is the old batched metering, which loses up to
    `flush_interval_s` of usage in a crash (kept so that benchmarks/usage_durability.py can compare).
    Default: the `LLMHOST_USAGE_JOURNAL` setting. `freeze_gc`: the app owns its process (`llmhost gateway`), so
    what exists once it has started is moved out of the garbage collector's sight (below); not in a process that
    builds many apps, such as the tests, where that would keep each one's cycles alive.
    """
    settings = settings or get_settings()
    gw = Gateway(get_engine(store_url or settings.store), settings, flush_interval_s=flush_interval_s,
                 usage_journal=usage_journal or settings.usage_journal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.meter.recover()  # usage a killed gateway journaled but had not stored yet
        await gw.start()
        log.info("gateway ready: %d endpoints", len(gw.routes))
        if freeze_gc:
            # What exists now (modules, the app, SQLAlchemy's and pydantic's caches) lives as long as the process:
            # frozen, it is no longer walked by each full collection, which otherwise runs on the request path.
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            await gw.close()  # flushes pending usage rows

    app = FastAPI(title="llmhost gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw

    async def chat(request: Request) -> Response:
        return await gw.forward(request, "chat")

    async def completions(request: Request) -> Response:
        return await gw.forward(request, "completions")

    async def embeddings(request: Request) -> Response:
        return await gw.forward(request, "embeddings")

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "endpoints": len(gw.routes)})

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    app.add_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/embeddings", embeddings, methods=["POST"])
    app.add_route("/v1/models", gw.models, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/openapi.json", openapi, methods=["GET"])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected gateway error on %s", request.url.path)
        return error_response(ApiError(
            500, f"The gateway failed unexpectedly ({type(exc).__name__}); see the gateway log.",
            type="server_error", code="gateway_error"))

    mount_dashboard(app, gw)  # /ui pages, / -> /ui, replica metrics sampler
    return GatewayApp(app, gw)


class GatewayApp:
    """ASGI entry: the proxied POST routes go straight to the gateway; everything else to the FastAPI app.

    FastAPI's middleware stack (OpenTelemetry, exit stacks, routing) costs about a fifth of the gateway's
    CPU per proxied request; the hot routes need none of it.
    """

    _FAST = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}

    def __init__(self, app: FastAPI, gateway: Gateway):
        self.app, self.gateway = app, gateway

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = self._FAST.get(scope.get("path", "")) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            response = await self.gateway.forward(Request(scope, receive), kind)
        except Exception as exc:
            log.exception("unexpected gateway error on %s", scope.get("path"))
            response = error_response(ApiError(
                500, f"The gateway failed unexpectedly ({type(exc).__name__}); see the gateway log.",
                type="server_error", code="gateway_error"))
        await response(scope, receive, send)


def _log_to_console(log_level: str) -> None:
    # uvicorn configures only its own loggers; route, health and metering messages use llmhost.*
    ours = logging.getLogger("llmhost")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(log_level.upper())


def worker_app() -> GatewayApp:
    """The app of one of several gateway worker processes (uvicorn imports this factory in each)."""
    _log_to_console(logging.getLevelName(logging.getLogger("uvicorn.error").getEffectiveLevel()))
    return create_app(freeze_gc=True)


def serve(host: str | None = None, port: int | None = None, *, access_log: bool = False,
          log_level: str = "info", workers: int = 1) -> None:
    """Run the gateway with uvicorn (uvloop and httptools) until interrupted; `workers` processes on one port.

    Every worker is a whole gateway over the same store: it reads the routes epoch on each request on SQLite
    (polled every 0.25 s elsewhere), so a revocation reaches all of them as it reaches one; it keeps its own
    usage journal and writes its own usage rows, so each request is metered once whichever worker answers.
    """
    import uvicorn

    settings = get_settings()
    settings.ensure_dirs()
    common: dict[str, Any] = dict(host=host or settings.gateway_host, port=port or settings.gateway_port,
                                  access_log=access_log, log_level=log_level, timeout_graceful_shutdown=30,
                                  loop="uvloop", http="httptools")
    if workers > 1:
        # uvicorn binds the socket once and the workers accept on it; it restarts a worker that dies.
        uvicorn.run("gateway.app:worker_app", factory=True, workers=workers, **common)
        return
    _log_to_console(log_level)
    uvicorn.run(create_app(settings=settings, freeze_gc=True), **common)
