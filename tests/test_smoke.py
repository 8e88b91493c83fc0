"""Smoke checks: the pure parts, a dead address, and a real vLLM replica (the session fixture).

Tool-call conformance against a replica started with a tool parser (pass, and a wrong parser failing with the
hint that names the right one) is exercised in tests/test_endpoints.py, where deploys start such replicas.
"""

from __future__ import annotations

import json

import pytest

from tasks.serving.local import free_port
from tasks.smoke import (
    DEFAULT_TOOL,
    SmokeCheck,
    SmokeConfig,
    SmokeReport,
    _validate_args,
    run_smoke,
    suggest_parser,
)


def test_markup_in_content_names_the_parser_that_reads_it():
    assert suggest_parser('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>') == "hermes"
    assert suggest_parser('[TOOL_CALLS][{"name": "f", "arguments": {}}]') == "mistral"
    assert suggest_parser('<|python_tag|>{"name": "f", "parameters": {}}') == "llama3_json"
    assert suggest_parser("the weather in paris is sunny .") is None


def test_arguments_must_be_json_matching_the_tool_schema():
    tools = [DEFAULT_TOOL]
    assert _validate_args(json.dumps({"city": "paris"}), tools, "get_weather") is None
    assert "not JSON" in _validate_args('{"city": paris}', tools, "get_weather")
    assert "do not match the schema" in _validate_args("{}", tools, "get_weather")
    assert "do not match the schema" in _validate_args('{"city": 3}', tools, "get_weather")
    assert "unknown function" in _validate_args("{}", tools, "get_time")


def test_an_unreachable_replica_fails_every_check_with_evidence_and_never_raises():
    report = run_smoke(f"http://127.0.0.1:{free_port()}/v1", "demo", SmokeConfig(timeout_s=3))
    assert not report.passed
    assert [c.name for c in report.failures()] == ["health", "models", "chat", "stream", "tool_calls"]
    assert all("Connect" in c.detail for c in report.checks), [c.detail for c in report.checks]
    md = report.markdown()
    assert md.count("**FAIL**") == 5 and "| check | result |" in md


def test_report_markdown_escapes_table_pipes():
    report = SmokeReport(
        base_url="http://x/v1",
        model="m",
        checks=[SmokeCheck(name="chat", passed=True, detail="a | b", seconds=0.1)],
    )
    assert "a / b" in report.markdown() and report.passed


@pytest.mark.slow
def test_real_replica_passes_health_models_chat_and_stream(vllm_server):
    report = run_smoke(vllm_server.base_url, "demo", SmokeConfig(), tool_calling=False)
    assert report.passed, report.markdown()
    checks = {c.name: c for c in report.checks}
    assert checks["chat"].evidence["usage"]["completion_tokens"] > 0
    assert checks["stream"].evidence["finish"] in ("stop", "length")
    assert "demo" in checks["models"].evidence["models"]
    # The wrong served name is caught by the model list check, not only by a failing request.
    wrong = run_smoke(vllm_server.base_url, "not-demo", SmokeConfig(), tool_calling=False)
    assert "'not-demo' missing" in next(c for c in wrong.checks if c.name == "models").detail


@pytest.mark.slow
def test_tools_against_a_replica_without_a_tool_parser_fail_with_vllms_reason(vllm_server):
    # The session fixture runs without --enable-auto-tool-choice: vLLM refuses tool_choice=auto.
    report = run_smoke(vllm_server.base_url, "demo", SmokeConfig(), tool_calling=True)
    tool_check = next(c for c in report.checks if c.name == "tool_calls")
    assert not tool_check.passed and "enable-auto-tool-choice" in tool_check.detail, tool_check.detail
