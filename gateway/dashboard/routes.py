"""The dashboard's routes under /ui, rendered on the server with Jinja2; `mount()` adds them to the app."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import anyio.to_thread
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from gateway.dashboard import data
from gateway.dashboard.auth import COOKIE, SESSION_MAX_AGE_S, Sessions, Viewer
from gateway.dashboard.health import health_view
from gateway.dashboard.overview import overview_of
from gateway.dashboard.sampler import Sampler
from gateway.dashboard.snippets import KEY_ENV, snippets
from gateway.dashboard.tables import ensure_tables
from tasks.core.errors import AccessError, GatewayError
from tasks.store.routes import get_endpoint, load_routes

log = logging.getLogger("llmhost.gateway.dashboard")
HERE = Path(__file__).parent
TABS = (("overview", "Overview"), ("calling", "Calling"), ("usage", "Usage"), ("health", "System Health"))
# Everything comes from this origin: no CDN, no inline script.
_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def _fmt_num(v: float | int | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def _fmt_bytes(v: float | None) -> str:
    if v is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:,.1f} {unit}" if unit != "B" else f"{v:.0f} B"
        v /= 1024
    return str(v)


class Dashboard:
    def __init__(self, engine: Any, *, sample_interval_s: float = 15.0, sampler: bool = True):
        self.engine = engine
        ensure_tables(engine)
        self.sessions = Sessions(engine)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        env = self.templates.env
        env.filters["num"] = _fmt_num
        env.filters["bytes"] = _fmt_bytes
        env.globals["tabs"] = TABS
        self.sampler = Sampler(engine, interval_s=sample_interval_s) if sampler else None
        self._aliases: dict[str, tuple[float, str]] = {}

    # -- helpers -----------------------------------------------------------------------------------------

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await anyio.to_thread.run_sync(fn)

    def render(self, request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> Response:
        resp = self.templates.TemplateResponse(request, name, ctx, status_code=status)
        resp.headers.update(_HEADERS)
        return resp

    async def viewer(self, request: Request) -> Viewer | None:
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        return await self.run(lambda: self.sessions.viewer(cookie))

    def to_login(self, request: Request) -> Response:
        nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/ui/login?next={quote(nxt)}", status_code=303)

    def visible(self, viewer: Viewer) -> set[str] | None:
        """Endpoint names the viewer's key may call; None (all) for admins."""
        if viewer.admin:
            return None
        _, routes = load_routes(engine=self.engine)
        return {
            n
            for n, r in routes.items()
            if viewer.user in r.users or (viewer.team is not None and viewer.team in r.teams)
        }

    def aliases(self, versions: set[str]) -> dict[str, str]:
        """MLflow aliases of model versions, cached for a minute (the registry is read in this thread)."""
        now = time.monotonic()
        missing = {v for v in versions if v not in self._aliases or now - self._aliases[v][0] > 60}
        if missing:
            got = data.model_aliases(missing)
            for v in missing:
                self._aliases[v] = (now, got.get(v, ""))
        return {v: self._aliases[v][1] for v in versions if self._aliases[v][1]}

    async def endpoint_page(
        self, request: Request, tab: str, build: Callable[[Viewer, str], dict[str, Any]]
    ) -> Response:
        viewer = await self.viewer(request)
        if viewer is None:
            return self.to_login(request)
        name = request.path_params["name"]
        visible = await self.run(lambda: self.visible(viewer))
        exists = True
        if visible is None:
            try:
                await self.run(lambda: get_endpoint(name, engine=self.engine))
            except GatewayError:
                exists = False
        if not exists or (visible is not None and name not in visible):
            # Same answer whether it does not exist or is not yours: names are not disclosed.
            return self.render(request, "not_found.html", {"viewer": viewer, "name": name}, status=404)
        ctx = await self.run(lambda: build(viewer, name))
        return self.render(request, f"{tab}.html", {"viewer": viewer, "name": name, "tab": tab, **ctx})

    # -- pages -------------------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        return self.render(
            request,
            "login.html",
            {"viewer": None, "next": _safe_next(request.query_params.get("next")), "error": None},
        )

    async def login(self, request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", errors="replace"))
        raw = (form.get("api_key") or [""])[0]
        nxt = _safe_next((form.get("next") or [""])[0])
        try:
            viewer, cookie = await self.run(lambda: self.sessions.login(raw))
        except AccessError as exc:
            return self.render(
                request, "login.html", {"viewer": None, "next": nxt, "error": str(exc)}, status=401
            )
        log.info(
            "dashboard sign-in: key %s… (user %s%s)",
            viewer.prefix,
            viewer.user,
            ", admin" if viewer.admin else "",
        )
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(
            COOKIE,
            cookie,
            max_age=SESSION_MAX_AGE_S,
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return resp

    async def logout(self, request: Request) -> Response:
        resp = RedirectResponse("/ui/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/ui")
        return resp

    async def index(self, request: Request) -> Response:
        viewer = await self.viewer(request)
        if viewer is None:
            return self.to_login(request)

        def build() -> dict[str, Any]:
            visible = self.visible(viewer)
            rows = data.endpoint_rows(self.engine, visible)
            aliases = self.aliases({r.model_version for r in rows if r.model_version})
            for r in rows:
                r.alias = aliases.get(r.model_version or "")
            return {"rows": rows}

        return self.render(request, "index.html", {"viewer": viewer, **(await self.run(build))})

    async def overview(self, request: Request) -> Response:
        def build(viewer: Viewer, name: str) -> dict[str, Any]:
            ov = overview_of(self.engine, name)
            alias = None
            if ov.live and ov.live.model_version:
                alias = self.aliases({ov.live.model_version}).get(ov.live.model_version)
            return {"ov": ov, "alias": alias}

        return await self.endpoint_page(request, "overview", build)

    async def calling(self, request: Request) -> Response:
        base_url = f"{str(request.base_url).rstrip('/')}/v1"

        def build(viewer: Viewer, name: str) -> dict[str, Any]:
            e = get_endpoint(name, engine=self.engine)
            _, routes = load_routes(engine=self.engine)
            route = routes.get(name)
            adapters = sorted(route.adapters) if route else []
            return {
                "endpoint": e,
                "base_url": base_url,
                "model": name,
                "adapters": adapters,
                "snippets": snippets(base_url, name),
                "key_env": KEY_ENV,
                "key_prefix": viewer.prefix,
            }

        return await self.endpoint_page(request, "calling", build)

    async def usage(self, request: Request) -> Response:
        window = data.window_of(request.query_params.get("window"))

        def build(viewer: Viewer, name: str) -> dict[str, Any]:
            return {
                "u": data.usage(self.engine, name, window),
                "cost": data.usage_cost(self.engine, name),
                "window": window,
                "windows": list(data.WINDOWS),
            }

        return await self.endpoint_page(request, "usage", build)

    async def health(self, request: Request) -> Response:
        window = data.window_of(request.query_params.get("window"))

        def build(viewer: Viewer, name: str) -> dict[str, Any]:
            return {
                "h": health_view(self.engine, name, window),
                "window": window,
                "windows": list(data.WINDOWS),
                "interval": self.sampler.interval_s if self.sampler else None,
            }

        return await self.endpoint_page(request, "health", build)

    async def prometheus_targets(self, request: Request) -> Response:
        """Prometheus HTTP service discovery: the live replicas' /metrics, for an admin key (Bearer)."""
        auth = request.headers.get("authorization", "")
        scheme, _, raw = auth.partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            return JSONResponse({"error": "send Authorization: Bearer <admin key>"}, status_code=401)
        try:
            viewer, _ = await self.run(lambda: self.sessions.login(raw))
        except AccessError as exc:
            return JSONResponse({"error": str(exc)}, status_code=401)
        if not viewer.admin:
            return JSONResponse(
                {
                    "error": f"user {viewer.user!r} is not a dashboard admin: "
                    f"`llmhost dashboard admin {viewer.user}`"
                },
                status_code=403,
            )
        _, routes = await self.run(lambda: load_routes(engine=self.engine))
        groups = []
        for name, route in sorted(routes.items()):
            for r in route.replicas:
                parts = urlsplit(r.base_url)
                groups.append(
                    {
                        "targets": [parts.netloc],
                        "labels": {
                            "__scheme__": parts.scheme,
                            "endpoint": name,
                            "replica": r.name,
                            "revision": (route.revision_hash or "")[:12],
                        },
                    }
                )
        return JSONResponse(groups)


def _safe_next(nxt: str | None) -> str:
    """Only local dashboard paths: a login link must not redirect elsewhere."""
    if nxt and nxt.startswith("/ui") and not nxt.startswith("//") and "\\" not in nxt:
        return nxt
    return "/ui"


def mount(
    app: FastAPI | Any,
    gateway: Any = None,
    *,
    engine: Any = None,
    sample_interval_s: float = 15.0,
    sampler: bool = True,
) -> Dashboard:
    """Add the dashboard (/ui, its static files, `/` -> /ui) and its sampling loop to the gateway's app.

    `app` is the FastAPI app inside create_app (or the GatewayApp it returns).
    `gateway` is the app's Gateway (its store engine is used); call before the app starts serving. Mounting
    twice returns the first dashboard.
    """
    if not isinstance(app, FastAPI) and isinstance(getattr(app, "app", None), FastAPI):  # a GatewayApp
        gateway = gateway if gateway is not None else app.gateway  # type: ignore[attr-defined]
        app = app.app  # type: ignore[attr-defined]
    existing = getattr(app.state, "dashboard", None)
    if isinstance(existing, Dashboard):  # mounted already (create_app does it): only retune the sampler
        if existing.sampler is not None:
            existing.sampler.interval_s = sample_interval_s
        return existing
    engine = engine if engine is not None else gateway.engine
    dash = Dashboard(engine, sample_interval_s=sample_interval_s, sampler=sampler)

    async def root(request: Request) -> Response:
        return RedirectResponse("/ui", status_code=307)

    async def to_overview(request: Request) -> Response:
        return RedirectResponse(
            f"/ui/endpoints/{quote(request.path_params['name'])}/overview", status_code=307
        )

    app.add_route("/", root, methods=["GET"])
    app.add_route("/ui", dash.index, methods=["GET"])
    app.add_route("/ui/", dash.index, methods=["GET"])
    app.add_route("/ui/login", dash.login_form, methods=["GET"])
    app.add_route("/ui/login", dash.login, methods=["POST"])
    app.add_route("/ui/logout", dash.logout, methods=["POST"])
    app.add_route("/ui/endpoints/{name}", to_overview, methods=["GET"])
    app.add_route("/ui/endpoints/{name}/overview", dash.overview, methods=["GET"])
    app.add_route("/ui/endpoints/{name}/calling", dash.calling, methods=["GET"])
    app.add_route("/ui/endpoints/{name}/usage", dash.usage, methods=["GET"])
    app.add_route("/ui/endpoints/{name}/health", dash.health, methods=["GET"])
    app.add_route("/ui/api/prometheus/targets", dash.prometheus_targets, methods=["GET"])
    app.mount("/ui/static", StaticFiles(directory=str(HERE / "static")), name="dashboard-static")
    app.state.dashboard = dash

    if dash.sampler is not None:
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a: Any) -> AsyncIterator[Any]:
            async with inner(a) as state:
                assert dash.sampler is not None
                dash.sampler.start()
                try:
                    yield state
                finally:
                    with contextlib.suppress(Exception):
                        await dash.sampler.close()

        app.router.lifespan_context = lifespan
    return dash
