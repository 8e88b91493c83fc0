"""The `local` target: a supervised `python -m vllm.entrypoints.openai.api_server` in the runtime venv."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tasks.core.errors import ReplicaStartError, ServingError
from tasks.core.procs import free_port, group_alive, listens, pid_alive
from tasks.core.settings import get_settings
from tasks.serving.base import Replica, ReplicaState, VllmArgs

log = logging.getLogger("llmhost.serving")

_KV_RE = re.compile(r"(?:CPU|GPU) KV cache size:\s*([\d,]+)\s*tokens")
_CONC_RE = re.compile(r"Maximum concurrency for\s*([\d,]+)\s*tokens per request:\s*([\d.]+)x")
_ERR_RE = re.compile(r"(\w*(?:Error|Exception)\b:.*|ERROR.*)")


def has_cuda_gpu() -> bool:
    """True where `nvidia-smi -L` lists a GPU; decides CPU-only env vars and the runtime package."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def parse_startup_log(text: str) -> dict[str, float | int | None]:
    """KV cache size (tokens) and max concurrency that vLLM prints once its cache is allocated."""
    kv = _KV_RE.findall(text)
    conc = _CONC_RE.findall(text)
    return {
        "kv_cache_tokens": int(kv[-1].replace(",", "")) if kv else None,
        "max_concurrency": float(conc[-1][1]) if conc else None,
    }


def error_summary(log_tail: str) -> str:
    """vLLM's most telling error line: the last `...Error: msg` in the log tail."""
    # vLLM's WARNING lines can quote an error text (e.g. the ulimit hint); they are not the failure.
    lines = [line for line in log_tail.splitlines() if " WARNING " not in line]
    found = [(m.group(1).strip(), i) for i, line in enumerate(lines) if (m := _ERR_RE.search(line))]
    specific = [f for f in found if ("Error:" in f[0] or "Exception:" in f[0])]
    pick = specific or found
    if not pick:
        return (lines or ["(empty log)"])[-1].strip()
    text, at = pick[-1]
    if "validation error for" in text:  # pydantic: the reason is on the indented lines below, e.g. vLLM's configs
        detail = [ln.strip().split(" [type=", 1)[0] for ln in lines[at + 1 : at + 3] if ln.startswith(" ")]
        text = ": ".join([text, *[d for d in detail if d and not d.startswith("For further information")]])
    return text


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 200_000))
            data = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


class LocalTarget:
    """Runs each replica as its own process group so that stop() leaves no child behind.

    A replica's pid is its supervisor's, which is also the group id: vLLM runs as the supervisor's child, and is
    restarted on the same port when it exits unexpectedly (`llmhost endpoints show` lists a replica that crashed
    too often as `failed`, with the reason).
    """

    name = "local"

    def __init__(self, python: Path | None = None, host: str = "127.0.0.1"):
        self.settings = get_settings()
        self.python = Path(python or self.settings.vllm_python)
        self.host = host
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    def _env(self, args: VllmArgs, extra: dict[str, str] | None, gpus: Sequence[int] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        # The runtime venv must not see the control plane's interpreter paths.
        for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(var, None)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if not has_cuda_gpu():
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kvcache_space_gib))
            if self.settings.cpu_single_process:
                env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if args.enable_lora or args.lora_modules:
            # Lets the control plane hot-load adapters with /v1/load_lora_adapter, no restart.
            env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        if gpus:
            # The replica's placement (tasks.serving.gpus), in NVML's numbering: CUDA must count in PCI bus order too.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpus)
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env.update(extra or {})
        return env

    def start(
        self,
        args: VllmArgs,
        *,
        name: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        timeout_s: float | None = None,
        gpus: Sequence[int] | None = None,
    ) -> Replica:
        if not self.python.exists():
            raise ServingError(
                f"LLMHOST_VLLM_PYTHON={str(self.python)!r} does not exist: run `make runtime` to build the "
                "serving venv, or point LLMHOST_VLLM_PYTHON at a Python that has vLLM installed."
            )
        self.settings.ensure_dirs()
        if port:  # the caller's port (0 or None: draw one)
            return self._start_on(port, args, name=name, env=env, timeout_s=timeout_s, gpus=gpus)
        for attempt in (1, 2, 3):
            try:
                return self._start_on(free_port(self.host), args, name=name, env=env, timeout_s=timeout_s, gpus=gpus)
            except ReplicaStartError as exc:  # the drawn port was taken before vLLM bound it: draw another
                if attempt == 3 or "Address already in use" not in exc.log_tail:
                    raise
                log.warning("vLLM replica %r lost its port to another process before it bound it; starting it "
                            "again on another port (log of the first try: %s)", name, exc.log_path)
        raise AssertionError("unreachable")

    def _start_on(self, port: int, args: VllmArgs, *, name: str, env: dict[str, str] | None,
                  timeout_s: float | None, gpus: Sequence[int] | None) -> Replica:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        log_path = self.settings.runs_dir / f"{name}-{port}-{stamp}.log"
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", *args.to_cli(),
               "--host", self.host, "--port", str(port)]
        # A small parent (the control plane's Python) restarts vLLM after a crash; see tasks.serving.supervisor.
        supervised = [sys.executable, "-m", "tasks.serving.supervisor", "--base-url",
                      f"http://{self.host}:{port}/v1", "--log", str(log_path), "--", *cmd]
        started = time.monotonic()
        with log_path.open("wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            proc = subprocess.Popen(
                supervised, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self._env(args, env, gpus), start_new_session=True,
            )
        self._procs[proc.pid] = proc
        replica = Replica(
            name=name, base_url=f"http://{self.host}:{port}/v1", host=self.host, port=port, pid=proc.pid,
            log_path=str(log_path), served_model_name=args.served_model_name, state="starting",
            started_at=datetime.now(UTC), args=cmd[3:], gpus=list(gpus or []),
        )
        deadline = started + (timeout_s or self.settings.startup_timeout_s)
        with httpx.Client(timeout=2.0) as client:
            while True:
                rc = proc.poll()
                if rc is not None:
                    tail = _tail(log_path, 40)
                    raise ReplicaStartError(
                        f"vLLM replica {name!r} exited with code {rc} during startup: {error_summary(tail)} "
                        f"(full log: {log_path})", log_tail=tail, log_path=str(log_path))
                try:
                    healthy = client.get(f"{replica.root_url}/health").status_code == 200
                except httpx.HTTPError:
                    healthy = False
                # Only from vLLM's own socket: another process may have drawn the same free port before vLLM bound
                # it (vLLM then fails to listen and exits, reported above with its "Address already in use").
                if healthy and listens(proc.pid, port):
                    break
                if time.monotonic() > deadline:
                    self.stop(replica)
                    tail = _tail(log_path, 40)
                    raise ReplicaStartError(
                        f"vLLM replica {name!r} was not healthy within {deadline - started:.0f}s "
                        f"(raise LLMHOST_STARTUP_TIMEOUT_S); last log line: {error_summary(tail)} "
                        f"(full log: {log_path})", log_tail=tail, log_path=str(log_path))
                time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):  # tells the supervisor vLLM came up: a crash now is restarted
            os.kill(proc.pid, signal.SIGUSR1)
        info = parse_startup_log(log_path.read_text(errors="replace"))
        replica.kv_cache_tokens = info["kv_cache_tokens"]  # type: ignore[assignment]
        replica.max_concurrency = info["max_concurrency"]
        replica.startup_seconds = round(time.monotonic() - started, 2)
        replica.state = "up"
        return replica

    def stop(self, replica: Replica) -> None:
        """SIGTERM the replica's process group, SIGKILL it after the grace period."""
        pid = replica.pid
        if pid is None:
            return
        proc = self._procs.pop(pid, None)
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            replica.state = "stopped"
            return
        deadline = time.monotonic() + self.settings.stop_grace_s
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None and not group_alive(pid):
                    break
            elif not pid_alive(pid) and not group_alive(pid):
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        # Wait until the group is gone: vLLM's engine core is a separate process in the same group.
        end = time.monotonic() + 5
        while group_alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        replica.state = "stopped"

    def status(self, replica: Replica) -> ReplicaState:
        if replica.pid is None:
            return "stopped"
        proc = self._procs.get(replica.pid)
        alive = proc.poll() is None if proc is not None else pid_alive(replica.pid)
        if not alive:
            return "stopped" if replica.state == "stopped" else "failed"
        try:
            ok = httpx.get(f"{replica.root_url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            ok = False
        return "up" if ok else ("starting" if replica.state == "starting" else "down")

    def logs(self, replica: Replica, lines: int = 100) -> str:
        return _tail(Path(replica.log_path), lines) if replica.log_path else ""

