"""Screenshots of the dashboard for the README: deploy the demo, send traffic, save each page as a PNG.

Runs everything for real in a throwaway state dir: registers the demo model, deploys deployments/demo.yaml
(vLLM starts, is smoke-tested and goes live), serves the gateway with its dashboard, sends a few minutes of
support-routing traffic through it with the OpenAI SDK from two users, then drives Debian's chromium with
Playwright and writes docs/screenshots/*.png. About five minutes on 2 cores (three of them traffic).

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--seconds 90]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = [("01-endpoints", "/ui"), ("02-overview", "/ui/endpoints/demo/overview"),
         ("03-calling", "/ui/endpoints/demo/calling"), ("04-usage", "/ui/endpoints/demo/usage"),
         ("05-health", "/ui/endpoints/demo/health")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--seconds", type=float, default=180.0, help="How long to send traffic.")
    ap.add_argument("--chromium", default=os.environ.get("LLMHOST_CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args()
    if not Path(args.chromium).exists():
        print(f"{args.chromium} is missing: apt-get install -y chromium chromium-driver", file=sys.stderr)
        return 1

    sys.path.insert(0, str(ROOT))
    from demo.build import build_demo_model, default_demo_dir

    # the demo model is built once per machine under the usual state dir (as the tests' cache); reuse it
    demo_dir = Path(os.environ.get("LLMHOST_DEMO_CACHE", default_demo_dir()))
    home = Path(tempfile.mkdtemp(prefix="llmhost-screens-"))
    os.environ.update({"LLMHOST_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
                       "MLFLOW_REGISTRY_URI": f"sqlite:///{home / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
                       "LLMHOST_ACTOR": "platform-bot"})

    import openai
    import uvicorn

    from demo.data import ROUTING_SYSTEM_PROMPT
    from gateway.app import create_app
    from gateway.dashboard import mount
    from tasks import store
    from tasks.core.tracking import mlflow_client
    from tasks.deploy import deploy, load_spec, stop_endpoint
    from tasks.register import register_model
    from tasks.serving.local import free_port

    built = build_demo_model(demo_dir)
    reg = register_model(f"path:{built.model_dir}", "demo")
    mlflow_client().set_registered_model_alias("demo", "champion", reg.version)
    print("deploying deployments/demo.yaml (vLLM start + smoke test) ...", flush=True)
    result = deploy(load_spec(ROOT / "deployments" / "demo.yaml"), actor="platform-bot")
    print(f"deploy: {result.outcome}: {result.message}", flush=True)
    if result.outcome != "live":
        return 1
    try:
        ana = store.create_key("ana", team="ml-platform", actor="platform-bot").raw
        ben = store.create_key("ben", team="ml-platform", actor="platform-bot").raw
        store.attach_server("demo-canary", base_url=result.replicas[0].base_url, served_model="demo",
                            description="The same replica under a canary name.", owner="platform",
                            actor="platform-bot")
        store.grant("demo-canary", team="ml-platform", actor="platform-bot")

        app = create_app()
        mount(app, sample_interval_s=3.0)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        send_traffic(url, {"ana": ana, "ben": ben}, args.seconds, ROUTING_SYSTEM_PROMPT, openai)
        time.sleep(4)  # a last sampling round and usage flush
        shoot(url, ana, args.out, args.chromium)
        server.should_exit = True
    finally:
        stop_endpoint("demo", actor="platform-bot")
    print(f"screenshots in {args.out}: {', '.join(n for n, _ in PAGES)}")
    return 0


def send_traffic(url: str, keys: dict[str, str], seconds: float, system: str, openai: object) -> None:
    rows = [json.loads(line) for line in (ROOT / "eval_suites" / "data" / "demo_routing_eval.jsonl")
            .read_text().splitlines() if line.strip()]
    rng = random.Random(7)
    clients = {u: openai.OpenAI(base_url=f"{url}/v1", api_key=k, max_retries=0)  # type: ignore[attr-defined]
               for u, k in keys.items()}
    stop = time.monotonic() + seconds
    n = 0
    while time.monotonic() < stop:
        user = "ana" if rng.random() < 0.7 else "ben"
        message = rng.choice(rows)["message"]
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": message}]
        model = "demo" if rng.random() < 0.85 else "demo-canary"
        try:
            if rng.random() < 0.3:
                list(clients[user].chat.completions.create(model=model, messages=msgs, max_tokens=16,
                                                           stream=True))
            elif rng.random() < 0.05:  # a few client errors, as real traffic has
                clients[user].chat.completions.create(model=model, messages=msgs * 200, max_tokens=4)
            else:
                clients[user].chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
        except Exception as exc:  # errors are part of the picture
            print(f"  {type(exc).__name__}", flush=True)
        n += 1
        time.sleep(rng.uniform(0.1, 0.8))
    print(f"sent {n} requests", flush=True)


def shoot(url: str, key: str, out: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_context(viewport={"width": 1360, "height": 900}).new_page()
        page.goto(f"{url}/ui/login")
        page.fill("#api_key", key)
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}/ui")
        for name, path in PAGES:
            page.goto(url + path)
            page.wait_for_load_state("load")
            page.screenshot(path=str(out / f"{name}.png"), full_page=True)
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
