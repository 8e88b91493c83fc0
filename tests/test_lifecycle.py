"""The lifecycle end to end on the demo model: real vLLM, gateway, MLflow, Prefect; resume from cache; triggers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import HF_TOKEN_SECRET, STANDIN_SECRET, LifecycleRun, gateway_port_env
from testing_utils import files_holding

from tasks.core.settings import PROJECT_ROOT
from tasks.serving.local import free_port

pytestmark = [pytest.mark.slow, pytest.mark.lifecycle, pytest.mark.timeout(3600)]
# The first test's lifecycle summary, quoted by the tests that build on its promotion.
LIFECYCLE: dict[str, Any] = {}
RETRAIN_STEPS = 60
RETRAIN_EVAL_LIMIT = 40  # the comparison's rows: this test is about the trigger, the worker and the flow's steps


@pytest.fixture(scope="module")
def gateway_port(lifecycle_gateway_port: int) -> Iterator[int]:
    """The lifecycle's gateway port (conftest), set in LLMHOST_GATEWAY_PORT while this module runs."""
    with gateway_port_env(lifecycle_gateway_port) as port:
        yield port


def test_failed_step_stops_the_flow_and_rerun_resumes_from_cache(lifecycle_run: LifecycleRun, gateway_port):
    run = lifecycle_run  # conftest: the run that fails after fine-tuning, then the resumed run
    # The suite is first needed after fine-tuning: the first run failed there, with the reason.
    assert "no_such_suite" in run.failure, run.failure
    assert run.runs_after_failure == run.runs_before + 1
    # Resumed: register and fine-tune came from Prefect's cache, so no second training run exists.
    assert run.runs_after_rerun == run.runs_after_failure
    summary = run.summary
    steps = {t.step: t.seconds for t in summary.timings}
    assert {"register", "size", "deploy", "frontier-standin", "evaluate-frontier", "fine-tune", "redeploy", "compare",
            "candidate-vs-frontier"} <= set(steps)
    print(f"\nlifecycle rerun wall {run.rerun_wall_s:.0f}s; steps {steps}\n{summary.text()}")

    assert summary.base_score is not None and summary.tuned_score is not None
    assert summary.decision, "a promotion decision is always explained"
    assert summary.verdict and summary.verdict.startswith(("READY TO REPLACE", "NOT YET")), summary.text()
    # The policy, not the test, decides: promoted only with a gain, and the aliases follow the decision.
    LIFECYCLE["summary"] = summary.text()
    LIFECYCLE["promoted"] = summary.promoted
    LIFECYCLE["candidate"] = summary.candidate
    if summary.promoted:
        assert summary.tuned_score > summary.base_score, summary.text()
        assert run.aliases_after == {"champion": summary.candidate, "previous-champion": run.champion_before}
        # The candidate was hot-loaded on the live replica for its eval: promotion switched the route, no restart.
        assert run.promote_links is not None, "a promotion is audited"
        assert run.promote_links["serving"] == "route-switch" and run.promote_links["restarted"] is False, (
            run.promote_links)
    else:
        assert run.aliases_after == {"champion": run.champion_before, "challenger": summary.candidate}, (
            summary.text())



def test_frontier_branch_compares_champion_and_candidate_with_the_labelled_standin(lifecycle_run: LifecycleRun):
    """The lifecycle's frontier branch, against the demo's frontier stand-in (local) priced as gpt-4o-mini."""
    import mlflow

    from demo.standin import CATALOG_NAME, SERVED_NAME
    from tasks.core.settings import get_settings
    from tasks.evaluate.targets import load_frontiers

    summary = lifecycle_run.summary
    assert "frontier stand-in (local)" in summary.frontier and "gpt-4o-mini" in summary.frontier, summary.frontier
    for verdict in (summary.frontier_verdict, summary.candidate_frontier_verdict):
        assert verdict and verdict.startswith(("READY TO REPLACE", "NOT YET")), summary.text()
    text = summary.text()
    champion_line = next(ln for ln in summary.frontier_lines if ln.startswith("champion v"))
    candidate_line = next(ln for ln in summary.frontier_lines if ln.startswith(f"candidate v{summary.candidate}"))
    for line in (champion_line, candidate_line):
        assert f"frontier:{CATALOG_NAME} (frontier stand-in (local), priced as gpt-4o-mini)" in line, line
    # Each comparison: the gap with its CI, the latency ratio, $ per 1M output tokens both ways, break-even.
    for who in ("champion v", f"candidate v{summary.candidate}"):
        block = "\n".join(_block(summary.frontier_lines, who))
        assert "gap " in block and "(95% CI " in block and "latency p95:" in block, block
        assert "$ per 1M output tokens: self-hosted $" in block and "vs API $" in block, block
        assert "break-even: " in block and "tokens/day" in block, block
    # The candidate comparison also loaded the endpoint full and priced that throughput.
    assert "kept full (16 concurrent)" in "\n".join(_block(summary.frontier_lines, f"candidate v{summary.candidate}"))
    assert all(ln in text for ln in summary.frontier_lines)

    # The catalog entry the demo wrote: priced as gpt-4o-mini, pointing at the endpoint's own vLLM.
    entry = load_frontiers()[CATALOG_NAME]
    api = load_frontiers()["gpt-4o-mini"]
    assert entry.standin_for == "gpt-4o-mini" and entry.model == SERVED_NAME
    assert (entry.price_in_per_1m, entry.price_out_per_1m) == (api.price_in_per_1m, api.price_out_per_1m)
    models = httpx.get(entry.base_url + "/models", timeout=30).json()["data"]
    assert SERVED_NAME in {m["id"] for m in models}

    # Both comparisons are MLflow runs that priced the stand-in as the API and logged the break-even volume.
    client = mlflow.MlflowClient(get_settings().mlflow_uri)
    compared = [r for exp in client.search_experiments() for r in client.search_runs(
        [exp.experiment_id], "tags.`llmhost.kind` = 'eval-comparison'", max_results=200)
        if r.data.params.get("baseline") == f"frontier:{CATALOG_NAME}"]
    assert len(compared) >= 2, [r.data.params for r in compared]
    assert all("api_usd_per_1m_out" in r.data.metrics and "break_even_tokens_per_day" in r.data.metrics
               for r in compared), [r.data.metrics for r in compared]
    # In the MLflow UI: lifecycle run > comparison run > its two side runs.
    for r in compared:
        parent = client.get_run(r.data.tags["mlflow.parentRunId"])
        assert parent.data.tags["llmhost.kind"] == "lifecycle", parent.data.tags
        for side in ("llmhost.candidate_run", "llmhost.baseline_run"):
            side_run = client.get_run(r.data.tags[side])
            assert side_run.data.tags["mlflow.parentRunId"] == r.info.run_id, (side, side_run.data.tags)


def _block(lines: list[str], head: str) -> list[str]:
    """The line starting with `head` and the indented lines under it."""
    i = next(i for i, ln in enumerate(lines) if ln.startswith(head))
    block = [lines[i]]
    for ln in lines[i + 1:]:
        if not ln.startswith("  "):
            break
        block.append(ln)
    return block


def test_no_secret_of_the_run_appears_anywhere_after_it(lifecycle_run: LifecycleRun, llmhost_home: Path):
    """The resumed run had a frontier key, HF_TOKEN and the gateway keys it minted in play: none of their values is
    in any file of the state dir (store with its audit log, MLflow database with runs, params and traces, artifacts,
    logs), nor in Prefect's database or the results it wrote."""
    from prefect.settings import get_current_settings

    from tasks.store.keys import split_key

    assert lifecycle_run.gateway_keys, "the run minted no gateway key: its evals did not call the gateway"
    secrets = {"the frontier key": STANDIN_SECRET, "HF_TOKEN": HF_TOKEN_SECRET}
    for i, raw in enumerate(lifecycle_run.gateway_keys):
        secrets[f"gateway key {i}"] = raw
        secrets[f"gateway key {i}'s secret"] = split_key(raw)[1]  # llmh-<public prefix>-<secret>
    needles = {what: value.encode() for what, value in secrets.items()}

    scanned: list[Path] = []
    scan = scanned.append  # read in a child process (see testing_utils.files_holding): these are live databases

    settings = get_current_settings()
    places: list[Path] = [llmhost_home]
    storage = Path(settings.results.local_storage_path).expanduser()
    db_url = settings.server.database.connection_url
    db = db_url.get_secret_value() if db_url is not None and hasattr(db_url, "get_secret_value") else str(db_url)
    if db and db.startswith("sqlite"):
        db_path = Path(db.split("///", 1)[1])
        places += [p for p in (db_path, Path(f"{db_path}-wal")) if p.exists()]
    checked = 0
    for place in places:
        files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
        for f in files:
            scan(f)
            checked += 1
    if storage.is_dir():  # shared by every run on this machine: the results written since the run began
        for f in storage.rglob("*"):
            if f.is_file() and f.stat().st_mtime >= lifecycle_run.rerun_started_at - 1:
                scan(f)
                checked += 1
    assert checked > 10, places
    assert files_holding(scanned, needles) == []


def test_champion_serves_the_endpoint_through_the_gateway(gateway_port):
    import openai

    from demo import data
    from tasks import store
    from tasks.store import audit

    key = store.create_key("alice", team="ml-platform", actor="test").raw
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key=key, max_retries=0)
    row = data.routing_rows("eval")[0]
    r = client.chat.completions.create(model="demo", temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": data.ROUTING_SYSTEM_PROMPT}, {"role": "user", "content": row["message"]}])
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    assert audit.verify().ok
    actions = [e.action for e in audit.entries()]
    assert "endpoint.route" in actions
    assert "promoted" in LIFECYCLE, "the lifecycle test did not run"
    # A policy promotion of the lifecycle's candidate is in the chain exactly when the lifecycle promoted it.
    to_candidate = [e for e in audit.entries() if e.action == "promote" and e.subject == "model:demo"
                    and json.loads(e.after or "{}").get("champion") == str(LIFECYCLE["candidate"])]
    assert bool(to_candidate) == LIFECYCLE["promoted"], LIFECYCLE["summary"]


def test_audit_at_answers_what_served_and_on_which_evidence(gateway_port):
    from datetime import UTC, datetime

    from tasks.promote import served_at

    now = served_at("demo", datetime.now(UTC))
    assert now.model_version and now.model_version.startswith("demo/")
    assert "promoted" in LIFECYCLE, "the lifecycle test did not run"
    if LIFECYCLE["promoted"]:
        assert now.promotion and now.promotion["action"] == "promote", (now.promotion, LIFECYCLE["summary"])
        assert json.loads(now.promotion["after"])["champion"] == str(LIFECYCLE["candidate"])
        assert now.promotion["eval_runs"], "a policy promotion links the eval runs it was decided on"
    else:  # whatever promotion came before, it is not one of the refused candidate
        after = json.loads((now.promotion or {}).get("after") or "{}")
        assert after.get("champion") != str(LIFECYCLE["candidate"]), (now.promotion, LIFECYCLE["summary"])


def _prefect(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "prefect"), *args], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, **kw)


def test_triggers_from_prefect_yaml_on_a_real_server(tmp_path, gateway_port):
    port = free_port()
    env = dict(os.environ)
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LLMHOST_PROJECT_DIR": str(PROJECT_ROOT)})
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    with (tmp_path / "server.log").open("w") as server_log:  # the child keeps its own copy of the fd
        server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                   "127.0.0.1", "--port", str(port), "--analytics-off"], env=env,
                                  stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        api = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert _prefect(["work-pool", "create", "llmhost", "--type", "process"], env).returncode == 0
        out = _prefect(["--no-prompt", "deploy", "--all"], env)
        assert out.returncode == 0, out.stdout + out.stderr
        deps = httpx.post(f"{api}/deployments/filter", json={}).json()
        by_name = {d["name"]: d for d in deps}
        assert {"lifecycle", "nightly-eval", "retrain-on-new-data"} <= set(by_name)
        assert by_name["nightly-eval"]["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        # As an operator would tune a deployment's defaults: a short retrain. This test is about the trigger and the
        # worker; the demo's full 1,200-step fine-tune is trained (and its gain asserted) once, by the session's
        # lifecycle run (conftest.lifecycle_run).
        retrain_id = by_name["retrain-on-new-data"]["id"]
        deadline = time.monotonic() + 60
        while True:  # the server answers 503 while its SQLite is locked (just after `prefect deploy`): retry
            patched = httpx.patch(f"{api}/deployments/{retrain_id}",
                                  json={"parameters": {"max_steps": RETRAIN_STEPS,
                                                        "eval_limit": RETRAIN_EVAL_LIMIT}}, timeout=30)
            if patched.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert patched.status_code == 204, patched.text

        new_rows = tmp_path / "more.jsonl"
        new_rows.write_text("\n".join(json.dumps({"messages": [
            {"role": "user", "content": f"my parcel number {i} is late"},
            {"role": "assistant", "content": "shipping"}]}) for i in range(4)) + "\n")
        add = subprocess.run([sys.executable, "-m", "flows.cli", "data", "add", str(new_rows), "--dataset",
                              "support"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
        assert add.returncode == 0, add.stdout + add.stderr
        run = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run is None:
            runs = httpx.post(f"{api}/flow_runs/filter", json={
                "deployments": {"id": {"any_": [retrain_id]}}}).json()
            run = runs[0] if runs else None
            time.sleep(1)
        assert run is not None, "the dataset event did not create a retrain flow run"
        assert run["parameters"]["dataset_path"].endswith("support/train.jsonl")
        # The trigger's parameters merge over the deployment's defaults.
        assert run["parameters"]["max_steps"] == RETRAIN_STEPS
        assert run["parameters"]["eval_limit"] == RETRAIN_EVAL_LIMIT
        worker = _prefect(["worker", "start", "--pool", "llmhost", "--run-once"], env, timeout=2400)
        state = httpx.get(f"{api}/flow_runs/{run['id']}").json()["state"]["type"]
        assert state == "COMPLETED", worker.stdout[-3000:] + worker.stderr[-3000:]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
