"""A real multi-node Ray cluster on one machine: a head and worker nodes on loopback, each its own `ray start`.

`make ray-up` / `make ray-down` and the Ray tests use it. Every node is a `ray start --block` in a process group
of its own, so stopping it (SIGTERM, then SIGKILL of its group) ends exactly that node's processes, never another
Ray on the machine (`ray stop` would end them all). Every port is chosen free and every file lives under `root`,
so a test cluster and a `make ray-up` cluster never collide.

    python -m tasks.serving.ray_cluster up [--root DIR]     # prints the dashboard URL
    python -m tasks.serving.ray_cluster down [--root DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tasks.core.errors import ServingError
from tasks.core.gpus import inventory
from tasks.core.procs import group_alive
from tasks.core.settings import get_settings
from tasks.serving.local import free_port, has_cuda_gpu

# Each node offers two replica slots: one for the live revision's replica and one for its blue/green successor,
# while `max_replicas_per_node: 1` (deployments/demo-ray.yaml) keeps one revision's replicas on different nodes.
DEFAULT_RESOURCES = {"llmhost_replica": 2}
# Ray counts CPUs for scheduling only; 2 real cores declared as 2 leave no room for Serve's own actors next to
# two replicas (measured: the ingress was never scheduled), so each node declares more than it has.
DEFAULT_NUM_CPUS = 4
# Ray replaces 127.0.0.1 (and localhost) given as a node IP by the machine's outward address, so nodes would talk
# over the external interface; 127.0.0.2 is loopback too, and Ray keeps it.
NODE_IP = "127.0.0.2"


def ray_bin() -> Path:
    """`ray` of the serving venv: the cluster must run the Python that has vLLM."""
    return Path(get_settings().vllm_python).parent / "ray"


def host_gpus() -> list[int]:
    """This machine's GPU indices (NVML; `nvidia-smi -L` where nvidia-ml-py is missing); [] without a GPU."""
    found = [g.index for g in inventory()]
    if found or not has_cuda_gpu():
        return found
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    return [int(line.split()[1].rstrip(":")) for line in out.splitlines() if line.startswith("GPU ")]  # "GPU 0: .."


def split_gpus(gpus: list[int], nodes: int) -> list[list[int]]:
    """The GPUs of each node, disjoint and contiguous, the head's first: the nodes share one machine, and two nodes
    offering the same GPU would let Ray put two replicas on it."""
    per, extra = divmod(len(gpus), nodes)
    out, at = [], 0
    for n in range(nodes):
        size = per + (1 if n < extra else 0)
        out.append(gpus[at:at + size])
        at += size
    return out


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "RAY_ADDRESS"):
        env.pop(var, None)
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"})
    # Serve's proxy sends a request to a replica on its own node whenever that one has room, which here (one
    # machine, and a gateway that calls one proxy) left the worker node's replica idle: 16 of 16 requests went to
    # the head's. The nodes share a machine, so locality buys nothing; balance across all replicas instead.
    env["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    # A vLLM replica whose constructor fails (a bad argument, a model that does not load) fails the same way again:
    # Serve's default of 3 tries per replica made a bad revision take 6 vLLM starts (~7 min on 2 cores) to be
    # reported. One try each; a replica that dies after it started is still replaced (that is not a retry).
    env.setdefault("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")
    return env


class LocalRayCluster:
    """Starts and stops a head plus `workers` worker nodes; state (pids, ports, logs) under `root`."""

    def __init__(
        self,
        root: Path,
        *,
        workers: int = 1,
        num_cpus: int = DEFAULT_NUM_CPUS,
        resources: dict[str, float] | None = None,
        dashboard_port: int | None = None,
        gpus: list[int] | None = None,
    ):
        self.root = Path(root).absolute()
        self.gpus = gpus  # NVML indices shared out over the nodes; None = this machine's
        self._gpu_host = False
        self.workers = workers
        self.num_cpus = num_cpus
        self.resources = DEFAULT_RESOURCES if resources is None else resources
        self.dashboard_port = dashboard_port
        self.state_file = self.root / "cluster.json"

    # ---- state

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    @property
    def dashboard_url(self) -> str:
        st = self.state()
        if not st:
            raise ServingError(f"no local Ray cluster under {self.root}: run `make ray-up` first")
        return f"http://127.0.0.1:{st['dashboard_port']}"

    def pids(self) -> list[int]:
        return [int(n["pid"]) for n in self.state().get("nodes", [])]

    # ---- up / down

    def _node_args(self, gpus: list[int]) -> list[str]:
        # Ports a node would otherwise take at fixed defaults (the agent's 52365) or at random: pinned free ones
        # let two nodes share 127.0.0.1.
        return [
            "--node-ip-address", NODE_IP,
            "--node-manager-port", str(free_port()),
            "--object-manager-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--num-cpus", str(self.num_cpus),
            "--num-gpus", str(len(gpus)),
            "--resources", json.dumps(self.resources),
            "--object-store-memory", str(200 * 1024 * 1024),
            "--temp-dir", str(self.root / "tmp"),
            "--disable-usage-stats",
            "--block",
        ]

    def _spawn(self, role: str, args: list[str], gpus: list[int]) -> dict[str, Any]:
        log = self.root / f"{role}.log"
        env = _clean_env()
        if self._gpu_host:  # Ray hands out only the GPUs in CUDA_VISIBLE_DEVICES, in NVML's (PCI bus) numbering
            env.update({"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
        with log.open("ab") as f:
            proc = subprocess.Popen(
                [str(ray_bin()), "start", *args, *self._node_args(gpus)], stdout=f, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        return {"role": role, "pid": proc.pid, "log": str(log), "gpus": gpus}

    def up(self, timeout_s: float = 240.0) -> LocalRayCluster:
        """Starts the head, then the workers; returns once the dashboard lists every node alive."""
        if self.state() and any(group_alive(p) for p in self.pids()):
            if len(self.alive_nodes()) == 1 + self.workers:
                return self
            raise ServingError(f"a Ray cluster under {self.root} is half up; run `make ray-down` first")
        if not ray_bin().exists():
            raise ServingError(f"{ray_bin()} does not exist: run `make runtime` (it installs ray[serve] into the "
                               "serving venv)")
        self.root.mkdir(parents=True, exist_ok=True)
        gcs, dash = free_port(), self.dashboard_port or free_port()
        all_gpus = host_gpus() if self.gpus is None else self.gpus
        self._gpu_host = bool(all_gpus)
        gpus = split_gpus(all_gpus, 1 + self.workers)
        head = self._spawn("head", ["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                                    "--dashboard-port", str(dash), "--include-dashboard", "true",
                                    "--ray-client-server-port", str(free_port())], gpus[0])
        st: dict[str, Any] = {"gcs_address": f"{NODE_IP}:{gcs}", "dashboard_port": dash, "nodes": [head]}
        self.state_file.write_text(json.dumps(st, indent=2))
        self._wait(1, timeout_s)
        for i in range(self.workers):
            st["nodes"].append(self._spawn(f"worker-{i + 1}", ["--address", st["gcs_address"]], gpus[i + 1]))
            self.state_file.write_text(json.dumps(st, indent=2))
        self._wait(1 + self.workers, timeout_s)
        return self

    def alive_nodes(self) -> list[dict[str, Any]]:
        try:
            r = httpx.get(f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100, "detail": "true"}, timeout=10)
            rows = r.json()["data"]["result"]["result"] if r.status_code == 200 else []
        except (httpx.HTTPError, ValueError, KeyError):
            return []
        return [n for n in rows if n.get("state") == "ALIVE"]

    def _wait(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.alive_nodes()) < n:
            dead = [node for node in self.state()["nodes"] if not group_alive(int(node["pid"]))]
            if dead or time.monotonic() > deadline:
                tail = Path(dead[0]["log"] if dead else self.state()["nodes"][-1]["log"]).read_text(errors="replace")
                self.down()
                why = f"`ray start` of {dead[0]['role']} exited" if dead else f"not {n} nodes within {timeout_s:.0f}s"
                raise ServingError(f"local Ray cluster failed to start: {why}; last log lines:\n"
                                   + "\n".join(tail.splitlines()[-15:]))
            time.sleep(1.0)

    def down(self, grace_s: float = 30.0) -> int:
        """SIGTERMs every node's `ray start --block` (it shuts its node down), then SIGKILLs what is left."""
        pids = self.pids()
        for pid in reversed(pids):  # workers first, the head (GCS) last
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(group_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if self.state_file.exists():
            self.state_file.unlink()
        return len(pids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--root", type=Path, default=None, help="State dir (default: $LLMHOST_HOME/ray).")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--workers", type=int, default=1)
    ns = parser.parse_args(argv)
    cluster = LocalRayCluster(ns.root or get_settings().home_abs / "ray", workers=ns.workers,
                              dashboard_port=ns.dashboard_port)
    try:
        if ns.action == "up":
            cluster.up()
            gpus = ", ".join(f"{n['role']} {len(n.get('gpus', []))}" for n in cluster.state()["nodes"])
            print(f"Ray cluster up: {1 + ns.workers} nodes (GPUs: {gpus}), dashboard {cluster.dashboard_url} "
                  f"(ray.address in deployments/demo-ray.yaml); logs under {cluster.root}")
        elif ns.action == "down":
            n = cluster.down()
            print(f"Ray cluster under {cluster.root}: stopped {n} node(s)")
        else:
            nodes = cluster.alive_nodes() if cluster.state() else []
            print(f"{len(nodes)} node(s) alive" + (f", dashboard {cluster.dashboard_url}" if nodes else ""))
    except ServingError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
