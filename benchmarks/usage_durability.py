"""What durable usage costs: the gateway's usage journal, in both its modes, and the old batched metering.

    .venv/bin/python benchmarks/usage_durability.py
    .venv/bin/python benchmarks/usage_durability.py --concurrency 1 --stream

The three gateways run as subprocesses over one store, in front of benchmarks/instant_upstream.py (answers at
once, in its own process), so the gateway's own cost is all there is to see. Arms alternate and take turns going
first, so that drift in the machine's load hits them alike. Prints requests/s, p50 / p95 latency, the gateway
process's CPU per request, and what each journal mode adds per request over batched metering: "write" puts the
row into the kernel before the answer's end leaves (survives kill -9), "fdatasync" onto the disk (survives a
power cut too). Against a real model the added latency is the same in absolute terms, and small next to
generation time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gateway_overhead import Arm, free_port, run_load, start, tree_cpu  # noqa: E402

LABELS = {"off": "batched (old)", "write": "journal, write", "fdatasync": "journal, fdatasync"}
GATEWAY = """
import sys, uvicorn
from gateway.app import create_app
uvicorn.run(create_app(usage_journal=sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]),
            log_level="warning", access_log=False)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="Requests per arm and round.")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="Alternating rounds per arm.")
    ap.add_argument("--stream", action="store_true", help="Streamed requests instead of plain ones.")
    ap.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="llmhost-bench-"))
    os.environ["LLMHOST_HOME"] = str(home)
    from tasks import store

    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    try:
        up_port = free_port()
        procs["upstream"] = start([sys.executable, str(ROOT / "benchmarks" / "instant_upstream.py"), "--port",
                                   str(up_port)], home / "upstream.log", f"http://127.0.0.1:{up_port}/health",
                                  "instant upstream")
        key = store.create_key("bench", team="bench", actor="benchmark")
        store.attach_server("bench", base_url=f"http://127.0.0.1:{up_port}/v1", served_model="instant",
                            actor="benchmark")
        store.grant("bench", team="bench", actor="benchmark")
        for mode in ("off", "write", "fdatasync"):
            port = free_port()
            urls[mode] = f"http://127.0.0.1:{port}"
            procs[mode] = start([sys.executable, "-c", GATEWAY, str(port), mode], home / f"gateway-{mode}.log",
                                f"{urls[mode]}/health", f"gateway ({mode})")

        arms = {mode: Arm(mode) for mode in urls}
        cpu = dict.fromkeys(urls, 0.0)
        print(f"warm-up, then {args.rounds} x {args.requests} {'streamed' if args.stream else 'plain'} requests "
              f"per arm at concurrency {args.concurrency}", file=sys.stderr)
        for url in urls.values():
            asyncio.run(load(url, key.raw, 50, args, Arm("warm")))
        modes = list(urls)
        for rnd in range(args.rounds):
            for mode in modes[rnd % 3:] + modes[:rnd % 3]:  # the arms take turns going first
                cpu0 = tree_cpu(psutil.Process(procs[mode].pid))
                asyncio.run(load(urls[mode], key.raw, args.requests, args, arms[mode]))
                cpu[mode] += tree_cpu(psutil.Process(procs[mode].pid)) - cpu0
        time.sleep(1.5)  # let the meters flush
        metered = sum(1 for u in store.list_usage(endpoint="bench") if u.status_code == 200)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(timeout=30)

    base = arms["off"]
    cpu_ms = {m: cpu[m] * 1000.0 / max(1, arms[m].requests) for m in arms}
    result: dict[str, Any] = {"requests_per_arm": base.requests, "concurrency": args.concurrency,
                              "stream": args.stream, "cpus": os.cpu_count()}
    print(f"{'metering':20} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'CPU ms/req':>10}   "
          "added vs batched: p50, p95, CPU per request, throughput ratio")
    for m, a in arms.items():
        row = {"rps": round(a.rps, 1), "p50_ms": round(a.pct(0.5), 3), "p95_ms": round(a.pct(0.95), 3),
               "cpu_ms_per_request": round(cpu_ms[m], 3), "errors": a.errors,
               "added_p50_ms": round(a.pct(0.5) - base.pct(0.5), 3),
               "added_p95_ms": round(a.pct(0.95) - base.pct(0.95), 3),
               "added_cpu_ms_per_request": round(cpu_ms[m] - cpu_ms["off"], 3),
               "throughput_ratio": round(a.rps / base.rps, 4) if base.rps else 0.0}
        result[m] = row
        added = "" if m == "off" else (f"   {row['added_p50_ms']:+.2f} ms, {row['added_p95_ms']:+.2f} ms, "
                                       f"{row['added_cpu_ms_per_request']:+.3f} ms, {row['throughput_ratio']:.3f}")
        print(f"{LABELS[m]:20} {a.rps:7.1f} {a.pct(0.5):7.2f} {a.pct(0.95):7.2f} {cpu_ms[m]:10.3f}{added}")
    print("in process, one row at a time through the meter (CPU, wall per row):")
    asyncio.run(record_cost("warm", home, 500))  # imports, the first connection, the metric children
    for m in arms:
        cpu_us, wall_us = asyncio.run(record_cost(m, home))
        result[m].update(record_cpu_us=round(cpu_us, 1), record_wall_us=round(wall_us, 1))
        print(f"  {LABELS[m]:20} {cpu_us:8.1f} us CPU {wall_us:8.1f} us wall")
    errors = sum(a.errors for a in arms.values())
    print(f"usage rows metered: {metered} (expected {3 * (args.rounds * args.requests + 50)}), errors: {errors}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


async def record_cost(mode: str, home: Path, n: int = 5000) -> tuple[float, float]:
    """In process, free of the machine's noise: (CPU, wall) in microseconds per row through the meter, one
    request at a time (no group to share a sync with), store flushes included."""
    from datetime import UTC, datetime

    from gateway.metering import Meter, Metrics
    from tasks.store.schema import get_engine

    engine = get_engine(f"sqlite:///{home / f'record-{mode}.db'}")
    meter = Meter(engine, Metrics(), journal_dir=None if mode in ("off", "warm") else home / f"journal-{mode}",
                  journal_sync="fdatasync" if mode == "fdatasync" else "write")
    await meter.recover()
    meter.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        row = {"ts": datetime.now(UTC), "route": "chat", "stream": False, "status_code": 200, "latency_ms": 3.0,
               "ttft_ms": None, "endpoint": "bench", "key_prefix": "abcdefgh", "user": "bench", "team": "bench",
               "prompt_tokens": 5, "completion_tokens": 2}
        await meter.durable(meter.record(row))
    await meter.flush()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    await meter.close()
    return cpu / n * 1e6, wall / n * 1e6


async def load(url: str, key: str, n: int, args: argparse.Namespace, arm: Arm) -> None:
    if not args.stream:
        await run_load(f"{url}/v1/chat/completions", key, "bench", n, args.concurrency, 2, arm)
        return
    body = {"model": "bench", "messages": [{"role": "user", "content": "where is my parcel ?"}], "max_tokens": 2,
            "stream": True}
    headers = {"authorization": f"Bearer {key}"}
    sem = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:

        async def one() -> None:
            async with sem:
                t0 = time.perf_counter()
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                    data = await r.aread()
                if r.status_code != 200 or not data.endswith(b"data: [DONE]\n\n"):
                    arm.errors += 1
                    return
                arm.latencies.append(time.perf_counter() - t0)
                arm.requests += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        arm.seconds += time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
