"""Gateway logic: authenticate, resolve `model` to a live revision, pick a replica, pass the answer through.

Hot-path costs are kept to in-memory lookups: keys and routes are cached and reloaded only when the store's
routes epoch moves (one indexed read of one row per request on SQLite), a usage row is appended to the
gateway's journal before its answer ends (gateway.journal; batched into the store every 0.5 s, replayed after a
crash), and one pooled aiohttp client talks to every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from typing import Any, Literal

import anyio.to_thread
import httpx
import orjson
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import KeyCache
from gateway.external import ExternalConfigs, kept_error_headers
from gateway.hold import hold_while_swapping
from gateway.metering import Meter, Metrics
from gateway.protocol import (
    STREAMABLE,
    UPSTREAM_PATHS,
    ApiError,
    ModelCard,
    ModelList,
    split_model,
    usage_of,
)
from gateway.routing import ReplicaPool, probe_all
from gateway.stream import StreamPassthrough
from gateway.upstream import ConnectFailed, Upstream, UpstreamFailed, UpstreamResponse, UpstreamTimeout
from tasks.core.settings import Settings, get_settings
from tasks.store.keys import KeyInfo
from tasks.store.routes import (
    EndpointRoute,
    ReplicaRoute,
    load_routes,
    read_epoch,
    record_replica_health,
    routes_epoch,
)
from tasks.store.schema import utcnow

log = logging.getLogger("llmhost.gateway")

_JSON = "application/json"
_UPSTREAM_HEADERS = {"content-type": _JSON}
# Marks an error answer as relayed: the replica's or provider's status, or "none" when it gave no answer. A 5xx
# without it is the gateway's own (a bug, or a verdict such as no healthy replica).
UPSTREAM_STATUS = "x-llmhost-upstream-status"


def error_response(exc: ApiError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type=_JSON, headers=exc.headers)


class Gateway:
    """State shared by all requests of one gateway app."""

    def __init__(self, engine: Engine, settings: Settings | None = None, *, flush_interval_s: float = 0.5,
                 epoch_poll_s: float = 0.25, usage_journal: Literal["write", "fdatasync", "off"] = "write"):
        self.engine = engine
        self.settings = settings or get_settings()
        self.keys = KeyCache(engine)
        self.pool = ReplicaPool()
        self.metrics = Metrics()
        # One journal folder per store, so a gateway never replays rows meant for another store.
        journal = self.settings.home_abs / "usage-journal" / hashlib.sha1(str(engine.url).encode()).hexdigest()[:12]
        self.meter = Meter(engine, self.metrics, flush_interval_s=flush_interval_s,
                           journal_dir=None if usage_journal == "off" else journal,
                           journal_sync="fdatasync" if usage_journal == "fdatasync" else "write")
        self.external = ExternalConfigs()
        self.client: httpx.AsyncClient | None = None
        self.upstream: Upstream
        self.epoch = -1
        self.routes: dict[str, EndpointRoute] = {}
        self.epoch_poll_s = epoch_poll_s
        self._raw: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._persisted: dict[int, str] = {}
        s = self.settings
        self.timeout = httpx.Timeout(connect=s.connect_timeout_s, read=s.read_timeout_s,
                                     write=s.read_timeout_s, pool=s.read_timeout_s)
        self.retry_after = str(max(1, math.ceil(s.health_interval_s)))

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.upstream = Upstream(connect_timeout_s=s.connect_timeout_s, read_timeout_s=s.read_timeout_s)
        self.client = httpx.AsyncClient(timeout=self.timeout, trust_env=False)  # health probes
        if self.engine.dialect.name == "sqlite":
            # A local file read of one row costs microseconds: check it on every request so revocations apply
            # at once. Other databases are polled in the background instead (a round trip per request is not).
            self._raw = self.engine.raw_connection()
        else:
            self._tasks.append(asyncio.create_task(self._poll_epoch(), name="llmhost-epoch"))
        self.refresh()
        self.meter.start()
        self._tasks.append(asyncio.create_task(self._health_loop(), name="llmhost-health"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        await self.meter.close()
        if self.client is not None:
            await self.client.aclose()
            await self.upstream.close()
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    # -- routes and health -------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Reload routes and drop cached keys when the store changed since the last look."""
        if self._raw is not None:
            epoch = read_epoch(self._raw)
            if epoch == self.epoch and not force:
                return
        self._reload()

    def _reload(self) -> None:
        epoch, routes = load_routes(engine=self.engine)
        self.keys.clear()
        old_ids = {r.id for route in self.routes.values() for r in route.replicas}
        self.epoch, self.routes = epoch, routes
        new = [r for route in routes.values() for r in route.replicas if r.id not in old_ids]
        for route in routes.values():
            for r in route.replicas:
                self._persisted.setdefault(r.id, r.state)
        if new and self.client is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._probe(new)))
        log.info("routes loaded (epoch %d): %s", epoch, ", ".join(sorted(routes)) or "no endpoints")

    async def _poll_epoch(self) -> None:
        while True:
            await asyncio.sleep(self.epoch_poll_s)
            try:
                epoch = await anyio.to_thread.run_sync(lambda: routes_epoch(self.engine))
                if epoch != self.epoch:
                    self._reload()
            except Exception as exc:
                log.warning("could not read the routes epoch from the store: %s", exc)

    def _replicas(self) -> list[ReplicaRoute]:
        return [r for route in self.routes.values() for r in route.replicas]

    async def _probe(self, replicas: list[ReplicaRoute]) -> None:
        assert self.client is not None
        await probe_all(self.client, self.pool, replicas, self.settings.connect_timeout_s, self._on_health,
                        self.settings.health_slow_probes)

    async def _health_loop(self) -> None:
        while True:
            try:
                await self._probe(self._replicas())
            except Exception as exc:  # never let the loop die
                log.warning("health probe round failed: %s", exc)
            await asyncio.sleep(self.settings.health_interval_s)

    def _on_health(self, replica: ReplicaRoute, ok: bool, err: str | None) -> None:
        endpoint = next((n for n, r in self.routes.items() if replica in r.replicas), "?")
        self.metrics.replica_up.labels(endpoint, replica.name).set(1 if ok else 0)
        state = "up" if ok else "down"
        # Only flip between up and down; 'stopped'/'failed' belong to the step that manages the replica.
        persisted = self._persisted.get(replica.id)
        if persisted in ("up", "down", "starting") and persisted != state:
            self._persisted[replica.id] = state
            asyncio.get_running_loop().run_in_executor(None, self._persist_state, replica.id, state)

    def _persist_state(self, replica_id: int, state: str) -> None:
        try:
            record_replica_health(replica_id, state, engine=self.engine)
        except Exception as exc:
            log.warning("could not record replica %d as %s: %s", replica_id, state, exc)

    # -- requests ----------------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        self.refresh()  # before the key cache is consulted, so a revocation applies to this very request
        try:
            key = await self.keys.authenticate(request.headers.get("authorization"))
        except ApiError as exc:
            return error_response(exc)
        cards = []
        for name, route in sorted(self.routes.items()):
            if route.status not in ("active", "swapping") or not route.allows(key):
                continue
            created = int(route.created_at.timestamp())
            owner = route.owner or "llmhost"
            cards.append(ModelCard(id=name, created=created, owned_by=owner))
            cards += [ModelCard(id=f"{name}:{a}", created=created, owned_by=owner)
                      for a in sorted(route.adapters)]
        return Response(ModelList(data=cards).model_dump_json(), media_type=_JSON)

    async def forward(self, request: Request, kind: str) -> Response:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"ts": utcnow(), "route": kind, "stream": False, "request_id": self.meter.new_id()}
        try:
            self.refresh()  # before the key cache is consulted, so a revocation applies to this very request
            key = await self.keys.authenticate(request.headers.get("authorization"))
        except ApiError as exc:
            # No identity to bill: count it, but keep unauthenticated noise out of the usage table.
            self.metrics.observe("(none)", exc.status, None, None, time.perf_counter() - t0, None)
            return error_response(exc)
        row.update(key_prefix=key.prefix, user=key.user, team=key.team)
        try:
            return await self._forward(request, kind, key, row, t0)
        except ApiError as exc:
            await self.meter.durable(self._finish(row, t0, exc.status, None, None, None))
            return error_response(exc)

    def _resolve(self, payload: dict[str, Any], key: KeyInfo,
                 row: dict[str, Any]) -> EndpointRoute:
        name, adapter = split_model(payload.get("model"))
        route = self.routes.get(name)
        if route is None:
            raise ApiError(404, f"The model {name!r} is not an endpoint here: GET /v1/models lists the "
                           "endpoints your key may call.", type="invalid_request_error", param="model",
                           code="model_not_found")
        row["endpoint"], row["adapter"] = name, adapter
        if not route.allows(key):
            team = f", team {key.team!r}" if key.team else ""
            raise ApiError(403, f"Key {key.prefix}… (user {key.user!r}{team}) has no access to endpoint "
                           f"{name!r}: ask its owner to run `llmhost access grant {name} --user {key.user}`.",
                           type="permission_error", code="access_denied")
        if route.status != "active":
            raise ApiError(503, f"Endpoint {name!r} is {route.status}: its owner can re-enable it.",
                           type="server_error", code="endpoint_disabled", headers={"retry-after": "60"})
        if route.revision_id is None or route.served_model_name is None:
            raise ApiError(503, f"Endpoint {name!r} has no live revision yet: deploy one, or attach a server "
                           f"with `llmhost endpoints attach {name} --base-url URL --served-model M`.",
                           type="server_error", code="no_live_revision",
                           headers={"retry-after": self.retry_after})
        row["revision_id"] = route.revision_id
        if adapter is None:
            payload["model"] = route.served_model_name
        else:
            served = route.adapters.get(adapter)
            if served is None:
                known = ", ".join(sorted(route.adapters)) or "none"
                raise ApiError(404, f"Endpoint {name!r} has no adapter {adapter!r} (adapters: {known}): use "
                               f"one of them as {name}:ADAPTER, or plain {name!r} for the base model.",
                               type="invalid_request_error", param="model", code="model_not_found")
            payload["model"] = served
        return route

    async def _forward(self, request: Request, kind: str, key: KeyInfo, row: dict[str, Any],
                       t0: float) -> Response:
        try:
            payload = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise ApiError(400, "The request body is not valid JSON.", type="invalid_request_error",
                           code="invalid_json") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "The request body must be a JSON object.", type="invalid_request_error",
                           code="invalid_json")
        await hold_while_swapping(self, split_model(payload.get("model"))[0], key)
        route = self._resolve(payload, key, row)
        stream = kind in STREAMABLE and payload.get("stream") is True
        client_wants_usage = True
        if stream:
            row["stream"] = True
            opts = payload.get("stream_options")
            opts = dict(opts) if isinstance(opts, dict) else {}
            client_wants_usage = bool(opts.get("include_usage"))
            if not client_wants_usage:
                # Metering needs the token counts; the extra chunk is stripped before it reaches the client.
                opts["include_usage"] = True
                payload["stream_options"] = opts
        if route.external is not None:
            return await self._external(route, kind, payload, row, t0, stream, client_wants_usage)
        body = orjson.dumps(payload)
        try:
            replica, resp = await self._send(route, UPSTREAM_PATHS[kind], body)
        except ApiError as exc:
            fallback = self._fallback_for(route, exc)
            if fallback is None:
                raise
            row["fallback"] = fallback.name
            return await self._external(fallback, kind, payload, row, t0, stream, client_wants_usage,
                                        {"x-llmhost-fallback": fallback.name})
        row["replica_id"] = replica.id
        headers = {"x-llmhost-endpoint": route.name, "x-llmhost-revision": (route.revision_hash or "")[:12],
                   "x-llmhost-replica": replica.name, "x-llmhost-request-id": row["request_id"]}
        if stream and resp.status_code == 200:
            headers["content-type"] = resp.content_type or "text/event-stream; charset=utf-8"
            return StreamPassthrough(
                self, resp, row, t0, client_wants_usage, headers,
                release=lambda: self.pool.release(replica.id),
                fail_message=lambda exc: self._mid_request_error(route.name, replica, exc).message)
        # Non-streamed answers, and upstream errors of streamed requests, pass through whole and unchanged.
        complete = False
        try:
            data = await resp.read()
            complete = True
        except (UpstreamTimeout, UpstreamFailed) as exc:
            raise self._mid_request_error(route.name, replica, exc) from None
        finally:
            resp.close(complete=complete)
            self.pool.release(replica.id)
        prompt = completion = None
        if resp.status_code == 200:
            with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
                prompt, completion = usage_of(orjson.loads(data))
        elif resp.status_code >= 400:
            headers[UPSTREAM_STATUS] = str(resp.status_code)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        await self.meter.durable(self._finish(row, t0, resp.status_code, prompt, completion, latency_ms))
        headers["content-type"] = resp.content_type or _JSON
        return Response(data, status_code=resp.status_code, headers=headers)

    async def _send(self, route: EndpointRoute, path: str,
                    body: bytes) -> tuple[ReplicaRoute, UpstreamResponse]:
        """Send to the least-loaded healthy replica; on connect failure (nothing sent) try the next one."""
        assert self.client is not None
        tried: list[int] = []
        last_err = ""
        while True:
            replica = self.pool.pick(route, tried)
            if replica is None:
                why = f" (last error: {last_err})" if last_err else ""
                if any(r.state == "restarting" for r in route.replicas):  # its supervisor is bringing it back
                    why += ", a crashed replica is restarting"
                raise ApiError(503, f"Endpoint {route.name!r} has no healthy replica right now{why}: retry "
                               f"in {self.retry_after}s; if it persists, check `llmhost endpoints list` and "
                               "the replica logs.", type="server_error", code="no_healthy_replica",
                               headers={"retry-after": self.retry_after})
            self.pool.acquire(replica.id)
            try:
                return replica, await self.upstream.post(replica.base_url + path, body, _UPSTREAM_HEADERS)
            except ConnectFailed as exc:
                self.pool.release(replica.id)
                last_err = f"{type(exc).__name__} to {replica.name}"
                if self.pool.mark(replica.id, False, str(exc)):
                    log.warning("replica %s (%s) is down: %s", replica.name, replica.base_url, exc)
                    self._on_health(replica, False, str(exc))
                tried.append(replica.id)
            except (UpstreamTimeout, UpstreamFailed) as exc:
                self.pool.release(replica.id)
                raise self._mid_request_error(route.name, replica, exc) from None

    def _mid_request_error(self, endpoint: str, replica: ReplicaRoute, exc: Exception) -> ApiError:
        if isinstance(exc, UpstreamTimeout):
            what = (f"did not answer within {self.settings.read_timeout_s:g}s (LLMHOST_READ_TIMEOUT_S); "
                    "retry with a smaller max_tokens, or ask the operator to raise the timeout")
        else:
            what = (f"failed mid-request ({type(exc).__name__}); retry, and if it repeats check the "
                    "replica's log")
        log.warning("replica %s of %s: %s: %s", replica.name, endpoint, type(exc).__name__, exc)
        return ApiError(502, f"Replica {replica.name} of endpoint {endpoint!r} {what}.", type="server_error",
                        code="replica_failed", headers={UPSTREAM_STATUS: "none"})

    def _finish(self, row: dict[str, Any], t0: float, status: int, prompt: int | None, completion: int | None,
                latency_ms: float | None, ttft_ms: float | None = None,
                usage: dict[str, Any] | None = None) -> asyncio.Future[None] | None:
        """Meter the request; the future (see Meter.record) completes once its usage row is durable."""
        row.update(status_code=status, prompt_tokens=prompt, completion_tokens=completion,
                   latency_ms=latency_ms if latency_ms is not None else (time.perf_counter() - t0) * 1000.0,
                   ttft_ms=ttft_ms)
        ext = row.pop("_ext", None)
        if ext is not None:
            row.update(ext.meter_fields(usage))
        return self.meter.record(row)

    # -- external endpoints and fallback ------------------------------------------------------------------

    def _fallback_for(self, route: EndpointRoute, exc: ApiError) -> EndpointRoute | None:
        """The external endpoint to answer instead, when `route` names one and has no healthy replica."""
        if exc.code != "no_healthy_replica" or not route.fallback:
            return None
        fb = self.routes.get(route.fallback)
        if fb is None or fb.external is None or fb.status != "active" or fb.revision_id is None:
            log.warning("endpoint %s has no healthy replica and its fallback %r is not a live external "
                        "endpoint; answering 503", route.name, route.fallback)
            return None
        return fb

    async def _external(self, route: EndpointRoute, kind: str, payload: dict[str, Any], row: dict[str, Any],
                        t0: float, stream: bool, client_wants_usage: bool,
                        extra_headers: dict[str, str] | None = None) -> Response:
        """Call the provider of an external endpoint with the key this host holds; pass its answer through."""
        cfg = self.external.get(route)
        row["_ext"], row["revision_id"] = cfg, route.revision_id
        key = cfg.read_key()
        body, applied = cfg.shape(kind, payload)
        headers = {"x-llmhost-endpoint": row.get("endpoint") or route.name,
                   "x-llmhost-revision": (route.revision_hash or "")[:12], "x-llmhost-provider": cfg.provider,
                   "x-llmhost-request-id": row["request_id"], **(extra_headers or {})}
        if applied is not None and (applied.changed or applied.dropped):
            headers["x-llmhost-adjusted"] = "; ".join(applied.changed + applied.dropped)[:1000]
        send_headers = {"content-type": _JSON, "authorization": f"Bearer {key}",
                        "accept-encoding": "identity"}  # usage is read from the body: no compression
        try:
            resp = await self.upstream.post(cfg.base_url + UPSTREAM_PATHS[kind], orjson.dumps(body), send_headers)
        except (ConnectFailed, UpstreamTimeout, UpstreamFailed) as exc:
            raise ApiError(502, cfg.unreachable(exc), type="server_error", code="provider_unreachable",
                           headers={**headers, UPSTREAM_STATUS: "none"}) from None
        if stream and resp.status_code == 200:
            headers["content-type"] = resp.content_type or "text/event-stream; charset=utf-8"
            return StreamPassthrough(self, resp, row, t0, client_wants_usage, headers, release=lambda: None,
                                     fail_message=cfg.unreachable)
        complete = False
        try:
            data = await resp.read()
            complete = True
        except (UpstreamTimeout, UpstreamFailed) as exc:
            raise ApiError(502, cfg.unreachable(exc), type="server_error", code="provider_unreachable",
                           headers={**headers, UPSTREAM_STATUS: "none"}) from None
        finally:
            resp.close(complete=complete)
        if resp.status_code != 200:
            raise cfg.error(resp.status_code, data, {**headers, **kept_error_headers(resp.header),
                                                     UPSTREAM_STATUS: str(resp.status_code)}, key)
        usage = None
        with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
            obj = orjson.loads(data)
            usage = obj.get("usage") if isinstance(obj, dict) else None
        prompt, completion = usage_of({"usage": usage})
        await self.meter.durable(self._finish(row, t0, 200, prompt, completion, (time.perf_counter() - t0) * 1000.0,
                                              usage=usage))
        headers["content-type"] = resp.content_type or _JSON
        return Response(data, status_code=200, headers=headers)
