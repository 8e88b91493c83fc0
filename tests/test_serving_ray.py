"""The `ray` target end to end: a real two-node Ray cluster on loopback, Serve replicas running real vLLM servers,
the real gateway and the OpenAI SDK.

The module starts one cluster (head + worker, each its own `ray start`, every node offering `llmhost_replica: 2`)
and shares one endpoint, `demo-ray` from deployments/demo-ray.yaml (2 replicas, one per node). vLLM starts cost
about a minute each here, so the tests run in order on it: deploy (2 replicas), a revision vLLM refuses (none
start), kill one replica's vLLM (1 replacement), redeploy a changed revision under load (2 more), stop.
Measured numbers print at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
from threaded_gateway import ThreadedGateway

from tasks import store
from tasks.core.errors import ConfigError
from tasks.core.settings import PROJECT_ROOT, get_settings
from tasks.deploy import EndpointSpec, load_spec, plan_revision
from tasks.serving.gpus import cluster_gpus
from tasks.serving.local import free_port
from tasks.serving.ray import RaySettings, RayTarget, code_package, deploy_config
from tasks.serving.ray_cluster import LocalRayCluster, host_gpus

# Its own Ray cluster, gateway and vLLM replicas, nothing of the session's servers: `make test` runs it in the
# background process, after the lifecycle group (scripts/run_tests.sh).
pytestmark = pytest.mark.background

SPEC_PATH = PROJECT_ROOT / "deployments" / "demo-ray.yaml"
NUMBERS: dict[str, Any] = {}


class Load:
    """One client thread calling the gateway steadily, plain and streamed in turn; counts every outcome."""

    def __init__(self, client: openai.OpenAI, model: str = "demo-ray"):
        self.client, self.model = client, model
        self.requests, self.errors, self.ok_at = 0, [], []
        self.revisions: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, i: int) -> None:
        msgs = [{"role": "user", "content": f"hi , where is my parcel {i} ?"}]
        if i % 2:
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.model, messages=msgs, max_tokens=4, temperature=0
            )
            resp = raw.parse()
            assert resp.choices and resp.usage is not None, resp
        else:
            with self.client.chat.completions.with_streaming_response.create(
                model=self.model, messages=msgs, max_tokens=4, temperature=0, stream=True
            ) as raw:
                chunks = list(raw.parse())
            assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length"), chunks[-1:]
        self.revisions[raw.headers.get("x-llmhost-revision", "?")] += 1

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                self._one(i)
                self.ok_at.append(time.monotonic())
            except Exception as exc:  # every failure counts; the tests assert on them
                self.errors.append(f"{time.monotonic():.1f} {type(exc).__name__}: {exc}"[:300])
            self.requests += 1
            # About 4 requests/s: hundreds of requests across a switch or a replacement, while the 2 cores stay
            # free enough for the replicas that are starting (back to back, the load doubled their start time).
            time.sleep(0.25)

    def __enter__(self) -> Load:
        self._thread.start()
        deadline = time.monotonic() + 60
        while self.requests < 3:
            assert time.monotonic() < deadline, f"no answers before the test began: {self.errors}"
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(1.0)
        self._stop.set()
        self._thread.join(timeout=120)


# ---------------------------------------------------------------------------------------------- fixtures


def _descendants(pids: list[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            out += psutil.Process(pid).children(recursive=True)
    return out


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """Head + one worker on loopback under a temp dir of its own (short: Ray's socket paths have a length limit)."""
    root = Path(tempfile.mkdtemp(prefix="llmr-", dir="/tmp"))
    cluster = LocalRayCluster(root, workers=1)
    t0 = time.monotonic()
    cluster.up()
    NUMBERS["cluster_up_s"] = round(time.monotonic() - t0, 1)
    try:
        yield cluster
    finally:
        # vLLM servers run in process groups of their own (children of replica actors): note them before the
        # nodes go, and end any that outlived their node. Only processes under this cluster's nodes are touched.
        left = _descendants(cluster.pids())
        cluster.down()
        for p in left:
            try:
                if p.is_running():
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def demo_version(demo_model_dir: Path) -> str:
    from tasks.core.tracking import mlflow_client
    from tasks.register import register_model

    reg = register_model(f"path:{demo_model_dir}", "demo")
    mlflow_client().set_registered_model_alias("demo", "champion", reg.version)
    return reg.version


@pytest.fixture(scope="module")
def spec(ray_cluster: LocalRayCluster) -> EndpointSpec:
    """deployments/demo-ray.yaml pointed at this module's cluster, with Serve on a free port."""
    raw = load_spec(SPEC_PATH).model_dump(mode="json")
    raw["ray"].update(address=ray_cluster.dashboard_url, serve_port=free_port())
    return EndpointSpec.model_validate(raw)


@pytest.fixture(scope="module")
def target(spec: EndpointSpec) -> RayTarget:
    assert spec.ray is not None
    return RayTarget(spec.ray)


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with ThreadedGateway() as gw:
        key = store.create_key("ray-alice", team="ml-platform", actor="test").raw
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    old = os.environ.get("LLMHOST_STARTUP_TIMEOUT_S")
    os.environ["LLMHOST_STARTUP_TIMEOUT_S"] = "900"  # two vLLM starts at once on 2 busy cores
    t0 = time.monotonic()
    yield
    if old is None:
        os.environ.pop("LLMHOST_STARTUP_TIMEOUT_S", None)
    else:
        os.environ["LLMHOST_STARTUP_TIMEOUT_S"] = old
    NUMBERS["module_s"] = round(time.monotonic() - t0, 1)
    print("\nmeasured:", NUMBERS)


def live_app(name: str = "demo-ray") -> store.ReplicaRow:
    e = store.get_endpoint(name)
    rows = [r for r in store.list_replicas(name, e.live_revision_id) if r.state == "up"]
    assert len(rows) == 1 and rows[0].target == "ray", rows
    return rows[0]


def running(target: RayTarget, app: str) -> list[dict[str, Any]]:
    return [r for r in target.replicas(app) if r["state"] == "RUNNING"]


def vllm_child(actor_pid: int) -> psutil.Process:
    kids = [p for p in psutil.Process(actor_pid).children() if "vllm.entrypoints.openai.api_server" in p.cmdline()]
    assert len(kids) == 1, kids
    return kids[0]


# ---------------------------------------------------------------------------------------------- no cluster


def test_spec_errors_name_the_field_and_the_fix(tmp_path: Path):
    text = SPEC_PATH.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("target: ray", "target: local"))
    with pytest.raises(ConfigError, match=r"bad.yaml: \(root\)=.* ray: is set but target is local; set target: ray"):
        load_spec(bad)
    bad.write_text(text.replace("  max_replicas: 2 ", "  max_replicas: 1 "))
    with pytest.raises(ConfigError, match=r"max_replicas=1 is below ray.min_replicas=2"):
        load_spec(bad)
    bad.write_text(text.replace("target: ray", "target: ray\nreplicas: 3"))
    with pytest.raises(ConfigError, match=r"replicas=3 with target: ray; set ray.min_replicas"):
        load_spec(bad)
    bad.write_text(text.replace("address: http://127.0.0.1:8265", "address: 127.0.0.1:8265"))
    with pytest.raises(ConfigError, match=r"ray.address='127.0.0.1:8265' is invalid"):
        load_spec(bad)
    bad.write_text(text.replace("  cpus_per_replica: 1", "  cpus_per_replica: 1\n  gpus: 1"))
    with pytest.raises(ConfigError, match=r"ray.gpus=1 is invalid: Extra inputs are not permitted"):
        load_spec(bad)


def test_serve_config_is_rendered_from_the_same_vllm_args(demo_version: str):
    spec = load_spec(SPEC_PATH)
    plan = plan_revision(spec)
    assert spec.ray is not None
    app = RayTarget(spec.ray).render(plan.vllm, name="demo-ray-abc", env={"X": "1"}, code_uri="gcs://_ray_pkg_x.zip")
    assert app["route_prefix"] == "/demo-ray-abc" and app["import_path"] == "llmhost_serve.replica:build"
    assert app["args"]["cli_args"] == plan.vllm.to_cli()  # exactly what the local target runs
    assert "--tool-call-parser" in app["args"]["cli_args"] and "--max-lora-rank" in app["args"]["cli_args"]
    dep = app["deployments"][0]
    assert dep["num_replicas"] == 2 and dep["max_replicas_per_node"] == 1
    assert dep["ray_actor_options"] == {"num_cpus": 1.0, "resources": {"llmhost_replica": 1.0}}
    env = app["runtime_env"]["env_vars"]
    assert env["LLMHOST_VLLM_PYTHON"] == str(get_settings().vllm_python) and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["X"] == "1" and app["runtime_env"]["py_modules"] == ["gcs://_ray_pkg_x.zip"]
    # Autoscaling when the bounds differ; GPUs = tensor parallel size on a GPU tier.
    scaled = RaySettings(min_replicas=1, max_replicas=4, target_ongoing_requests=3)
    gpu_args = plan.vllm.model_copy(update={"tensor_parallel_size": 2})
    dep = RayTarget(scaled, device="gpu").render(gpu_args, name="x", code_uri=None)["deployments"][0]
    assert dep["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                         "target_ongoing_requests": 3.0}
    assert dep["ray_actor_options"]["num_gpus"] == 2 and "num_replicas" not in dep
    whole = deploy_config([app], host="127.0.0.1", port=8100)
    assert whole["http_options"]["port"] == 8100 and whole["applications"] == [app]
    # The code package is content-addressed and has llmhost_serve/ at its top (what py_modules unpacks).
    name, data = code_package()
    assert name.startswith("_ray_pkg_") and name == code_package()[0]
    import io
    import zipfile

    assert "llmhost_serve/replica.py" in zipfile.ZipFile(io.BytesIO(data)).namelist()


_PORT_RACE = r"""
import subprocess, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from llmhost_serve.replica import _wait_ready

class Other(BaseHTTPRequestHandler):  # another process's server on the port: 200 to everything, /health included
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *args):
        pass

srv = ThreadingHTTPServer(("127.0.0.1", 0), Other)
threading.Thread(target=srv.serve_forever, daemon=True).start()
port, log = srv.server_address[1], Path(sys.argv[2])
with log.open("wb") as out:
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", sys.argv[1],
                             "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
                             "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
try:
    _wait_ready(proc, port, log, 300)
    print("READY")
except RuntimeError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.slow
def test_a_serve_replica_takes_only_its_own_vllm_as_ready(demo_model_dir: Path, tmp_path: Path):
    """Two replicas on one node can draw the same free port before either vLLM binds it. The replica waits for
    /health from vLLM's own socket, so the other's answer does not make it ready: its vLLM fails to bind, the
    replica's start fails with the reason, and Serve starts it again on a new port. Run in the serving env."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([str(get_settings().vllm_python), "-c", _PORT_RACE, str(demo_model_dir),
                          str(tmp_path / "vllm.log")], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("REFUSED vLLM exited with code 1 during startup: "
                           "OSError: [Errno 98] Address already in use"), line
    assert "another process answered on its port" in line


# ---------------------------------------------------------------------------------------------- the cluster


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_deploy_places_two_replicas_on_two_nodes_and_answers_through_the_gateway(
    demo_version: str, spec: EndpointSpec, target: RayTarget, ray_cluster: LocalRayCluster, client: openai.OpenAI
):
    from tasks.deploy import deploy

    t0 = time.monotonic()
    result = deploy(spec, actor="test")
    NUMBERS["first_deploy_s"] = round(time.monotonic() - t0, 1)
    assert result.outcome == "live", result.message
    assert all(c.passed for c in result.smoke[0].checks), [c.detail for c in result.smoke[0].checks]
    app = result.replicas[0]
    assert spec.ray is not None and app.target == "ray"
    assert app.base_url == f"http://127.0.0.1:{spec.ray.serve_port}/{app.name}/v1"
    assert app.kv_cache_tokens and app.kv_cache_tokens > 100_000  # read from a replica's vLLM log via Ray's log API
    NUMBERS["kv_cache_tokens"] = app.kv_cache_tokens
    assert live_app().base_url == app.base_url

    # Two Serve replicas, one on each node (llmhost_replica resources + max_replicas_per_node: 1).
    reps = running(target, app.name)
    nodes = {n["node_id"] for n in ray_cluster.alive_nodes()}
    assert len(reps) == 2 and {r["node_id"] for r in reps} == nodes and len(nodes) == 2, (reps, nodes)
    # What GPU placement reads: the cluster's own GPUs (make ray-up gives its nodes this machine's), not ours.
    assert cluster_gpus(target.nodes()) == len(host_gpus())
    NUMBERS["placement"] = sorted(r["node_id"][:8] for r in reps)
    for r in reps:  # each replica runs its own vLLM server as a child process, on a port of its own
        assert vllm_child(r["pid"]).is_running()
    assert len({_vllm_port(r) for r in reps}) == 2

    # Through the gateway with the OpenAI SDK: model list, chat, stream, tools.
    assert "demo-ray" in [m.id for m in client.models.list()]
    resp = client.chat.completions.create(
        model="demo-ray", messages=[{"role": "user", "content": "hi , i was charged twice ."}], max_tokens=8
    )
    assert resp.choices[0].message.content and resp.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(
        model="demo-ray", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True
    ))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    tools = load_spec(SPEC_PATH).smoke.tools
    resp = client.chat.completions.create(
        model="demo-ray", messages=[{"role": "user", "content": "what is the weather in paris ?"}], tools=tools,
        max_tokens=64, temperature=0,
    )
    assert resp.choices[0].message.tool_calls and resp.choices[0].message.tool_calls[0].function.name == "get_weather"
    # Both replicas answer a share of 16 gateway requests: Serve balances across them.
    before = {r["replica_id"]: _served_by(r) for r in reps}
    for i in range(16):
        client.chat.completions.create(model="demo-ray", messages=[{"role": "user", "content": f"hi {i}"}],
                                       max_tokens=2)
    share = {r["replica_id"]: _served_by(r) - before[r["replica_id"]] for r in reps}
    NUMBERS["requests_per_replica"] = sorted(share.values())
    assert sum(share.values()) == 16 and all(v > 0 for v in share.values()), share


def _vllm_port(rep: dict[str, Any]) -> int:
    cmd = vllm_child(rep["pid"]).cmdline()
    return int(cmd[cmd.index("--port") + 1])


def _served_by(rep: dict[str, Any]) -> int:
    """Requests a replica's vLLM finished, from its own /metrics (its loopback port, this machine)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{_vllm_port(rep)}/metrics", timeout=5).text
    return int(sum(float(ln.rsplit(" ", 1)[-1]) for ln in text.splitlines()
                   if ln.startswith("vllm:request_success_total")))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_revision_that_fails_to_start_leaves_the_old_one_serving(
    spec: EndpointSpec, target: RayTarget, client: openai.OpenAI
):
    from tasks.deploy import DeployStartError, deploy

    old = live_app()
    bad = EndpointSpec.model_validate(
        {**spec.model_dump(mode="json"),
         "vllm": {**spec.vllm.model_dump(mode="json"), "extra_args": ["--max-model-len", "999999"]}}
    )
    # Arguments vLLM's parser accepts (an unknown flag is refused before anything starts, tasks.deploy.vllm_args)
    # but its engine refuses at start, past the model's 1,024 positions: vLLM's own error line reaches the
    # deploy's one-line error through Serve's application status.
    with pytest.raises(DeployStartError, match=r"old revision keeps serving: .*max_model_len \(999999\)"):
        deploy(bad, actor="test")
    assert live_app().id == old.id
    assert list(target.details()["applications"]) == [old.name]  # the failed application was deleted
    assert client.chat.completions.create(
        model="demo-ray", messages=[{"role": "user", "content": "hello"}], max_tokens=2
    ).choices


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_replica_is_replaced_while_the_gateway_keeps_answering(target: RayTarget, client: openai.OpenAI):
    app = live_app().name
    before = running(target, app)
    victim = before[0]
    child = vllm_child(victim["pid"])
    with Load(client) as load:
        time.sleep(1.0)
        t0 = time.monotonic()
        os.killpg(child.pid, signal.SIGKILL)  # vLLM dies as if OOM-killed: server, engine core and worker
        deadline = t0 + 900
        while True:
            now = running(target, app)
            if len(now) == 2 and victim["replica_id"] not in {r["replica_id"] for r in now}:
                break
            assert time.monotonic() < deadline, now
            time.sleep(0.5)
        recovered = time.monotonic() - t0
    NUMBERS["kill_recovery_s"] = round(recovered, 1)
    NUMBERS["kill_requests"], NUMBERS["kill_errors"] = load.requests, len(load.errors)
    answered_meanwhile = [t for t in load.ok_at if t0 < t < t0 + recovered]
    NUMBERS["kill_answered_while_replacing"] = len(answered_meanwhile)
    # The other replica kept answering through the gateway for the whole replacement.
    assert len(answered_meanwhile) >= 10, (len(answered_meanwhile), load.errors[:5])
    # Only a request that was inside the killed server can fail (Serve reroutes once the replica actor ends).
    assert len(load.errors) <= 2, load.errors
    NUMBERS["kill_error_text"] = load.errors
    replacement = next(r for r in running(target, app) if r["replica_id"] != before[1]["replica_id"])
    assert replacement["node_id"] == victim["node_id"]  # the free slot is on the victim's node
    assert not child.is_running()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_changed_revision_switches_under_load_with_no_failed_request(
    spec: EndpointSpec, target: RayTarget, client: openai.OpenAI
):
    from tasks.deploy import deploy

    old = live_app()
    changed = EndpointSpec.model_validate(
        {**spec.model_dump(mode="json"), "vllm": {**spec.vllm.model_dump(mode="json"), "max_num_seqs": 16}}
    )
    with Load(client) as load:
        t0 = time.monotonic()
        result = deploy(changed, actor="test")
        NUMBERS["switch_deploy_s"] = round(time.monotonic() - t0, 1)
    NUMBERS["switch_requests"], NUMBERS["switch_errors"] = load.requests, len(load.errors)
    NUMBERS["switch_by_revision"] = dict(load.revisions)
    assert result.outcome == "live", result.message
    assert load.errors == [], load.errors[:5]
    new = live_app()
    assert new.name != old.name and len(load.revisions) == 2, load.revisions  # both revisions answered
    apps = target.details()["applications"]
    assert old.name not in apps and new.name in apps  # the old application was deleted
    assert [r.state for r in store.list_replicas("demo-ray", old.revision_id)] == ["stopped"]
    reps = running(target, new.name)
    assert len(reps) == 2 and len({r["node_id"] for r in reps}) == 2
    assert "--max-num-seqs" in vllm_child(reps[0]["pid"]).cmdline()


@pytest.mark.slow
def test_an_adapter_reaches_every_ray_replica_through_a_blue_green_redeploy(
    demo_version: str, demo_data_dir: Path, target: RayTarget, client: openai.OpenAI
):
    """A runtime load would reach one Serve replica, and replicas Serve adds or replaces would lack it."""
    from testing_utils import small_config

    from tasks.deploy.adapters import load_into_endpoint
    from tasks.finetune import DataSource, finetune

    cfg = small_config(demo_data_dir, f"models:/demo/{demo_version}", max_steps=4, eval_steps=4,
                       train=[DataSource(path=demo_data_dir / "train.jsonl")])
    tuned = finetune(cfg)
    old = live_app()
    t0 = time.monotonic()
    change = load_into_endpoint("demo-ray", tuned.registered_version)
    NUMBERS["adapter_redeploy_s"] = round(time.monotonic() - t0, 1)
    assert change.method == "restart" and "Ray Serve" in (change.note or ""), change
    new = live_app()
    live_rev = next(r for r in store.list_revisions("demo-ray") if r.id == new.revision_id)
    assert new.name != old.name and change.adapter in (live_rev.adapters or {}), live_rev.adapters
    reps = running(target, new.name)
    assert len(reps) == 2
    for r in reps:  # the adapter is in every replica's command line, so a replaced replica has it too
        cmd = vllm_child(r["pid"]).cmdline()
        assert any(a.startswith(f"{change.adapter}=") for a in cmd[cmd.index("--lora-modules") + 1:]), cmd
    before = {r["replica_id"]: _served_by(r) for r in reps}
    for i in range(12):
        resp = client.chat.completions.create(model=f"demo-ray:{change.adapter}", max_tokens=2,
                                              messages=[{"role": "user", "content": f"hi {i}"}])
        assert resp.choices[0].message.content is not None
    share = {r["replica_id"]: _served_by(r) - before[r["replica_id"]] for r in reps}
    assert sum(share.values()) == 12 and all(v > 0 for v in share.values()), share


@pytest.mark.slow
def test_stop_deletes_the_application_and_its_vllm_servers(target: RayTarget, ray_cluster: LocalRayCluster):
    from tasks.deploy import stop_endpoint

    app = live_app().name
    pids = [vllm_child(r["pid"]).pid for r in running(target, app)]
    assert stop_endpoint("demo-ray", actor="test") == 1
    assert app not in target.details()["applications"]
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, "vLLM servers outlived their deleted application"
        time.sleep(0.5)
    for rev in store.list_revisions("demo-ray"):
        assert all(r.state == "stopped" for r in store.list_replicas("demo-ray", rev.id))
