"""This host's GPUs as NVML (nvidia-ml-py, import name `pynvml`) reports them; empty where there is none.

It lives in core so that the gateway's dashboard reads GPUs the same way the deploy path places replicas
(the gateway may import only `tasks.core` and `tasks.store`). NVML numbers GPUs in PCI bus order, which is
CUDA's order only under `CUDA_DEVICE_ORDER=PCI_BUS_ID`: whoever hands these indices to CUDA sets that too.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("llmhost.gpus")

GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    """One GPU: its NVML index (PCI bus order), name and memory now; utilisation and compute pids for the dashboard."""

    index: int
    name: str
    total_bytes: int
    used_bytes: int
    uuid: str = ""
    util_percent: float = 0.0
    pids: frozenset[int] = field(default_factory=frozenset)

    @property
    def free_bytes(self) -> int:
        return max(0, self.total_bytes - self.used_bytes)

    def describe(self) -> str:
        """`GPU 0 NVIDIA H100 80.0 GiB, 71.2 used`: how errors and reports name a GPU."""
        return f"GPU {self.index} {self.name} {self.total_bytes / GIB:.1f} GiB, {self.used_bytes / GIB:.1f} used"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read(nvml: Any, i: int) -> Gpu:
    h = nvml.nvmlDeviceGetHandleByIndex(i)
    mem = nvml.nvmlDeviceGetMemoryInfo(h)
    # Utilisation, uuid and pids are extras: a GPU that refuses them (MIG, permissions) still counts.
    util, uuid, pids = 0.0, "", frozenset[int]()
    with contextlib.suppress(Exception):
        util = float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
    with contextlib.suppress(Exception):
        uuid = _text(nvml.nvmlDeviceGetUUID(h))
    with contextlib.suppress(Exception):
        pids = frozenset(int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(h))
    return Gpu(index=i, name=_text(nvml.nvmlDeviceGetName(h)), total_bytes=int(mem.total), used_bytes=int(mem.used),
               uuid=uuid, util_percent=util, pids=pids)


def inventory() -> list[Gpu]:
    """Every GPU NVML sees, by index; [] where nvidia-ml-py, the driver or a GPU is missing (never raises for that)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no device: NVMLError_LibraryNotFound / DriverNotLoaded
        return []
    try:
        return [_read(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception as exc:  # a GPU that fell off the bus mid-read: report none rather than half an inventory
        log.warning("NVML query failed, treating this host as having no GPU: %s", exc)
        return []
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
