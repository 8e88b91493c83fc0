"""The demo builder is deterministic, idempotent and keeps train and eval apart."""

from __future__ import annotations

import json

from demo import data
from demo.build import DemoModelConfig, build_demo_model


def test_same_inputs_give_the_same_hash_and_second_call_is_skipped(tmp_path):
    cfg = DemoModelConfig(steps=5)
    a = build_demo_model(tmp_path / "a", cfg, log=lambda *_: None)
    b = build_demo_model(tmp_path / "b", cfg, log=lambda *_: None)
    assert not a.skipped and not b.skipped
    assert a.content_hash == b.content_hash
    again = build_demo_model(tmp_path / "a", cfg, log=lambda *_: None)
    assert again.skipped and again.content_hash == a.content_hash


def test_model_dir_is_a_small_gqa_llama_with_tool_template(demo_model_dir):
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == 64 and 2 <= config["num_hidden_layers"] <= 4
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert (demo_model_dir / "generation_config.json").exists()
    tok_cfg = json.loads((demo_model_dir / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template") or (demo_model_dir / "chat_template.jinja").read_text()
    assert "tools" in template and "<tool_call>" in template


def test_train_and_eval_share_no_example():
    train = {r["message"] for r in data.routing_rows("train")}
    evals = {r["message"] for r in data.routing_rows("eval")}
    assert train and evals and not train & evals
    assert {r["queue"] for r in data.routing_rows("eval")} == set(data.QUEUES)
    tools_train = {r["message"] for r in data.tool_rows("train")}
    assert not tools_train & {r["message"] for r in data.tool_rows("eval")}


def test_committed_eval_split_matches_the_generator():
    from tasks.core.settings import PROJECT_ROOT

    committed = (PROJECT_ROOT / "eval_suites" / "data" / "demo_routing_eval.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in committed] == data.routing_rows("eval")
    committed = (PROJECT_ROOT / "eval_suites" / "data" / "demo_tools_eval.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in committed] == data.tool_rows("eval")


def test_the_standin_trains_in_a_child_and_a_build_call_waits_for_it_and_reuses_it(demo_build, tmp_path):
    """What the lifecycle does with a stand-in not yet built: `build_in_background` trains it in a child process
    beside the fine-tune, then the frontier step's `build_standin` waits on the build's lock and reuses the result."""
    import shutil
    import time

    from demo.standin import background_failure, build_in_background, build_standin

    demo_dir = tmp_path / "demo"
    shutil.copytree(demo_build.model_dir, demo_dir / "model")
    shutil.copytree(demo_build.data_dir, demo_dir / "data")
    log = tmp_path / "standin-build.log"
    child = build_in_background(3, log, demo_dir=demo_dir)
    assert child is not None
    try:
        deadline = time.monotonic() + 120
        while "training the frontier stand-in" not in (log.read_text() if log.exists() else ""):
            assert child.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the child never started training"
            time.sleep(0.5)
        reused = build_standin(demo_dir, steps=3, log=lambda *_: None)  # the child holds the lock: this waits
        assert child.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
    assert reused.skipped and (reused.adapter_dir / "adapter_config.json").exists(), reused
    assert background_failure(child, log) is None
    assert build_in_background(3, log, demo_dir=demo_dir) is None  # built: nothing to start


def test_a_failed_background_build_is_reported_with_its_reason_and_log(demo_build, tmp_path):
    """The frontier step's `build_standin` cannot tell a child that finished from one that died: it takes the lock
    and trains. The lifecycle then says that the child failed, why, and where its log is."""
    import shutil

    from demo.standin import background_failure, build_in_background

    demo_dir = tmp_path / "demo"
    shutil.copytree(demo_build.model_dir, demo_dir / "model")
    shutil.copytree(demo_build.data_dir, demo_dir / "data")
    (demo_dir / ".standin.lock").mkdir()  # the child cannot open its lock file: it fails before training
    log = tmp_path / "standin-build.log"
    child = build_in_background(3, log, demo_dir=demo_dir)
    assert child is not None
    line = background_failure(child, log, wait_s=120)
    assert line is not None and child.returncode == 1, log.read_text()[-2000:]
    assert line.startswith("frontier stand-in: the background build exited with code 1 (IsADirectoryError: "), line
    assert line.endswith(f"the child's log: {log}")
