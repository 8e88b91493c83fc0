"""The README's CLI table and `llmhost` code lines, run as written (placeholders filled in).

Every `llmhost ...` command the README shows is either run for real below (RUN, against the session's sqlite
MLflow and store, in the order a newcomer would), or, when it needs a live vLLM server, a gateway process, a
training run or the hub, checked to parse through its `--help` (HELP_ONLY, with the reason). A command added
to the README without a place in either fails `test_every_readme_command_is_covered`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.core.settings import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"

# Commands that need something no CPU test session has at hand; only their parsing is checked.
HELP_ONLY = {
    "deploy": "starts vLLM processes (tests/test_endpoints.py deploys for real, marked slow)",
    "rollback": "redeploys through vLLM",
    "gateway": "a long-running server (tests/test_gateway.py runs it in a thread)",
    "eval run": "calls a live endpoint or frontier API",
    "eval compare": "calls two live targets",
    "finetune": "trains for minutes (tests/test_finetune.py, marked slow)",
    "adapters load": "loads into a running vLLM replica",
    "adapters unload": "unloads from a running vLLM replica",
    "lifecycle": "the whole lifecycle: vLLM, training and evaluation (make demo)",
}


def readme_commands() -> list[str]:
    """Each `llmhost ...` of the CLI table (backticked) and of the README's bash blocks, as written."""
    text = README.read_text()
    section = text.split("## The CLI", 1)[1].split("\n## ", 1)[0]
    found = [c.strip() for c in re.findall(r"`(llmhost [^`]+)`", section)]
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"^(\w+=\S*\s+)+", "", line.split("#", 1)[0].strip())  # drop VAR=value prefixes
            if line.startswith("llmhost "):
                found.append(line)
    return found


def command_paths(command: str) -> list[list[str]]:
    """`llmhost keys create|list|revoke` -> [[keys, create], [keys, list], [keys, revoke]]: the subcommands named."""
    import typer.main

    from flows.cli import app

    root = typer.main.get_command(app)
    paths: list[list[str]] = [[]]
    node = {(): root}
    for word in command.split()[1:]:
        grown = []
        for path in paths:
            cmd = node[tuple(path)]
            subs = getattr(cmd, "commands", None)
            names = [w for w in word.split("|") if subs and w in subs]
            if not names:
                grown.append(path)
                continue
            for name in names:
                node[(*path, name)] = subs[name]
                grown.append([*path, name])
        if grown == paths:
            break  # the rest are arguments and options
        paths = grown
    return paths


def all_paths() -> list[str]:
    return sorted({" ".join(p) for c in readme_commands() for p in command_paths(c)})


def test_readme_has_commands():
    paths = all_paths()
    assert {"register", "size", "deploy", "keys create", "usage", "audit log"} <= set(paths), paths
    assert "" in paths  # `llmhost --help` itself


@pytest.mark.parametrize("path", all_paths())
def test_readme_command_parses(path: str, capsys: pytest.CaptureFixture[str]):
    from flows.cli import main

    assert main([*path.split(), "--help"]) == 0
    assert "Example: llmhost" in " ".join(capsys.readouterr().out.split())


# The concrete run: one argv per README command, in lifecycle order. `{model}` etc. are filled in below.
# The model is registered as `readme-demo` (and deployments/demo-ray.yaml rendered for it), so that promoting it
# here leaves the `demo` model's aliases, which other tests of the session read, alone.
RUN = [
    ("", ["--help"]),
    ("register", ["register", "path:{model}", "--name", "readme-demo", "--json"]),
    ("models list", ["models", "list", "--json"]),
    ("models show", ["models", "show", "readme-demo", "--json"]),
    ("models resolve", ["models", "resolve", "models:/readme-demo/1"]),
    ("size", ["size", "models:/readme-demo/1", "--json"]),
    ("size", ["size", "--config", "{model}/config.json", "--json"]),
    ("promote", ["promote", "readme-demo", "1", "--force"]),
    ("size", ["size", "models:/readme-demo@champion", "--json"]),
    ("render k8s", ["render", "k8s", "{tmp}/demo-ray.yaml", "--out", "{tmp}/k8s"]),
    ("endpoints attach", ["endpoints", "attach", "readme-ep", "--base-url", "http://127.0.0.1:9/v1",
                          "--served-model", "demo"]),
    ("endpoints list", ["endpoints", "list", "--json"]),
    ("endpoints show", ["endpoints", "show", "readme-ep", "--json"]),
    ("keys create", ["keys", "create", "--user", "readme-user", "--team", "readme-team", "--expires", "30d"]),
    ("keys list", ["keys", "list", "--json"]),
    ("access grant", ["access", "grant", "readme-ep", "--team", "readme-team"]),
    ("access revoke", ["access", "revoke", "readme-ep", "--team", "readme-team"]),
    ("usage", ["usage", "--endpoint", "readme-ep", "--json"]),
    ("keys revoke", ["keys", "revoke", "{prefix}"]),
    ("audit at", ["audit", "at", "now", "--endpoint", "readme-ep"]),
    ("endpoints stop", ["endpoints", "stop", "readme-ep"]),
    ("data add", ["data", "add", "{tmp}/rows.jsonl", "--dataset", "readme-data"]),
    ("audit log", ["audit", "log", "--endpoint", "readme-ep", "--json"]),
    ("audit verify", ["audit", "verify"]),
]


def test_every_readme_command_is_covered():
    ran = {path for path, _ in RUN}
    missing = [p for p in all_paths() if p not in ran and p not in HELP_ONLY]
    assert not missing, f"README commands neither run nor help-checked here: {missing}"


def test_readme_commands_run_as_written(demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from flows.cli import main

    (tmp_path / "rows.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "my invoice is wrong"}, {"role": "assistant", "content": "billing"}]}) + "\n")
    import yaml

    ray_spec = yaml.safe_load((PROJECT_ROOT / "deployments" / "demo-ray.yaml").read_text())
    ray_spec.update(name="readme-ray", model="models:/readme-demo@champion")
    (tmp_path / "demo-ray.yaml").write_text(yaml.safe_dump(ray_spec))
    fill = {"model": str(demo_model_dir), "tmp": str(tmp_path), "prefix": ""}
    outputs: dict[str, list[str]] = {}
    for path, argv in RUN:
        args = [a.format(**fill) for a in argv]
        capsys.readouterr()
        rc = main(args)
        out = capsys.readouterr()
        assert rc == 0, f"llmhost {' '.join(args)} -> {rc}: {out.err}"
        outputs.setdefault(path, []).append(out.out)
        if path == "keys create":
            fill["prefix"] = out.out.strip().split("-")[1]

    assert outputs[""][0].index("Lifecycle") < outputs[""][0].index("Operations")
    registered = json.loads(outputs["register"][0])
    assert registered["model_uri"] == "models:/readme-demo/1" and registered["tags"]["vllm_supported"] == "true"
    assert "readme-demo" in {m["name"] for m in json.loads(outputs["models list"][0])}
    assert Path(outputs["models resolve"][0].strip(), "config.json").is_file()
    by_ref, by_config, by_alias = (json.loads(o) for o in outputs["size"])
    assert by_ref["params_total"] == by_config["params_total"] == by_alias["params_total"] > 0
    assert by_ref["fits"] and by_ref["recommendation"]["vllm_args"]
    assert "champion" in outputs["promote"][0]
    assert (tmp_path / "k8s" / "rayservice.yaml").is_file()
    listed = {e["name"]: e for e in json.loads(outputs["endpoints list"][0])}
    assert listed["readme-ep"]["replicas"][0]["url"] == "http://127.0.0.1:9/v1"
    assert [r["live"] for r in json.loads(outputs["endpoints show"][0])] == [True]
    keys = {k["prefix"]: k for k in json.loads(outputs["keys list"][0])}
    assert keys[fill["prefix"]]["user"] == "readme-user" and keys[fill["prefix"]]["expires_at"]
    assert json.loads(outputs["usage"][0]) == []
    assert "stopped" in outputs["endpoints stop"][0]
    actions = [e["action"] for e in json.loads(outputs["audit log"][0])]
    assert actions[0].startswith("endpoint") and "endpoint.stop" in actions
    assert "OK" in outputs["audit verify"][0]


def test_gpu_walkthrough_spec_and_finetune_config_match_its_commands():
    """The GPU walkthrough's spec file and inline fine-tune config load, and the names its commands use are theirs."""
    import yaml

    from tasks.deploy import load_spec
    from tasks.finetune import FinetuneConfig

    text = README.read_text()
    section = text.split("## On a GPU machine", 1)[1].split("\n## ", 1)[0]
    commands = [c for c in readme_commands() if c in section]
    spec_path = "deployments/qwen2.5-7b-instruct.gpu.yaml"
    spec = load_spec(PROJECT_ROOT / spec_path)
    assert spec.hardware == "auto" and spec.vllm.tensor_parallel_size == "auto" and spec.vllm.max_model_len is None
    assert spec.swap == "auto" and spec.model == f"models:/{spec.name}@champion"
    assert f"llmhost deploy {spec_path}" in commands
    assert f"llmhost endpoints show {spec.name}" in commands
    assert any(c.startswith("llmhost register hf:") and f"--name {spec.name}" in c for c in commands)
    assert any(c.startswith(f"llmhost promote {spec.name} 2 --force --spec {spec_path}") for c in commands)
    [block] = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    config = FinetuneConfig.model_validate(yaml.safe_load(block))
    assert config.base_model == f"models:/{spec.name}@champion" and config.gradient_checkpointing
    assert any(c.startswith("llmhost finetune --config qwen-7b-lora.yaml") for c in commands)
