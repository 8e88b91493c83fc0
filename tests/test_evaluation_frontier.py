"""Frontier dialects, pacing and failures that count: the rules alone, then the runner and the CLI against a
local double of a hosted API (`tests/frontier_double.py`) that enforces the providers' documented rules."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from frontier_double import DoubleModel, FrontierDouble
from testing_utils import files_holding

from tasks.evaluate.failures import fix_for, group_errors
from tasks.evaluate.frontier_rules import RuleEntry, adapt_to_error, apply_rules, is_reasoning
from tasks.evaluate.pacing import RateLimiter, go_duration_s, retry_after_s
from tasks.evaluate.runner import ExampleRecord, run_suite
from tasks.evaluate.suite import SuiteError, load
from tasks.evaluate.targets import load_dialects, resolve_target

LLMHOST = Path(sys.executable).with_name("llmhost")
KEY_ENV = "LLMHOST_TEST_DOUBLE_KEY"
SECRET = "sk-double-secret-3f9a1c"
DIALECTS = load_dialects()


def entry(model: str, **kw: object) -> RuleEntry:
    return RuleEntry(base_url="https://api.openai.com/v1", model=model, **kw)  # type: ignore[arg-type]


SUITE_PARAMS = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8, "seed": 0, "presence_penalty": 0.5}


# ------------------------------------------------------------------------------------------------ rules


def test_reasoning_model_gets_max_completion_tokens_and_no_refused_sampling() -> None:
    kwargs, ignored, dropped, changed = apply_rules(
        entry("gpt-5-mini", reasoning=True), SUITE_PARAMS, DIALECTS, reasoning_effort="low"
    )
    assert "max_tokens" not in kwargs and kwargs["max_completion_tokens"] == 8 + 25000
    assert "temperature" not in kwargs and "presence_penalty" not in kwargs
    assert kwargs["top_p"] == 1.0 and kwargs["seed"] == 0 and kwargs["reasoning_effort"] == "low"
    assert any(d.startswith("temperature=0.0") for d in dropped)
    assert any(d.startswith("presence_penalty") for d in dropped)
    assert any("max_completion_tokens" in c for c in changed) and ignored == []


def test_anthropic_ignores_seed_and_effort_and_caps_temperature() -> None:
    e = RuleEntry(base_url="https://api.anthropic.com/v1/", model="claude-sonnet-4-20250514")
    kwargs, ignored, dropped, changed = apply_rules(
        e, {**SUITE_PARAMS, "temperature": 1.7}, DIALECTS, reasoning_effort="high"
    )
    assert kwargs["temperature"] == 1 and kwargs["max_tokens"] == 8
    assert {i.split(":")[0] for i in ignored} == {"seed", "presence_penalty", "reasoning_effort"}
    assert changed == ["temperature: 1.7 capped at 1 (anthropic)"] and dropped == []


@pytest.mark.parametrize(
    ("model", "reasoning"),
    [("o1", True), ("o3-mini", True), ("o4-mini-2025-04-16", True), ("gpt-5", True), ("gpt-5.1", True),
     ("gpt-5-mini", True), ("openai/o3", True), ("gpt-4o-mini", False), ("gpt-4.1", False),
     ("gpt-oss-120b", False), ("llama-3.3-70b", False), ("claude-opus-4", False)],
)
def test_unknown_entries_are_recognised_by_model_name(model: str, reasoning: bool) -> None:
    assert is_reasoning(entry(model)) is reasoning
    assert is_reasoning(entry(model, reasoning=not reasoning)) is (not reasoning)  # the flag wins


def test_params_overrides_apply_before_the_rules() -> None:
    e = entry("o3", params={"seed": None, "max_tokens": 256, "max_completion_tokens": None})
    kwargs, _, dropped, _ = apply_rules(e, SUITE_PARAMS, DIALECTS)
    assert "seed" not in kwargs and kwargs["max_completion_tokens"] == 256 + 25000
    assert "seed: removed by `params` in frontiers.yaml" in dropped
    # An explicit max_completion_tokens stands: no headroom added.
    kwargs, *_ = apply_rules(entry("o3", params={"max_completion_tokens": 64}), SUITE_PARAMS, DIALECTS)
    assert kwargs["max_completion_tokens"] == 64 and "max_tokens" not in kwargs


def test_reasoning_effort_is_not_sent_to_other_models() -> None:
    kwargs, _, dropped, _ = apply_rules(entry("gpt-4o"), SUITE_PARAMS, DIALECTS, reasoning_effort="low")
    assert "reasoning_effort" not in kwargs and dropped == ["reasoning_effort=low: gpt-4o is not a reasoning model"]


def test_adapt_to_error_renames_or_leaves_out_once() -> None:
    out, note = adapt_to_error({"max_tokens": 8, "seed": 0}, "unsupported_parameter", "max_tokens", 100)  # type: ignore[misc]
    assert out == {"max_completion_tokens": 108, "seed": 0} and "max_completion_tokens=108" in note
    out, _ = adapt_to_error({"temperature": 0.0}, "unsupported_value", "temperature")  # type: ignore[misc]
    assert out == {}
    assert adapt_to_error({"temperature": 0.0}, "invalid_value", "temperature") is None
    assert adapt_to_error({}, "unsupported_parameter", "max_tokens") is None


def test_catalog_errors_name_field_value_and_fix(tmp_path: Path) -> None:
    bad = tmp_path / "frontiers.yaml"
    bad.write_text(
        "frontiers:\n  x:\n    base_url: http://h/v1\n    model: m\n    api_key_env: K\n    price_in_per_1m: 1\n"
        "    price_out_per_1m: 1\n    prices_as_of: 2026-12-02\n    reasoning: maybe\n"
    )
    with pytest.raises(SuiteError, match=r"frontiers\.x\.reasoning.*maybe"):
        resolve_target("frontier:x", frontiers_file=bad)
    bad.write_text("dialects:\n  openai:\n    source: u\n    as_of: 2026-12-02\n    refuse: temperature\n")
    with pytest.raises(SuiteError, match=r"dialects\.openai\.refuse"):
        load_dialects(bad)


def test_shipped_dialects_cite_their_source_and_date() -> None:
    for name in ("openai", "openai-reasoning", "anthropic"):
        d = DIALECTS[name]
        assert d.source.startswith("https://") and str(d.as_of) == "2026-12-02"


# ------------------------------------------------------------------------------------------------ pacing


def test_retry_hints_in_every_documented_form() -> None:
    now = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_s({"Retry-After": "2"}) == 2.0
    assert retry_after_s({"retry-after": format_datetime(now + timedelta(seconds=7), usegmt=True)}, now) == 7.0
    assert retry_after_s({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}) == 60.0  # capped
    assert retry_after_s({"x-ratelimit-reset-tokens": "120ms"}) == pytest.approx(0.12)
    assert retry_after_s({"retry-after": "soon"}) is None and retry_after_s({}) is None
    assert go_duration_s("1h2m3.5s") == 3723.5 and go_duration_s("6m0s") == 360 and go_duration_s("6 min") is None


def test_limiter_paces_requests_and_tokens_and_holds_after_429() -> None:
    async def run(limiter: RateLimiter, n: int, tokens: int = 0) -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(limiter.acquire(tokens) for _ in range(n)))
        return time.monotonic() - t0

    assert asyncio.run(run(RateLimiter(rpm=600, burst_s=0), 6)) == pytest.approx(0.5, abs=0.15)  # 10/s
    assert asyncio.run(run(RateLimiter(tpm=6000, burst_s=0), 3, tokens=50)) == pytest.approx(1.0, abs=0.15)
    unlimited = RateLimiter()
    assert not unlimited.active and asyncio.run(run(unlimited, 50)) < 0.1
    unlimited.pause(0.4)
    assert asyncio.run(run(unlimited, 3)) == pytest.approx(0.4, abs=0.15)


# ------------------------------------------------------------------------------------------------ failures


def test_errors_group_by_class_with_the_fix() -> None:
    recs = [
        ExampleRecord(index=i, id=str(i), ok=False, error="HTTP 400: Unsupported parameter: 'max_tokens'",
                      error_class="400 unsupported_parameter max_tokens")
        for i in range(3)
    ] + [ExampleRecord(index=3, id="3", ok=False, error="HTTP 503", error_class="503 server error"),
         ExampleRecord(index=4, id="4", ok=True)]
    groups = group_errors(recs, target="frontier:gpt-5-mini", key_env="OPENAI_API_KEY")
    assert [(g.error_class, g.count) for g in groups] == [("400 unsupported_parameter max_tokens", 3),
                                                          ("503 server error", 1)]
    assert groups[0].line() == (
        "3x 400 unsupported_parameter max_tokens: this model takes max_completion_tokens; "
        "set `reasoning: true` for gpt-5-mini in frontiers.yaml"
    )
    assert "OPENAI_API_KEY" in fix_for("401 invalid_api_key", target="frontier:x", key_env="OPENAI_API_KEY")
    assert "rpm" in fix_for("429 rate limited", target="frontier:x")


# ------------------------------------------------------------------------------------------------ the double


def _answer(messages: list[dict[str, str]]) -> str:
    text = messages[-1]["content"].lower()
    return next((q for q in ("billing", "shipping", "returns", "technical", "account", "security", "sales")
                 if q[:4] in text), "feedback")


@pytest.fixture()
def double() -> Iterator[FrontierDouble]:
    models = {
        "gpt-5-mini": DoubleModel(reasoning=True, answer=_answer),
        "o3-strict": DoubleModel(reasoning=True, answer=_answer),
        "gpt-4o-mini": DoubleModel(answer=_answer),
        "no-usage": DoubleModel(usage=False),
        "flaky": DoubleModel(fail_status=503),
        "thinker": DoubleModel(reasoning=True, reasoning_tokens=200),
    }
    with FrontierDouble(models, api_key=SECRET) as d:
        yield d


def catalog(double: FrontierDouble, path: Path) -> Path:
    """A user's frontiers.yaml: entries on the double, priced like the real models."""
    def e(name: str, model: str, extra: str = "") -> str:
        return (f"  {name}:\n    base_url: {double.base_url}\n    model: {model}\n    api_key_env: {KEY_ENV}\n"
                "    price_in_per_1m: 0.25\n    price_out_per_1m: 2.0\n    prices_as_of: 2026-12-02\n" + extra)

    path.write_text("frontiers:\n" + "".join([
        e("reasoner", "gpt-5-mini", "    reasoning: true\n    reasoning_effort: minimal\n"),
        e("unflagged", "o3-strict", "    reasoning: false\n"),  # wrong flag: the runner must adapt
        e("chat", "gpt-4o-mini"),
        e("nousage", "no-usage"),
        e("flaky", "flaky"),
        e("thinker", "thinker", "    reasoning: true\n    params: {max_completion_tokens: 64}\n"),
        e("paced", "gpt-4o-mini", "    rpm: 240\n"),
    ]))
    return path


@pytest.fixture()
def frontiers(double: FrontierDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return catalog(double, tmp_path / "frontiers.yaml")


def run(spec: str, frontiers: Path, limit: int = 6, concurrency: int = 3):  # -> RunResult
    return run_suite(load("demo_routing", limit=limit), resolve_target(spec, frontiers_file=frontiers),
                     concurrency=concurrency, progress=False)


def test_reasoning_frontier_completes_every_example(double: FrontierDouble, frontiers: Path) -> None:
    res = run("frontier:reasoner", frontiers)
    assert res.stats.n_ok == res.stats.n == 6 and not res.failed
    sent = double.sent("gpt-5-mini")
    assert len(sent) == 6 and all(r.status == 200 for r in sent)
    for r in sent:
        assert "max_tokens" not in r.body and "temperature" not in r.body
        assert r.body["max_completion_tokens"] == 8 + 25000 and r.body["reasoning_effort"] == "minimal"
    assert all(rec.tokens_reasoning == 8 for rec in res.records)
    assert res.stats.tokens_reasoning_total == 48
    assert any(d.startswith("temperature=0.0") for d in res.request_rules["dropped"])
    assert res.columns["valid_label"].values.mean() == 1.0  # answers were scored, not counted as failures


def test_unflagged_reasoning_model_is_adapted_once_and_reported(double: FrontierDouble, frontiers: Path) -> None:
    res = run("frontier:unflagged", frontiers, limit=8, concurrency=2)
    assert res.stats.n_ok == 8, [r.error for r in res.records if not r.ok]
    adapted = res.request_rules["adapted"]
    assert any(a.startswith("max_tokens=8 -> max_completion_tokens=25008") for a in adapted)
    assert any(a.startswith("temperature=0.0") for a in adapted)
    rejected = double.sent("o3-strict", status=400)
    assert 2 <= len(rejected) <= 4  # the first requests in flight, not every example
    assert all("max_tokens" not in r.body and r.body["max_completion_tokens"] == 8 + 25000
               for r in double.sent("o3-strict", status=200))


def test_429_retry_after_is_honoured(double: FrontierDouble, frontiers: Path) -> None:
    double.rate_limits = [{"retry-after": "1"}]
    res = run("frontier:chat", frontiers, limit=3, concurrency=1)
    assert res.stats.n_ok == 3 and res.stats.retries["429"] == 1
    sent = double.sent("gpt-4o-mini")
    assert [r.status for r in sent[:2]] == [429, 200]
    assert sent[1].at - sent[0].at >= 0.95


def test_client_side_rpm_paces_the_run(double: FrontierDouble, frontiers: Path) -> None:
    res = run("frontier:paced", frontiers, limit=8, concurrency=8)  # 240 rpm = 4/s, 1 s burst
    at = [r.at for r in double.sent("gpt-4o-mini")]
    assert res.stats.n_ok == 8 and at[-1] - at[0] >= 0.5 and res.stats.rate_limit_wait_s > 0


def test_missing_usage_is_an_answer_with_unknown_tokens(double: FrontierDouble, frontiers: Path) -> None:
    res = run("frontier:nousage", frontiers, limit=4)
    assert res.stats.n_ok == 4 and res.stats.n_no_usage == 4 and res.stats.tokens_out_mean is None


def test_exhausted_reasoning_budget_is_flagged_not_scored_wrong(double: FrontierDouble, frontiers: Path) -> None:
    res = run("frontier:thinker", frontiers, limit=3)
    assert res.stats.n_failed == 3 and res.failed
    [group] = res.error_groups
    assert group.error_class == "reasoning budget exhausted" and "raise generation.max_tokens" in group.fix


# ------------------------------------------------------------------------------------------------ the CLI


def llmhost(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`llmhost` as a user runs it, with its own state dir (frontiers.yaml, MLflow) and the key exported."""
    env = {**os.environ, "LLMHOST_HOME": str(home), KEY_ENV: SECRET,
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
           "MLFLOW_REGISTRY_URI": f"sqlite:///{home / 'mlflow.db'}"}
    return subprocess.run([str(LLMHOST), *args], capture_output=True, text=True, timeout=600, env=env)


def _no_secret_under(home: Path) -> None:
    files = [p for p in home.rglob("*") if p.is_file()]
    assert files_holding(files, {"the API key": SECRET.encode()}) == []


def test_cli_run_against_reasoning_frontier_and_json(double: FrontierDouble, tmp_path: Path) -> None:
    import mlflow

    catalog(double, tmp_path / "frontiers.yaml")
    double.rate_limits = [{"retry-after-ms": "300"}]
    proc = llmhost(tmp_path, "eval", "run", "demo_routing", "--target", "frontier:reasoner", "--limit", "8",
                   "--no-genai", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["schema"] == "llmhost.eval.run/1" and out["status"] == "ok" and out["errors"] == []
    assert out["stats"]["n_ok"] == 8 and out["stats"]["retries"]["429"] == 1
    assert "max_completion_tokens" in out["request"]["sent"] and "max_tokens" not in out["request"]["sent"]
    assert "accuracy" in out["scores"] and out["max_error_rate"] == 0.05
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["params_sent"].startswith("max_completion_tokens")
    assert "temperature=0.0" in run.data.params["params_dropped"]
    _no_secret_under(tmp_path)


def test_cli_run_with_failures_above_max_error_rate_fails(double: FrontierDouble, tmp_path: Path) -> None:
    import mlflow

    catalog(double, tmp_path / "frontiers.yaml")
    proc = llmhost(tmp_path, "eval", "run", "demo_routing", "--target", "frontier:flaky", "--limit", "4",
                   "--concurrency", "4", "--no-traces")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4x 503 server error: the server kept failing" in " ".join(proc.stdout.split())
    [err] = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]  # one line
    assert err.startswith("Error: FAILED: 4/4 examples got no answer (error rate 1.00 > max_error_rate 0.05)")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eval/demo_routing")
    assert exp is not None
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["llmhost.run_failed"] == "true"
    _no_secret_under(tmp_path)


def test_cli_compare_with_a_failed_side_cannot_tell(double: FrontierDouble, tmp_path: Path) -> None:
    catalog(double, tmp_path / "frontiers.yaml")
    proc = llmhost(tmp_path, "eval", "compare", "demo_routing", "--targets", "frontier:chat", "frontier:flaky",
                   "--limit", "4", "--no-traces", "--json")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Error: verdict CANNOT TELL: run failed: frontier:flaky: 4/4 examples failed" in proc.stderr
    out = json.loads(proc.stdout)
    assert out["schema"] == "llmhost.eval.compare/1" and out["verdict"] == "CANNOT TELL" and not out["ready"]
    assert out["baseline"]["status"] == "failed" and out["candidate"]["status"] == "ok"
    assert out["baseline"]["errors"][0]["error_class"] == "503 server error"
    assert "CANNOT TELL" in out["report"] and "## Errors" in out["report"]


def test_compare_with_saturation_prices_a_replica_kept_full(double: FrontierDouble, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, llmhost_home: Path):
    """`saturation` loads the self-hosted side at the endpoint's max_num_seqs and prices that throughput too.

    The double serves both sides here (a `url:` target is self-hosted); its catalog entry is a drop-in in
    $LLMHOST_HOME/frontiers.d/, as the demo writes its stand-in's.
    """
    import mlflow

    from tasks.evaluate.report import verdict_lines
    from tasks.evaluate.running import compare_targets

    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.setenv("LLMHOST_TARGET_API_KEY", SECRET)  # the `url:` side's key, on the same double
    drop = llmhost_home / "frontiers.d" / "test-saturation.yaml"
    drop.parent.mkdir(exist_ok=True)
    catalog(double, drop)
    try:
        out = compare_targets(load("demo_routing", limit=8), f"url:{double.base_url}#gpt-4o-mini", "frontier:chat",
                              tier="cpu", concurrency=2, saturation=6, progress=False, trace=False, genai=False,
                              out_dir=tmp_path)
    finally:
        drop.unlink()
    cost = out.comparison.cost
    assert cost is not None and cost.saturation is not None and cost.saturation.concurrency == 6
    assert cost.self_per_1m_out_saturation is not None and cost.self_per_1m_out_eval is not None
    run = mlflow.get_run(out.run_ids["comparison"])
    assert run.data.params["saturation_concurrency"] == "6"
    assert run.data.params["saturation_target"] == f"url:{double.base_url}#gpt-4o-mini"
    # Four waves of six, unscored: beyond the eval's 8 examples a side (and the warm-ups).
    assert run.data.metrics["saturation_requests"] == 24 and run.data.metrics["saturation_failed"] == 0
    assert run.data.metrics["self_usd_per_1m_out_saturation"] == pytest.approx(cost.self_per_1m_out_saturation)
    assert len(double.sent("gpt-4o-mini", status=200)) == (2 + 8) + 8 + (6 + 24)
    assert any("kept full (6 concurrent)" in ln for ln in verdict_lines("the url side", out.comparison))
