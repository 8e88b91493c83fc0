"""GPU inventory and placement: which GPUs each replica gets, on this host and on a Ray cluster.

The decisions are pure functions of an inventory (NVML's `Gpu` rows) and what the store says is held, so they are
tested here with the GPUs of the machines they are meant for; this machine has none, and NVML's own reading is
checked only for not failing here.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import pytest

from tasks import store
from tasks.core.errors import PlacementError
from tasks.core.gpus import GIB, Gpu, inventory
from tasks.deploy import rollout
from tasks.deploy.plan import RevisionPlan, device_for
from tasks.deploy.replicas import start_replicas
from tasks.deploy.spec import EndpointSpec
from tasks.serving import gpus as placement
from tasks.serving.base import Replica, VllmArgs
from tasks.serving.gpus import cluster_gpus, describe_nodes, place, place_for, place_on_ray
from tasks.serving.local import LocalTarget
from tasks.serving.ray import RaySettings, RayTarget
from tasks.serving.ray_cluster import split_gpus


def h100(index: int, used_gib: float = 0.5) -> Gpu:
    return Gpu(index=index, name="NVIDIA H100 80GB HBM3", total_bytes=80 * GIB, used_bytes=int(used_gib * GIB))


FULL = 73.6  # GiB a replica at vLLM's default gpu_memory_utilization (0.92) holds on an 80 GiB GPU

# (case, GPUs, held by live replicas, tensor_parallel_size, replicas, utilization, expected GPUs per replica)
TABLE: list[tuple[str, list[Gpu], dict[int, list[str]], int, int, float | None, list[list[int]]]] = [
    ("1 GPU, 1 replica", [h100(0)], {}, 1, 1, 0.92, [[0]]),
    ("2 GPUs, 2 replicas spread", [h100(0), h100(1)], {}, 1, 2, 0.92, [[0], [1]]),
    ("GPU 0 held: the new replica beside it", [h100(0, FULL), h100(1)], {0: ["old-0"]}, 1, 1, 0.92, [[1]]),
    ("whole GPUs (no claim known): held is taken", [h100(0, 1.0), h100(1)], {0: ["old-0"]}, 1, 1, None, [[1]]),
    ("TP 2 on 4 GPUs, 2 replicas", [h100(i) for i in range(4)], {}, 2, 2, 0.92, [[0, 1], [2, 3]]),
    ("TP 2 skips the held GPU", [h100(0), h100(1, FULL), h100(2)], {1: ["old-0"]}, 2, 1, 0.92, [[0, 2]]),
    ("0.45 shares one GPU with a live 0.45 replica", [h100(0, 36.5)], {0: ["old-0"]}, 1, 1, 0.45, [[0]]),
    ("two 0.4 replicas on one GPU", [h100(0)], {}, 1, 2, 0.4, [[0], [0]]),
    ("free GPUs first, then sharing", [h100(0, 30), h100(1)], {0: ["old-0"]}, 1, 2, 0.45, [[1], [0]]),
    ("a sleeping replica freed its GPU", [h100(0, 1.2)], {0: ["old-0"]}, 1, 1, 0.92, [[0]]),
]


@pytest.mark.parametrize("case, gpus, held, tp, replicas, util, expected", TABLE, ids=[row[0] for row in TABLE])
def test_placement_table(case: str, gpus: list[Gpu], held: dict[int, list[str]], tp: int, replicas: int,
                         util: float | None, expected: list[list[int]]):
    assert place(gpus, held, tp, None, replicas, utilization=util) == expected


@pytest.mark.parametrize(
    "gpus, held, tp, replicas, util, starting, names",
    [
        ([h100(0, 71.2)], {0: ["support-ab12cd34-0"]}, 1, 1, 0.92, (),
         "GPU 0 NVIDIA H100 80GB HBM3 80.0 GiB, 71.2 used (held by support-ab12cd34-0)"),
        ([h100(0, FULL), h100(1, FULL)], {0: ["a-0"], 1: ["a-1"]}, 1, 2, 0.92, (), "GPU 1 NVIDIA H100 80GB HBM3"),
        ([h100(0), h100(1, FULL)], {1: ["a-1"]}, 2, 1, 0.92, (), "needs 2 GPU(s) with 73.6 GiB free"),
        ([h100(0), h100(1)], {}, 1, 3, 0.92, (), "replica 3 of 3"),
        ([h100(0, 1.0)], {0: ["old-0"]}, 1, 1, None, (), "that no other replica holds"),
        ([h100(0, 10)], {0: ["new-0"]}, 1, 1, 0.45, {0}, "GPU 0"),  # its replica is still starting: not shared
    ],
)
def test_a_replica_that_does_not_fit_is_refused_naming_the_inventory(
    gpus: list[Gpu], held: dict[int, list[str]], tp: int, replicas: int, util: float | None, starting: Any, names: str
):
    with pytest.raises(PlacementError) as err:
        place(gpus, held, tp, None, replicas, utilization=util, starting=starting)
    msg = str(err.value)
    assert names in msg and "\n" not in msg and "Fix: " in msg, msg


def test_inventory_is_empty_without_nvml_or_driver():
    assert inventory() == []  # this machine: no GPU (nvidia-ml-py, where installed, finds no driver)


def test_the_dashboard_reads_a_replicas_gpus_from_the_same_inventory():
    from gateway.dashboard.sampler import HardwareProbe

    me = os.getpid()
    gpus = [Gpu(0, "A", 80 * GIB, 70 * GIB, util_percent=90.0, pids=frozenset({me})),
            Gpu(1, "A", 80 * GIB, 1 * GIB, util_percent=0.0)]
    hw = HardwareProbe().measure(1, me, "http://127.0.0.1:9/v1", gpus)
    assert hw == {"hw_kind": "gpu", "gpu_util": 90.0, "gpu_mem_used_bytes": 70.0 * GIB,
                  "gpu_mem_total_bytes": 80.0 * GIB}
    assert HardwareProbe().measure(1, me, "http://127.0.0.1:9/v1", [])["hw_kind"] == "cpu"


def test_a_placed_local_replica_sees_only_its_gpus():
    target = LocalTarget()
    args = VllmArgs(model="/m", served_model_name="m")
    env = target._env(args, {"X": "1"}, [2, 3])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["X"] == "1"
    assert "CUDA_DEVICE_ORDER" not in target._env(args, None)  # a CPU replica: no placement


# ---------------------------------------------------------------------------------------------- through the store


def _revision(tmp: str, **vllm: Any) -> tuple[EndpointSpec, RevisionPlan, int]:
    name = f"gpu-{tmp}-{uuid.uuid4().hex[:6]}"
    spec = EndpointSpec(name=name, model="models:/m@champion")
    args = VllmArgs(model="/m", served_model_name=name, **vllm)
    plan = RevisionPlan(endpoint=name, content_hash=uuid.uuid4().hex * 2, model_version="m/1", model_dir="/m",
                        served_model_name=name, vllm=args, runtime="vllm test", tool_calling="off", identity={})
    store.upsert_endpoint(name, actor="test")
    rev = store.add_revision(name, {"n": name}, served_model_name=name, actor="test")
    return spec, plan, rev.id


class NoStart(LocalTarget):
    """A local target that records what it was asked to start instead of starting vLLM."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[int] | None] = []

    def start(self, args: VllmArgs, *, name: str, env: dict[str, str] | None = None, port: int | None = None,
              timeout_s: float | None = None, gpus: Any = None) -> Replica:
        self.calls.append(list(gpus) if gpus is not None else None)
        port = 9000 + len(self.calls)
        return Replica(name=name, base_url=f"http://127.0.0.1:{port}/v1", host="127.0.0.1", port=port,
                       served_model_name=args.served_model_name, gpus=list(gpus or []))


def test_placement_skips_gpus_the_store_says_are_held_and_records_it(monkeypatch: pytest.MonkeyPatch):
    spec, plan, rev = _revision("held")
    # GPU 0 is held by a live replica of another endpoint; vLLM's default claim cannot fit beside it.
    store.add_replica(spec.name, rev, base_url="http://127.0.0.1:8999/v1", served_model_name=spec.name,
                      name="other-0", state="up", gpus="0", actor="test")
    monkeypatch.setattr(placement, "inventory", lambda: [h100(0, FULL), h100(1), h100(2)])
    target = NoStart()
    started, row_ids = start_replicas(plan, rev, 2, actor="test", target=target)
    assert target.calls == [[1], [2]]
    rows = [r for r in store.list_replicas(spec.name, rev) if r.id in row_ids]
    assert [r.gpus for r in rows] == ["1", "2"]
    facts = next(r for r in store.list_revisions(spec.name) if r.id == rev).facts["placement"]
    assert facts["gpus"] == [[1], [2]] and "held by other-0" in facts["inventory"]
    for r in store.list_replicas(spec.name, rev):  # the session's store is shared: nothing stays held
        store.set_replica_state(r.id, "stopped", actor="test")


def test_a_refused_placement_starts_nothing_and_fails_the_revision(monkeypatch: pytest.MonkeyPatch):
    spec, plan, rev = _revision("refused", tensor_parallel_size=2)
    monkeypatch.setattr(placement, "inventory", lambda: [h100(0), h100(1, 79.0)])
    monkeypatch.setattr(LocalTarget, "start", lambda *a, **k: pytest.fail("a replica was started"))
    ro = rollout._Rollout(spec=spec, actor="test", plan=plan, live=None, t0=time.monotonic(), rev_id=rev)
    with pytest.raises(PlacementError, match=r"needs 2 GPU\(s\) with 73.6 GiB free .* GPU 1 .* 79.0 used"):
        rollout.start(ro)
    assert store.list_replicas(spec.name, rev) == []
    row = next(r for r in store.list_revisions(spec.name) if r.id == rev)
    assert row.status == "failed" and row.reason.startswith("placement refused it: replica 1 of 1 needs 2 GPU(s)")
    assert "placement" not in (row.facts or {})


def test_a_cpu_host_places_nothing():
    assert place_for(LocalTarget(), VllmArgs(model="/m", served_model_name="m"), 2) == (None, None)


# ---------------------------------------------------------------------------------------------- ray


def _node(ip: str, gpus: float, head: bool = False, node_id: str = "") -> dict[str, Any]:
    """A node as the dashboard's /api/v0/nodes lists it (Ray leaves GPU out where a node has none)."""
    res = {"CPU": 4.0, "memory": 8e9, "object_store_memory": 2e8, "llmhost_replica": 2.0, f"node:{ip}": 1.0}
    if gpus:
        res["GPU"] = gpus
    return {"node_ip": ip, "node_id": node_id, "is_head_node": head, "resources_total": res}


def test_ray_placement_reads_the_clusters_gpus_not_the_control_planes():
    cpu_cluster = [_node("127.0.0.2", 0, True, "3f2a1b9c77"), _node("127.0.0.2", 0, node_id="8d7e6f5a11")]
    gpu_cluster = [_node("10.0.0.1", 2, head=True), _node("10.0.0.2", 1)]
    assert (cluster_gpus(cpu_cluster), cluster_gpus(gpu_cluster)) == (0, 3)
    assert device_for("auto", cluster_gpus(gpu_cluster)) == "gpu"  # this control plane has no GPU
    assert device_for("auto", cluster_gpus(cpu_cluster)) == "cpu"
    assert place_on_ray("gpu", gpu_cluster, tp=1, replicas=3, address="http://r:8265")["cluster_gpus"] == 3
    assert describe_nodes(cpu_cluster) == ("node 127.0.0.2 3f2a1b9c (head): CPU 4, GPU 0, llmhost_replica 2; "
                                           "node 127.0.0.2 8d7e6f5a: CPU 4, GPU 0, llmhost_replica 2")
    with pytest.raises(PlacementError, match=r"room for 1; its nodes: node 10.0.0.1 \(head\): CPU 4, GPU 2"):
        place_on_ray("gpu", gpu_cluster, tp=2, replicas=2, address="http://r:8265")

    target = RayTarget(RaySettings(address="http://127.0.0.1:1", min_replicas=2), device="gpu")
    args = VllmArgs(model="/m", served_model_name="m")
    with pytest.raises(PlacementError) as err:
        place_for(target, args, 1, nodes=cpu_cluster)  # `nodes`: what the dashboard would answer
    assert str(err.value).startswith("ray.address='http://127.0.0.1:1': the revision runs on GPUs and needs 2 "
                                     "replica(s) x 1 GPU(s) on one node, the cluster has room for 0; its nodes: "
                                     "node 127.0.0.2 3f2a1b9c (head): CPU 4, GPU 0")
    assert place_for(RayTarget(RaySettings(), device="cpu"), args, 1) == (None, None)  # asks no cluster


@pytest.mark.parametrize("gpus, nodes, expected", [
    ([], 2, [[], []]), ([0], 2, [[0], []]), ([0, 1], 2, [[0], [1]]), ([0, 1, 2, 3, 4], 2, [[0, 1, 2], [3, 4]]),
])
def test_make_ray_up_shares_the_gpus_out_over_its_nodes(gpus: list[int], nodes: int, expected: list[list[int]]):
    assert split_gpus(gpus, nodes) == expected
