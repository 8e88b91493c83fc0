"""Suites: the shipped ones load; malformed ones fail naming file, line or field, and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.core.errors import EvalError
from tasks.evaluate.suite import SUITES_DIR, SuiteError, load, load_examples, load_suite
from tasks.evaluate.targets import TargetKeyError, load_frontiers, resolve_target

GOOD = """\
name: tiny
version: "1"
data:
  path: rows.jsonl
prompt:
  messages:
    - role: system
      content: "route it"
    - role: user
      content: "{{ message }}"
metrics:
  - kind: classification
    reference: queue
    labels: [billing, shipping]
thresholds:
  pass: {accuracy: 0.5}
"""


def write_suite(tmp_path: Path, text: str, rows: list[dict] | None = None) -> Path:
    p = tmp_path / "suite.yaml"
    p.write_text(text)
    rows = rows if rows is not None else [{"id": "a", "message": "my invoice", "queue": "billing"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("name", ["demo_routing", "demo_tools", "tools_basic", "general_qa"])
def test_shipped_suites_load(name: str) -> None:
    loaded = load(name)
    assert loaded.examples, name
    assert len(loaded.content_hash) == 16


def test_demo_suites_match_the_demo_task() -> None:
    from demo.data import QUEUES, ROUTING_SYSTEM_PROMPT, TOOLS

    routing = load_suite("demo_routing")
    assert routing.prompt.messages[0].content == ROUTING_SYSTEM_PROMPT
    assert routing.metrics[0].labels == list(QUEUES)  # type: ignore[union-attr]
    assert load_suite("demo_tools").prompt.tools == TOOLS


def test_rendering_and_hash(tmp_path: Path) -> None:
    loaded = load(write_suite(tmp_path, GOOD))
    ex = loaded.examples[0]
    assert ex.messages == [
        {"role": "system", "content": "route it"},
        {"role": "user", "content": "my invoice"},
    ]
    assert ex.where.endswith("rows.jsonl:1")
    h1 = loaded.content_hash
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"id": "a", "message": "my receipt", "queue": "billing"}) + "\n"
    )
    assert load(tmp_path / "suite.yaml").content_hash != h1


def test_bad_field_names_file_line_and_problem(tmp_path: Path) -> None:
    bad = GOOD.replace("labels: [billing, shipping]", "labels: [billing]")
    with pytest.raises(SuiteError) as e:
        load_suite(write_suite(tmp_path, bad))
    msg = str(e.value)
    assert f"{tmp_path / 'suite.yaml'}:14" in msg  # the `labels` line
    assert "metrics[0].labels" in msg and "at least 2" in msg


def test_unknown_key_and_metric_kind(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match=r"suite.yaml:6: prompt.mesages=.*Extra inputs"):
        load_suite(write_suite(tmp_path, GOOD.replace("  messages:", "  mesages:")))
    with pytest.raises(SuiteError, match=r"suite.yaml:12: metrics\[0\]=.*tag 'classify'"):
        load_suite(write_suite(tmp_path, GOOD.replace("kind: classification", "kind: classify")))


def test_threshold_on_unknown_score(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match=r"thresholds name 'acc'.*scores are"):
        load_suite(write_suite(tmp_path, GOOD.replace("{accuracy: 0.5}", "{acc: 0.5}")))


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match=r"suite.yaml:\d+: yaml="):
        load_suite(write_suite(tmp_path, GOOD + "  bad: [unclosed\n"))


def test_data_errors_name_the_jsonl_line(tmp_path: Path) -> None:
    p = write_suite(tmp_path, GOOD)
    (tmp_path / "rows.jsonl").write_text('{"id": "a", "message": "x", "queue": "billing"}\n{not json\n')
    with pytest.raises(SuiteError, match=r"rows.jsonl:2: row=.*not JSON"):
        load_examples(load_suite(p))
    (tmp_path / "rows.jsonl").write_text('{"id": "a", "text": "x", "queue": "billing"}\n')
    with pytest.raises(
        SuiteError, match=r"rows.jsonl:1: prompt.messages\[1\].content=.*'message' is undefined"
    ):
        load_examples(load_suite(p))
    (tmp_path / "rows.jsonl").write_text('{"id": "a", "message": "x"}\n')
    with pytest.raises(SuiteError, match=r"rows.jsonl:1: reference='queue'.*no such field"):
        load_examples(load_suite(p))


def test_dataset_reference_loads_offline(tmp_path: Path) -> None:
    text = GOOD.replace("  path: rows.jsonl", "  dataset: json\n  data_files: rows.jsonl\n  split: train")
    loaded = load(write_suite(tmp_path, text))
    assert loaded.examples[0].messages[1]["content"] == "my invoice"


def test_unknown_suite_name_lists_known() -> None:
    with pytest.raises(SuiteError, match="demo_routing"):
        load_suite("no_such_suite")


def test_targets_resolve_and_never_hold_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    t = resolve_target("endpoint:support-router:v2-lora")
    assert (
        t.model == "support-router:v2-lora"
        and t.base_url.endswith("/v1")
        and t.api_key_env == "LLMHOST_API_KEY"
    )
    f = resolve_target("frontier:gpt-4o-mini")
    assert f.pricing is not None and f.pricing.price_in_per_1m == 0.15
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(TargetKeyError, match="OPENAI_API_KEY is not set"):
        f.api_key()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    assert f.api_key() == "sk-secret-value"
    assert "sk-secret" not in f.model_dump_json()
    u = resolve_target("url:http://127.0.0.1:9/v1#demo")
    assert (u.base_url, u.model, u.self_hosted) == ("http://127.0.0.1:9/v1", "demo", True)
    with pytest.raises(EvalError, match="not understood"):
        resolve_target("gpt-4o")
    with pytest.raises(EvalError, match="no frontier named 'nope'"):
        resolve_target("frontier:nope")


def test_gateway_key_is_a_parameter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tasks.evaluate.runner import make_client, run_suite
    from tasks.evaluate.targets import ResolvedTarget

    monkeypatch.delenv("LLMHOST_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    gw = resolve_target("endpoint:support-router")
    assert gw.api_key("k-given") == "k-given"
    assert resolve_target("frontier:gpt-4o-mini").api_key("k-given") == "sk-from-env"  # a frontier's own key
    assert make_client(gw, 5.0, "k-given").api_key == "k-given"
    # the runner uses the given key (it gets as far as the unreachable port) and keeps it off the target
    down = ResolvedTarget(spec="endpoint:x", kind="endpoint", base_url="http://127.0.0.1:9/v1", model="x",
                          api_key_env="LLMHOST_API_KEY")
    loaded = load(write_suite(tmp_path, GOOD))
    with pytest.raises(TargetKeyError, match="LLMHOST_API_KEY is not set"):
        run_suite(loaded, down, progress=False)
    with pytest.raises(EvalError, match="unreachable") as err:
        run_suite(loaded, down, progress=False, api_key="k-given")
    assert not isinstance(err.value, TargetKeyError) and "k-given" not in str(err.value)
    assert "k-given" not in down.model_dump_json()


def test_every_shipped_frontier_has_dated_prices() -> None:
    catalog = load_frontiers()
    assert len(catalog) >= 5
    raw = yaml.safe_load((SUITES_DIR / "frontiers.yaml").read_text())["frontiers"]
    for name, e in catalog.items():
        assert e.prices_as_of and "prices_as_of" in raw[name], name
        assert e.price_out_per_1m >= e.price_in_per_1m > 0, name


def test_user_frontiers_file_extends_catalog(llmhost_home: Path) -> None:
    (llmhost_home / "frontiers.yaml").write_text(
        "frontiers:\n  mine:\n    base_url: http://127.0.0.1:1/v1\n    model: m\n    api_key_env: MY_KEY\n"
        "    price_in_per_1m: 1\n    price_out_per_1m: 2\n    prices_as_of: 2025-01-01\n"
    )
    try:
        assert resolve_target("frontier:mine").model == "m"
    finally:
        (llmhost_home / "frontiers.yaml").unlink()
