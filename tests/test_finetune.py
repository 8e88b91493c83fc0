"""LoRA fine-tuning for real on the demo model, MLflow logging and registration, and hot-loading into vLLM."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from testing_utils import small_config

from demo import data as demo_data
from tasks.core.errors import ConfigError
from tasks.finetune import (
    ContaminationError,
    ContaminationSettings,
    DataSource,
    check_contamination,
    finetune,
    load_config,
    load_training_data,
    read_chat_rows,
    tokenize_row,
)

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "ft-demo"


# ------------------------------------------------------------------------------------------ config + refusals


def test_demo_config_loads_with_paths_under_the_state_dir(llmhost_home: Path):
    cfg = load_config(ROOT / "demo" / "finetune.yaml")
    assert [s.path for s in cfg.train] == [
        llmhost_home / "demo" / "data" / "train.jsonl",
        llmhost_home / "demo" / "data" / "tools_train.jsonl",
    ]
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.base_model.startswith("models:/")


def test_bad_config_names_file_field_and_fix(tmp_path: Path):
    p = tmp_path / "ft.yaml"
    p.write_text(
        yaml.safe_dump({"base_model": "models:/x/1", "train": [{"path": "a.jsonl"}], "lora": {"r": 0}})
    )
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert str(p) in msg and "lora.r=0" in msg and "greater than or equal to 1" in msg and "\n" not in msg


def test_training_rows_that_contain_eval_rows_are_refused(tmp_path: Path, demo_data_dir: Path):
    eval_rows = [json.loads(line) for line in (ROOT / "eval_suites/data/demo_routing_eval.jsonl").open()][:3]
    leaked = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in (demo_data_dir / "train.jsonl").open()][:50]
    # Re-cased and re-spaced copies must be caught too (the normalised comparison).
    for i, r in enumerate(eval_rows):
        msg = r["message"] if i == 0 else "  " + r["message"].upper().replace(" ,", ",")
        rows.append(demo_data.routing_chat({"id": f"leak-{i}", "message": msg, "queue": r["queue"]}))
    leaked.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = small_config(
        demo_data_dir,
        "models:/nothing/1",
        train=[DataSource(path=leaked)],
        contamination=ContaminationSettings(suites=["demo_routing"]),
    )
    data = load_training_data(cfg.model_copy(update={"eval_fraction": 0.0}))
    with pytest.raises(ContaminationError) as exc:
        check_contamination(data.train, cfg.contamination)
    msg = str(exc.value)
    assert "3/240 rows of suite:demo_routing" in msg and "\n" not in msg
    for r in eval_rows:
        assert r["id"] in msg
    assert "leak-0" in msg
    # finetune() stops at the check: before the base model is even looked up (it does not exist here).
    with pytest.raises(ContaminationError):
        finetune(cfg.model_copy(update={"eval_fraction": 0.0}))
    # Below the threshold it passes and reports the overlap.
    loose = cfg.contamination.model_copy(update={"max_overlap": 0.05})
    assert check_contamination(data.train, loose).checked[0].normalized == [r["id"] for r in eval_rows]


def test_clean_demo_data_passes_the_check_against_every_suite(demo_data_dir: Path):
    cfg = small_config(demo_data_dir, "models:/x/1")
    report = check_contamination(load_training_data(cfg).train, cfg.contamination)
    names = {r.name for r in report.checked}
    assert {"suite:demo_routing", "suite:demo_tools"} <= names and report.passed and report.worst == 0.0


def test_loss_is_masked_to_assistant_tokens(demo_model_dir: Path, demo_data_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    routing = read_chat_rows(DataSource(path=demo_data_dir / "train.jsonl"))[0]
    tool = read_chat_rows(DataSource(path=demo_data_dir / "tools_train.jsonl"))[0]
    for row, want in (
        (routing, routing.messages[-1]["content"] + "<|im_end|>"),
        (tool, '<tool_call>{"name": "get_weather", "arguments": {"city": "paris"}}</tool_call><|im_end|>'),
    ):
        f = tokenize_row(tok, row, 1024)
        assert f is not None
        learned = tok.decode([i for i, lab in zip(f["input_ids"], f["labels"], strict=True) if lab != -100])
        assert learned == want
        assert f["labels"][0] == -100 and len(f["labels"]) == len(f["input_ids"])


# ---------------------------------------------------------------------------------------------- real training


@pytest.fixture(scope="module")
def base_version(demo_model_dir: Path):
    from tasks.register import register_model

    return register_model(f"path:{demo_model_dir}", MODEL_NAME)


@pytest.mark.slow
def test_lora_changes_adapter_weights_not_base_weights_and_loss_falls(
    demo_model_dir: Path, demo_data_dir: Path
):
    import torch
    from safetensors.torch import load_file

    from tasks.finetune import train_lora

    cfg = small_config(demo_data_dir, "models:/x/1")
    out = train_lora(cfg, load_training_data(cfg), demo_model_dir)
    base = load_file(str(demo_model_dir / "model.safetensors"))
    state = out.model.state_dict()
    lora_b = [k for k in state if "lora_B" in k]
    assert lora_b, "no LoRA matrices in the model"
    # LoRA B starts at zero: any non-zero entry is a learned update.
    assert all(float(state[k].abs().max()) > 0 for k in lora_b)
    checked = 0
    for key, value in state.items():
        if "lora_" in key:
            continue
        name = key.replace("base_model.model.", "").replace(".base_layer", "")
        if name in base:
            assert torch.equal(value, base[name]), f"base weight {name} changed"
            checked += 1
    assert checked >= len(base) - 1  # every base tensor (lm_head is tied to the embeddings)
    first, last = out.history.first_last_train(k=3)
    assert last < first * 0.7, (first, last)
    assert out.eval_loss_after is not None and out.eval_loss_before is not None
    assert out.eval_loss_after < out.eval_loss_before


@pytest.fixture(scope="module")
def finetuned(base_version, demo_data_dir: Path):
    cfg = small_config(demo_data_dir, f"models:/{MODEL_NAME}/{base_version.version}")
    return cfg, finetune(cfg)


@pytest.mark.slow
def test_finetune_logs_run_and_registers_a_new_version_with_tags(finetuned, base_version):
    from mlflow import MlflowClient

    from tasks.core.tracking import mlflow_client
    from tasks.finetune import config_hash

    cfg, res = finetuned
    client: MlflowClient = mlflow_client()
    run = client.get_run(res.run_id)
    assert run.data.params["dataset_hash"] == res.dataset_hash
    assert run.data.params["lora.r"] == "8" and run.data.params["finetune_config_hash"] == config_hash(cfg)
    assert int(run.data.params["dataset_rows"]) == res.rows > 500
    steps = [m.step for m in client.get_metric_history(res.run_id, "train_loss")]
    assert len(steps) >= cfg.max_steps and steps == sorted(steps)
    assert len(client.get_metric_history(res.run_id, "eval_loss")) >= 2
    artifacts = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"loss.png", "losses.json", "contamination.txt"} <= artifacts
    # A reload through MLflow gives the trained model's logits (MLflow issue #23761 would break this).
    assert res.reload_max_abs_diff <= 1e-4
    # The run states the precision it trained in and the tolerance of its reload check.
    assert run.data.params["train_dtype"] == "float32" and run.data.params["reload_atol"] == "0.0001"
    assert run.data.tags["llmhost.precision"].startswith("auto: CPU") and res.precision == "fp32"
    # A new version of the same registered model, tagged as an adapter on the base version.
    assert res.registered_name == MODEL_NAME and int(res.registered_version) == int(base_version.version) + 1
    mv = client.get_model_version(MODEL_NAME, res.registered_version)
    assert mv.tags["adapter"] == "true" and mv.tags["base_version"] == base_version.version
    assert mv.tags["dataset_hash"] == res.dataset_hash and mv.tags["training_run_id"] == res.run_id
    assert mv.tags["finetune_config_hash"] == config_hash(cfg) and mv.run_id == res.run_id


@pytest.mark.slow
def test_registered_adapter_reloads_with_identical_logits(finetuned, demo_model_dir: Path):
    """Independent of the check inside finetune(): reload by registry URI, compare with base + adapter dir."""
    import mlflow
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.deploy.adapters import resolve_adapter

    _, res = finetuned
    adapter = resolve_adapter(f"models:/{MODEL_NAME}/{res.registered_version}")
    assert (adapter.adapter_dir / "adapter_config.json").is_file() and adapter.lora_rank == 8
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    enc = tok(["hey team , something is off with my invoice ."], return_tensors="pt")
    direct = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(demo_model_dir), adapter.adapter_dir
    )
    via_mlflow = mlflow.transformers.load_model(
        f"models:/{MODEL_NAME}/{res.registered_version}", return_type="components"
    )["model"]
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    with torch.no_grad():
        a, b, c = direct.eval()(**enc).logits, via_mlflow.eval()(**enc).logits, base.eval()(**enc).logits
    assert float((a - b).abs().max()) <= 1e-5
    assert float((a - c).abs().max()) > 1e-3  # and the adapter does change the model


@pytest.mark.slow
def test_cli_runs_the_retrain_flow_from_a_yaml_config(base_version, demo_data_dir: Path, tmp_path: Path):
    """`llmhost finetune --config X.yaml` runs the Prefect flow with the config as its typed parameter."""
    from flows.cli import main

    cfg = small_config(demo_data_dir, f"models:/{MODEL_NAME}/{base_version.version}", seed=7)
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["finetune", "--config", str(path), "--max-steps", "4", "--json"]) == 0
    from tasks.core.tracking import mlflow_client

    client = mlflow_client()
    versions = client.search_model_versions(f"name = '{MODEL_NAME}' and tags.adapter = 'true'")
    runs = {v.tags["training_run_id"] for v in versions}
    steps = [int(client.get_run(r).data.params["max_steps"]) for r in runs]
    assert 4 in steps


# ---------------------------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def lora_server(vllm_server):
    """The session's vLLM (LoRA with runtime loading on, hermes tool parser), served as `demo`."""
    return vllm_server


BASE = "demo"  # the lora_server's served name for the base weights


PROMPTS = [
    m
    for m in (
        "hey team , something is off with my invoice .",
        "still waiting on an answer about courier .",
        "i would like some support with app crash .",
        "regarding survey : please advise .",
    )
]


def _answers(client: openai.OpenAI, model: str) -> list[str]:
    out = []
    for p in PROMPTS:
        r = client.chat.completions.create(
            model=model,
            temperature=0,
            max_tokens=8,
            messages=[
                {"role": "system", "content": demo_data.ROUTING_SYSTEM_PROMPT},
                {"role": "user", "content": p},
            ],
        )
        out.append(r.choices[0].message.content or "")
    return out


@pytest.mark.slow
def test_hot_load_into_running_vllm_then_unload(lora_server, finetuned):
    from tasks.deploy.adapters import hot_load, hot_unload, resolve_adapter
    from tasks.serving.lora import served_adapters
    from tasks.store import audit

    _, res = finetuned
    adapter = resolve_adapter(f"models:/{MODEL_NAME}/{res.registered_version}")
    client = openai.OpenAI(base_url=lora_server.base_url, api_key="unused", max_retries=0, timeout=60)
    pid = lora_server.pid
    base = _answers(client, BASE)
    change = hot_load(lora_server, adapter)
    print(f"\nhot-load took {change.seconds:.3f}s (vLLM startup was {lora_server.startup_seconds}s)")
    assert change.method == "runtime" and change.seconds < 5.0
    assert (
        change.adapter == f"{MODEL_NAME}-v{res.registered_version}" in served_adapters(lora_server.base_url)
    )
    tuned = _answers(client, change.adapter)
    assert tuned != base, (base, tuned)
    assert (
        lora_server.pid == pid and httpx.get(f"{lora_server.root_url}/health").status_code == 200
    )  # no restart
    hot_unload(lora_server, change.adapter)
    assert change.adapter not in served_adapters(lora_server.base_url)
    with pytest.raises(openai.NotFoundError):
        _answers(client, change.adapter)
    actions = [e.action for e in audit.entries(action="adapter.")]
    assert actions[-2:] == ["adapter.load", "adapter.unload"]


@pytest.mark.slow
def test_endpoint_load_through_the_gateway_as_endpoint_colon_adapter(lora_server, finetuned):
    """`llmhost adapters load` on an endpoint, then a call through the real gateway as `endpoint:adapter`."""
    pytest.importorskip("gateway.app")
    import uvicorn

    from flows.cli import main
    from gateway.app import create_app
    from tasks import store
    from tasks.serving.local import free_port
    from tasks.store import audit

    _, res = finetuned
    store.attach_server("ft-ep", base_url=lora_server.base_url, served_model=BASE, actor="test")
    store.grant("ft-ep", team="ft-team", actor="test")
    key = store.create_key("ft-user", team="ft-team", actor="test").raw
    # An attached server has no registered model version, so name the adapter as NAME/VERSION.
    assert main(["adapters", "load", "ft-ep", f"{MODEL_NAME}/{res.registered_version}"]) == 0
    name = f"{MODEL_NAME}-v{res.registered_version}"
    entry = audit.entries(endpoint="ft-ep", action="adapter.load")[-1]
    assert json.loads(entry.after)["method"] == "runtime"

    app = create_app(flush_interval_s=0.1)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.05)
        gw = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)
        direct = openai.OpenAI(base_url=lora_server.base_url, api_key="unused", max_retries=0, timeout=60)
        assert _answers(gw, f"ft-ep:{name}") == _answers(direct, name)
        assert _answers(gw, "ft-ep") == _answers(direct, BASE)
        assert main(["adapters", "unload", "ft-ep", f"{MODEL_NAME}/{res.registered_version}"]) == 0
        deadline = time.monotonic() + 15
        while True:  # the gateway reloads routes when the store's epoch moves
            try:
                _answers(gw, f"ft-ep:{name}")
            except openai.NotFoundError:
                break
            assert time.monotonic() < deadline, "adapter still routed after unload"
            time.sleep(0.2)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.slow
@pytest.mark.lifecycle
@pytest.mark.skipif(
    os.environ.get("LLMHOST_SKIP_DEMO_FINETUNE") == "1", reason="LLMHOST_SKIP_DEMO_FINETUNE=1"
)
def test_demo_finetune_improves_held_out_routing_and_tool_calls(lifecycle_run):
    """The demo config end to end: base vs tuned on the held-out splits, scored by the evaluation runner.

    The tuned model is the session lifecycle's candidate: demo/finetune.yaml (1,200 steps) on the demo base, trained
    once for the suite instead of once per test. Both are scored on the lifecycle endpoint's replica (LoRA and the
    hermes parser on, as deployments/demo.yaml asks): its base weights against the candidate hot-loaded beside them.
    """
    from tasks import store
    from tasks.core.tracking import mlflow_client
    from tasks.deploy.adapters import hot_load, resolve_adapter
    from tasks.evaluate.runner import run_suite
    from tasks.evaluate.suite import load
    from tasks.finetune import config_hash
    from tasks.register import VersionTags

    summary = lifecycle_run.summary
    assert summary.candidate, summary.text()
    ref = f"models:/{summary.model}/{summary.candidate}"
    tags = VersionTags.from_mlflow(mlflow_client().get_model_version(summary.model, str(summary.candidate)).tags)
    # The candidate was trained from the demo config as it stands (the same steps, data and LoRA settings).
    demo_cfg = load_config(ROOT / "demo" / "finetune.yaml")
    assert tags.finetune_config_hash == config_hash(demo_cfg.model_copy(
        update={"base_model": f"models:/{summary.model}/{tags.base_version}"})), tags
    replica = next(r for r in store.list_replicas(summary.endpoint) if r.state == "up")
    # The base weights are the served model without a LoRA parent; adapters list their base as `parent`.
    listed = httpx.get(f"{replica.base_url}/models", timeout=10).json()["data"]
    base = next(m["id"] for m in listed if not m.get("parent"))
    change = hot_load(replica.base_url, resolve_adapter(ref), name="demo-ft")
    scores = {}
    for suite, metric in (("demo_routing", "exact_match"), ("demo_tools", "tool_call")):
        loaded = load(suite)
        for model in (base, change.adapter):
            result = run_suite(loaded, f"url:{replica.base_url}#{model}", progress=False, concurrency=4)
            scores[(suite, model)] = result.mean(metric) if hasattr(result, "mean") else _mean(result, metric)
    print(f"\ndemo fine-tune {ref} (lifecycle candidate); scores {scores}")
    # The demo's promise (issue 18): the base scores about 0 on the held-out routing task, the tuned model >= 0.80.
    # (At 1,000 steps this machine's tuned model scored 0.59, which the earlier bar of base + 0.3 let through.)
    assert scores[("demo_routing", base)] <= 0.10 and scores[("demo_routing", change.adapter)] >= 0.80, scores
    # Measured: routing 0.00 -> 0.95, tool calls 0.00 -> 0.62 on the held-out phrasings.
    assert scores[("demo_tools", change.adapter)] >= scores[("demo_tools", base)] + 0.3


def _mean(result, metric: str) -> float:
    vals = [r.scores.get(metric) for r in result.records if r.scores.get(metric) is not None]
    return sum(vals) / len(vals) if vals else 0.0
