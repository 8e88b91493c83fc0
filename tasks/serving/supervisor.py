"""A small parent per local replica: restarts a vLLM process that exits unexpectedly, on the same port.

`LocalTarget.start` runs `python -m tasks.serving.supervisor --base-url URL --log PATH -- <vLLM argv>` with the
control plane's Python, as the leader of a new session, so it outlives the CLI that deployed it. The vLLM process
is its child in the same process group: `LocalTarget.stop` signals the whole group, and a supervisor that is told
to stop (SIGTERM, SIGINT) stops its child and exits without restarting it. A crash is any other exit.

After a crash it waits (`replica_restart_backoff_s`, doubling per restart in the window, capped at
`replica_restart_backoff_max_s`) and starts the same command again. Once `replica_max_restarts` restarts fall
within `replica_restart_window_s`, the next crash marks the replica `failed`, with the reason and the log's last
lines in the audit entry `replica.failed`, and the supervisor exits. Its replica row (found by the supervisor's
pid and URL) records `restarting`, then its state before the crash once /health answers again. A replica that
never became healthy (by our probe, or SIGUSR1 from `LocalTarget.start` once it saw /health) is not restarted:
that is a bad start, which `LocalTarget.start` reports itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import httpx

from tasks import store  # imported up front: the crash path should not wait for SQLAlchemy to load
from tasks.core.procs import listens
from tasks.core.settings import get_settings
from tasks.serving.local import _tail, error_summary

ACTOR = "llmhost-supervisor"
TAIL_LINES = 20


@dataclass
class RestartPolicy:
    """How often a crashed replica is restarted: exponential backoff, and a limit per sliding window."""

    max_restarts: int = 5
    window_s: float = 600.0
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    _restarts: deque[float] = field(default_factory=deque)

    @classmethod
    def from_settings(cls) -> RestartPolicy:
        s = get_settings()
        return cls(s.replica_max_restarts, s.replica_restart_window_s, s.replica_restart_backoff_s,
                   s.replica_restart_backoff_max_s)

    def recent(self, now: float) -> int:
        """Restarts within the window that ends at `now`."""
        while self._restarts and now - self._restarts[0] > self.window_s:
            self._restarts.popleft()
        return len(self._restarts)

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before restarting after a crash at `now`; None: the limit is reached, give up."""
        n = self.recent(now)
        if n >= self.max_restarts:
            return None
        return min(self.backoff_max_s, self.backoff_s * 2**n)

    def restarted(self, now: float) -> None:
        self._restarts.append(now)


def say(msg: str) -> None:
    """One line in the replica's log (our stdout is that file), marked as the supervisor's."""
    print(f"{datetime.now():%m-%d %H:%M:%S} llmhost-supervisor[{os.getpid()}]: {msg}", flush=True)


def exit_text(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
    return f"exit code {rc}"


class Supervisor:
    """Runs `cmd`, watches it, restarts it after a crash under `policy`; records transitions through `record`."""

    def __init__(self, cmd: Sequence[str], *, health_url: str, log_path: Path | None, policy: RestartPolicy,
                 record: Callable[[str, str, dict[str, Any]], None], grace_s: float = 10.0,
                 startup_timeout_s: float = 600.0) -> None:
        self.cmd, self.health_url, self.log_path = list(cmd), health_url, log_path
        self.port = urlsplit(health_url).port  # whose socket answers on it: see _healthy
        self.policy, self.record, self.grace_s = policy, record, grace_s
        self.startup_timeout_s = startup_timeout_s
        self.stopping = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None
        self.restarts_done = 0
        self.crashed_at: float | None = None
        self.ever_up = False  # a child that never came up is a bad start, not a crash

    def request_stop(self, signum: int, frame: FrameType | None = None) -> None:
        self.stopping.set()

    def mark_up(self, signum: int, frame: FrameType | None = None) -> None:
        """SIGUSR1 from `LocalTarget.start` once it saw /health answer (our own probe may not have yet)."""
        self.ever_up = True

    def _healthy(self, client: httpx.Client) -> bool:
        """/health answers 200 from the child's own socket (not another process's that drew the same port)."""
        try:
            ok = client.get(self.health_url).status_code == 200
        except httpx.HTTPError:
            return False
        return ok and (self.port is None or (self.child is not None and listens(self.child.pid, self.port)))

    def _watch(self, client: httpx.Client) -> tuple[int | None, bool]:
        """Waits for the child to exit or for a stop; (exit code or None on stop, whether /health answered)."""
        assert self.child is not None
        up, next_probe = False, 0.0
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.stopping.is_set():
            rc = self.child.poll()
            if rc is not None:
                return rc, up
            if not up and self.restarts_done and time.monotonic() > deadline:
                say(f"restart {self.restarts_done} not healthy within {self.startup_timeout_s:g}s; killing it")
                self.child.kill()
            if not up and time.monotonic() >= next_probe:
                up = self._healthy(client)
                next_probe = time.monotonic() + 0.5
                if up and self.crashed_at is not None:
                    down_s = round(time.monotonic() - self.crashed_at, 2)
                    say(f"healthy again, {down_s}s after the crash")
                    self.record("up", "replica.recovered", {"attempt": self.restarts_done, "down_s": down_s})
                    self.crashed_at = None
            time.sleep(0.1)
        return None, up

    def run(self) -> int:
        """Supervises until a stop (0), a bad first start (the child's code) or giving up (1)."""
        with httpx.Client(timeout=2.0) as client:
            while True:
                self.child = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL)
                say(f"started pid {self.child.pid}" + (f", restart {self.restarts_done}" if self.restarts_done else ""))
                rc, up = self._watch(client)
                self.ever_up = self.ever_up or up
                # A stop signals the whole group: the SIGTERM that ended vLLM may be ours too, a moment behind.
                if rc is None or self.stopping.wait(0.2):
                    return self._stop_child()
                crashed_at = self.crashed_at = time.monotonic()
                kill_leftovers()
                if not self.ever_up:  # a bad start: LocalTarget.start reports it from the log
                    say(f"vLLM exited before it was ever healthy ({exit_text(rc)}); not restarting")
                    return rc if rc > 0 else 1
                delay = self.policy.next_delay(crashed_at)
                if delay is None:
                    self._give_up(rc)
                    return 1
                self.restarts_done += 1
                say(f"vLLM {exit_text(rc)}; restart {self.restarts_done} in {delay:g}s")
                self.record("restarting", "replica.restart",
                            {"attempt": self.restarts_done, "exit_code": rc, "backoff_s": delay})
                if self.stopping.wait(delay):
                    say("stopped while waiting to restart")
                    return 0
                self.policy.restarted(crashed_at)

    def _give_up(self, rc: int) -> None:
        n, window = self.policy.recent(time.monotonic()), self.policy.window_s
        say(f"vLLM {exit_text(rc)}; giving up after {n} restart(s) within {window:g}s: the replica is failed")
        tail = _tail(self.log_path, TAIL_LINES) if self.log_path else ""
        self.record("failed", "replica.failed", {
            "exit_code": rc, "restarts": n, "window_s": window, "reason": error_summary(tail),
            "log_tail": tail.splitlines(),
        })

    def _stop_child(self) -> int:
        """A deliberate stop: the child got the group's SIGTERM too; SIGTERM it again only if it lingers."""
        assert self.child is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.child.wait(timeout=2.0)
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        kill_leftovers()
        say("stopped")
        return 0


def kill_leftovers() -> None:
    """SIGKILLs what the dead child left in our process group (e.g. vLLM's engine core), so the port is free."""
    import psutil

    me, pgid = os.getpid(), os.getpgid(0)
    if pgid != me:  # not our own group (see main): never touch a group we merely belong to
        return
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if p.pid != me and os.getpgid(p.pid) == pgid:
                p.kill()


ROW_LOOKUPS = 4  # over 1.5 s


def store_recorder(base_url: str) -> Callable[[str, str, dict[str, Any]], None]:
    """Writes a transition to this replica's row and the audit log; the row is looked up by our pid each time,
    since a deploy registers it after the start (or only after its smoke test)."""
    before: dict[str, str] = {}

    def record(state: str, action: str, detail: dict[str, Any]) -> None:
        try:
            row = store.supervised_replica(os.getpid(), base_url)
            for _ in range(ROW_LOOKUPS - 1):  # a deploy may be registering the row right now: look again briefly
                if row is not None:
                    break
                time.sleep(0.5)
                row = store.supervised_replica(os.getpid(), base_url)
            if row is None:
                say(f"no running replica row for pid {os.getpid()} at {base_url}: {action} not recorded")
                return
            if state == "restarting" and row.state != "restarting":
                before["state"] = row.state
            if state == "up":  # a replica still `starting` (its deploy's smoke test not passed yet) stays so
                state = "starting" if before.pop("state", None) == "starting" else "up"
            store.set_replica_state(row.id, state, actor=ACTOR, action=action, detail=detail)
        except Exception as exc:  # the store being away must not stop the supervision
            say(f"could not record {action} in the store: {type(exc).__name__}: {exc}")

    return record


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.serving.supervisor", description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="The replica's OpenAI base URL (…/v1); /health is beside it.")
    ap.add_argument("--log", type=Path, default=None, help="The replica's log file, for the tail of a failure.")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the vLLM command line.")
    ns = ap.parse_args(argv)
    cmd = ns.cmd[1:] if ns.cmd[:1] == ["--"] else ns.cmd
    if not cmd:
        ap.error("give the command to supervise after --")
    base_url = ns.base_url.rstrip("/")
    if os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)  # lead our own group, so a stop (killpg of our pid) reaches vLLM and nothing else
    sup = Supervisor(cmd, health_url=base_url.removesuffix("/v1") + "/health", log_path=ns.log,
                     policy=RestartPolicy.from_settings(), record=store_recorder(base_url),
                     grace_s=get_settings().stop_grace_s, startup_timeout_s=get_settings().startup_timeout_s)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    signal.signal(signal.SIGUSR1, sup.mark_up)  # set before vLLM exists, so LocalTarget's signal never kills us
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
