"""How a new revision replaces the live one when both cannot run at once: the strategy, and the in-place swaps.

- `bluegreen`: the new revision starts beside the old one (rollout's own path); clients never wait.
- `hold`: the endpoint is marked `swapping`, so gateways hold its new requests (up to LLMHOST_SWAP_HOLD_S, then
  503 with Retry-After); requests in flight drain on the old replicas, which then stop; the new revision starts,
  passes its smoke test and is switched in, which releases the held requests. If it fails, the old revision is
  started again.
- `sleep` (vLLM sleep mode: CUDA only, see `sleep_mode_supported`): as `hold`, but the old replicas sleep at level 1
  (weights offloaded to CPU RAM, KV cache dropped, GPU memory freed) instead of stopping. If the new revision
  fails, they wake in well under a second and their prefix cache is reset (cached blocks did not survive sleep).

What vLLM 0.32 (the CPU build installed here) exposes, read from its source: `--enable-sleep-mode` (ModelConfig
refuses it unless `Platform.is_sleep_mode_available()`, which is True for CUDA, ROCm and XPU only, not CPU), and,
with VLLM_SERVER_DEV_MODE=1, `POST /sleep?level=0|1|2&mode=abort|wait|keep`, `POST /wake_up`, `GET /is_sleeping`
and `POST /reset_prefix_cache`. Dev mode also opens other admin routes; replicas bind to 127.0.0.1 and the
gateway forwards only /v1/*, so only this host reaches them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx
import psutil

from tasks import store
from tasks.core.errors import ConfigError, DeployError
from tasks.core.gpus import inventory
from tasks.core.settings import get_settings
from tasks.deploy.plan import RevisionPlan, device_for, plan_revision
from tasks.deploy.replicas import _wait_idle, drain_and_stop, start_replicas, target_for
from tasks.deploy.spec import EndpointSpec, pinned_spec
from tasks.serving.gpus import VLLM_DEFAULT_UTILIZATION
from tasks.serving.local import has_cuda_gpu

if TYPE_CHECKING:
    from tasks.deploy.rollout import SizingOutcome, _Rollout

SwapMode = Literal["auto", "bluegreen", "hold", "sleep"]
Strategy = Literal["bluegreen", "hold", "sleep"]

GiB = 1024**3
SLEEP_LEVEL = 1  # level 2 also drops the weights, and waking then needs them reloaded: not "well under a second"
SLEEP_ARGS = ["--enable-sleep-mode"]
SLEEP_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # /sleep, /wake_up and /reset_prefix_cache exist only in dev mode


def choose_swap_strategy(spec_swap: SwapMode, fits_beside: bool, sleep_available: bool) -> tuple[Strategy, str]:
    """The swap strategy and why, one line: the spec's choice, else bluegreen where both fit, else sleep, else hold."""
    if spec_swap == "sleep" and not sleep_available:
        raise ConfigError("swap", "sleep", "vLLM's sleep mode needs a local target on a CUDA GPU and a live revision "
                          "started with it (swap: auto or sleep there); use swap: hold (or auto) here")
    if spec_swap != "auto":
        return spec_swap, f"swap: {spec_swap} in the spec"
    if fits_beside:
        return "bluegreen", "the new revision fits beside the old one"
    if sleep_available:
        return "sleep", "the new revision does not fit beside the old one; the old one sleeps while it starts"
    return "hold", ("the new revision does not fit beside the old one and sleep mode is unavailable; the gateway "
                    "holds requests while the old one stops and the new one starts")


# ------------------------------------------------------------------------------------------- room beside


@dataclass(frozen=True)
class Room:
    fits: bool
    detail: str


def cpu_room(need_per_replica: int, replicas: int, available_bytes: int) -> Room:
    """Whether `replicas` more CPU replicas fit in the memory free now (weights + overhead + VLLM_CPU_KVCACHE_SPACE)."""
    need = need_per_replica * replicas
    verdict = "fits" if need <= available_bytes else "does not fit"
    return Room(need <= available_bytes, f"{replicas} replica(s) x {need_per_replica / GiB:.2f} GiB {verdict} in "
                f"the {available_bytes / GiB:.2f} GiB of RAM available")


def gpu_room(gpus: list[tuple[int, int]], devices_needed: int, utilization: float) -> Room:
    """Whether `devices_needed` GPUs each have utilization x their memory free: vLLM's own start-up check.

    `gpus` is (total, free) bytes per GPU. vLLM claims gpu_memory_utilization of a device's whole memory and refuses
    to start where less is free, so two replicas at the default 0.92 never share a GPU.
    """
    ok = sum(1 for total, free in gpus if free >= utilization * total)
    verdict = "fits" if ok >= devices_needed else "does not fit"
    return Room(ok >= devices_needed, f"{devices_needed} GPU(s) with {utilization:g} of their memory free needed, "
                f"{ok} of {len(gpus)} have it: {verdict}")


def room_beside(spec: EndpointSpec, plan: RevisionPlan, *, weight_bytes: int, overhead_bytes: int) -> Room:
    """Whether the new revision's replicas fit on this machine while the old ones keep running."""
    if spec.target == "ray":
        return Room(True, "Ray Serve places the new application's replicas on its cluster")
    if device_for(spec.hardware) == "cpu" or not has_cuda_gpu():
        kv = get_settings().cpu_kvcache_space_gib * GiB
        return cpu_room(weight_bytes + overhead_bytes + kv, spec.replicas, psutil.virtual_memory().available)
    util = plan.vllm.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION
    gpus = [(g.total_bytes, g.free_bytes) for g in inventory()]
    return gpu_room(gpus, plan.vllm.tensor_parallel_size * spec.replicas, util)


# ------------------------------------------------------------------------------------------- sleep mode


def sleep_mode_supported(spec: EndpointSpec) -> bool:
    """vLLM's sleep mode runs here: a local replica on CUDA (vLLM's is_sleep_mode_available is False on CPU)."""
    return spec.target == "local" and has_cuda_gpu()


def with_sleep_mode(plan: RevisionPlan) -> RevisionPlan:
    """The plan with --enable-sleep-mode (not part of its identity: how it starts, not what it serves)."""
    if "--enable-sleep-mode" in plan.vllm.extra_args:
        return plan
    return plan.model_copy(update={"vllm": plan.vllm.model_copy(
        update={"extra_args": [*plan.vllm.extra_args, *SLEEP_ARGS]})})


def started_with_sleep_mode(rev: store.EndpointRevision | None) -> bool:
    return bool(rev is not None and ((rev.facts or {}).get("swap") or {}).get("sleep_mode"))


def _post(root: str, path: str, timeout_s: float = 60.0) -> None:
    resp = httpx.post(root + path, timeout=timeout_s)
    if resp.status_code != 200:
        raise DeployError(f"{root}{path} answered {resp.status_code}: {resp.text[:300]}")


# ------------------------------------------------------------------------------------------- the swap


@dataclass
class Swap:
    """One in-place swap: make way for the new revision, then mark it served, or restore the old one."""

    endpoint: str
    actor: str
    strategy: Strategy
    why: str
    sleep_mode: bool = False
    old_rev: store.EndpointRevision | None = None
    old_rows: list[store.ReplicaRow] = field(default_factory=list)
    paused_at: float | None = None
    pause_s: float = 0.0
    restored: str | None = None

    @property
    def in_place(self) -> bool:
        return self.strategy != "bluegreen" and bool(self.old_rows)

    @property
    def env(self) -> dict[str, str]:
        return dict(SLEEP_ENV) if self.sleep_mode else {}

    def make_way(self) -> None:
        """Hold the endpoint's requests, drain the old replicas, then stop them (hold) or put them to sleep."""
        if not self.in_place:
            return
        self.paused_at = time.monotonic()
        store.upsert_endpoint(self.endpoint, status="swapping", actor=self.actor)
        if self.strategy == "hold":
            drain_and_stop(self.endpoint, self.old_rows, actor=self.actor)
            return
        time.sleep(1.0)  # gateways see `swapping` on their next request, or within their 0.25 s epoch poll
        for row in self.old_rows:
            root = row.base_url.removesuffix("/v1")
            _wait_idle(root, quiet_s=0.5, timeout_s=120.0)
            _post(root, f"/sleep?level={SLEEP_LEVEL}&mode=wait")

    def served(self) -> None:
        """The new revision serves: the pause ends (rollout's switch has set the endpoint active)."""
        if self.paused_at is not None:
            self.pause_s = round(time.monotonic() - self.paused_at, 2)

    def restore(self) -> None:
        """The new revision failed: wake (sleep) or restart (hold) the old one, and let the gateways route again."""
        if self.paused_at is None:
            return
        t0 = time.monotonic()
        try:
            if self.strategy == "sleep":
                for row in self.old_rows:
                    root = row.base_url.removesuffix("/v1")
                    _post(root, "/wake_up")
                    _post(root, "/reset_prefix_cache")
                self.restored = "woken"
            else:
                self.restored = self._restart_old()
        except Exception as exc:
            self.restored = f"failed: {exc}"[:500]
            raise DeployError(f"the old revision could not be brought back ({exc}); redeploy it with "
                              f"`llmhost rollback {self.endpoint}`") from exc
        finally:
            store.upsert_endpoint(self.endpoint, status="active", actor=self.actor)
            self.pause_s = round(time.monotonic() - self.paused_at, 2)
            self.restored = f"{self.restored} in {time.monotonic() - t0:.2f}s"

    def _restart_old(self) -> str:
        assert self.old_rev is not None  # old rows imply an old revision
        for row in self.old_rows:
            if not row.managed:  # an attached server: llmhost never stopped it
                store.set_replica_state(row.id, "up", actor=self.actor)
        n = sum(1 for r in self.old_rows if r.managed)
        if not n:
            return "routed to again"
        spec = pinned_spec(self.old_rev)
        plan = plan_revision(spec)
        slept = started_with_sleep_mode(self.old_rev)
        _, row_ids = start_replicas(with_sleep_mode(plan) if slept else plan, self.old_rev.id, n, actor=self.actor,
                                    target=target_for(spec), env=dict(SLEEP_ENV) if slept else None)
        for rid in row_ids:
            store.set_replica_state(rid, "up", actor=self.actor)
        return "restarted"

    def facts(self) -> dict[str, Any]:
        """What the revision records as its `swap` fact (and the audit as revision.facts)."""
        out: dict[str, Any] = {"strategy": self.strategy, "why": self.why, "pause_s": self.pause_s,
                               "held_requests": None, "sleep_mode": self.sleep_mode}
        if self.restored is not None:
            out["old_revision"] = self.restored
        return out


def plan_swap(spec: EndpointSpec, plan: RevisionPlan, *, actor: str, live: store.EndpointRevision | None,
              weight_bytes: int, overhead_bytes: int) -> tuple[Swap, Room]:
    """Decides how this deploy replaces the live revision, from the spec's `swap` and the room on this machine."""
    rows = store.list_replicas(spec.name, live.id) if live is not None else []
    old_rows = [r for r in rows if r.state not in ("stopped", "failed")]
    room = room_beside(spec, plan, weight_bytes=weight_bytes, overhead_bytes=overhead_bytes)
    if not old_rows and spec.swap == "auto":
        room = Room(True, "no replica of the live revision is running")
    sleep_ok = sleep_mode_supported(spec) and (started_with_sleep_mode(live) or not old_rows)
    strategy, why = choose_swap_strategy(spec.swap, room.fits, sleep_ok)
    sleep_mode = sleep_mode_supported(spec) and spec.swap in ("auto", "sleep")
    return Swap(spec.name, actor, strategy, why, sleep_mode=sleep_mode, old_rev=live, old_rows=old_rows), room


# ------------------------------------------------------------------------------------------- the deploy's stage


def begin_swap(ro: _Rollout, sizing: SizingOutcome) -> Swap:
    """Swap stage: decide (audited as deploy.swap); in place, the old replicas stop or sleep now."""
    try:
        swap, room = plan_swap(ro.spec, ro.plan, actor=ro.actor, live=ro.live, weight_bytes=sizing.weight_bytes,
                               overhead_bytes=sizing.overhead_bytes)
    except ConfigError as exc:
        ro.set_status("failed", f"swap refused: {exc}")
        raise
    ro.record("deploy.swap", {"strategy": swap.strategy, "why": swap.why, "room": room.detail,
                              "in_place": swap.in_place, "sleep_mode": swap.sleep_mode})
    if swap.sleep_mode:
        ro.plan, ro.env = with_sleep_mode(ro.plan), swap.env
    try:
        swap.make_way()
    except Exception:
        finish_swap(ro, swap, served=False)
        raise
    return swap


def finish_swap(ro: _Rollout, swap: Swap, *, served: bool) -> None:
    """The new revision serves (the pause ends), or failed (the old one comes back); recorded as its swap fact."""
    try:
        if served:
            swap.served()
        else:
            swap.restore()
    finally:
        if served or swap.in_place:  # a blue/green revision that failed beside the old one has no swap to tell
            store.set_revision_facts(ro.name, ro.rev_id, "swap", swap.facts(), actor=ro.actor)
