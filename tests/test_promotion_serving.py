"""Promotion changes what serves before it moves an alias: a route switch to a hot-loaded adapter, on real things.

Real MLflow (the session's tmp sqlite), a real fine-tune, the session's vLLM (LoRA with runtime loading), the real
gateway in a thread and the openai SDK. The endpoint's live revision is planned from a spec and adopts the session's
vLLM as its one replica (unmanaged, so nothing here stops it), so no test in this module starts a vLLM.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from testing_utils import small_config
from threaded_gateway import ThreadedGateway, wait_for

from tasks import store
from tasks.core.errors import DeployError, PromotionError
from tasks.deploy.spec import Access, EndpointSpec, SpecVllm
from tasks.store import audit

MODEL = "promo-rs"
ENDPOINT = "promo-ep"
TEAM = "promo-team"


def _spec(name: str = ENDPOINT, **kw) -> EndpointSpec:
    kw.setdefault("vllm", SpecVllm(max_lora_rank=16, enforce_eager=True, max_model_len=1024))
    return EndpointSpec(name=name, model=f"models:/{MODEL}@champion", tool_calling="off",
                        access=Access(teams=[TEAM]), **kw)


@pytest.fixture(scope="module")
def versions(demo_model_dir: Path, demo_data_dir: Path) -> tuple[str, str]:
    """(base version = champion, adapter version fine-tuned on it) of a model of this module's own."""
    from tasks.core.tracking import mlflow_client
    from tasks.finetune import finetune
    from tasks.register import register_model

    base = register_model(f"path:{demo_model_dir}", MODEL)
    mlflow_client().set_registered_model_alias(MODEL, "champion", base.version)
    res = finetune(small_config(demo_data_dir, f"models:/{MODEL}/{base.version}", max_steps=4), log=lambda _m: None)
    return str(base.version), str(res.registered_version)


def adopt(spec: EndpointSpec, replica) -> store.EndpointRevision:
    """The spec's planned revision, live, with `replica` (already running, served as `demo`) as its one replica."""
    from tasks.deploy.plan import plan_revision
    from tasks.deploy.rollout import apply_access

    store.upsert_endpoint(spec.name, actor="test")
    apply_access(spec, actor="test")
    plan = plan_revision(spec)
    rev = store.add_revision(spec.name, plan.identity, served_model_name=replica.served_model_name,
                             model_version=plan.model_version, actor="test")
    store.add_replica(spec.name, rev.id, base_url=replica.base_url, served_model_name=replica.served_model_name,
                      name="session-vllm", state="up", pid=replica.pid, managed=False, actor="test")
    store.set_live_revision(spec.name, rev.id, reason="adopted the session vLLM", actor="test")
    store.upsert_endpoint(spec.name, status="active", actor="test")
    return rev


@pytest.fixture(scope="module", autouse=True)
def stop_what_this_module_started() -> Iterator[None]:
    """Endpoints made here stop at the end; the adopted session vLLM is unmanaged, so it keeps running."""
    before = {e.name for e in store.list_endpoints()}
    yield
    from tasks.deploy import stop_endpoint

    for e in store.list_endpoints():
        if e.name not in before:
            stop_endpoint(e.name, actor="test-teardown")


@pytest.fixture(scope="module")
def gateway() -> Iterator[ThreadedGateway]:
    with ThreadedGateway() as gw:
        yield gw


class Load:
    """A client thread calling `model` through the gateway without pause; counts errors and who answered."""

    def __init__(self, client: openai.OpenAI, model: str):
        self.client, self.model = client, model
        self.requests, self.errors, self.answered_by = 0, [], Counter()
        self._at_exit = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.client.chat.completions.create(
                    model=self.model, max_tokens=2, temperature=0,
                    messages=[{"role": "user", "content": f"where is my parcel {self.requests} ?"}])
                assert r.choices and r.usage is not None, r
                self.answered_by[r.model] += 1
            except Exception as exc:  # every failure counts; the test asserts there are none
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            self.requests += 1

    def __enter__(self) -> Load:
        self._thread.start()
        wait_for(lambda: self.requests >= 3, timeout=60, what="answers before the switch")
        return self

    def __exit__(self, *exc: object) -> None:
        wait_for(lambda: self.requests >= self._at_exit + 3, timeout=60, what="answers after the switch")
        self._stop.set()
        self._thread.join(timeout=60)

    def mark(self) -> None:
        self._at_exit = self.requests


@pytest.mark.slow
def test_promoting_a_hot_loaded_adapter_switches_the_route_with_no_restart_and_no_failed_request(
    versions: tuple[str, str], vllm_server, gateway: ThreadedGateway
):
    from tasks.deploy import deploy
    from tasks.deploy.adapters import load_into_endpoint
    from tasks.promote import current_aliases, mark_challenger, promote
    from tasks.serving.local import pid_alive

    base_v, cand_v = versions
    spec = _spec()
    old = adopt(spec, vllm_server)
    client = gateway.client(store.create_key("promo-user", team=TEAM, actor="test").raw)
    assert client.chat.completions.create(model=ENDPOINT, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).model == "demo"
    # What the lifecycle does before it compares: hot-load the candidate beside the champion, mark it under test.
    assert load_into_endpoint(ENDPOINT, f"models:/{MODEL}/{cand_v}", name=f"v{cand_v}").method == "runtime"
    mark_challenger(MODEL, cand_v, actor="test")
    assert current_aliases(MODEL) == {"champion": base_v, "challenger": cand_v}
    pid = vllm_server.pid

    with Load(client, ENDPOINT) as load:
        rec = promote(MODEL, cand_v, spec, actor="test", evidence={"eval_runs": ["run-a"]})
        load.mark()
    served = f"{MODEL}-v{cand_v}"
    assert rec.serving is not None and rec.serving.method == "route-switch", rec.serving
    assert not rec.serving.restarted and rec.serving.seconds < 10, rec.serving
    assert load.errors == [], load.errors[:5]
    assert load.answered_by["demo"] > 0 and load.answered_by[served] > 0, load.answered_by
    print(f"\nroute switch {rec.serving.seconds:.3f}s; {load.requests} requests during it, none failed")

    # The same process serves, now the adapter, under the endpoint's plain name.
    assert pid_alive(pid) and httpx.get(f"{vllm_server.root_url}/health").status_code == 200
    resp = client.chat.completions.create(model=ENDPOINT, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert resp.model == served
    new = next(r for r in store.list_revisions(ENDPOINT) if r.id == store.get_endpoint(ENDPOINT).live_revision_id)
    assert new.id != old.id and new.content_hash.startswith(rec.revision)
    assert new.model_version == f"{MODEL}/{cand_v}" and new.served_model_name == served
    assert new.spec["base_version"] == f"{MODEL}/{base_v}"
    assert [r.pid for r in store.list_replicas(ENDPOINT) if r.state == "up"] == [pid]
    assert {r.state for r in store.list_replicas(ENDPOINT, old.id)} == {"stopped"}
    assert next(r for r in store.list_revisions(ENDPOINT) if r.id == old.id).status == "retired"
    # The hot-loaded name stays callable as endpoint:adapter.
    assert client.chat.completions.create(model=f"{ENDPOINT}:v{cand_v}", max_tokens=2,
                                          messages=[{"role": "user", "content": "hi"}]).model == f"v{cand_v}"

    # Audited: the route switch as its own entry, then the promotion naming the revision and how it was served.
    actions = [e.action for e in audit.entries(endpoint=ENDPOINT)]
    assert actions.index("deploy.route_switch") < actions.index("promote")
    promo = audit.entries(action="promote")[-1]
    links = json.loads(promo.links)
    assert promo.endpoint == ENDPOINT and links["revision"] == rec.revision and links["serving"] == "route-switch"
    assert links["restarted"] is False and links["eval_runs"] == ["run-a"]
    assert audit.verify().ok
    assert current_aliases(MODEL) == {"champion": cand_v, "previous-champion": base_v}

    # Deploying the spec now (champion -> the adapter) finds that revision live: still no restart.
    again = deploy(spec, actor="test")
    assert again.outcome == "unchanged" and again.revision == rec.revision, again.message
    with pytest.raises(PromotionError, match="already the champion"):
        promote(MODEL, cand_v, spec, actor="test")


@pytest.mark.slow
def test_a_failed_serving_change_leaves_the_aliases_where_they_were(
    versions: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from tasks.core.tracking import mlflow_client
    from tasks.promote import current_aliases, promote

    base_v, cand_v = versions
    client = mlflow_client()
    client.set_registered_model_alias(MODEL, "champion", base_v)
    before = current_aliases(MODEL)
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text("tiers:\n  - {name: tiny-cpu, device: cpu, accelerator: cpu, count: 1, memory_gib: 1,\n"
                     "     kv_cache_space_gib: 1, price_per_hour: 0.0}\n")
    monkeypatch.setenv("LLMHOST_TIERS_FILE", str(tiers))
    n_promotions = len(audit.entries(action="promote"))
    # A fresh endpoint: nothing runs the adapter, so it needs a deploy, and the deploy is refused by sizing.
    spec = _spec(name="promo-too-big", hardware="tiny-cpu", concurrency=100_000)
    with pytest.raises(DeployError, match="does not fit hardware 'tiny-cpu'"):
        promote(MODEL, cand_v, spec, actor="test")
    assert current_aliases(MODEL) == before
    assert len(audit.entries(action="promote")) == n_promotions



@pytest.mark.slow
@pytest.mark.timeout(1800)  # one vLLM start in the background; 1-15 min under parallel load
def test_serve_promoted_merged_replaces_the_adapter_with_merged_weights_in_the_background(
    versions: tuple[str, str], vllm_server, gateway: ThreadedGateway, monkeypatch: pytest.MonkeyPatch
):
    from tasks.core.tracking import mlflow_client
    from tasks.deploy.adapters import load_into_endpoint
    from tasks.promote import current_aliases, promote
    from tasks.register import get_version
    from tasks.serving.local import pid_alive

    monkeypatch.setenv("LLMHOST_STARTUP_TIMEOUT_S", "900")  # the background process reads it
    base_v, cand_v = versions
    client_ml = mlflow_client()
    client_ml.set_registered_model_alias(MODEL, "champion", base_v)
    for alias in ("previous-champion", "challenger"):
        if alias in current_aliases(MODEL):
            client_ml.delete_registered_model_alias(MODEL, alias)
    spec = _spec(name="promo-merged", serve_promoted="merged",
                 vllm=SpecVllm(max_lora_rank=16, enforce_eager=True, max_model_len=1024, max_num_seqs=8))
    adopt(spec, vllm_server)
    load_into_endpoint(spec.name, f"models:/{MODEL}/{cand_v}", name=f"v{cand_v}")
    client = gateway.client(store.create_key("promo-merged-user", team=TEAM, actor="test").raw)

    with Load(client, spec.name) as load:
        rec = promote(MODEL, cand_v, spec, actor="test")
        assert rec.serving is not None and rec.serving.method == "route-switch" and rec.merge_log
        n = len(audit.entries(action="promote.merge"))  # merge_started; then promote.merged or merge_failed
        # The background process merges, registers, deploys blue/green and moves champion; the load keeps running.
        wait_for(lambda: len(audit.entries(action="promote.merge")) > n, timeout=1500,
                 what="the background merged rollout")
        load.mark()
    assert audit.entries(action="promote.merge")[-1].action == "promote.merged", Path(rec.merge_log).read_text()[-3000:]
    assert load.errors == [], load.errors[:5]

    merged_v = current_aliases(MODEL)["champion"]
    assert merged_v not in (base_v, cand_v)
    assert current_aliases(MODEL) == {"champion": merged_v, "previous-champion": base_v}
    tags = dict(get_version(f"models:/{MODEL}/{merged_v}").tags)
    assert tags["merged_from"] == f"{MODEL}/{cand_v}" and tags["merged_base"] == f"{MODEL}/{base_v}"
    assert tags.get("adapter") != "true"
    assert dict(get_version(f"models:/{MODEL}/{cand_v}").tags)["merged_version"] == merged_v
    merge = json.loads(audit.entries(action="merge")[-1].after)
    assert merge["max_abs_diff"] <= 1e-4
    # A new process with the merged weights (no LoRA) now answers the endpoint's name.
    live = store.list_replicas(spec.name)
    assert [r.state for r in live] == ["up"] and live[0].pid != vllm_server.pid and pid_alive(vllm_server.pid)
    rev = next(r for r in store.list_revisions(spec.name) if r.id == store.get_endpoint(spec.name).live_revision_id)
    assert rev.model_version == f"{MODEL}/{merged_v}" and not rev.spec["vllm"]["lora_modules"]
    resp = client.chat.completions.create(model=spec.name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert resp.model == spec.name and load.answered_by[spec.name] > 0, load.answered_by
