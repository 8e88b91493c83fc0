"""How long a local replica is gone after `kill -9`, and how many requests fail meanwhile.

    .venv/bin/python benchmarks/replica_recovery.py
    .venv/bin/python benchmarks/replica_recovery.py --concurrency 4 --rounds 2 --retry-wait 0

One vLLM replica of the demo model (its supervisor restarts it, see tasks.serving.supervisor) behind the real
gateway (a subprocess), both over a tmp state dir. Client threads call the gateway back to back; a client whose
request failed waits `--retry-wait` seconds (or the Retry-After the gateway sent, with --honour-retry-after)
before its next one. Each round SIGKILLs the vLLM process (not its supervisor) and prints: kill -> vLLM's
/health answers, kill -> the first answer through the gateway, the supervisor's recorded downtime, and the
requests that failed meanwhile by status.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GATEWAY = """
import sys, uvicorn
from gateway.app import create_app
uvicorn.run(create_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


class Load:
    """`n` client threads; every outcome is kept as (time, status) with status 200 for an answer."""

    def __init__(self, url: str, key: str, n: int, retry_wait: float, honour_retry_after: bool) -> None:
        self.url, self.key, self.retry_wait, self.honour = url, key, retry_wait, honour_retry_after
        self.outcomes: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, t: int) -> None:
        i = 0
        with httpx.Client(timeout=120, headers={"authorization": f"Bearer {self.key}"}) as c:
            while not self.stop.is_set():
                i += 1
                body = {"model": "recovery", "max_tokens": 4, "temperature": 0,
                        "messages": [{"role": "user", "content": f"where is my parcel {t}-{i} ?"}]}
                try:
                    r = c.post(f"{self.url}/v1/chat/completions", json=body)
                    status, retry_after = r.status_code, r.headers.get("retry-after")
                except httpx.HTTPError:
                    status, retry_after = 0, None
                self.outcomes.append((time.monotonic(), status))
                if status != 200:
                    wait = float(retry_after) if self.honour and retry_after else self.retry_wait
                    self.stop.wait(wait)

    def __enter__(self) -> Load:
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(timeout=150)


def wait_until(pred, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--retry-wait", type=float, default=0.5, help="a client's pause after a failed request (s)")
    ap.add_argument("--honour-retry-after", action="store_true", help="pause for the gateway's Retry-After")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="llmhost-recovery-"))
    os.environ["LLMHOST_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import psutil

    from demo.build import build_demo_model
    from tasks import store
    from tasks.serving.base import VllmArgs
    from tasks.serving.local import LocalTarget, free_port

    model = build_demo_model(Path(os.environ.get("LLMHOST_DEMO_CACHE", ROOT / ".llmhost" / "demo"))).model_dir
    target = LocalTarget()
    t0 = time.monotonic()
    replica = target.start(VllmArgs(model=str(model), served_model_name="recovery", dtype="float32",
                                    max_model_len=256, enforce_eager=True), name="recovery-r0")
    print(f"vLLM up in {time.monotonic() - t0:.1f}s on port {replica.port} (supervisor pid {replica.pid})")
    store.upsert_endpoint("recovery", actor="bench")
    rev = store.add_revision("recovery", {"kind": "bench"}, served_model_name="recovery", actor="bench")
    store.add_replica("recovery", rev.id, base_url=replica.base_url, served_model_name="recovery",
                      name=replica.name, state="up", pid=replica.pid, log_path=replica.log_path, actor="bench")
    store.set_live_revision("recovery", rev.id, actor="bench")
    store.grant("recovery", user="bench", actor="bench")
    key = store.create_key("bench", actor="bench").raw
    port = free_port()
    gw = subprocess.Popen([sys.executable, "-c", GATEWAY, str(port)], start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ok(u: str) -> bool:
        try:
            return httpx.get(u, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(lambda: ok(f"{url}/health"), 60, "the gateway")
        for rnd in range(1, args.rounds + 1):
            with Load(url, key, args.concurrency, args.retry_wait, args.honour_retry_after) as load:
                time.sleep(5.0)
                [child] = [p for p in psutil.Process(replica.pid).children() if "vllm" in " ".join(p.cmdline())]
                t_kill = time.monotonic()
                child.kill()
                wait_until(lambda: not ok(f"{replica.root_url}/health"), 10, "vLLM to go")
                t_health = wait_until(lambda: ok(f"{replica.root_url}/health"), 600, "vLLM to come back")
                t_served = wait_until(lambda k=t_kill: any(t > k and s == 200 for t, s in load.outcomes), 60,
                                      "an answer through the gateway")
                time.sleep(3.0)
            after = [(t, s) for t, s in load.outcomes if t > t_kill]
            failed = Counter(s for t, s in after if s != 200 and t <= t_served)
            late = sum(1 for t, s in after if s != 200 and t > t_served)
            entry = store.audit.entries(endpoint="recovery", action="replica.recovered")[-1]
            down_s = json.loads(entry.after or "{}").get("down_s")
            by_status = ", ".join(f"{n}x {s or 'conn'}" for s, n in sorted(failed.items()))
            print(f"round {rnd}: kill -9 -> /health {t_health - t_kill:.1f}s, -> served through the gateway "
                  f"{t_served - t_kill:.1f}s (supervisor's record: {down_s}s); failed meanwhile: "
                  f"{sum(failed.values())} ({by_status})"
                  f", after: {late}; answered in the round: {sum(1 for _, s in load.outcomes if s == 200)} "
                  f"at concurrency {args.concurrency}, retry wait "
                  f"{'Retry-After' if args.honour_retry_after else f'{args.retry_wait:g}s'}")
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        target.stop(replica)


if __name__ == "__main__":
    main()
