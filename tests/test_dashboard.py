"""The dashboard in headless Chromium: real gateway + real vLLM, real requests, the numbers on the pages.

Debian's chromium is driven by Playwright with `executable_path`; no browser is downloaded. Screenshots of
every page are saved under the test's tmp dir (and under $LLMHOST_SCREENSHOTS_DIR when it is set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from threaded_gateway import ThreadedGateway, wait_for

from tasks import store
from tasks.store import audit

CHROMIUM = os.environ.get("LLMHOST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EP, PRIVATE = "dash-router", "dash-private"
MSG = [{"role": "user", "content": "hi , my invoice is wrong ."}]
ROOT = Path(__file__).resolve().parents[1]

needs_chromium = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} missing: apt-get install chromium chromium-driver",
)


@dataclass
class Sent:
    """What the test sent through the gateway, to compare with what the pages show."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    per_user: dict[str, int] = field(default_factory=dict)

    def add(self, user: str, usage: Any | None, error: bool = False) -> None:
        self.requests += 1
        self.errors += error
        self.per_user[user] = self.per_user.get(user, 0) + 1
        if usage is not None:
            self.prompt_tokens += usage.prompt_tokens
            self.completion_tokens += usage.completion_tokens


@dataclass
class World:
    gw: ThreadedGateway
    keys: dict[str, str]
    sent: Sent
    live_hash: str
    old_hash: str
    replica_name: str


def smoke_audit(vllm_server: Any, revision: str) -> bool:
    """A real smoke test of the replica, recorded the way `deploy` records it."""
    from tasks.smoke import SmokeConfig, run_smoke

    # the fixture server runs without a tool parser, so the tool-call check is not part of it
    rp = run_smoke(vllm_server.base_url, "demo", SmokeConfig(max_tokens=8, timeout_s=60), tool_calling=False)
    audit.record(
        "dash-dave",
        "deploy.smoke",
        f"endpoint:{EP}",
        after={
            "passed": rp.passed,
            "replicas": [
                {
                    "url": rp.base_url,
                    "checks": [
                        {"name": c.name, "passed": c.passed, "detail": c.detail, "seconds": c.seconds}
                        for c in rp.checks
                    ],
                }
            ],
        },
        endpoint=EP,
        revision=revision,
    )
    return rp.passed


def revision_spec(version: int, max_num_seqs: int) -> dict[str, Any]:
    """A revision identity shaped like tasks.deploy.plan_revision's."""
    return {
        "spec": {
            "name": EP,
            "model": f"models:/dash-model/{version}",
            "target": "local",
            "replicas": 1,
            "hardware": "auto",
            "concurrency": 4,
            "vllm": {
                "max_model_len": 1024,
                "dtype": "float32",
                "enforce_eager": True,
                "max_num_seqs": max_num_seqs,
            },
        },
        "model_version": f"dash-model/{version}",
        "served_model_name": "demo",
        "vllm": {
            "served_model_name": "demo",
            "max_model_len": 1024,
            "dtype": "float32",
            "enforce_eager": True,
            "max_num_seqs": max_num_seqs,
        },
        "runtime": "vllm 0.32.0",
        "tool_calling": "hermes: from the chat template's tool-call markup",
    }


@pytest.fixture(scope="module")
def world(vllm_server: Any) -> Iterator[World]:
    from gateway.dashboard.auth import set_admin

    # dash-router: an old revision made live by carol, then the current one deployed by dave.
    store.upsert_endpoint(
        EP,
        description="Routes a support message to one of 8 queues.",
        usage_notes="Send the customer's message as the user turn; the answer is one queue "
        "name such as billing.\nUse temperature 0.",
        owner="dash-dave",
        actor="dash-dave",
    )
    old = store.add_revision(
        EP,
        revision_spec(1, 16),
        served_model_name="demo",
        model_version="dash-model/1",
        status="ready",
        actor="dash-carol",
    )
    store.set_live_revision(EP, old.id, reason="first deploy", actor="dash-carol")
    live = store.add_revision(
        EP,
        revision_spec(2, 32),
        served_model_name="demo",
        model_version="dash-model/2",
        status="deploying",
        actor="dash-dave",
    )
    rep = store.add_replica(
        EP,
        live.id,
        base_url=vllm_server.base_url,
        served_model_name="demo",
        state="up",
        name="dash-router-r0",
        pid=vllm_server.pid,
        log_path=vllm_server.log_path,
        kv_cache_tokens=vllm_server.kv_cache_tokens,
        # The session fixture owns this process: stopping the endpoint must not kill it.
        managed=False,
        actor="dash-dave",
    )
    smoke_audit(vllm_server, live.content_hash[:12])
    store.set_live_revision(EP, live.id, reason="smoke tests passed", actor="dash-dave")
    store.grant(EP, team="dash-ml", actor="dash-dave")
    # dash-private: the same server under another name, open to bob only.
    store.attach_server(
        PRIVATE,
        base_url=f"http://localhost:{vllm_server.port}/v1",
        served_model="demo",
        description="Bob's private endpoint.",
        actor="dash-bob",
    )
    store.grant(PRIVATE, user="dash-bob", actor="dash-bob")

    keys = {
        "alice": store.create_key("dash-alice", team="dash-ml", actor="test").raw,
        "erin": store.create_key("dash-erin", team="dash-ml", actor="test").raw,
        "bob": store.create_key("dash-bob", actor="test").raw,
        "root": store.create_key("dash-root", actor="test").raw,
    }
    set_admin("dash-root", actor="test")

    with ThreadedGateway(flush_interval_s=0.1, dashboard=True) as gw:
        sent = Sent()
        alice = gw.client(keys["alice"])
        for i in range(4):
            r = alice.chat.completions.create(model=EP, messages=MSG, max_tokens=4 + i, temperature=0)
            sent.add("dash-alice", r.usage)
        for _ in range(2):
            chunks = list(
                alice.chat.completions.create(
                    model=EP, messages=MSG, max_tokens=12, stream=True, stream_options={"include_usage": True}
                )
            )
            sent.add("dash-alice", chunks[-1].usage)
        with pytest.raises(openai.BadRequestError):  # vLLM's context-length error, passed through
            alice.chat.completions.create(
                model=EP, messages=[{"role": "user", "content": "parcel " * 2000}], max_tokens=4
            )
        sent.add("dash-alice", None, error=True)
        r = gw.client(keys["erin"]).chat.completions.create(model=EP, messages=MSG, max_tokens=3)
        sent.add("dash-erin", r.usage)
        for _ in range(2):
            gw.client(keys["bob"]).chat.completions.create(model=PRIVATE, messages=MSG, max_tokens=2)

        wait_for(
            lambda: (
                len(store.list_usage(endpoint=EP)) == sent.requests and len(store.list_usage(endpoint=PRIVATE)) == 2
            ),
            what="usage rows",
        )
        # two sampling rounds after the traffic, so the health charts have points
        rounds = gw.dashboard.sampler.rounds
        wait_for(lambda: gw.dashboard.sampler.rounds >= rounds + 2, what="sampler rounds")
        yield World(gw, keys, sent, live.content_hash[:12], old.content_hash[:12], rep.name)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dashboard-screenshots")


class Session:
    """A browser context signed in with one key; records console errors and every URL the page fetched."""

    def __init__(self, browser: Any, gw: ThreadedGateway, shots: Path):
        self.context = browser.new_context(viewport={"width": 1360, "height": 900})
        self.page = self.context.new_page()
        self.gw, self.shots = gw, shots
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.failed: list[str] = []
        self.page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    def login(self, key: str) -> None:
        self.page.goto(f"{self.gw.url}/")
        assert self.page.url.startswith(f"{self.gw.url}/ui/login")  # / -> /ui -> sign-in
        self.page.fill("#api_key", key)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(f"{self.gw.url}/ui")

    def goto(self, path: str) -> Any:
        resp = self.page.goto(f"{self.gw.url}{path}")
        self.page.wait_for_load_state("load")
        return resp

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        extra = os.environ.get("LLMHOST_SCREENSHOTS_DIR")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / path.name)
        return path

    def endpoints(self) -> list[str]:
        return self.page.eval_on_selector_all("#endpoints tbody tr", "rows => rows.map(r => r.dataset.endpoint)")

    def cell(self, selector: str) -> str:
        return self.page.inner_text(selector).strip()

    def charts_drawn(self) -> list[str]:
        """Ids of canvases that Chart.js drew (a Chart instance exists and the canvas has a size)."""
        return self.page.evaluate("""() => Array.from(document.querySelectorAll('canvas.chart'))
            .filter(c => window.Chart.getChart(c) && c.width > 0 && c.height > 0).map(c => c.id)""")

    def close(self) -> None:
        self.context.close()


def as_int(text: str) -> int:
    return int(re.sub(r"[^\d]", "", text))


@pytest.mark.slow
@needs_chromium
def test_user_sees_their_endpoint_and_every_tab_shows_the_traffic(
    world: World, browser: Any, shots: Path, monkeypatch: pytest.MonkeyPatch
):
    s = Session(browser, world.gw, shots)
    sent = world.sent
    try:
        s.login(world.keys["alice"])
        # The cookie names the key by its public prefix only, signed; the secret never leaves the form.
        cookie = next(c for c in s.context.cookies() if c["name"] == "llmhost_ui")
        secret = world.keys["alice"].split("-", 2)[2]
        assert secret not in cookie["value"] and cookie["httpOnly"] and cookie["path"] == "/ui"

        # Endpoints list: only what alice's team may call, with the last hour's counts.
        assert s.endpoints() == [EP]
        row = f"#endpoints tr[data-endpoint='{EP}']"
        assert as_int(s.cell(f"{row} td[data-metric=requests]")) == sent.requests
        assert as_int(s.cell(f"{row} td[data-metric=errors]")) == sent.errors == 1
        assert world.live_hash in s.cell(row) and "dash-model/2" in s.cell(row)
        s.shot("01-endpoints")

        # Overview: status, description, live revision and its spec, history with who/when, smoke results.
        s.page.click(f"{row} a")
        s.page.wait_for_url(f"**/ui/endpoints/{EP}/overview")
        assert s.cell("#live-revision") == world.live_hash
        assert "Routes a support message" in s.cell("#description")
        spec = yaml.safe_load(s.cell("#live-spec pre.spec"))
        assert spec["model"] == "models:/dash-model/2" and spec["vllm"]["max_num_seqs"] == 32
        assert "--max-num-seqs 32" in s.cell("#live-spec")
        history = s.page.eval_on_selector_all("#revisions tbody tr", "rs => rs.map(r => r.innerText)")
        assert len(history) == 2
        assert world.live_hash in history[0] and "dash-dave" in history[0] and "live" in history[0]
        assert world.old_hash in history[1] and "dash-carol" in history[1] and "retired" in history[1]
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", history[0])
        checks = s.page.eval_on_selector_all(".smoke-checks tbody tr td:first-child", "cs => cs.map(c => c.innerText)")
        assert {"health", "models", "chat", "stream"} <= set(checks)
        s.shot("02-overview")

        # Calling: base URL and model filled in, in all three snippets, plus the owner's notes.
        s.page.click("nav.tabs a[data-tab=calling]")
        s.page.wait_for_url("**/calling")
        base = f"{world.gw.url}/v1"
        assert s.cell("#base-url") == base and s.cell("#model-name") == EP
        for lang in ("python", "curl", "javascript"):
            text = s.cell(f"#snippet-{lang}")
            assert base in text and EP in text and "LLMHOST_API_KEY" in text and secret not in text
        assert "one queue name such as billing" in s.cell("#usage-notes")
        s.shot("03-calling")
        # The Python snippet runs as shown against the real gateway.
        monkeypatch.setenv("LLMHOST_API_KEY", world.keys["alice"])
        exec(compile(s.cell("#snippet-python"), "snippet", "exec"), {"__name__": "snippet"})
        sent.add("dash-alice", None)  # counted below; its tokens are read back from the store
        row_ = wait_for(
            lambda: len(store.list_usage(endpoint=EP)) == sent.requests and store.list_usage(endpoint=EP),
            what="snippet usage row",
        )
        last = row_[-1]
        sent.prompt_tokens += last.prompt_tokens or 0
        sent.completion_tokens += last.completion_tokens or 0

        # Usage: the totals equal what was sent; charts drawn; top users.
        s.page.click("nav.tabs a[data-tab=usage]")
        s.page.wait_for_url("**/usage")
        for window in ("1h", "24h", "7d"):
            s.goto(f"/ui/endpoints/{EP}/usage?window={window}")
            assert as_int(s.cell("#usage-totals [data-metric=requests]")) == sent.requests, window
            assert as_int(s.cell("#usage-totals [data-metric=errors]")) == sent.errors
            assert as_int(s.cell("#usage-totals [data-metric=prompt_tokens]")) == sent.prompt_tokens
            assert as_int(s.cell("#usage-totals [data-metric=completion_tokens]")) == sent.completion_tokens
            assert sorted(s.charts_drawn()) == ["chart-requests", "chart-tokens"]
            bars = s.page.evaluate(
                "() => Chart.getChart('chart-requests').data.datasets[0].data.reduce((a, b) => a + b, 0)"
            )
            assert bars == sent.requests
        s.goto(f"/ui/endpoints/{EP}/usage?window=1h")
        users = {
            r[0]: as_int(r[1])
            for r in s.page.eval_on_selector_all(
                "#top-users tbody tr", "rs => rs.map(r => [r.dataset.user, r.children[2].innerText])"
            )
        }
        assert users == sent.per_user
        alice_prefix = store.split_key(world.keys["alice"])[0]
        assert s.page.locator(f"#top-keys tr[data-key='{alice_prefix}']").count() == 1
        s.shot("04-usage")

        # System health: latency percentiles, sampled vLLM gauges, CPU/RAM of the replica, its log.
        s.page.click("nav.tabs a[data-tab=health]")
        s.page.wait_for_url("**/health")
        ok_latencies = sorted(r.latency_ms for r in store.list_usage(endpoint=EP) if r.status_code < 400)
        p50 = ok_latencies[max(1, -(-50 * len(ok_latencies) // 100)) - 1]
        assert as_int(s.cell("#latency-totals [data-metric=latency_p50]")) == round(p50)
        assert s.cell("#latency-totals [data-metric=ttft_p50]") != "– ms"  # streamed requests have a TTFT
        assert sorted(s.charts_drawn()) == ["chart-hw", "chart-kv", "chart-latency", "chart-queue"]
        kv = s.page.evaluate("() => Chart.getChart('chart-kv').data.datasets[0].data.filter(v => v !== null)")
        assert kv, "no KV-cache samples in the chart"
        assert "CPU and RAM of the replica processes (psutil" in s.cell("#hw-label")
        cpu = s.page.evaluate("() => Chart.getChart('chart-hw').data.datasets[1].data.filter(v => v !== null)")
        assert cpu and all(v > 1 for v in cpu), "replica RSS (MiB) missing"
        rep_row = s.cell(f"#replicas tr[data-replica='{world.replica_name}']")
        assert "up" in rep_row and ("MiB" in rep_row or "GiB" in rep_row)
        log_text = s.cell(f"pre[data-replica-log='{world.replica_name}']")
        (rep,) = [r for r in store.list_replicas(EP) if r.name == world.replica_name]
        in_file = set(Path(rep.log_path).read_text(errors="replace").splitlines())
        shown = [line for line in log_text.splitlines() if line.strip()]
        assert shown and all(line in in_file for line in shown), "the log pane is not the replica's log"
        s.shot("05-health")

        assert s.errors == [], (s.errors, s.failed)
        foreign = [u for u in s.urls if not u.startswith(world.gw.url) and not u.startswith("data:")]
        assert foreign == [], f"pages fetched from elsewhere: {foreign}"
    finally:
        s.close()


@pytest.mark.slow
@needs_chromium
def test_user_without_access_cannot_see_the_endpoint(world: World, browser: Any, shots: Path):
    s = Session(browser, world.gw, shots)
    try:
        s.login(world.keys["bob"])
        assert s.endpoints() == [PRIVATE]
        assert as_int(s.cell(f"#endpoints tr[data-endpoint='{PRIVATE}'] td[data-metric=requests]")) == 2
        assert EP not in s.page.content()
        for tab in ("overview", "calling", "usage", "health"):
            resp = s.goto(f"/ui/endpoints/{EP}/{tab}")
            assert resp.status == 404
            body = s.page.content()
            assert "Routes a support message" not in body and world.live_hash not in body
        s.shot("06-no-access")
        # An unknown endpoint answers exactly the same way: names are not disclosed.
        assert s.goto("/ui/endpoints/no-such-endpoint/usage").status == 404
    finally:
        s.close()


@pytest.mark.slow
@needs_chromium
def test_admin_sees_every_endpoint(world: World, browser: Any, shots: Path):
    s = Session(browser, world.gw, shots)
    try:
        s.login(world.keys["root"])
        shown = s.endpoints()
        assert {EP, PRIVATE} <= set(shown)
        assert shown == sorted(e.name for e in store.list_endpoints())
        assert "admin" in s.cell("header .who")
        assert s.goto(f"/ui/endpoints/{PRIVATE}/usage").status == 200
        assert as_int(s.cell("#usage-totals [data-metric=requests]")) == 2
    finally:
        s.close()


@pytest.mark.slow
@needs_chromium
def test_bad_key_and_revoked_key_are_refused(world: World, browser: Any, shots: Path):
    s = Session(browser, world.gw, shots)
    try:
        s.page.goto(f"{world.gw.url}/ui/login")
        s.page.fill("#api_key", "llmh-0123abcd-" + "x" * 43)
        s.page.click("button[type=submit]")
        assert "is not valid" in s.cell("p.error")
        assert not [c for c in s.context.cookies() if c["name"] == "llmhost_ui"]

        raw = store.create_key("dash-erin", team="dash-ml", actor="test").raw
        s.login(raw)
        assert s.endpoints() == [EP]
        store.revoke_key(store.split_key(raw)[0], actor="test")
        s.goto("/ui")
        assert "/ui/login" in s.page.url  # the session ended with the key
    finally:
        s.close()


@pytest.mark.slow
def test_prometheus_targets_and_grafana_dashboard_use_real_metric_names(world: World, vllm_server: Any):
    gw = world.gw
    # HTTP service discovery for Prometheus: admin key only.
    url = f"{gw.url}/ui/api/prometheus/targets"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"authorization": f"Bearer {world.keys['alice']}"}).status_code == 403
    groups = httpx.get(url, headers={"authorization": f"Bearer {world.keys['root']}"}).json()
    mine = [g for g in groups if g["labels"]["endpoint"] == EP]
    assert mine == [
        {
            "targets": [f"127.0.0.1:{vllm_server.port}"],
            "labels": {
                "__scheme__": "http",
                "endpoint": EP,
                "replica": world.replica_name,
                "revision": world.live_hash,
            },
        }
    ]

    # The sampler parses only its gauges' lines of the real page: the same values as a parse of the whole page.
    from gateway.dashboard.sampler import VLLM_GAUGES, parse_vllm_metrics

    page = httpx.get(f"{vllm_server.root_url}/metrics").text
    parsed = parse_vllm_metrics(page)
    assert set(parsed) == set(VLLM_GAUGES.values())
    assert parsed == _whole_page_values(page)

    names = set()
    for text in (httpx.get(f"{gw.url}/metrics").text, page):
        for fam in text_string_to_metric_families(text):
            names |= {s.name for s in fam.samples}
    dash = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(?:llmhost_gateway_|vllm:)[A-Za-z0-9_:]+", e)}
    assert len(used) >= 12
    assert used <= names, f"dashboard metrics missing from the real /metrics: {sorted(used - names)}"
    assert dash["templating"]["list"][0]["query"]["query"].startswith("label_values(llmhost_gateway_requests_total")

    prom = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["llmhost-vllm"]["http_sd_configs"][0]["url"].endswith("/ui/api/prometheus/targets")
    assert jobs["llmhost-gateway"]["metrics_path"] == "/metrics"


def test_dashboard_admin_cli_is_audited():
    from flows.cli import main
    from gateway.dashboard.auth import is_admin

    assert main(["dashboard", "admin", "dash-zoe"]) == 0
    assert is_admin("dash-zoe")
    assert main(["dashboard", "admin", "dash-zoe", "--remove"]) == 0
    assert not is_admin("dash-zoe")
    actions = [(e.action, e.subject) for e in audit.entries(action="user.admin")]
    assert actions[-2:] == [("user.admin", "user:dash-zoe"), ("user.admin", "user:dash-zoe")]
    assert audit.verify().ok


# ------------------------------------------------------------------------------------------ no servers


VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="demo"} 3.0
vllm:num_requests_running{engine="1",model_name="demo"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="demo"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="demo"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="demo"} 0.25
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="demo"} 120.0
vllm:prompt_tokens_created{engine="0",model_name="demo"} 1.7e9
"""


def test_vllm_metrics_are_summed_over_engines_and_kv_usage_averaged():
    from gateway.dashboard.sampler import parse_vllm_metrics

    assert parse_vllm_metrics(VLLM_METRICS) == {
        "running": 4.0,
        "waiting": 2.0,
        "kv_cache_usage": 0.375,
        "prompt_tokens_total": 120.0,
    }


def _whole_page_values(text: str) -> dict[str, float]:
    """What parse_vllm_metrics must return, from a parse of every line of the page."""
    from gateway.dashboard.sampler import VLLM_GAUGES

    found: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in VLLM_GAUGES:
                found.setdefault(VLLM_GAUGES[s.name], []).append(float(s.value))
    return {col: sum(v) / len(v) if col == "kv_cache_usage" else sum(v) for col, v in found.items()}


def test_vllm_metrics_among_histograms_and_lookalike_names_parse_as_the_whole_page():
    from gateway.dashboard.sampler import parse_vllm_metrics

    others = """# HELP vllm:e2e_request_latency_seconds Histogram of end to end request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="demo"} 4.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="demo"} 5.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="demo"} 5.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="demo"} 1.25
# TYPE vllm:num_requests_running_max gauge
vllm:num_requests_running_max{engine="0",model_name="demo"} 99.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="demo"} 7.0
vllm:generation_tokens_total {engine="1",model_name="demo"} 3.0
"""
    page = others + VLLM_METRICS
    assert parse_vllm_metrics(page) == _whole_page_values(page) == {
        "running": 4.0, "waiting": 2.0, "kv_cache_usage": 0.375, "prompt_tokens_total": 120.0,
        "generation_tokens_total": 10.0,
    }
    # Not an exposition at all (an HTML error page): still an error, which the sampler stores as such.
    with pytest.raises(ValueError):
        parse_vllm_metrics("<html><body>502 Bad Gateway</body></html>")


def test_percentiles_and_buckets():
    from datetime import UTC, datetime, timedelta

    from gateway.dashboard.data import Buckets, percentile

    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (50.0, 95.0, 100.0)
    now = datetime(2026, 1, 1, 12, 30, 20, tzinfo=UTC)
    b = Buckets.for_window("1h", now)
    assert b.n == 61 and b.start == datetime(2026, 1, 1, 11, 30, tzinfo=UTC) and b.since == now - timedelta(hours=1)
    assert b.index(now) == 60 and b.index(now - timedelta(hours=2)) is None
    assert b.labels()[0] == "11:30" and len(Buckets.for_window("7d", now).labels()) == 29


def test_snippets_are_valid_and_never_carry_a_key():
    import ast
    import shlex

    from gateway.dashboard.snippets import snippets

    out = snippets("http://gw.example:8000/v1", "support-router", example='it\'s "quoted"')
    ast.parse(out["python"])
    words = shlex.split(out["curl"].replace("\\\n", " "))
    body = json.loads(words[words.index("-d") + 1])
    assert body["model"] == "support-router" and body["messages"][0]["content"] == 'it\'s "quoted"'
    assert "http://gw.example:8000/v1/chat/completions" in words
    assert 'baseURL: "http://gw.example:8000/v1"' in out["javascript"]
    assert all("llmh-" not in text for text in out.values())


def test_session_cookie_is_signed_and_follows_the_key():
    from gateway.dashboard.auth import Sessions
    from gateway.dashboard.routes import _safe_next

    engine = store.get_engine()
    raw = store.create_key("dash-unit", actor="test").raw
    sessions = Sessions(engine, secret="s3cret-for-the-test")
    viewer, cookie = sessions.login(raw)
    assert (viewer.user, viewer.admin) == ("dash-unit", False)
    assert raw.split("-", 2)[2] not in cookie
    assert sessions.viewer(cookie) == viewer
    assert sessions.viewer(cookie[:-2] + ("A" if cookie[-2] != "A" else "B") + cookie[-1]) is None
    assert Sessions(engine, secret="another-secret").viewer(cookie) is None
    store.revoke_key(viewer.prefix, actor="test")
    assert sessions.viewer(cookie) is None
    assert [_safe_next(x) for x in ("/ui/endpoints/a/usage", "//evil.example", "https://evil.example", None)] == [
        "/ui/endpoints/a/usage",
        "/ui",
        "/ui",
        "/ui",
    ]


def test_tail_lines_reads_only_the_end(tmp_path: Path):
    from gateway.dashboard.health import tail_lines

    log = tmp_path / "replica.log"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert tail_lines(str(log), 3) == ["line 99997", "line 99998", "line 99999"]
    assert tail_lines(str(tmp_path / "missing.log")) == [] and tail_lines(None) == []


def test_usage_buckets_in_sql_match_the_rows():
    """Rows at known times land in the right buckets of every window, counted by the database."""
    from datetime import UTC, datetime, timedelta

    from gateway.dashboard import data

    engine = store.get_engine()
    now = datetime(2026, 3, 4, 10, 0, 30, tzinfo=UTC)
    ages = [timedelta(seconds=10), timedelta(minutes=5, seconds=1), timedelta(hours=3), timedelta(days=2)]
    store.add_usage(
        [
            {
                "ts": now - age,
                "key_prefix": "0000beef",
                "user": "dash-bucket",
                "endpoint": "dash-bucket",
                "route": "chat",
                "status_code": 500 if k == 1 else 200,
                "prompt_tokens": 10 * (k + 1),
                "completion_tokens": k,
                "latency_ms": 5.0,
            }
            for k, age in enumerate(ages)
        ],
        engine=engine,
    )
    u1 = data.usage(engine, "dash-bucket", "1h", now)
    assert (u1.requests, u1.errors, u1.prompt_tokens, u1.completion_tokens) == (2, 1, 30, 1)
    assert u1.series["requests"][60] == 1 and u1.series["errors"][55] == 1  # 10 s ago, 5 min 1 s ago
    assert u1.top_users == [
        {"name": "dash-bucket", "team": None, "requests": 2, "errors": 1, "prompt_tokens": 30, "completion_tokens": 1}
    ]
    u24 = data.usage(engine, "dash-bucket", "24h", now)
    assert u24.requests == 3 and [u24.series["requests"][i] for i in (-1, -2, -4)] == [1, 1, 1]
    u7 = data.usage(engine, "dash-bucket", "7d", now)
    assert u7.requests == 4 and sum(u7.series["requests"]) == 4 and u7.status_codes == {200: 3, 500: 1}


def test_a_replica_whose_listener_is_not_found_is_looked_for_again_only_after_the_miss_ttl() -> None:
    """The search for an attached replica's pid walks every process's sockets; a miss is remembered for
    `miss_ttl_s` rather than searched again at every 15 s sample, and a listener that appears later is found."""
    import socket
    import time

    from gateway.dashboard.sampler import HardwareProbe
    from tasks.serving.local import free_port

    port = free_port()
    probe = HardwareProbe(miss_ttl_s=1.0)
    url = f"http://127.0.0.1:{port}/v1"
    assert probe.pid_of(7, None, url) is None  # nothing listens: a miss
    with socket.create_server(("127.0.0.1", port)):
        assert probe.pid_of(7, None, url) is None  # within the TTL: not searched again
        time.sleep(1.1)
        assert probe.pid_of(7, None, url) == os.getpid()  # after it: searched, and this process found
        assert probe.pid_of(7, None, url) == os.getpid()  # then cached
