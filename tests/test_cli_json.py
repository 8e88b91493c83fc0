"""The CLI as scripts and newcomers read it: `--json` schemas, 80-column tables, sizing registry refs, help order.

Everything runs against the session's real sqlite MLflow and store (no server): commands are called through
`flows.cli.main` as the console script calls it, and their output is parsed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks import store

WIDE_URL = "http://gpu-node-17.internal.example.com:8001/v1"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from flows.cli import main

    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    rc, out, err = run([*argv, "--json"], capsys)
    assert rc == 0, err
    return json.loads(out)


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    rc, out, _ = run([*argv, "--help"], capsys)
    assert rc == 0
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())  # rich boxes and wraps the help


@pytest.fixture(scope="module")
def demo_version(demo_model_dir: Path) -> str:
    """The demo model registered as `size-demo` (reused by content hash when it already is)."""
    from tasks.register import register_model

    return register_model(f"path:{demo_model_dir}", "size-demo").version


@pytest.fixture()
def columns80(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")


# ---------------------------------------------------------------------------------------------- size


def test_size_accepts_a_version_and_an_alias(demo_version: str, demo_model_dir: Path, capsys):
    from tasks.core.tracking import mlflow_client

    local = run_json(["size", str(demo_model_dir)], capsys)
    by_version = run_json(["size", f"models:/size-demo/{demo_version}"], capsys)
    mlflow_client().set_registered_model_alias("size-demo", "champion", demo_version)
    by_alias = run_json(["size", "models:/size-demo@champion", "--max-model-len", "512"], capsys)
    for est in (by_version, by_alias):
        assert est["fits"] is True and est["params_total"] == local["params_total"]
        assert est["weight_bytes"] == local["weight_bytes"] and est["kv_bytes_per_token"] == local["kv_bytes_per_token"]
    assert by_version["recommendation"]["max_model_len"] == local["recommendation"]["max_model_len"]
    assert by_alias["recommendation"]["max_model_len"] == 512
    rc, out, _ = run(["size", f"models:/size-demo/{demo_version}"], capsys)
    assert rc == 0 and f"size-demo/{demo_version}" in out  # the explanation names the version


def test_size_of_an_adapter_version_sizes_its_base(demo_version: str, demo_model_dir: Path, capsys):
    from tasks.core.tracking import mlflow_client
    from tasks.register import VersionTags

    client = mlflow_client()
    base = client.get_model_version("size-demo", demo_version)
    tags = VersionTags(adapter=True, base_model=f"models:/size-demo/{demo_version}", lora_rank=8)
    # Only the tags matter to sizing: the adapter's own files are never read.
    adapter = client.create_model_version("size-demo", source=base.source, tags=tags.to_mlflow())
    client.set_registered_model_alias("size-demo", "challenger", adapter.version)
    est = run_json(["size", "models:/size-demo@challenger"], capsys)
    assert est["params_total"] == run_json(["size", str(demo_model_dir)], capsys)["params_total"]
    rc, out, _ = run(["size", f"models:/size-demo/{adapter.version}"], capsys)
    assert rc == 0 and f"size-demo/{demo_version}" in out


@pytest.mark.parametrize(
    ("ref", "says"),
    [
        ("models:/no-such-model/1", "model_ref='models:/no-such-model/1' does not exist"),
        ("models:/size-demo@nobody", "model_ref='models:/size-demo@nobody' does not exist"),
        ("models:/", "use models:/NAME@ALIAS or models:/NAME/VERSION"),
        ("runs:/0123/model", "register it first"),
    ],
)
def test_size_bad_refs_are_one_line(demo_version: str, ref: str, says: str, capsys):
    rc, _, err = run(["size", ref], capsys)
    assert rc == 1 and says in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------- --json


@pytest.fixture(scope="module")
def operated() -> dict[str, str]:
    """An endpoint with two wide replicas, a key with access, and usage: what the listing commands show."""
    from tasks.store import audit

    ep = "support-router-for-the-long-team-name"
    store.attach_server(ep, base_url=WIDE_URL, served_model="qwen2.5-7b-instruct-awq", adapters={"tuned": "t-v3"},
                        owner="someone-with-a-long-name", description="routes support tickets", actor="test")
    store.attach_server(ep, base_url=WIDE_URL.replace("17", "18"), served_model="qwen2.5-7b-instruct-awq",
                        adapters={"tuned": "t-v3"}, actor="test")
    created = store.create_key("a-user-with-a-very-long-name", team="platform-engineering",
                               description="the nightly batch job of the platform team", actor="test")
    store.grant(ep, user="a-user-with-a-very-long-name", actor="test")
    now = store.utcnow()
    store.add_usage([{"ts": now, "key_prefix": created.info.prefix, "user": created.info.user,
                      "team": created.info.team, "endpoint": ep, "route": "chat", "status_code": code,
                      "prompt_tokens": 1_234_567, "completion_tokens": 89, "latency_ms": 12.5, "ttft_ms": None}
                     for code in (200, 200, 500)])
    audit.record("test", "note.long", "subject:" + "x" * 80, after={"why": "y" * 200}, endpoint=ep)
    return {"endpoint": ep, "raw": created.raw, "prefix": created.info.prefix}


def test_usage_json(operated: dict[str, str], capsys):
    rows = run_json(["usage", "--endpoint", operated["endpoint"], "--since", "1h"], capsys)
    assert len(rows) == 1
    assert list(rows[0]) == ["endpoint", "user", "team", "key_prefix", "requests", "errors", "prompt_tokens",
                             "completion_tokens", "avg_latency_ms", "avg_ttft_ms", "cost_usd", "reasoning_tokens",
                             "fallback_requests"]
    r = rows[0]
    assert (r["user"], r["key_prefix"], r["requests"], r["errors"]) == (
        "a-user-with-a-very-long-name", operated["prefix"], 3, 1)
    assert r["prompt_tokens"] == 3 * 1_234_567 and r["avg_ttft_ms"] is None
    assert (r["cost_usd"], r["fallback_requests"]) == (0, 0)  # self-hosted: no API spend, nothing fell back


def test_endpoints_list_and_show_json(operated: dict[str, str], capsys):
    listed = {e["name"]: e for e in run_json(["endpoints", "list"], capsys)}
    e = listed[operated["endpoint"]]
    assert list(e) == ["name", "status", "owner", "description", "live_revision", "served_model_name",
                       "model_version", "replicas"]
    assert e["owner"] == "someone-with-a-long-name" and len(e["live_revision"]) == 12
    assert [r["url"] for r in e["replicas"]] == [WIDE_URL, WIDE_URL.replace("17", "18")]
    assert set(e["replicas"][0]) == {"name", "state", "url", "target", "kv_cache_tokens"}
    revisions = run_json(["endpoints", "show", operated["endpoint"]], capsys)
    live = [r for r in revisions if r["live"]]
    assert len(live) == 1 and live[0]["revision"] == e["live_revision"]
    assert live[0]["adapters"] == {"tuned": "t-v3"} and len(live[0]["replicas"]) == 2
    assert set(live[0]["replicas"][0]) == {"name", "state", "url", "kv_cache_tokens", "pid", "log_path", "gpus"}
    assert "facts" in live[0]  # sizing, placement, swap: what the revision ran with beyond its spec


def test_keys_list_json_never_holds_a_secret(operated: dict[str, str], capsys):
    from flows.cli import main

    capsys.readouterr()
    assert main(["keys", "list", "--json"]) == 0
    text = capsys.readouterr().out
    keys = {k["prefix"]: k for k in json.loads(text)}
    k = keys[operated["prefix"]]
    assert list(k) == ["prefix", "user", "team", "created_at", "expires_at", "revoked_at", "status", "description"]
    assert k["status"] == "active" and k["team"] == "platform-engineering" and k["expires_at"] is None
    secret = operated["raw"].rsplit("-", 1)[-1]
    assert secret not in text and "hash" not in text and "salt" not in text


def test_access_list_and_audit_log_json(operated: dict[str, str], capsys):
    grants = run_json(["access", "list", operated["endpoint"]], capsys)
    assert grants == [{"endpoint": operated["endpoint"], "kind": "user", "name": "a-user-with-a-very-long-name"}]
    entries = run_json(["audit", "log", "--endpoint", operated["endpoint"]], capsys)
    assert list(entries[-1]) == ["seq", "ts", "actor", "action", "subject", "endpoint", "before", "after", "links"]
    assert entries[-1]["after"] == {"why": "y" * 200} and entries[-1]["subject"].endswith("x" * 80)
    key_entries = run_json(["audit", "log", "--action", "key."], capsys)
    assert key_entries and operated["raw"].rsplit("-", 1)[-1] not in json.dumps(key_entries)


def test_models_list_and_show_json(demo_version: str, capsys):
    models = {m["name"]: m for m in run_json(["models", "list"], capsys)}
    assert list(models["size-demo"]) == ["name", "latest_version", "aliases", "tags"]
    versions = run_json(["models", "show", "size-demo"], capsys)
    assert versions[0]["model_uri"] == f"models:/size-demo/{demo_version}"
    assert list(versions[0]) == ["name", "version", "created", "model_uri", "source", "run_id", "tags"]


@pytest.mark.parametrize(
    ("argv", "keys"),
    [
        (["usage"], "USAGE_KEYS"),
        (["endpoints", "list"], "ENDPOINT_KEYS"),
        (["endpoints", "show"], "REVISION_KEYS"),
        (["keys", "list"], "KEY_KEYS"),
        (["access", "list"], "GRANT_KEYS"),
        (["audit", "log"], "AUDIT_KEYS"),
        (["models", "list"], "SUMMARY_KEYS"),
        (["models", "show"], "REGISTERED_KEYS"),
        (["size"], "ESTIMATE_KEYS"),
    ],
)
def test_json_schema_is_in_the_help(argv: list[str], keys: str, capsys):
    import importlib

    module = {"usage": "usage", "endpoints": "endpoints", "keys": "keys", "access": "access", "audit": "audit",
              "models": "register", "size": "size"}[argv[0]]
    names = getattr(importlib.import_module(f"flows.commands.{module}"), keys)
    text = help_text(argv, capsys)
    assert "--json" in text and ", ".join(names) in text.replace("- ", "-")


def test_size_json_keys_match_the_estimate_model():
    from flows.commands.size import ESTIMATE_KEYS, RECOMMENDATION_KEYS
    from tasks.size import MemoryEstimate, Recommendation

    assert tuple(MemoryEstimate.model_fields) == ESTIMATE_KEYS
    assert tuple(Recommendation.model_fields) == RECOMMENDATION_KEYS


# ---------------------------------------------------------------------------------------------- 80 columns


def test_tables_fit_80_columns(operated: dict[str, str], demo_version: str, columns80, capsys):
    for argv in (["endpoints", "list"], ["endpoints", "show", operated["endpoint"]], ["usage"], ["keys", "list"],
                 ["access", "list"], ["audit", "log"], ["models", "list"]):
        rc, out, err = run(argv, capsys)
        assert rc == 0, err
        wide = [line for line in out.splitlines() if len(line) > 80]
        assert not wide, (argv, wide)


def test_endpoints_list_keeps_each_replica_on_one_line(operated: dict[str, str], columns80, capsys):
    rc, out, _ = run(["endpoints", "list"], capsys)
    assert rc == 0
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if "gpu-node-17" in line)
    assert "up" in lines[first].split("gpu-node-17", 1)[1]  # its state on the same line
    assert "gpu-node-18" in lines[first + 1] and "up" in lines[first + 1]
    assert lines[first].startswith("support-route")  # the endpoint on the replica's line, shortened
    usage_out = run(["usage"], capsys)[1]
    # tokens shortened, the user cut with an ellipsis, the key prefix whole
    assert "a-user-…" in usage_out and operated["prefix"] in usage_out and "3.7M/267" in usage_out


# ---------------------------------------------------------------------------------------------- help


def test_help_lists_the_lifecycle_first(capsys):
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    listed = [m.group(1) for m in re.finditer(r"^│ ([a-z-]+)  ", out, flags=re.M)]
    expected = ["register", "size", "deploy", "eval", "finetune", "promote", "endpoints", "keys", "access", "usage",
                "audit", "gateway", "dashboard", "lifecycle", "demo"]
    assert [name for name in listed if name in expected] == expected, listed
    assert out.index("Lifecycle") < out.index("Operations")


def _leaf_commands() -> list[list[str]]:
    import typer.main

    from flows.cli import app

    out: list[list[str]] = []

    def walk(cmd, path: list[str]) -> None:  # type: ignore[no-untyped-def]
        if hasattr(cmd, "commands"):
            for name in cmd.list_commands(None):
                walk(cmd.commands[name], [*path, name])
        else:
            out.append(path)

    walk(typer.main.get_command(app), [])
    return out


def test_every_command_has_one_example(capsys):
    leaves = _leaf_commands()
    assert len(leaves) > 30
    missing = []
    for path in leaves:
        text = help_text(path, capsys)
        if text.count("Example: llmhost ") != 1:
            missing.append(" ".join(path))
        else:
            example = text.split("Example: llmhost ", 1)[1].split()
            assert example[: len(path)] == path, (path, example)  # the example runs this very command
    assert not missing, missing


def test_adapters_list_and_dashboard_admins_json(capsys):
    from gateway.dashboard.auth import set_admin

    store.attach_server("adapters-json", base_url="http://127.0.0.1:9/v1", served_model="base",
                        adapters={"tuned": "base-tuned"}, actor="test")
    listed = run_json(["adapters", "list", "adapters-json"], capsys)
    assert listed["adapters"] == {"tuned": "base-tuned"}
    assert listed["replicas"] == [{"url": "http://127.0.0.1:9/v1", "served": None, "error": "ConnectError"}]
    set_admin("json-admin", True, actor="test")
    assert "json-admin" in run_json(["dashboard", "admins"], capsys)


def test_a_command_that_exits_non_zero_gives_the_shell_its_code(capsys: pytest.CaptureFixture[str]):
    """`raise typer.Exit(1)` inside a command reaches the shell as 1 (click returns it, in non-standalone mode)."""
    store.upsert_endpoint("never-routed", actor="test")
    rc, out, _ = run(["audit", "at", "now", "--endpoint", "never-routed"], capsys)
    assert rc == 1 and "nothing was routed" in out
