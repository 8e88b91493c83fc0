"""A Ray Serve deployment whose every replica runs vLLM's OpenAI server as a child process and proxies to it.

Ray does the placement, the replica count, health checks and autoscaling; vLLM runs exactly the
`python -m vllm.entrypoints.openai.api_server` command line the local target runs (same `VllmArgs.to_cli()`),
so tool parsers, `--lora-modules` with local adapter dirs, `/metrics` and the runtime LoRA API behave the same
on both targets. (Ray Serve LLM was not used: its LoRA support loads adapters only from s3/gs/azure paths, and
Ray 2.60's `ray.serve.llm` is built against vLLM 0.29, not the 0.32 the project pins.)

The Serve config names `llmhost_serve.replica:build` as the application's import path; `args` carry the vLLM
command line and its environment (see `tasks/serving/ray.py`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from ray import serve
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from llmhost_serve.ports import free_port, listens

# Headers that describe one HTTP hop, not the message: never forwarded (RFC 9110 section 7.6.1).
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length"}
_ERR_RE = re.compile(r"(\w*(?:Error|Exception)\b:.*)")
_PR_SET_PDEATHSIG = 1

app = FastAPI()


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the replica actor dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _log_dir() -> Path:
    """The node's Ray log dir, so `ray logs` and the dashboard show vLLM's log next to the replica's."""
    try:
        from ray._private.worker import _global_node

        if _global_node is not None:
            return Path(_global_node.get_logs_dir_path())
    except Exception:  # a private API; fall back rather than fail the replica over where its log goes
        pass
    return Path(tempfile.gettempdir())


def _last_error(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-60:]
    except OSError:
        return "(no log)"
    lines = [ln for ln in lines if " WARNING " not in ln]
    found = [(m.group(1).strip(), i) for i, ln in enumerate(lines) if (m := _ERR_RE.search(ln))]
    if not found:
        return (lines or ["(empty log)"])[-1].strip()
    text, at = found[-1]
    if "validation error for" in text:  # pydantic (vLLM's configs): the reason is on the indented lines below
        detail = [ln.strip().split(" [type=", 1)[0] for ln in lines[at + 1 : at + 3] if ln.startswith(" ")]
        text = ": ".join([text, *[d for d in detail if d and not d.startswith("For further information")]])
    return text


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout_s: float) -> None:
    """Returns once vLLM (`proc`) answers /health on `port` from a socket it listens on itself.

    The port is drawn free before vLLM binds it, about 10 s later, so another process on the node (the vLLM of a
    replica starting beside this one) can draw the same port meanwhile. The /health answer of that other server is
    not this vLLM's: readiness also asks the kernel who listens on the port. This vLLM then fails to listen and
    exits, and the error below names the reason, so Serve starts the replica again on a new port. (Once, under CI,
    a replica taken as ready this way left both replicas proxying to one vLLM.)
    Raises RuntimeError when vLLM exits, TimeoutError when it is not ready within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    foreign = ""
    with httpx.Client(timeout=2.0) as client:
        while True:
            rc = proc.poll()
            if rc is not None:
                raise RuntimeError(f"vLLM exited with code {rc} during startup: {_last_error(log_path)}{foreign} "
                                   f"(log on node: {log_path})")
            try:
                healthy = client.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy:
                if listens(proc.pid, port):
                    return
                foreign = f"; another process answered on its port {port}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM was not healthy within {timeout_s:.0f}s: {_last_error(log_path)}{foreign} "
                                   f"(log on node: {log_path})")
            time.sleep(0.5)


@serve.deployment
@serve.ingress(app)
class VllmReplica:
    """One Serve replica = one vLLM server on a free loopback port of the node Ray placed it on."""

    def __init__(self, cli_args: list[str], env: dict[str, str], startup_timeout_s: float = 600.0):
        self.port = free_port()
        ctx = serve.get_replica_context()
        tag = re.sub(r"[^A-Za-z0-9._-]", "_", f"{ctx.app_name}-{ctx.replica_id.unique_id}")
        self.log_path = _log_dir() / f"llmhost-vllm-{tag}.log"
        python = os.environ.get("LLMHOST_VLLM_PYTHON") or sys.executable
        self.cmd = [python, "-m", "vllm.entrypoints.openai.api_server", *cli_args,
                    "--host", "127.0.0.1", "--port", str(self.port)]
        child_env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._ready = False  # during startup a vLLM exit is reported by __init__, with its log's error line
        started = threading.Event()
        # PDEATHSIG fires when the *thread* that forked the child exits, so the child is forked by a thread
        # that lives exactly as long as the child does (it only waits on it).
        self._supervisor = threading.Thread(target=self._supervise, args=(child_env, started), daemon=True)
        self._supervisor.start()
        started.wait()
        if self.proc is None:
            raise RuntimeError(f"could not start vLLM: {self._spawn_error}")
        print(f"llmhost: vLLM pid {self.proc.pid} on 127.0.0.1:{self.port}, log {self.log_path}", flush=True)
        try:
            _wait_ready(self.proc, self.port, self.log_path, startup_timeout_s)
        except TimeoutError as exc:
            self._stop_child()
            raise RuntimeError(str(exc)) from None
        # One pooled client for every proxied request; vLLM keeps idle connections 75 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE
        # in the env), longer than httpx's 5 s pool expiry, so the client side always closes first.
        self.client: httpx.AsyncClient = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}",
                                        timeout=httpx.Timeout(None, connect=5.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._ready = True

    def _supervise(self, env: dict[str, str], started: threading.Event) -> None:
        self._spawn_error = ""
        try:
            with self.log_path.open("wb") as log:
                log.write(("$ " + " ".join(self.cmd) + "\n").encode())
                log.flush()
                self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=env, start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as exc:
            self._spawn_error = str(exc)
            started.set()
            return
        started.set()
        rc = self.proc.wait()
        if self._ready and not self._stopping:
            # vLLM died under a running replica (crash, OOM kill). Ending the actor at once lets Serve's router
            # stop sending it requests now, instead of after the next failed health check (measured: 11 s of
            # 500s), and Serve starts a replacement replica.
            print(f"llmhost: vLLM pid {self.proc.pid} exited with code {rc}; ending this replica", flush=True)
            os._exit(1)

    def _stop_child(self, grace_s: float = 10.0) -> None:
        """SIGTERM vLLM's process group (api server, engine core, worker), SIGKILL it after the grace period."""
        proc = getattr(self, "proc", None)
        if proc is None:
            return
        self._stopping = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising makes it replace this replica."""
        rc = self.proc.poll() if self.proc else -1
        if rc is not None:
            raise RuntimeError(f"vLLM (pid {self.proc.pid if self.proc else '?'}) exited with code {rc}: "
                               f"{_last_error(self.log_path)}")
        # A live vLLM that is slow to answer (its cores busy serving, or starting a sibling replica) is not a dead
        # one: wait up to just under Serve's health_check_timeout_s (30 s) before declaring it failed. At load 12
        # on 2 cores, with a 10 s limit, an endpoint lost its serving replicas for 5 minutes during a redeploy
        # (inferred from its 503s, not seen in Serve's logs). A vLLM that exited is caught above at once.
        resp = await self.client.get("/health", timeout=25.0)
        if resp.status_code != 200:
            raise RuntimeError(f"vLLM /health answered {resp.status_code}")

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def proxy(self, path: str, request: Request) -> Response:
        """Forwards the request as it came (minus hop headers) and streams the answer back chunk by chunk."""
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        upstream = self.client.build_request(request.method, "/" + path, params=request.query_params,
                                             headers=headers, content=await request.body())
        try:
            resp = await self.client.send(upstream, stream=True)
        except httpx.ConnectError as exc:
            return Response(f"vLLM on this replica is not reachable ({exc}); retry", status_code=503,
                            headers={"retry-after": "1"})
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}

        async def body() -> AsyncIterator[bytes]:
            async for chunk in resp.aiter_raw():
                yield chunk

        return StreamingResponse(body(), status_code=resp.status_code, headers=out_headers,
                                 background=BackgroundTask(resp.aclose))

    def info(self) -> dict[str, Any]:
        return {"pid": self.proc.pid if self.proc else None, "port": self.port, "log_path": str(self.log_path)}

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown (scale-down, delete, redeploy), after in-flight requests finished.
        self._stop_child()


def build(args: dict[str, Any]) -> Any:
    """The application builder the Serve config's `import_path` names; `args` come from the config."""
    # `bind` comes from @serve.deployment, which mypy cannot see through (ray is not in the control-plane env).
    return VllmReplica.bind(list(args["cli_args"]), dict(args.get("env") or {}),  # type: ignore[attr-defined]
                            float(args.get("startup_timeout_s", 600.0)))
