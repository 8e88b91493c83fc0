"""Gateway overhead: the same load straight to vLLM and through `llmhost gateway`, side by side in one run.

    .venv/bin/python benchmarks/gateway_overhead.py                 # starts vLLM on the demo model
    .venv/bin/python benchmarks/gateway_overhead.py --base-url http://127.0.0.1:8001/v1 --served-model demo

Prints the throughput ratio (gateway / direct) and the added p50 / p95 latency. Arms alternate
(direct, gateway, direct, gateway, ...) so that drift in the machine's load hits both alike.
Target: ratio >= 0.97 and <= 2 ms added at p50.
The gateway arm meters with its usage journal on (the default, see gateway/journal.py);
benchmarks/usage_durability.py sets it against the old batched metering to show what it costs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (Linux), to say how much CPU the gateway spends per request."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Arm:
    name: str
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    requests: int = 0
    errors: int = 0

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] * 1000.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def run_load(url: str, api_key: str, model: str, n: int, concurrency: int, max_tokens: int,
                   arm: Arm) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "where is my parcel ?"}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    headers = {"authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                resp = await client.post(url, json=body, headers=headers)
                dt = time.perf_counter() - t0
                if resp.status_code != 200:
                    arm.errors += 1
                    if arm.errors == 1:
                        print(f"  {arm.name}: HTTP {resp.status_code}: {resp.text[:300]}", file=sys.stderr)
                    continue
                arm.latencies.append(dt)
                arm.requests += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        arm.seconds += time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="A running vLLM server (else one is started on the demo model).")
    ap.add_argument("--served-model", default="demo")
    ap.add_argument("--requests", type=int, default=200, help="Requests per arm and round.")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="Alternating rounds per arm.")
    ap.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="llmhost-bench-"))
    os.environ["LLMHOST_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tasks import store

    target = replica = None
    base_url = args.base_url
    if base_url is None:
        from demo.build import build_demo_model, default_demo_dir
        from tasks.serving.base import VllmArgs
        from tasks.serving.local import LocalTarget

        built = build_demo_model(default_demo_dir())
        target = LocalTarget()
        print("starting vLLM on the demo model (about a minute)...", file=sys.stderr)
        replica = target.start(VllmArgs(model=str(built.model_dir), served_model_name=args.served_model,
                                        dtype="float32", max_model_len=1024, enforce_eager=True,
                                        max_num_seqs=max(32, args.concurrency)), name="bench")
        base_url = replica.base_url
    gw_proc = None
    try:
        key = store.create_key("bench", team="bench", actor="benchmark")
        store.attach_server("bench", base_url=base_url, served_model=args.served_model, actor="benchmark")
        store.grant("bench", team="bench", actor="benchmark")
        port = free_port()
        log_path = home / "gateway.log"
        with log_path.open("wb") as log:
            gw_proc = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "gateway", "--port", str(port), "--log-level", "warning"],
                cwd=ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
        gw_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{gw_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or gw_proc.poll() is not None:
                raise SystemExit(f"gateway did not come up; see {log_path}:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)

        direct = Arm("direct")
        via = Arm("gateway")
        direct_url = base_url.rstrip("/") + "/chat/completions"
        via_url = f"{gw_url}/v1/chat/completions"
        print(f"warm-up, then {args.rounds} x {args.requests} requests per arm at concurrency "
              f"{args.concurrency}, max_tokens {args.max_tokens}", file=sys.stderr)
        warm = Arm("warm")
        asyncio.run(run_load(direct_url, "unused", args.served_model, 32, args.concurrency, args.max_tokens,
                             warm))
        asyncio.run(run_load(via_url, key.raw, "bench", 32, args.concurrency, args.max_tokens, warm))
        gw_cpu = 0.0
        for _ in range(args.rounds):
            asyncio.run(run_load(direct_url, "unused", args.served_model, args.requests, args.concurrency,
                                 args.max_tokens, direct))
            cpu0 = cpu_seconds(gw_proc.pid)
            asyncio.run(run_load(via_url, key.raw, "bench", args.requests, args.concurrency, args.max_tokens,
                                 via))
            gw_cpu += cpu_seconds(gw_proc.pid) - cpu0
        time.sleep(1.5)  # let the meter flush
        metered = sum(1 for u in store.list_usage(endpoint="bench") if u.status_code == 200)
    finally:
        if gw_proc is not None:
            gw_proc.terminate()
            gw_proc.wait(timeout=30)
        if target is not None and replica is not None:
            target.stop(replica)

    ratio = via.rps / direct.rps if direct.rps else 0.0
    result = {
        "requests_per_arm": direct.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "direct_rps": round(direct.rps, 2), "gateway_rps": round(via.rps, 2),
        "throughput_ratio": round(ratio, 4),
        "direct_p50_ms": round(direct.pct(0.5), 2), "gateway_p50_ms": round(via.pct(0.5), 2),
        "added_p50_ms": round(via.pct(0.5) - direct.pct(0.5), 2),
        "direct_p95_ms": round(direct.pct(0.95), 2), "gateway_p95_ms": round(via.pct(0.95), 2),
        "added_p95_ms": round(via.pct(0.95) - direct.pct(0.95), 2),
        "errors": direct.errors + via.errors, "usage_rows_metered": metered,
        "gateway_cpu_ms_per_request": round(gw_cpu * 1000.0 / max(1, via.requests), 3),
        "cpus": os.cpu_count(),
    }
    print(f"{'arm':8} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for arm in (direct, via):
        print(f"{arm.name:8} {arm.rps:8.2f} {arm.pct(0.5):8.2f} {arm.pct(0.95):8.2f}")
    print(f"throughput ratio (gateway/direct): {ratio:.3f}  (target >= 0.97)")
    print(f"added latency: p50 {result['added_p50_ms']:+.2f} ms (target <= 2), "
          f"p95 {result['added_p95_ms']:+.2f} ms")
    print(f"usage rows metered: {metered} (expected {via.requests + 32})")
    print(f"gateway process CPU: {result['gateway_cpu_ms_per_request']:.3f} ms per request "
          f"(on {os.cpu_count()} cores shared with vLLM and this client)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
