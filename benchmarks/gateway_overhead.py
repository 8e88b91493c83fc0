"""Gateway overhead: the same load straight to an upstream and through `llmhost gateway`, side by side in one run.

    .venv/bin/python benchmarks/gateway_overhead.py --instant       # the gateway's own cost (see below)
    .venv/bin/python benchmarks/gateway_overhead.py                 # starts vLLM on the demo model
    .venv/bin/python benchmarks/gateway_overhead.py --base-url http://127.0.0.1:8001/v1 --served-model demo

--instant puts benchmarks/instant_upstream.py (answers from memory) behind three arms: direct, llmhost (one gateway
process) and LiteLLM's proxy (`make bench-env`; one process, config file only, no database). For plain and streamed
requests it measures, per arm and run: requests/s at saturation (wrk, concurrency 16), the proxy process's CPU ms
per request (psutil), and p50/p95 latency at a fixed rate below saturation (an aiohttp client sending on a clock),
from which the added latency over direct follows, with the CPU ms per request again at that rate (an event loop
that wakes for one request at a time amortizes less than one under saturation; this is the figure to set beside the
vLLM arm's, where the gateway sees about 100 requests/s), and requests/s from the official openai SDK at the same
concurrency (--sdk-requests per arm in --sdk-blocks blocks, the arms taking turns; the method of issue 18's table:
an application's client, which is then the bottleneck, so the ratio says what putting the gateway in its path costs
it, while wrk's says what the gateway can carry at most). Arms alternate within each run; the ratios are printed
with their min/max over the runs.

Against vLLM, prints the throughput ratio (gateway / direct) and the added p50 / p95 latency of a closed loop
(`--concurrency` clients, each sending when answered), then the added p50 / p95 at --fixed-rate requests/s sent on a
clock. Arms alternate in short rounds, the first arm alternating too (direct, gateway, gateway, direct, ...), so that
drift in the machine's load hits both alike.
Target: ratio >= 0.97 and <= 2 ms added at p50.
The gateway arm meters with its usage journal on (the default, see gateway/journal.py);
benchmarks/usage_durability.py sets it against the old batched metering to show what it costs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tasks.core.procs import free_port  # noqa: E402

if TYPE_CHECKING:
    from tasks.serving.base import Replica
    from tasks.serving.local import LocalTarget


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


def vllm_body(model: str, max_tokens: int) -> dict[str, object]:
    """The vLLM arm's request: greedy and `max_tokens` long whatever the model says, so both arms get equal work."""
    return {"model": model, "messages": [{"role": "user", "content": "where is my parcel ?"}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


async def run_load(url: str, api_key: str, model: str, n: int, concurrency: int, max_tokens: int,
                   arm: Arm) -> None:
    body = vllm_body(model, max_tokens)
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


def wait_health(url: str, proc: subprocess.Popen[bytes], log_path: Path, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"{what} did not come up; see {log_path}:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.2)


def start(cmd: list[str], log_path: Path, health_url: str, what: str,
          env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    wait_health(health_url, proc, log_path, what)
    return proc


def start_gateway(home: Path, workers: int = 1, root: Path = ROOT) -> tuple[subprocess.Popen[bytes], str]:
    """`llmhost gateway` from the tree at `root` (another checkout: compare code before and after a change)."""
    port = free_port()
    cmd = [sys.executable, "-m", "flows.cli", "gateway", "--port", str(port), "--log-level", "warning"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    url = f"http://127.0.0.1:{port}"
    proc = start(cmd, home / "gateway.log", f"{url}/health", "gateway", env={**os.environ, "PYTHONPATH": str(root)},
                 cwd=root)
    return proc, url


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_demo_vllm(demo_dir: Path, served_model: str, name: str, **vllm: Any) -> tuple[LocalTarget, Replica]:
    """vLLM on the demo model in `demo_dir` (built first if missing); stop it with `target.stop(replica)`."""
    from demo.build import build_demo_model
    from tasks.serving.base import VllmArgs
    from tasks.serving.local import LocalTarget

    built = build_demo_model(demo_dir)
    target = LocalTarget()
    print("starting vLLM on the demo model (about a minute)...", file=sys.stderr)
    replica = target.start(VllmArgs(model=str(built.model_dir), served_model_name=served_model, dtype="float32",
                                    max_model_len=1024, enforce_eager=True, **vllm), name=name)
    return target, replica


def bench_endpoint(base_url: str, served_model: str) -> str:
    """The store's endpoint `bench`, attached to the server at `base_url`, and a key granted it (returned raw)."""
    from tasks import store

    key = store.create_key("bench", team="bench", actor="benchmark")
    store.attach_server("bench", base_url=base_url, served_model=served_model, actor="benchmark")
    store.grant("bench", team="bench", actor="benchmark")
    return key.raw


# -- the instant-upstream arms -----------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"status_errors\\": %%d, "
    .. "\\"socket_errors\\": %%d}\\n", summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


def tree_cpu(proc: psutil.Process) -> float:
    """CPU seconds of a process and its children (uvicorn workers), user + system."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def own_cpu(proc: psutil.Process) -> float:
    """CPU seconds of the process alone, user + system: not its children (this one starts every arm's server)."""
    t = proc.cpu_times()
    return t.user + t.system


@dataclass
class Target:
    """One arm: where to send, with which key and model name, and the process whose CPU is its cost."""

    name: str
    url: str
    key: str
    model: str
    proc: psutil.Process | None


def body_for(model: str, stream: bool) -> dict[str, object]:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": "where is my parcel ?"}],
                               "max_tokens": 16}
    if stream:  # every arm gets the same bytes back: the usage chunk is asked for, as a metering client does
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def saturate(t: Target, stream: bool, seconds: int, concurrency: int, tmp: Path) -> dict[str, float]:
    """wrk at `concurrency` for `seconds`: requests/s, errors, and the arm's process CPU ms per request."""
    script = tmp / f"wrk-{t.name}-{int(stream)}.lua"
    script.write_text(WRK_SCRIPT % (json.dumps(body_for(t.model, stream)), t.key))
    cpu0 = tree_cpu(t.proc) if t.proc else 0.0
    # A 30 s timeout: a slow arm's answers are counted late rather than dropped as socket errors (wrk's 2 s).
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s", "-s", str(script),
                          t.url],
                         capture_output=True, text=True, check=True).stdout
    cpu = (tree_cpu(t.proc) - cpu0) if t.proc else float("nan")
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no summary for {t.name}:\n{out}")
    got = json.loads(line[4:])
    ok = got["requests"] - got["status_errors"]
    if got["status_errors"] or got["socket_errors"]:
        print(f"  {t.name}: {got['status_errors']} non-2xx, {got['socket_errors']} socket errors", file=sys.stderr)
    return {"rps": ok / (got["duration_us"] / 1e6), "cpu_ms": cpu * 1000.0 / max(1, got["requests"]),
            "errors": got["status_errors"] + got["socket_errors"], "requests": got["requests"]}


async def fixed_rate(t: Target, stream: bool, rate: float, n: int,
                     payload: dict[str, object] | None = None) -> list[float]:
    """Send `n` requests on a clock at `rate`/s (not waiting for answers); each one's latency in ms."""
    body = json.dumps(payload or body_for(t.model, stream)).encode()
    headers = {"authorization": f"Bearer {t.key}", "content-type": "application/json"}
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            nonlocal errors
            t0 = time.perf_counter()
            async with session.post(t.url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
                    return
            lat.append((time.perf_counter() - t0) * 1000.0)

        start_at = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = start_at + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    if errors:
        print(f"  {t.name}: {errors} failed requests at the fixed rate", file=sys.stderr)
    return sorted(lat)


async def sdk_arms(targets: list[Target], stream: bool, n: int, concurrency: int,
                   blocks: int) -> dict[str, dict[str, float]]:
    """`n` requests per arm through the official openai SDK (AsyncOpenAI) from `concurrency` tasks, as an
    application calls an endpoint: requests/s, and the CPU ms per request of the arm's process and of this client.

    Each arm's `n` requests run in `blocks` blocks, the arms taking turns ABBA (a, b, b, a, ...), so a drift in
    the machine's speed over the run hits every arm alike instead of whichever happened to run then. One client
    per arm for the whole run, its `concurrency` connections opened before any block is timed."""
    import openai
    from openai.types.chat import ChatCompletionMessageParam

    me = psutil.Process()
    msgs: list[ChatCompletionMessageParam] = [{"role": "user", "content": "where is my parcel ?"}]
    clients = {t.name: openai.AsyncOpenAI(base_url=t.url.removesuffix("/chat/completions"), api_key=t.key,
                                          max_retries=0, timeout=60) for t in targets}
    acc = {t.name: {"n": 0, "secs": 0.0, "errors": 0, "cpu": 0.0, "mine": 0.0} for t in targets}

    async def one(t: Target) -> None:
        client = clients[t.name]
        try:
            if stream:
                chunks = await client.chat.completions.create(
                    model=t.model, messages=msgs, max_tokens=16, stream=True,
                    stream_options={"include_usage": True})
                async for _ in chunks:
                    pass
            else:
                await client.chat.completions.create(model=t.model, messages=msgs, max_tokens=16)
        except openai.APIError as exc:
            if not acc[t.name]["errors"]:
                print(f"  {t.name} (sdk): {exc}", file=sys.stderr)
            acc[t.name]["errors"] += 1

    async def block(t: Target, k: int) -> None:
        left = k

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one(t)

        a = acc[t.name]
        cpu0, mine0 = (tree_cpu(t.proc) if t.proc else 0.0), own_cpu(me)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        a["secs"] += time.perf_counter() - t0
        a["cpu"] += (tree_cpu(t.proc) - cpu0) if t.proc else float("nan")
        a["mine"] += own_cpu(me) - mine0
        a["n"] += k

    try:
        for t in targets:  # connections and the key's verification are not timed
            await asyncio.gather(*(one(t) for _ in range(concurrency)))
            acc[t.name]["errors"] = 0
        sizes = [n // blocks + (1 if i < n % blocks else 0) for i in range(blocks)]
        for b, k in enumerate(sizes):
            for t in (targets if b % 2 == 0 else targets[::-1]):
                await block(t, k)
    finally:
        for c in clients.values():
            await c.close()
    out = {}
    for name, a in acc.items():
        if a["errors"]:
            print(f"  {name} (sdk): {a['errors']} failed requests", file=sys.stderr)
        out[name] = {"sdk_rps": (a["n"] - a["errors"]) / a["secs"], "sdk_cpu_ms": a["cpu"] * 1000.0 / a["n"],
                     "sdk_client_cpu_ms": a["mine"] * 1000.0 / a["n"]}
    return out


def still_up(targets: list[Target], home: Path) -> None:
    """Stop the run with one line when an arm's server died under the load (a crash, not a slow answer)."""
    for t in targets:
        if t.proc is not None and (not t.proc.is_running() or t.proc.status() == psutil.STATUS_ZOMBIE):
            raise SystemExit(f"the {t.name} arm's server (pid {t.proc.pid}) died during the run; its log is in "
                             f"{home}: rerun, or leave that arm out")


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def instant_main(args: argparse.Namespace, home: Path) -> int:
    from benchmarks import litellm_proxy
    from tasks import store

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: `apt-get install wrk` (Debian) drives the saturation load.")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port = free_port()
        up = start([sys.executable, str(ROOT / "benchmarks" / "instant_upstream.py"), "--port", str(up_port)],
                   home / "upstream.log", f"http://127.0.0.1:{up_port}/health", "instant upstream")
        procs.append(up)
        up_base = f"http://127.0.0.1:{up_port}/v1"
        key = bench_endpoint(up_base, "instant")
        gw, gw_url = start_gateway(home, args.workers, args.gateway_root)
        procs.append(gw)
        targets = [Target("direct", f"{up_base}/chat/completions", "unused", "instant", psutil.Process(up.pid)),
                   Target("llmhost", f"{gw_url}/v1/chat/completions", key, "bench", psutil.Process(gw.pid))]
        if args.baseline_root:  # the same gateway from another tree, on the same store: before/after in one run
            (home / "base").mkdir()
            base, base_url = start_gateway(home / "base", 1, args.baseline_root)
            procs.append(base)
            targets.append(Target("baseline", f"{base_url}/v1/chat/completions", key, "bench",
                                  psutil.Process(base.pid)))
        if not args.no_litellm:
            lport = free_port()
            cfg = litellm_proxy.write_config(home, upstream_base_url=up_base, upstream_model="instant",
                                             model_name="bench")
            lp = start(litellm_proxy.command(cfg, lport), home / "litellm.log",
                       f"http://127.0.0.1:{lport}/health/liveliness", "LiteLLM proxy", litellm_proxy.environment())
            procs.append(lp)
            targets.append(Target("litellm", f"http://127.0.0.1:{lport}/v1/chat/completions",
                                  litellm_proxy.MASTER_KEY, "bench", psutil.Process(lp.pid)))
        for t in targets:  # warm-up: connections, caches, the key's one scrypt
            for stream in (False, True):
                saturate(t, stream, 1, args.concurrency, home)
        results: list[dict[str, object]] = []
        rates: dict[bool, float] = {}
        for run in range(args.runs):
            order = targets[run % len(targets):] + targets[:run % len(targets)]
            for stream in (False, True):
                sat = {t.name: saturate(t, stream, args.seconds, args.concurrency, home) for t in order}
                still_up(order, home)
                # the issue's own method: an SDK client, concurrency 16, n requests per arm
                for name, got in asyncio.run(sdk_arms(order, stream, args.sdk_requests, args.concurrency,
                                                      args.sdk_blocks)).items():
                    sat[name].update(got)
                still_up(order, home)
                if stream not in rates:  # fixed once, from the first run: half the slowest arm's saturation
                    rates[stream] = args.rate or round(0.5 * min(s["rps"] for s in sat.values()))
                n = max(100, int(rates[stream] * args.latency_seconds))
                for t in order:
                    cpu0 = tree_cpu(t.proc) if t.proc else 0.0
                    lat = asyncio.run(fixed_rate(t, stream, rates[stream], n))
                    cpu_rate = ((tree_cpu(t.proc) - cpu0) * 1000.0 / n) if t.proc else float("nan")
                    still_up([t], home)
                    results.append({"run": run + 1, "mode": "stream" if stream else "plain", "arm": t.name,
                                    **sat[t.name], "rate": rates[stream], "p50": pct(lat, 0.5),
                                    "p95": pct(lat, 0.95), "cpu_ms_at_rate": cpu_rate})
        time.sleep(1.0)  # let the meter flush
        metered = sum(1 for u in store.list_usage(endpoint="bench") if u.status_code == 200)
    finally:
        for p in reversed(procs):
            stop(p)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    report(results, [t.name for t in targets], args)
    print(f"usage rows metered by llmhost: {metered}")
    return 0


def report(results: list[dict[str, object]], arms: list[str], args: argparse.Namespace) -> None:
    print(f"# instant upstream, {args.runs} runs, concurrency {args.concurrency} for {args.seconds}s (wrk), "
          f"latency at a fixed rate for {args.latency_seconds:g}s, {os.cpu_count()} cores shared by all")
    print(f"{'run':>3} {'mode':6} {'arm':8} {'req/s':>8} {'cpu ms/req':>10} {'rate':>5} {'cpu@rate':>8} "
          f"{'p50 ms':>7} {'p95 ms':>7} {'+p50':>6} {'+p95':>6} {'sdk req/s':>9}")
    by = {(r["run"], r["mode"], r["arm"]): r for r in results}
    for r in results:
        d = by[(r["run"], r["mode"], "direct")]
        add50, add95 = float(r["p50"]) - float(d["p50"]), float(r["p95"]) - float(d["p95"])  # type: ignore[arg-type]
        cpu = "" if r["arm"] == "direct" else f"{r['cpu_ms']:.3f}"
        print(f"{r['run']:>3} {r['mode']:6} {r['arm']:8} {r['rps']:8.0f} {cpu:>10} {r['rate']:>5} "
              f"{r['cpu_ms_at_rate']:8.3f} {r['p50']:7.2f} {r['p95']:7.2f} {add50:+6.2f} {add95:+6.2f} "
              f"{r['sdk_rps']:9.0f}")

    def span(mode: str, f: object) -> str:
        xs = [f(run) for run in range(1, args.runs + 1)]  # type: ignore[operator]
        return f"{sum(xs) / len(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f})"

    for mode in ("plain", "stream"):
        def g(run: int, arm: str, k: str, mode: str = mode) -> float:
            return float(by[(run, mode, arm)][k]) or float("nan")  # type: ignore[arg-type]

        print(f"## {mode}")
        print(f"  llmhost/direct  req/s: {span(mode, lambda r: g(r, 'llmhost', 'rps') / g(r, 'direct', 'rps'))}")
        print(f"  openai SDK client ({args.sdk_requests} requests, concurrency {args.concurrency}): "
              f"llmhost/direct req/s {span(mode, lambda r: g(r, 'llmhost', 'sdk_rps') / g(r, 'direct', 'sdk_rps'))}")
        for arm in arms:
            print(f"    {arm} req/s {span(mode, lambda r, a=arm: g(r, a, 'sdk_rps'))}; its process's cpu ms/req "
                  f"{span(mode, lambda r, a=arm: g(r, a, 'sdk_cpu_ms'))}; the client's "
                  f"{span(mode, lambda r, a=arm: g(r, a, 'sdk_client_cpu_ms'))}")
        for other in ("litellm", "baseline"):
            if other in arms:
                print(f"  llmhost/{other} req/s: "
                      f"{span(mode, lambda r, o=other: g(r, 'llmhost', 'rps') / g(r, o, 'rps'))}")
        for arm in arms:
            print(f"  {arm} cpu ms/req at the fixed rate: {span(mode, lambda r, a=arm: g(r, a, 'cpu_ms_at_rate'))}")
        for arm in arms[1:]:
            print(f"  {arm} cpu ms/req: {span(mode, lambda r, a=arm: g(r, a, 'cpu_ms'))}; added p50 ms: "
                  f"{span(mode, lambda r, a=arm: g(r, a, 'p50') - g(r, 'direct', 'p50'))}; added p95 ms: "
                  f"{span(mode, lambda r, a=arm: g(r, a, 'p95') - g(r, 'direct', 'p95'))}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instant", action="store_true", help="Measure against benchmarks/instant_upstream.py.")
    ap.add_argument("--base-url", help="A running vLLM server (else one is started on the demo model).")
    ap.add_argument("--served-model", default="demo")
    ap.add_argument("--requests", type=int, default=100, help="vLLM: requests per arm and round.")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8, help="vLLM: rounds, each arm once per round, the first "
                    "arm alternating (direct, gateway, gateway, direct, ...).")
    ap.add_argument("--fixed-rate", type=float, default=40.0, help="vLLM: then requests/s sent on a clock, not "
                    "waiting for answers (an open loop, as an application's users send), for the added latency "
                    "at a rate below saturation; 0 leaves it out.")
    ap.add_argument("--fixed-rounds", type=int, default=4, help="vLLM: rounds at --fixed-rate, 5 s per arm, ABBA.")
    ap.add_argument("--runs", type=int, default=3, help="--instant: runs, each with every arm and mode.")
    ap.add_argument("--seconds", type=int, default=5, help="--instant: saturation load per arm and mode.")
    ap.add_argument("--sdk-requests", type=int, default=1500, help="--instant: requests per arm, mode and run "
                    "through the openai SDK (the issue's method: an application's client, not wrk).")
    ap.add_argument("--sdk-blocks", type=int, default=6, help="--instant: the SDK requests of each arm run in this "
                    "many blocks, the arms taking turns ABBA, so drift over the run hits every arm alike.")
    ap.add_argument("--rate", type=float, help="--instant: fixed rate for latency (default: half the slowest "
                    "arm's saturation in run 1).")
    ap.add_argument("--latency-seconds", type=float, default=5.0, help="--instant: seconds at the fixed rate "
                    "(100 requests at least).")
    ap.add_argument("--no-litellm", action="store_true", help="--instant: leave out the LiteLLM arm.")
    ap.add_argument("--baseline-root", type=Path, help="--instant: add an arm with the gateway run from this "
                    "tree (`git archive REV | tar -x -C DIR`), to compare code before and after a change in one run.")
    ap.add_argument("--workers", type=int, default=1, help="Gateway processes (llmhost gateway --workers).")
    ap.add_argument("--gateway-root", type=Path, default=ROOT, help="Run the gateway from this tree (e.g. "
                    "`git archive REV | tar -x -C DIR`, to measure before and after a change the same way).")
    ap.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = ap.parse_args()

    from demo.build import demo_cache_dir

    demo_dir = demo_cache_dir()  # the demo model this state dir (or LLMHOST_DEMO_CACHE) has built, not a new one
    home = Path(tempfile.mkdtemp(prefix="llmhost-bench-"))
    os.environ["LLMHOST_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.instant:
        return instant_main(args, home)
    from tasks import store

    target = replica = None
    base_url = args.base_url
    if base_url is None:
        target, replica = start_demo_vllm(demo_dir, args.served_model, "bench",
                                          max_num_seqs=max(32, args.concurrency))
        base_url = replica.base_url
    gw_proc = None
    try:
        key = bench_endpoint(base_url, args.served_model)
        gw_proc, gw_url = start_gateway(home, args.workers, args.gateway_root)
        gw_ps = psutil.Process(gw_proc.pid)
        direct = Arm("direct")
        via = Arm("gateway")
        direct_url = base_url.rstrip("/") + "/chat/completions"
        via_url = f"{gw_url}/v1/chat/completions"
        print(f"warm-up, then {args.rounds} x {args.requests} requests per arm at concurrency "
              f"{args.concurrency}, max_tokens {args.max_tokens}", file=sys.stderr)
        warm = Arm("warm")
        asyncio.run(run_load(direct_url, "unused", args.served_model, 32, args.concurrency, args.max_tokens,
                             warm))
        asyncio.run(run_load(via_url, key, "bench", 32, args.concurrency, args.max_tokens, warm))
        gw_cpu = 0.0
        legs = [(direct, direct_url, "unused", args.served_model), (via, via_url, key, "bench")]
        for i in range(args.rounds):
            # ABBA: the arm that goes first alternates, so a drift in vLLM's speed over the run (its caches
            # filling, another process waking) hits both arms alike instead of always favouring the second.
            for arm, url, api_key, model in (legs if i % 2 == 0 else legs[::-1]):
                cpu0 = tree_cpu(gw_ps)
                asyncio.run(run_load(url, api_key, model, args.requests, args.concurrency, args.max_tokens, arm))
                if arm is via:
                    gw_cpu += tree_cpu(gw_ps) - cpu0
        # The rounds above are a closed loop: each client sends its next request when its last one is answered,
        # so the two arms' throughput ratio is their latency ratio. At a fixed rate the arms get the same load.
        fixed: dict[str, list[float]] = {"direct": [], "gateway": []}
        targets = [Target("direct", direct_url, "unused", args.served_model, None),
                   Target("gateway", via_url, key, "bench", None)]
        n_fixed = max(50, int(args.fixed_rate * 5))
        for i in range(args.fixed_rounds if args.fixed_rate > 0 else 0):
            for t in (targets if i % 2 == 0 else targets[::-1]):
                fixed[t.name] += asyncio.run(fixed_rate(t, False, args.fixed_rate, n_fixed,
                                                        vllm_body(t.model, args.max_tokens)))
        for xs in fixed.values():
            xs.sort()
        time.sleep(1.5)  # let the meter flush
        metered = sum(1 for u in store.list_usage(endpoint="bench") if u.status_code == 200)
    finally:
        stop(gw_proc)
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
        "fixed_rate": args.fixed_rate,
        **{f"fixed_{a}_p{q}_ms": round(pct(xs, q / 100), 2) for a, xs in fixed.items() for q in (50, 95)},
        "cpus": os.cpu_count(),
    }
    print(f"{'arm':8} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for arm in (direct, via):
        print(f"{arm.name:8} {arm.rps:8.2f} {arm.pct(0.5):8.2f} {arm.pct(0.95):8.2f}")
    print(f"throughput ratio (gateway/direct): {ratio:.3f}  (target >= 0.97)")
    print(f"added latency: p50 {result['added_p50_ms']:+.2f} ms (target <= 2), "
          f"p95 {result['added_p95_ms']:+.2f} ms")
    print(f"usage rows metered: {metered} (expected {via.requests + 32 + len(fixed['gateway'])})")
    print(f"gateway process CPU: {result['gateway_cpu_ms_per_request']:.3f} ms per request "
          f"(on {os.cpu_count()} cores shared with vLLM and this client)")
    if fixed["direct"] and fixed["gateway"]:
        r = result
        print(f"at a fixed {args.fixed_rate:g} req/s ({args.fixed_rounds} x {n_fixed} per arm, ABBA): p50 direct "
              f"{r['fixed_direct_p50_ms']:.2f} / gateway {r['fixed_gateway_p50_ms']:.2f} ms, added "
              f"{r['fixed_gateway_p50_ms'] - r['fixed_direct_p50_ms']:+.2f} ms (target <= 2); p95 added "
              f"{r['fixed_gateway_p95_ms'] - r['fixed_direct_p95_ms']:+.2f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
