"""The `ray` target: a revision runs as one Ray Serve application, deployed through the dashboard's REST API.

Each revision becomes one application (route prefix `/<app name>`) of the Serve deployment in
`llmhost_serve/replica.py`, whose replicas each run vLLM's OpenAI server as a child process. The Serve config is
plain data rendered here from the same `VllmArgs` the local target uses; `llmhost render k8s` embeds the same
config in a KubeRay RayService. The control plane never imports ray: it talks HTTP to the dashboard
(`PUT/GET /api/serve/applications/`, `PUT /api/packages/...`, `/api/v0/...`) as `serve deploy` does.

Serve's config is declarative: a PUT replaces the whole set of applications. Adding or deleting one application
therefore reads the deployed configs back and PUTs them unchanged next to the change; Serve leaves an
application whose config did not change alone (its replicas keep running).
"""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import yaml
from pydantic import BaseModel, Field, model_validator

from tasks.core.errors import ReplicaStartError, ServingError
from tasks.core.settings import PROJECT_ROOT, get_settings
from tasks.serving.base import Replica, ReplicaState, VllmArgs
from tasks.serving.local import parse_startup_log

Device = Literal["cpu", "gpu"]
CODE_DIR = PROJECT_ROOT / "llmhost_serve"
IMPORT_PATH = "llmhost_serve.replica:build"
DEPLOYMENT = "VllmReplica"  # the class name in llmhost_serve/replica.py; Serve names deployments after it


class RaySettings(BaseModel):
    """The spec's `ray:` block: where the cluster is and how Serve scales and places the revision's replicas."""

    model_config = {"extra": "forbid"}

    address: str = Field(
        default="http://127.0.0.1:8265",
        pattern=r"^https?://[^/]+/?$",
        description="The Ray dashboard URL (what `serve deploy --address` takes).",
    )
    min_replicas: int = Field(default=1, ge=1, le=64, description="Serve never scales below this.")
    max_replicas: int | None = Field(default=None, ge=1, le=64, description="Autoscaling ceiling; None = min.")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Serve adds replicas when the mean in-flight requests per replica exceed it."
    )
    max_ongoing_requests: int = Field(
        default=32, ge=1, description="Requests Serve sends one replica at once (vLLM batches them); more queue."
    )
    cpus_per_replica: float = Field(default=1.0, ge=0, description="Ray CPUs a replica reserves (CPU machines).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom node resources each replica takes, e.g. {llmhost_replica: 1}."
    )
    max_replicas_per_node: int | None = Field(
        default=None, ge=1, le=100, description="1 spreads the replicas one per node; None = no limit."
    )
    serve_host: str = Field(default="127.0.0.1", description="Where Serve's proxies listen, if this deploy starts it.")
    serve_port: int = Field(
        default=8100, gt=0, lt=65536, description="Serve's HTTP port if this deploy starts it; a running one keeps its."
    )
    health_check_period_s: float = Field(default=5.0, gt=0, description="How often Serve checks each replica.")

    @model_validator(mode="after")
    def _bounds(self) -> RaySettings:
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(
                f"ray.max_replicas={self.max_replicas} is below ray.min_replicas={self.min_replicas}; "
                "raise max_replicas or lower min_replicas"
            )
        return self

    @property
    def ceiling(self) -> int:
        return self.max_replicas or self.min_replicas


# ---------------------------------------------------------------------------------------------- rendering


def runtime_env_vars(
    device: Device, *, vllm_python: str | None, lora: bool = False, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """What every replica's process (and so vLLM, its child) sees: the serving env's Python and vLLM's knobs.

    The same rules as LocalTarget's environment, so that a revision behaves alike on both targets.
    """
    env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if vllm_python:
        env["LLMHOST_VLLM_PYTHON"] = vllm_python
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(get_settings().cpu_kvcache_space_gib)
        if get_settings().cpu_single_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if lora:
        # Lets the control plane hot-load adapters with /v1/load_lora_adapter, no restart.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.update(extra or {})
    return env


def app_config(
    args: VllmArgs,
    *,
    name: str,
    settings: RaySettings,
    device: Device,
    code_uri: str | None,
    env: dict[str, str],
    startup_timeout_s: float,
) -> dict[str, Any]:
    """One Serve application (a `ServeApplicationSchema` dict) for a revision's vLLM args."""
    actor: dict[str, Any] = {"num_cpus": settings.cpus_per_replica}
    if device == "gpu":
        # vLLM inside the replica sees exactly the GPUs Ray gave the actor (CUDA_VISIBLE_DEVICES is inherited), so
        # tensor parallelism stays inside one node.
        actor["num_gpus"] = args.tensor_parallel_size
    if settings.resources:
        actor["resources"] = dict(settings.resources)
    deployment: dict[str, Any] = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": settings.max_ongoing_requests,
        "ray_actor_options": actor,
        "health_check_period_s": settings.health_check_period_s,
        "health_check_timeout_s": 30.0,
        # A deleted or replaced replica finishes its in-flight requests (long generations too) before it stops.
        "graceful_shutdown_wait_loop_s": 1.0,
        "graceful_shutdown_timeout_s": 120.0,
    }
    if settings.ceiling > settings.min_replicas:
        deployment["autoscaling_config"] = {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.ceiling,
            "initial_replicas": settings.min_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
        }
    else:
        deployment["num_replicas"] = settings.min_replicas
    if settings.max_replicas_per_node is not None:
        deployment["max_replicas_per_node"] = settings.max_replicas_per_node
    runtime_env: dict[str, Any] = {"env_vars": dict(env)}
    if code_uri:
        runtime_env["py_modules"] = [code_uri]
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": IMPORT_PATH,
        "runtime_env": runtime_env,
        "args": {"cli_args": args.to_cli(), "startup_timeout_s": startup_timeout_s},
        "deployments": [deployment],
    }


def deploy_config(
    apps: list[dict[str, Any]], *, host: str, port: int, proxy_location: str = "EveryNode"
) -> dict[str, Any]:
    """A whole `ServeDeploySchema` (what `serve deploy` and `PUT /api/serve/applications/` take)."""
    return {
        "proxy_location": proxy_location,
        # 90 s is Serve's default too; pinned because the gateway's pool (60 s) must close idle connections first.
        "http_options": {"host": host, "port": port, "keep_alive_timeout_s": 90},
        "applications": apps,
    }


def code_package() -> tuple[str, bytes]:
    """`llmhost_serve/` as the zip Ray's py_modules expect (the folder itself at the top), named by content."""
    files = sorted(p for p in CODE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in files:
            info = zipfile.ZipInfo(str(p.relative_to(CODE_DIR.parent)), date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, p.read_bytes())
    data = buf.getvalue()
    return f"_ray_pkg_{hashlib.sha256(data).hexdigest()[:32]}.zip", data


# ---------------------------------------------------------------------------------------------- the target


class RayTarget:
    """Deploys, watches and deletes a revision's Serve application on a running Ray cluster."""

    name = "ray"

    def __init__(self, settings: RaySettings, *, device: Device = "cpu", timeout_s: float | None = None):
        self.settings = settings
        self.device = device
        self.address = settings.address.rstrip("/")
        self.timeout_s = timeout_s or get_settings().startup_timeout_s
        self.http = httpx.Client(base_url=self.address, timeout=httpx.Timeout(30.0, connect=5.0))

    # ---- dashboard calls

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServingError(
                f"ray.address={self.address!r}: no Ray dashboard answered ({type(exc).__name__}: {exc}); start a "
                "cluster with `make ray-up`, or set ray.address to your cluster's dashboard URL"
            ) from None

    def details(self) -> dict[str, Any]:
        """Serve's instance details: http_options, proxies and every application with its replicas."""
        r = self._call("GET", "/api/serve/applications/")
        if r.status_code != 200:
            raise ServingError(f"GET {self.address}/api/serve/applications/ answered {r.status_code}: {r.text[:500]}")
        return dict(r.json())

    def application(self, app: str) -> dict[str, Any] | None:
        return (self.details().get("applications") or {}).get(app)

    def replicas(self, app: str) -> list[dict[str, Any]]:
        """The application's Serve replicas: replica_id, state, node_id, node_ip, pid (of the replica actor)."""
        a = self.application(app) or {}
        return [r for d in (a.get("deployments") or {}).values() for r in d.get("replicas", [])]

    def nodes(self) -> list[dict[str, Any]]:
        """Alive nodes from the state API: node_id, node_ip, resources_total, is_head_node."""
        r = self._call("GET", "/api/v0/nodes", params={"limit": 1000, "detail": "true"})
        if r.status_code != 200:
            raise ServingError(f"GET {self.address}/api/v0/nodes answered {r.status_code}: {r.text[:300]}")
        rows = r.json()["data"]["result"]["result"]
        return [n for n in rows if n.get("state") == "ALIVE"]

    def serve_url(self, details: dict[str, Any] | None = None) -> str:
        """The HTTP address the gateway calls: the dashboard's host, Serve's proxy port."""
        d = details if details is not None else self.details()
        port = ((d.get("http_options") or {}).get("port")) if d.get("controller_info", {}).get("node_id") else None
        host = urlsplit(self.address).hostname or "127.0.0.1"
        return f"http://{host}:{port or self.settings.serve_port}"

    def ensure_code(self) -> str:
        """Uploads llmhost_serve/ to the cluster's GCS once per content; returns its gcs:// URI."""
        pkg, data = code_package()
        if self._call("GET", f"/api/packages/gcs/{pkg}").status_code != 200:
            r = self._call("PUT", f"/api/packages/gcs/{pkg}", content=data)
            if r.status_code != 200:
                raise ServingError(f"uploading {pkg} to {self.address} answered {r.status_code}: {r.text[:300]}")
        return f"gcs://{pkg}"

    def _put(self, apps: list[dict[str, Any]], details: dict[str, Any]) -> None:
        running = bool(details.get("controller_info", {}).get("node_id"))
        http = (details.get("http_options") or {}) if running else {}
        config = deploy_config(
            apps,
            host=http.get("host") or self.settings.serve_host,
            port=http.get("port") or self.settings.serve_port,
            proxy_location=(details.get("proxy_location") or "EveryNode") if running else "EveryNode",
        )
        r = self._call("PUT", "/api/serve/applications/", json=config)
        if r.status_code != 200:
            raise ServingError(f"Serve refused the config ({r.status_code}): {r.text[:1000]}")

    @staticmethod
    def _deployed(details: dict[str, Any], skip: str | None = None) -> list[dict[str, Any]]:
        """The configs of the applications deployed now (from the last PUT), except `skip`."""
        out = []
        for name, a in (details.get("applications") or {}).items():
            cfg = a.get("deployed_app_config")
            if name != skip and cfg and a.get("status") != "DELETING":
                out.append(cfg)
        return out

    # ---- the Target protocol

    def render(self, args: VllmArgs, *, name: str, env: dict[str, str] | None = None,
               code_uri: str | None = None, vllm_python: str | None = None) -> dict[str, Any]:
        """The application config `start` deploys, without deploying it."""
        python = vllm_python if vllm_python is not None else str(get_settings().vllm_python)
        return app_config(
            args, name=name, settings=self.settings, device=self.device, code_uri=code_uri,
            env=runtime_env_vars(self.device, vllm_python=python, lora=args.enable_lora or bool(args.lora_modules),
                                 extra=env),
            startup_timeout_s=self.timeout_s,
        )

    def start(self, args: VllmArgs, *, name: str, env: dict[str, str] | None = None) -> Replica:
        """Deploys application `name` next to the ones running, waits until Serve reports it RUNNING."""
        details = self.details()
        apps = details.get("applications") or {}
        app_name, n = name, 1
        while app_name in apps:  # a forced restart of the same revision runs beside the old application
            n += 1
            app_name = f"{name}-r{n}"
        config = self.render(args, name=app_name, env=env, code_uri=self.ensure_code())
        self._write_config(app_name, deploy_config([config], host=self.settings.serve_host,
                                                   port=self.settings.serve_port))
        started = time.monotonic()
        self._put([*self._deployed(details), config], details)
        replica = Replica(
            name=app_name, target="ray", base_url="http://unknown/v1", host="", port=0,
            served_model_name=args.served_model_name, state="starting", started_at=datetime.now(UTC),
            args=["serve", app_name, *args.to_cli()],
        )
        deadline = started + self.timeout_s
        while True:
            d = self.details()
            a = (d.get("applications") or {}).get(app_name) or {}
            status = a.get("status")
            if status == "RUNNING":
                break
            if status == "DEPLOY_FAILED" or time.monotonic() > deadline:
                late = (f"not RUNNING within {self.timeout_s:.0f}s (status {status}); raise "
                        "LLMHOST_STARTUP_TIMEOUT_S if it was only slow")
                why = _failure(a) if status == "DEPLOY_FAILED" else late
                try:  # the log is a courtesy; never let fetching it hide why the start failed
                    log = self.replica_log(app_name, lines=40)
                except Exception as exc:  # noqa: BLE001
                    log = f"(could not read the replica log: {type(exc).__name__}: {exc})"
                self._delete(app_name)
                raise ReplicaStartError(f"Ray Serve application {app_name!r} failed to start: {why}", log_tail=log)
            time.sleep(1.0)
        url = self.serve_url(d) + f"/{app_name}"
        parts = urlsplit(url)
        replica.base_url, replica.host, replica.port = url + "/v1", parts.hostname or "", parts.port or 0
        info = parse_startup_log(self.replica_log(app_name, lines=400))
        replica.kv_cache_tokens = info["kv_cache_tokens"]  # type: ignore[assignment]
        replica.max_concurrency = info["max_concurrency"]
        replica.startup_seconds = round(time.monotonic() - started, 2)
        replica.state = "up"
        return replica

    def _write_config(self, app: str, config: dict[str, Any]) -> Path:
        """Keeps the rendered config under runs/ so that `serve deploy FILE` can reproduce it by hand."""
        s = get_settings()
        s.ensure_dirs()
        path = s.runs_dir / f"ray-{app}.serve.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _delete(self, app: str, wait_s: float = 180.0) -> None:
        details = self.details()
        if app not in (details.get("applications") or {}):
            return
        self._put(self._deployed(details, skip=app), details)
        deadline = time.monotonic() + wait_s
        while app in (self.details().get("applications") or {}) and time.monotonic() < deadline:
            time.sleep(0.5)

    def stop(self, replica: Replica) -> None:
        """Deletes the application; Serve lets each replica finish its in-flight requests first."""
        self._delete(replica.name)
        replica.state = "stopped"

    def status(self, replica: Replica) -> ReplicaState:
        a = self.application(replica.name)
        if a is None:
            return "stopped" if replica.state == "stopped" else "failed"
        states: dict[str, ReplicaState] = {"RUNNING": "up", "DEPLOYING": "starting", "NOT_STARTED": "starting",
                                           "DEPLOY_FAILED": "failed", "DELETING": "stopped"}
        return states.get(a.get("status", ""), "down")

    def replica_log(self, app: str, lines: int = 100, replica_id: str | None = None) -> str:
        """The vLLM log of one replica (the first, or `replica_id`), read through the dashboard's log API."""
        reps = self.replicas(app)
        # A replica that died before it was placed (a failed start) has no node_id: there is no log to read.
        rep = next((r for r in reps if replica_id in (None, r.get("replica_id")) and r.get("node_id")), None)
        if rep is None:
            return ""
        filename = f"llmhost-vllm-{app}-{rep['replica_id']}.log"
        r = self._call("GET", "/api/v0/logs/file",
                       params={"node_id": rep["node_id"], "filename": filename, "lines": lines})
        return r.text if r.status_code == 200 else ""

    def logs(self, replica: Replica, lines: int = 100) -> str:
        return self.replica_log(replica.name, lines)


def _failure(app: dict[str, Any]) -> str:
    """Serve's own words for a failed application, cut to the replica's last error line."""
    msgs = [app.get("message") or ""] + [d.get("message") or "" for d in (app.get("deployments") or {}).values()]
    text = " ".join(m for m in msgs if m).strip() or "DEPLOY_FAILED"
    # The replica's RuntimeError text is the useful part; Serve wraps it in a long traceback.
    marker = text.rfind("RuntimeError: ")
    if marker >= 0:
        return text[marker + len("RuntimeError: "):].splitlines()[0][:1000]
    return " ".join(text.split())[:1000]
