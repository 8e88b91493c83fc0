"""The gateway's CPU when it has little or nothing to do, this tree against another, side by side in one run.

    .venv/bin/python benchmarks/gateway_idle.py --baseline-root /tmp/base               # starts vLLM (demo model)
    .venv/bin/python benchmarks/gateway_idle.py --baseline-root /tmp/base --base-url http://127.0.0.1:8001/v1

A gateway's CPU per proxied request (gateway_overhead.py) includes what it does between requests: its loops for
metering, health probes and the dashboard's replica sampler (each replica's vLLM /metrics, every 15 s), and
uvicorn's own tick. At a few requests a second that background work is most of the cost; on a 2-core host it is
taken from vLLM. Both gateways run at once over the same store, with the same vLLM replica attached:

1. idle: both measured over the same window (--idle-seconds), so a drift in the machine hits both alike;
2. light load: --rate requests/s for --requests requests through each in turn (ABBA over --rounds), their CPU ms
   per request and p50 latency.

Prints CPU ms/s idle and ms/request under the light load for each tree, and this tree / baseline.
`git worktree add /tmp/base HEAD~1` gives a baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.gateway_overhead import (  # noqa: E402
    Target,
    bench_endpoint,
    fixed_rate,
    pct,
    start_demo_vllm,
    start_gateway,
    stop,
    tree_cpu,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-root", type=Path, required=True, help="The tree to compare with (a worktree).")
    ap.add_argument("--base-url", help="A running vLLM server (else one is started on the demo model).")
    ap.add_argument("--served-model", default="demo")
    ap.add_argument("--idle-seconds", type=float, default=60.0, help="The idle window (the sampler runs every 15 s).")
    ap.add_argument("--settle-seconds", type=float, default=20.0, help="Wait after start before measuring.")
    ap.add_argument("--rate", type=float, default=5.0, help="Light load: requests/s.")
    ap.add_argument("--requests", type=int, default=100, help="Light load: requests per arm and round.")
    ap.add_argument("--rounds", type=int, default=4, help="Light load: rounds, the first arm alternating.")
    args = ap.parse_args()

    from demo.build import demo_cache_dir

    demo_dir = demo_cache_dir()  # the demo model this state dir (or LLMHOST_DEMO_CACHE) has built, not a new one
    home = Path(tempfile.mkdtemp(prefix="llmhost-idle-"))
    os.environ["LLMHOST_HOME"] = str(home)

    replica = target = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        base_url = args.base_url
        if base_url is None:
            target, replica = start_demo_vllm(demo_dir, args.served_model, "idle-bench")
            base_url = replica.base_url
        key = bench_endpoint(base_url, args.served_model)
        arms: list[Target] = []
        ps: list[psutil.Process] = []  # each arm's gateway, whose CPU is measured
        for name, root in (("this tree", ROOT), ("baseline", args.baseline_root.resolve())):
            arm_home = home / name.replace(" ", "-")
            arm_home.mkdir()
            proc, url = start_gateway(arm_home, 1, root)
            procs.append(proc)
            ps.append(psutil.Process(proc.pid))
            arms.append(Target(name, f"{url}/v1/chat/completions", key, "bench", ps[-1]))
        # One request through each first: the key's scrypt and the upstream connection are not measured.
        for a in arms:
            asyncio.run(fixed_rate(a, False, 10.0, 2))
        time.sleep(args.settle_seconds)

        print(f"idle: both gateways over the same {args.idle_seconds:.0f} s", file=sys.stderr)
        cpu0 = [tree_cpu(p) for p in ps]
        t0 = time.monotonic()
        time.sleep(args.idle_seconds)
        dt = time.monotonic() - t0
        idle = [(tree_cpu(p) - c) * 1000.0 / dt for p, c in zip(ps, cpu0, strict=True)]

        print(f"light load: {args.rounds} x {args.requests} requests per arm at {args.rate:g}/s", file=sys.stderr)
        cpu = {a.name: 0.0 for a in arms}
        lat: dict[str, list[float]] = {a.name: [] for a in arms}
        legs = list(zip(arms, ps, strict=True))
        for i in range(args.rounds):
            for a, p in (legs if i % 2 == 0 else legs[::-1]):
                c = tree_cpu(p)
                lat[a.name] += asyncio.run(fixed_rate(a, False, args.rate, args.requests))
                cpu[a.name] += tree_cpu(p) - c
        n = args.rounds * args.requests
        per = {k: v * 1000.0 / n for k, v in cpu.items()}
    finally:
        for p in procs:
            stop(p)
        if replica is not None and target is not None:
            target.stop(replica)

    new, old = arms[0].name, arms[1].name
    print(f"\n{'':<32}{new:>12}{old:>12}{'ratio':>8}")
    print(f"{'idle CPU, ms/s':<32}{idle[0]:>12.2f}{idle[1]:>12.2f}{idle[0] / idle[1]:>8.3f}")
    print(f"{f'CPU ms/request at {args.rate:g}/s':<32}{per[new]:>12.3f}{per[old]:>12.3f}"
          f"{per[new] / per[old]:>8.3f}")
    p50 = {k: pct(sorted(v), 0.5) for k, v in lat.items()}
    print(f"{f'p50 latency at {args.rate:g}/s, ms':<32}{p50[new]:>12.2f}{p50[old]:>12.2f}{p50[new] / p50[old]:>8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
