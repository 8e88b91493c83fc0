"""Bad input across the CLI and the gateway: one line naming the field, the value and the fix; nothing half-created.

Each CLI case runs `flows.cli.main` in-process (the console script's own error handling) and compares, before
and after, every table of the store (the audit log is one of them), the MLflow database and its artifacts.
The key, access and prompt cases are HTTP calls to the real gateway: one-line JSON errors, and no row anywhere
but the usage row the gateway writes for every authenticated request (refused ones too, with their status) and
the dashboard sampler's replica samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from threaded_gateway import ThreadedApp, ThreadedGateway

from tasks import store
from tasks.core.settings import PROJECT_ROOT, get_settings
from tasks.store import audit

CONFIGS = PROJECT_ROOT / "tests" / "fixtures" / "configs"
VLLM_PYTHON = Path(os.environ.get("LLMHOST_VLLM_PYTHON", PROJECT_ROOT / ".venv-vllm" / "bin" / "python"))


def _db_digest(path: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Table -> sha256 of its rows in primary-key order, read without writing."""
    if not path.exists():
        return {}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        out = {}
        for t in sorted(tables):
            if t in skip:
                continue
            rows = con.execute(f'SELECT * FROM "{t}" ORDER BY 1').fetchall()
            out[t] = hashlib.sha256(repr(rows).encode()).hexdigest()[:16]
        return out
    finally:
        con.close()


def _state() -> dict[str, object]:
    """Everything a command could half-create: the store with its audit log, MLflow and its artifact files."""
    home = get_settings().home_abs
    store_db = Path(str(store.get_engine().url.database))
    artifacts = home / "mlartifacts"
    return {
        "store": _db_digest(store_db),
        "mlflow": _db_digest(home / "mlflow.db"),
        "artifacts": sorted(str(p) for p in artifacts.rglob("*")) if artifacts.exists() else [],
        "audit_entries": len(audit.entries()),
    }


@dataclass
class Case:
    id: str
    argv: list[str]
    names: list[str]  # what the one line must name: the field, the value, the fix
    stdout_is_report: bool = False  # `size` prints its sizing report on stdout, then the error line on stderr


def _specs(tmp: Path) -> dict[str, Path]:
    files = {
        "unknown-model.yaml": "name: bad-model\nmodel: models:/no-such-model@champion\nhardware: cpu\n",
        "bad-vllm-arg.yaml": ("name: bad-arg\nmodel: models:/no-such-model@champion\nhardware: cpu\n"
                              "vllm:\n  extra_args: ['--no-such-flag', '1']\n"),
        "suite.yaml": ("name: broken\nversion: '1'\ndata: {path: nowhere.jsonl}\n"
                       "prompt:\n  messages: [{role: user, content: '{{ message }}'}]\n"
                       "metrics:\n  - kind: no_such_metric\n"),
        "finetune.yaml": ("base_model: models:/demo/1\ntrain: [{path: rows.jsonl}]\nlora: {r: -4}\n"),
        "managed.yaml": ("name: managed-ep\ntarget: external\nbase_url: http://127.0.0.1:9/v1\nmodel: m\n"
                         "api_key_env: NO_SUCH_KEY_VAR\n"),
    }
    out = {}
    for name, text in files.items():
        (tmp / name).write_text(text)
        out[name] = tmp / name
    return out


@pytest.fixture(scope="module")
def bad_arch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny model folder whose config names an architecture vLLM does not have."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("bad-arch")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["route the billing question ."] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                                 max_position_embeddings=128)).save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _run(argv: list[str]) -> tuple[int, str, str]:
    """The console script in-process. Its streams are buffers that stay open: a library that binds a log handler
    to them while the command runs (Prefect does) keeps a live stream after the capture ends."""
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _cases(tmp: Path, bad_arch: Path) -> list[Case]:
    s = _specs(tmp)
    cases = [
        Case("unknown-model-ref", ["deploy", str(s["unknown-model.yaml"])],
             ["model_ref=", "models:/no-such-model@champion", "llmhost models show"]),
        Case("unsupported-architecture", ["register", f"path:{bad_arch}", "--name", "bad-arch"],
             ["NoSuchModelForCausalLM", "--force"]),
        Case("does-not-fit", ["size", "--config", str(CONFIGS / "llama-3.1-8b.json"), "--tier", "t4-16gb-x1"],
             ["does not fit", "t4-16gb-x1", "fits on"], stdout_is_report=True),
        Case("malformed-suite", ["eval", "run", str(s["suite.yaml"]), "--target", "endpoint:none"],
             ["kind", "no_such_metric"]),
        Case("malformed-finetune-config", ["finetune", "--config", str(s["finetune.yaml"])],
             ["lora.r=-4", "greater than or equal to 1"]),
        Case("duplicate-endpoint-name", ["endpoints", "attach", "managed-ep", "--base-url", "http://127.0.0.1:9/v1",
                                         "--served-model", "m"],
             ["name='managed-ep'", "managed by `llmhost deploy`", "attach under another name"]),
    ]
    if VLLM_PYTHON.is_file():
        cases.append(Case("bad-vllm-extra-arg", ["deploy", str(s["bad-vllm-arg.yaml"])],
                          ["vllm.extra_args=", "--no-such-flag", "unrecognized arguments", "remove"]))
    return cases


def test_cli_bad_input_is_one_line_and_creates_nothing(tmp_path: Path, bad_arch_dir: Path) -> None:
    from tasks.core.tracking import configure_mlflow, mlflow_client

    configure_mlflow()
    mlflow_client().search_registered_models()  # the MLflow database exists before the first snapshot
    specs = _specs(tmp_path)
    assert _run(["deploy", str(specs["managed.yaml"])])[0] == 0  # a managed endpoint, for the duplicate name
    timings = {}
    for case in _cases(tmp_path, bad_arch_dir):
        before = _state()
        t0 = time.monotonic()
        rc, out, err = _run(case.argv)
        timings[case.id] = round(time.monotonic() - t0, 1)
        after = _state()
        # The one line; around it the console script only adds its log path and step lines (tasks.core.quiet),
        # and in-process library log records, none of which is an error line or a traceback.
        lines = [ln for ln in (out + err).splitlines() if ln.startswith("Error:")]
        assert rc != 0, (case.id, out, err)
        assert len(lines) == 1 and "Traceback" not in out + err, (case.id, out, err)
        assert case.stdout_is_report or not out.strip(), (case.id, out)
        for name in case.names:
            assert name in lines[0], (case.id, name, lines[0])
        assert after == before, (case.id, {k: (before[k], after[k]) for k in before if before[k] != after[k]})
    print("cli bad-input cases (s):", timings)


def test_the_console_script_prints_only_the_error_line(tmp_path: Path) -> None:
    """As a user runs it: the `llmhost` process prints the one `Error:` line on stderr, nothing else on either
    stream (no log path: nothing ran whose output went to a log). `deploy` is the exception: it prints its step's
    `start` and `FAILED` lines (and the log path) before the error line, since planning runs inside the step."""
    s = _specs(tmp_path)
    for argv in (["finetune", "--config", str(s["finetune.yaml"])],
                 ["eval", "run", str(s["suite.yaml"]), "--target", "endpoint:none"]):
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "COLUMNS": "200"})
        assert proc.returncode == 1 and proc.stdout == "", (argv, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (argv, proc.stderr)


def test_a_valid_vllm_extra_arg_passes_the_check() -> None:
    """The gate asks vLLM's parser, so it must not refuse what vLLM accepts."""
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"no serving runtime at {VLLM_PYTHON}")
    from tasks.deploy.vllm_args import check_extra_args

    args = ["--max-num-batched-tokens", "512", "--disable-log-stats"]
    t0 = time.monotonic()
    check_extra_args(args, python=VLLM_PYTHON)
    first = time.monotonic() - t0
    t0 = time.monotonic()
    check_extra_args(args, python=VLLM_PYTHON)  # the verdict is cached on disk per vLLM version and args
    again = time.monotonic() - t0
    print(f"vLLM extra_args check: {first:.1f}s, cached {again * 1000:.0f}ms")
    assert again < 1.0, again


# ------------------------------------------------------------------------------------------------ the gateway


def _one_line_error(resp: httpx.Response) -> str:
    assert resp.text.count("\n") == 0, resp.text
    message = resp.json()["error"]["message"]
    assert "\n" not in message
    return str(message)


def test_gateway_bad_keys_and_access_are_one_line_and_create_nothing() -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def health(request):  # type: ignore[no-untyped-def]
        return JSONResponse({})

    double = ThreadedApp(Starlette(routes=[Route("/health", health)]), what="replica double")
    try:
        store.attach_server("guarded", base_url=f"http://127.0.0.1:{double.port}/v1", served_model="m", actor="test")
        store.grant("guarded", team="allowed-team", actor="test")
        revoked = store.create_key("bad-input-user", team="allowed-team", actor="test")
        store.revoke_key(revoked.info.prefix, actor="test")
        expired = store.create_key("bad-input-user", team="allowed-team", expires_in=timedelta(seconds=1),
                                   actor="test")
        outsider = store.create_key("bad-input-outsider", team="other-team", actor="test")
        time.sleep(1.1)
        body = {"model": "guarded", "messages": [{"role": "user", "content": "hi"}]}
        garbage = "llmh-00000000-" + "x" * 32
        cases = [
            ("bad key", garbage, 401, ["API key 00000000", "not valid", "llmhost keys create"]),
            ("malformed key", "sk-not-ours", 401, ["malformed", "llmh-", "llmhost keys create"]),
            ("revoked key", revoked.raw, 401, [revoked.info.prefix, "was revoked", "ask an admin"]),
            ("expired key", expired.raw, 401, [expired.info.prefix, "expired", "--expires"]),
            ("team without access", outsider.raw, 403,
             ["team 'other-team'", "endpoint 'guarded'", "llmhost access grant guarded"]),
        ]
        with ThreadedGateway() as gw:
            for what, key, status, names in cases:
                before = _state()
                resp = httpx.post(f"{gw.url}/v1/chat/completions", json=body,
                                  headers={"authorization": f"Bearer {key}"})
                assert resp.status_code == status, (what, resp.text)
                message = _one_line_error(resp)
                for name in names:
                    assert name in message, (what, name, message)
                assert key not in resp.text, what
                time.sleep(0.5)  # the meter's flush interval is 0.2 s: a usage row would be stored by now
                after = _state()
                changed = {k for k, v in before["store"].items() if v != after["store"].get(k)}  # type: ignore[attr-defined]
                # usage_records: the 403's metered row; replica_samples: the dashboard sampler's background reads.
                assert changed <= {"usage_records", "replica_samples"}, (what, changed)
                assert {k: v for k, v in after.items() if k != "store"} == {k: v for k, v in before.items()
                                                                            if k != "store"}, what
    finally:
        double.close()


@pytest.mark.slow
def test_an_oversize_prompt_is_refused_in_one_line_relayed_from_vllm(vllm_server) -> None:
    """vLLM knows the context length; its 400 reaches the client whole, labelled as relayed."""
    from gateway.proxy import UPSTREAM_STATUS

    store.attach_server("oversize", base_url=vllm_server.base_url, served_model="demo", actor="test")
    store.grant("oversize", team="oversize-team", actor="test")
    key = store.create_key("oversize-user", team="oversize-team", actor="test").raw
    prompt = "invoice " * 3000  # about 3,000 tokens against max_model_len 1024
    with ThreadedGateway() as gw:
        before = _state()
        resp = httpx.post(f"{gw.url}/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                          json={"model": "oversize", "max_tokens": 4,
                                "messages": [{"role": "user", "content": prompt}]})
        after = _state()
    assert resp.status_code == 400 and resp.headers[UPSTREAM_STATUS] == "400", resp.text
    message = _one_line_error(resp)
    assert "maximum context length" in message and "1024" in message, message
    assert {k: v for k, v in after.items() if k != "store"} == {k: v for k, v in before.items() if k != "store"}
