"""Which GPUs a revision's replicas get, decided before any of them starts.

Local target (`place`, from this host's NVML inventory and the store's `replicas.gpus`):
- a replica takes `tensor_parallel_size` distinct GPUs;
- GPUs no replica holds come first, lowest index first, so replicas spread over the host;
- a replica claims `gpu_memory_utilization` x each GPU's total memory (vLLM 0.32's default is 0.92) and vLLM
  refuses to start where less is free, so a GPU is usable only where its free memory covers the claim. With the
  default no two awake replicas share a GPU; a replica asleep (the `sleep` swap) has freed its memory, and specs
  that set `vllm.gpu_memory_utilization` <= ~0.45 can run two replicas, e.g. a blue/green pair, on one GPU;
- GPUs of replicas still starting or restarting are never shared: their memory use is not final yet.

Ray target (`place_on_ray`): the cluster's nodes must offer `tensor_parallel_size` GPUs on one node for each
replica a GPU revision starts with.

Indices are NVML's (PCI bus order); the local target hands them to vLLM as CUDA_VISIBLE_DEVICES together with
CUDA_DEVICE_ORDER=PCI_BUS_ID, so that CUDA numbers the GPUs the same way.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from tasks import store
from tasks.core.errors import PlacementError
from tasks.core.gpus import GIB, Gpu, inventory
from tasks.serving.base import Target, VllmArgs
from tasks.serving.local import LocalTarget
from tasks.serving.ray import RaySettings, RayTarget

__all__ = ["GIB", "VLLM_DEFAULT_UTILIZATION", "Gpu", "cluster_gpus", "describe", "describe_nodes", "inventory",
           "place", "place_for", "place_on_ray", "ray_nodes"]

VLLM_DEFAULT_UTILIZATION = 0.92  # vLLM 0.32's CacheConfig.gpu_memory_utilization default
# Ray's bookkeeping resources, left out when a cluster is named in an error.
_RAY_INTERNAL = ("memory", "object_store_memory", "node:", "accelerator_type:")


def describe(gpus: Sequence[Gpu], held: Mapping[int, Sequence[str]] | None = None) -> str:
    """`GPU 0 NVIDIA H100 80.0 GiB, 71.2 used (held by a-0); GPU 1 ...`, or that there is none."""
    held = held or {}
    parts = [g.describe() + (f" (held by {', '.join(held[g.index])})" if held.get(g.index) else "") for g in gpus]
    return "; ".join(parts) or "no GPU (NVML lists none)"


def place(
    gpus: Sequence[Gpu],
    busy: Mapping[int, Sequence[str]],
    tp: int,
    need_bytes: int | None,
    replicas: int,
    *,
    utilization: float | None = None,
    starting: Collection[int] = (),
) -> list[list[int]]:
    """One sorted list of `tp` GPU indices per replica, by the module's rules; PlacementError naming the GPUs if not.

    `busy` maps a GPU to the replicas holding it. A replica claims, per GPU, the larger of `need_bytes` and
    `utilization` x that GPU's total; with neither it takes whole GPUs (only ones no replica holds). `starting`:
    GPUs of replicas whose memory use is not final, never shared.
    """
    held = {i: list(names) for i, names in busy.items() if names}
    free = {g.index: g.free_bytes for g in gpus}
    mine: set[int] = set()  # GPUs given to earlier replicas of this placement

    def claim(g: Gpu) -> int | None:
        if need_bytes is None and utilization is None:
            return None
        return max(need_bytes or 0, int((utilization or 0.0) * g.total_bytes))

    def usable(g: Gpu) -> bool:
        c = claim(g)
        if c is None:
            return g.index not in held and g.index not in mine
        return g.index not in starting and free[g.index] >= c

    out: list[list[int]] = []
    for n in range(replicas):
        order = sorted((g for g in gpus if usable(g)), key=lambda g: (g.index in held or g.index in mine, g.index))
        if len(order) < tp:
            raise PlacementError(_refusal(n, replicas, tp, claim, gpus, held))
        for g in order[:tp]:
            free[g.index] -= claim(g) or 0
            mine.add(g.index)
        out.append(sorted(g.index for g in order[:tp]))
    return out


def _refusal(n: int, replicas: int, tp: int, claim: Any, gpus: Sequence[Gpu], held: dict[int, list[str]]) -> str:
    claims = {claim(g) for g in gpus} - {None}
    if not claims:
        which, share = "that no other replica holds", ", or set vllm.gpu_memory_utilization so that replicas can share"
    else:
        low, high = min(claims) / GIB, max(claims) / GIB
        which = f"with {low:.1f} GiB free" if low == high else f"with {low:.1f}-{high:.1f} GiB free"
        share = ", or lower vllm.gpu_memory_utilization so that replicas can share a GPU"
    return (f"replica {n + 1} of {replicas} needs {tp} GPU(s) {which} (tensor_parallel_size={tp}); this host has "
            f"{len(gpus)}: {describe(gpus, held)}. Fix: stop a replica (see `llmhost endpoints list`), lower "
            f"replicas or vllm.tensor_parallel_size{share}")


# ---------------------------------------------------------------------------------------------- ray


def ray_nodes(settings: RaySettings) -> list[dict[str, Any]]:
    """The cluster's alive nodes (resources_total each), read from its dashboard as every other Ray call is."""
    return RayTarget(settings).nodes()


def cluster_gpus(nodes: Sequence[Mapping[str, Any]]) -> float:
    """GPUs the nodes offer in all: what `ray.cluster_resources()["GPU"]` says (0 where none)."""
    return sum(float((n.get("resources_total") or {}).get("GPU", 0)) for n in nodes)


def describe_nodes(nodes: Sequence[Mapping[str, Any]]) -> str:
    """`node 127.0.0.2 1a2b3c4d (head): CPU 4, GPU 0, llmhost_replica 2; node ...`: a cluster's resources, one line."""
    parts = []
    for n in nodes:
        res = {k: v for k, v in (n.get("resources_total") or {}).items() if not k.startswith(_RAY_INTERNAL)}
        res.setdefault("GPU", 0)
        shown = ", ".join(f"{k} {float(v):g}" for k, v in sorted(res.items(), key=lambda kv: (kv[0] != "CPU", kv[0])))
        node_id = str(n.get("node_id") or "")[:8]  # nodes on one machine share an IP
        name = " ".join(x for x in (str(n.get("node_ip", "?")), node_id) if x)
        parts.append(f"node {name}{' (head)' if n.get('is_head_node') else ''}: {shown}")
    return "; ".join(parts) or "no alive node"


def place_on_ray(
    device: str, nodes: Sequence[Mapping[str, Any]], *, tp: int, replicas: int, address: str
) -> dict[str, Any]:
    """The placement facts of a ray revision; PlacementError naming the cluster's resources where it cannot run.

    Serve gives each replica `tp` GPUs of one node. Totals are checked, not what is free now: a blue/green
    successor on a cluster with no spare GPUs waits for them, and Serve reports that as a start timeout.
    """
    per_node = [float((n.get("resources_total") or {}).get("GPU", 0)) for n in nodes]
    if device == "gpu":
        slots = sum(int(g // tp) for g in per_node)
        if slots < replicas:
            raise PlacementError(
                f"ray.address={address!r}: the revision runs on GPUs and needs {replicas} replica(s) x {tp} GPU(s) "
                f"on one node, the cluster has room for {slots}; its nodes: {describe_nodes(nodes)}. Fix: start the "
                "nodes with their GPUs (`make ray-up` on a GPU machine, or `ray start --num-gpus N`), lower "
                "ray.min_replicas or vllm.tensor_parallel_size, or use hardware: cpu")
    return {"target": "ray", "device": device, "address": address, "tensor_parallel_size": tp,
            "cluster_gpus": sum(per_node), "nodes": describe_nodes(nodes)}


# ---------------------------------------------------------------------------------------------- a target


def place_for(
    target: Target, args: VllmArgs, replicas: int, *, gpus: Sequence[Gpu] | None = None,
    nodes: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[list[list[int]] | None, dict[str, Any] | None]:
    """(GPUs of each local replica, the placement facts to record on the revision), or PlacementError.

    Local: this host's GPUs (`gpus`, default NVML's) against the store's; (None, None) on a host without a GPU,
    where replicas run on the CPU. Ray (a GPU revision): the cluster's nodes (`nodes`, default its dashboard's).
    """
    if isinstance(target, RayTarget):
        if target.device != "gpu":
            return None, None
        nodes = target.nodes() if nodes is None else nodes
        return None, place_on_ray("gpu", nodes, tp=args.tensor_parallel_size, replicas=target.settings.min_replicas,
                                  address=target.address)
    if not isinstance(target, LocalTarget):
        return None, None
    inv = inventory() if gpus is None else list(gpus)
    if not inv:
        return None, None
    held = store.gpus_in_use()
    util = args.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION
    assigned = place(inv, held, args.tensor_parallel_size, None, replicas, utilization=util,
                     starting=store.gpus_in_use(states=("starting", "restarting")))
    return assigned, {"target": "local", "gpus": assigned, "gpu_memory_utilization": util,
                      "inventory": describe(inv, held)}
