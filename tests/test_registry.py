"""Registering models against a real sqlite MLflow, a real HF cache layout and the real vLLM runtime."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.errors import ConfigError, LlmhostError, RegistryError
from tasks.core.retry import is_transient
from tasks.core.settings import PROJECT_ROOT, get_settings
from tasks.core.tracking import get_or_create_experiment, mlflow_client
from tasks.register import (
    MODEL_FILE_PATTERNS,
    RegisteredVersion,
    TransientHubError,
    VersionTags,
    find_version_by_hash,
    guess_tool_call_format,
    inspect_model_dir,
    model_versions,
    params_from_config,
    params_from_safetensors,
    register_model,
    resolve_model_ref,
)
from tasks.register.vllm_compat import check_architectures, load_fallback, supported_architectures

RUNTIME_PYTHON = PROJECT_ROOT / ".venv-vllm" / "bin" / "python"
needs_runtime = pytest.mark.skipif(not RUNTIME_PYTHON.exists(), reason="no vLLM runtime venv (make runtime)")


def _registered_model_names() -> set[str]:
    return {m.name for m in mlflow_client().search_registered_models(max_results=1000)}


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".build.json"))
    return dst


def _state_dict(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 0.3M-parameter Llama with a hermes-style chat template, for the many copies bad-input tests break."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["route the billing question to the right queue ."] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% if tools %}<tools>{{ tools | tojson }}</tools> reply <tool_call>{json}</tool_call>{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    fast.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _assert_one_line_and_nothing_left(exc: LlmhostError, name: str) -> None:
    assert "\n" not in str(exc)
    assert name not in _registered_model_names()


# ---------------------------------------------------------------------------------------------- path:


def test_register_path_demo_model_tags_idempotence_and_resolve(demo_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    result = register_model(f"path:{demo_model_dir}", "demo-path")
    assert result.created and result.version == "1"
    tags = result.tags
    # Reported in the closing note: the tags written for the demo model.
    print("DEMO_TAGS", json.dumps(tags, indent=1, sort_keys=True))

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    expected_params = sum(p.numel() for p in model.parameters())  # tied embeddings count once
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert tags["source"] == f"path:{demo_model_dir}"
    assert tags["source_kind"] == "path" and tags["storage"] == "artifacts"
    assert len(tags["content_hash"]) == 64
    assert tags["architectures"] == "LlamaForCausalLM"
    assert int(tags["params_total"]) == expected_params == int(tags["params_active"])
    assert tags["params_source"] == "safetensors"
    assert tags["dtype"] == "float32"
    assert tags["max_context"] == str(config["max_position_embeddings"]) == "1024"
    assert tags["has_chat_template"] == "true"
    assert tags["template_supports_tools"] == "true"
    assert tags["tool_call_format"] == "hermes"
    assert tags["vllm_supported"] == "true" and "LlamaForCausalLM" in tags["vllm_reason"]
    assert tags["trust_remote_code"] == "false"
    # The version links to the run that stored the weights as artifacts.
    assert result.run_id and mlflow_client().get_run(result.run_id).info.status == "FINISHED"

    again = register_model(f"path:{demo_model_dir}", "demo-path")
    assert not again.created and again.version == "1"
    assert [v.version for v in model_versions("demo-path")] == ["1"]

    # resolve_model_ref hands back an HF folder with the same content, by version and by alias.
    mlflow_client().set_registered_model_alias("demo-path", "champion", "1")
    for ref in ("models:/demo-path/1", "models:/demo-path@champion"):
        resolved = resolve_model_ref(ref)
        assert resolved.version == "1" and resolved.tags["content_hash"] == tags["content_hash"]
        assert inspect_model_dir(resolved.local_dir, label=ref).content_hash == tags["content_hash"]
    loaded = AutoModelForCausalLM.from_pretrained(resolved.local_dir)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


# ---------------------------------------------------------------------------------------------- run:


def test_register_run_model_links_version_to_run(demo_model_dir: Path) -> None:
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    experiment_id = get_or_create_experiment("test-registry-runs")
    assert get_settings().artifact_root in mlflow_client().get_experiment(experiment_id).artifact_location
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="model", task="text-generation",
            pip_requirements=["transformers", "torch"],
        )  # fmt: skip

    result = register_model(f"run:{run.info.run_id}", "demo-run")
    assert result.created and result.run_id == run.info.run_id
    tags = result.tags
    assert tags["source"] == f"run:{run.info.run_id}/model" and tags["source_run_id"] == run.info.run_id
    assert tags["architectures"] == "LlamaForCausalLM" and tags["vllm_supported"] == "true"
    assert tags["has_chat_template"] == "true" and tags["tool_call_format"] == "hermes"
    assert int(tags["params_total"]) == sum(p.numel() for p in model.parameters())
    assert not register_model(f"run:{run.info.run_id}/model", "demo-run").created

    # Logged from objects, the tokenizer sits apart from the weights; the resolved folder has both.
    resolved = resolve_model_ref("models:/demo-run/1")
    assert (resolved.local_dir / "config.json").is_file() and (resolved.local_dir / "tokenizer.json").exists()
    reloaded = AutoTokenizer.from_pretrained(resolved.local_dir)
    assert reloaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    )
    original = model.state_dict()
    assert all((original[k] == v).all() for k, v in _state_dict(resolved.local_dir).items() if k in original)


def test_run_without_transformers_model_is_refused() -> None:
    import mlflow

    experiment_id = get_or_create_experiment("test-registry-runs")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_text("not a model", "model/readme.txt")
    with pytest.raises(RegistryError, match="no transformers model named 'model'") as err:
        register_model(f"run:{run.info.run_id}", "run-no-model")
    _assert_one_line_and_nothing_left(err.value, "run-no-model")

    with pytest.raises(RegistryError, match="no transformers model named 'weights'") as err:
        register_model(f"run:{run.info.run_id}/weights", "run-no-model")
    _assert_one_line_and_nothing_left(err.value, "run-no-model")

    with pytest.raises(RegistryError, match="no such run") as err:
        register_model("run:" + "0" * 32, "run-no-model")
    _assert_one_line_and_nothing_left(err.value, "run-no-model")


# ---------------------------------------------------------------------------------------------- hf:


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def build_hf_cache(cache: Path, repo: str, model_dir: Path, commit: str, refs: dict[str, str]) -> Path:
    """Lay a model out the way huggingface_hub's cache does: blobs by etag, snapshot symlinks, refs."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        # LFS files (weights) are stored under their sha256; git-tracked files under the git blob sha1.
        etag = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else _git_blob_sha1(data)
        (storage / "blobs" / etag).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / etag)
    for ref, sha in refs.items():
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(sha)
    return snapshot


def _offline_hf_cache(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    commit = hashlib.sha1(b"llmhost-demo").hexdigest()
    # A README is in the repo but outside the allow patterns: it must not be hashed or stored.
    src = _copy_model(model_dir, tmp_path / "src")
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# demo\n")
    build_hf_cache(tmp_path / "hub", "llmhost-test/demo", src, commit, {"main": commit})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub", commit


@pytest.fixture()
def hf_cache(tmp_path: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    return _offline_hf_cache(tmp_path, demo_model_dir, monkeypatch)


@pytest.fixture()
def tiny_hf_cache(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    return _offline_hf_cache(tmp_path, tiny_model_dir, monkeypatch)


def test_register_hf_from_offline_cache_by_reference(
    hf_cache: tuple[Path, str], demo_model_dir: Path
) -> None:
    cache, commit = hf_cache
    result = register_model("hf:llmhost-test/demo", "demo-hf")
    tags = result.tags
    assert result.created
    assert tags["source"] == f"hf:llmhost-test/demo@{commit}"  # pinned to the resolved sha, not "main"
    assert tags["hf_repo"] == "llmhost-test/demo" and tags["hf_revision"] == commit
    assert tags["storage"] == "reference" and tags["vllm_supported"] == "true"
    assert tags["tool_call_format"] == "hermes" and tags["dtype"] == "float32"
    # Blob names stand in for the weights' sha256, so the hash equals that of the same files on disk.
    assert tags["content_hash"] == inspect_model_dir(demo_model_dir, label="demo").content_hash

    # By reference: the registry run holds config/tokenizer and reference.json, never the weights.
    assert result.run_id is not None
    stored = [a.path for a in mlflow_client().list_artifacts(result.run_id, "hf_reference")]
    assert "hf_reference/reference.json" in stored and "hf_reference/config.json" in stored
    assert not [p for p in stored if p.endswith(".safetensors")]

    resolved = resolve_model_ref("models:/demo-hf/1")
    assert resolved.local_dir == cache / "models--llmhost-test--demo" / "snapshots" / commit
    assert (resolved.local_dir / "model.safetensors").is_file()

    # Pinning by sha resolves to the same content, hence the same version.
    assert not register_model(f"hf:llmhost-test/demo@{commit}", "demo-hf").created


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("hf:llmhost-test/nope", "not in the local HF cache"),
        ("hf:llmhost-test/demo@v9.9", "not in the local HF cache"),
        ("hf:llmhost-test/demo@" + "f" * 40, "not in the local HF cache"),
    ],
)
def test_hf_unknown_repo_or_revision(tiny_hf_cache: tuple[Path, str], source: str, match: str) -> None:
    with pytest.raises(RegistryError, match=match) as err:
        register_model(source, "hf-bad")
    assert "check the repo id and revision" in str(err.value)
    _assert_one_line_and_nothing_left(err.value, "hf-bad")


# ---------------------------------------------------------------------------------------------- bad input


def _break_missing_config(d: Path) -> None:
    (d / "config.json").unlink()


def _break_no_weights(d: Path) -> None:
    for f in d.glob("*.safetensors"):
        f.unlink()


def _break_bin_weights(d: Path) -> None:
    for f in d.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))


def _break_truncated_weights(d: Path) -> None:
    f = next(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-1000])


def _break_no_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").unlink()


def _break_bad_config_json(d: Path) -> None:
    (d / "config.json").write_text("{not json")


@pytest.mark.parametrize(
    ("breaker", "match"),
    [
        (_break_missing_config, "config.json is missing"),
        (_break_no_weights, r"no \*\.safetensors weights; save with"),
        (_break_bin_weights, "found pytorch_model.bin; convert to safetensors"),
        (_break_truncated_weights, "model.safetensors is not readable safetensors .truncated"),
        (_break_no_tokenizer, "no tokenizer files"),
        (_break_bad_config_json, "config.json is not valid JSON"),
    ],
)
def test_bad_model_folder(tmp_path: Path, tiny_model_dir: Path, breaker, match: str) -> None:
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    breaker(d)
    with pytest.raises(RegistryError, match=match) as err:
        register_model(f"path:{d}", "bad-folder")
    _assert_one_line_and_nothing_left(err.value, "bad-folder")


def test_missing_or_non_folder_path(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="folder does not exist") as err:
        register_model(f"path:{tmp_path / 'absent'}", "bad-folder")
    _assert_one_line_and_nothing_left(err.value, "bad-folder")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RegistryError, match="not a folder") as err:
        register_model(f"path:{tmp_path / 'file'}", "bad-folder")
    _assert_one_line_and_nothing_left(err.value, "bad-folder")


def test_unreadable_folder_via_cli(tmp_path: Path, tiny_model_dir: Path) -> None:
    """chmod 000 stops everyone but root; as root, the CLI runs with its capabilities dropped."""
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    d.chmod(0)
    cmd = [sys.executable, "-m", "flows.cli", "register", f"path:{d}", "--name", "unreadable"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: root reads any folder")
        cmd = [setpriv, "--inh-caps=-all", "--bounding-set=-all", "--reuid=0", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
                              env={**os.environ, "LLMHOST_RAISE_ERRORS": ""})  # fmt: skip
    finally:
        d.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "permission denied" in lines[0] and "make the folder" in lines[0], proc.stderr
    assert "unreadable" not in _registered_model_names()


def test_bad_source_and_name_strings() -> None:
    for source in ("demo", "s3:bucket/x", "hf:", "hf:a/b@", "run:not-a-run-id", "path:"):
        with pytest.raises(ConfigError, match="source=") as err:
            register_model(source, "bad-source")
        _assert_one_line_and_nothing_left(err.value, "bad-source")
    with pytest.raises(ConfigError, match="name='has space'"):
        register_model("path:/tmp", "has space")


def test_unsupported_architecture_refused_then_forced(tmp_path: Path, tiny_model_dir: Path) -> None:
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["LlammaForCausalLM"]
    (d / "config.json").write_text(json.dumps(config))

    with pytest.raises(RegistryError) as err:
        register_model(f"path:{d}", "typo-arch")
    msg = str(err.value)
    assert "LlammaForCausalLM" in msg and "closest: LlamaForCausalLM" in msg and "--force" in msg
    _assert_one_line_and_nothing_left(err.value, "typo-arch")

    forced = register_model(f"path:{d}", "typo-arch", force=True)
    assert forced.created and forced.tags["vllm_supported"] == "false"
    assert "closest: LlamaForCausalLM" in forced.tags["vllm_reason"]


def test_failure_after_creation_removes_what_was_created(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    d = _copy_model(tiny_model_dir, tmp_path / "m")
    (d / "generation_config.json").write_text('{"max_new_tokens": 7}')  # new content, new hash

    def refuse(self, *args, **kwargs):
        raise MlflowException("store went away")

    # The failure is injected in MLflow (third-party), after the run and registered model exist.
    monkeypatch.setattr(MlflowClient, "create_model_version", refuse)
    with pytest.raises(MlflowException, match="store went away"):
        register_model(f"path:{d}", "half-created")
    monkeypatch.undo()
    assert "half-created" not in _registered_model_names()
    experiment_id = get_or_create_experiment("llmhost-registry")
    runs = mlflow_client().search_runs([experiment_id], "tags.`mlflow.runName` = 'register-half-created'")
    assert runs == []  # deleted runs are not returned by default


# ---------------------------------------------------------------------------------------------- vLLM list


@needs_runtime
def test_compat_against_the_real_runtime_list() -> None:
    archs = supported_architectures(RUNTIME_PYTHON)
    assert archs.source == "runtime" and archs.vllm_version.startswith("0.")
    assert len(archs.archs) > 100 and "LlamaForCausalLM" in archs.archs and "Qwen2ForCausalLM" in archs.archs
    cached = list((get_settings().home_abs / "cache").glob(f"vllm-archs-{archs.vllm_version}-*.json"))
    assert len(cached) == 1

    ok = check_architectures(["LlamaForCausalLM"], {}, archs)
    assert ok.supported and f"vLLM {archs.vllm_version} runtime" in ok.reason

    typo = check_architectures(["LLamaForCausalLm"], {}, archs)
    assert not typo.supported and "LlamaForCausalLM" in typo.closest

    removed = check_architectures(["MPTForCausalLM"], {}, archs)
    assert not removed.supported and "removed from vLLM after" in removed.reason

    pooling = check_architectures(["BertModel"], {}, archs)
    assert pooling.supported and "pooling model" in pooling.reason

    custom = check_architectures(["LlamaForCausalLM"], {"auto_map": {"AutoModelForCausalLM": "m.M"}}, archs)
    assert custom.supported and custom.trust_remote_code and "--trust-remote-code" in custom.reason


def test_fallback_list_only_without_runtime(tmp_path: Path) -> None:
    archs = supported_architectures(tmp_path / "no-venv" / "bin" / "python")
    assert archs.source == "fallback" and "no runtime at" in archs.described
    result = check_architectures(["LlamaForCausalLM"], {}, archs)
    assert result.supported and "shipped list" in result.reason
    assert load_fallback().archs == archs.archs


# ---------------------------------------------------------------------------------------------- pure parts


def test_param_counts_from_config_match_safetensors(tiny_model_dir: Path) -> None:
    from tasks.register import read_safetensors_header

    config = json.loads((tiny_model_dir / "config.json").read_text())
    headers = [read_safetensors_header(f) for f in tiny_model_dir.glob("*.safetensors")]
    assert params_from_config(config) == params_from_safetensors(headers, config)


def test_moe_active_params_count_top_k_experts() -> None:
    config = {"num_local_experts": 8, "num_experts_per_tok": 2}
    header = {
        "embed.weight": {"dtype": "BF16", "shape": [100, 10], "data_offsets": [0, 2000]},
        **{f"layers.0.mlp.experts.{i}.w1": {"dtype": "BF16", "shape": [10, 10], "data_offsets": [0, 200]}
           for i in range(8)},
    }  # fmt: skip
    assert params_from_safetensors([header], config) == (1800, 1000 + 2 * 100)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% for t in tools %}{{ t }}{% endfor %}<tool_call>", (True, "hermes")),
        ("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]", (True, "mistral")),
        ("{%- if tools %}<|python_tag|>{% endif %}", (True, "llama3_json")),
        ("{% if tools %}<tool_call>\n<function=x>\n<parameter=y>{% endif %}", (True, "qwen3_coder")),
        ("{% if tools %}call something{% endif %}", (True, "unknown")),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", (False, "none")),
    ],
)
def test_tool_call_format_guess(template: str, expected: tuple[bool, str]) -> None:
    assert guess_tool_call_format([template]) == expected


def test_model_file_patterns_cover_a_saved_model(tiny_model_dir: Path) -> None:
    facts = inspect_model_dir(tiny_model_dir, label="demo")
    assert set(facts.files) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert all(any(Path(f).match(p) for p in MODEL_FILE_PATTERNS) for f in facts.files)


# ---------------------------------------------------------------------------------------------- edges


def test_cli_register_and_models_commands(demo_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    assert main(["register", f"path:{demo_model_dir}", "--name", "demo-cli", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_uri"] == "models:/demo-cli/1" and out["tags"]["vllm_supported"] == "true"

    assert main(["models", "list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["demo-cli"]["latest_version"] == "1"

    assert main(["models", "show", "demo-cli"]) == 0
    assert "hermes" in capsys.readouterr().out

    assert main(["register", "path:/definitely/not/here", "--name", "demo-cli"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: path:/definitely/not/here: folder does not exist") and "\n" not in err


def test_register_task_in_a_flow_is_idempotent(demo_model_dir: Path) -> None:
    from prefect import flow

    from flows.tasks import register_model_task

    @flow
    def register_flow(source: str, name: str) -> RegisteredVersion:
        return register_model_task(source, name)

    first = register_flow(f"path:{demo_model_dir}", "demo-task")
    second = register_flow(f"path:{demo_model_dir}", "demo-task")
    assert first.version == second.version == "1" and first.created and not second.created
    existing = find_version_by_hash("demo-task", first.tags["content_hash"])
    assert existing is not None and str(existing.version) == "1"


def test_version_tags_read_and_write_mlflow_strings_unchanged() -> None:
    wire = {
        "source": "hf:org/name@abc", "storage": "reference", "architectures": "A,B", "max_context": "",
        "vllm_supported": "false", "adapter": "true", "lora_rank": "8", "lora_target_modules": '["q_proj"]',
        "llmhost.note": "kept",
    }  # fmt: skip
    tags = VersionTags.from_mlflow(wire)
    assert tags.architectures == ["A", "B"] and tags.max_context is None and tags.vllm_supported is False
    assert tags.adapter and tags.lora_rank == 8 and tags.lora_target_modules == ["q_proj"]
    assert tags.to_mlflow() == wire  # only the tags that were there, spelled as they were
    with pytest.raises(RegistryError, match="params_total"):
        VersionTags.from_mlflow({"params_total": "lots"})


def test_only_a_hub_outage_is_retried() -> None:
    assert is_transient(TransientHubError("hf:org/name: the hub could not be reached"))
    assert not is_transient(RegistryError("hf:org/name: repo not found"))
