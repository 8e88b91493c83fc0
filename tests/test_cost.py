"""$ per 1M output tokens and break-even: the arithmetic by hand, the compare run's metrics and plot in a real
sqlite MLflow, `llmhost cost --json` against a real store, and the dashboard's Usage data."""

from __future__ import annotations

import json
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import pytest

from tasks.evaluate.cost import (
    ApiPrice,
    Throughput,
    TierPrice,
    TokenMix,
    api_bill,
    break_even_tokens_per_day,
    cost_report,
    day_cost,
    self_hosted_per_1m_out,
)
from tasks.evaluate.runner import ExampleRecord, RunResult, compute_stats
from tasks.evaluate.suite import LoadedSuite, load
from tasks.evaluate.targets import Pricing, ResolvedTarget, TargetInfo

API = ApiPrice(name="frontier:gpt-4o-mini", price_in_per_1m=0.15, price_out_per_1m=0.60, as_of=date(2025, 8, 1))
CPU = TierPrice(tier="cpu", hourly_usd=0.08925, instance="aws:c7i.large")


def test_arithmetic_by_hand() -> None:
    # 100 output tokens/s -> 360,000/h; $0.36/h / 360,000 x 1e6 = $1.00 per 1M output tokens.
    assert self_hosted_per_1m_out(0.36, Throughput(output_tokens_per_s=100, concurrency=4)) == pytest.approx(1.0)
    mix = TokenMix(tokens_in=300, tokens_out=100)
    # 300 in + 100 out: (300 x 0.15 + 100 x 0.60) / 1e6 = $0.000105 per request, 400 tokens.
    assert api_bill(API, 300, 100) == pytest.approx(0.000105)
    # A day of the tier: 0.08925 x 24 = $2.142; per token $0.000105 / 400 = $2.625e-7 -> 8,160,000 tokens/day.
    assert break_even_tokens_per_day(0.08925, API, mix) == pytest.approx(8_160_000)
    r = cost_report(CPU, API, mix, Throughput(output_tokens_per_s=50, concurrency=4),
                    Throughput(output_tokens_per_s=200, concurrency=64))
    assert r.self_per_1m_out_eval == pytest.approx(0.08925 / (50 * 3600) * 1e6)  # $0.4958
    assert r.self_per_1m_out_saturation == pytest.approx(0.08925 / (200 * 3600) * 1e6)  # $0.1240
    assert r.api_per_1m_out == pytest.approx(0.60 + 0.15 * 3)  # $1.05: output plus its 3x input
    # Capacity from saturation: 200 out/s x (1 + 3) x 86,400 = 69.12M tokens/day > 8.16M: reachable.
    assert r.capacity_tokens_per_day == pytest.approx(69_120_000) and r.reachable is True
    assert r.metrics()["break_even_tokens_per_day"] == pytest.approx(8_160_000)
    assert any("break-even: 8.2M tokens/day" in ln for ln in r.lines())
    slow = cost_report(CPU, API, mix, Throughput(output_tokens_per_s=5, concurrency=4))
    # 5 x 4 x 86,400 = 1.728M tokens/day < 8.16M: the API is cheaper at any volume.
    assert slow.reachable is False and "cheaper at any volume" in slow.lines()[-1]
    d = day_cost(r, 3_000_000, 1_000_000, replicas=2)
    assert d.api_usd == pytest.approx(0.45 + 0.60) and d.tier_usd == pytest.approx(0.08925 * 48)


def test_every_tier_has_a_sourced_price() -> None:
    from tasks.size.io import load_tiers

    for t in load_tiers():
        assert t.price_per_hour > 0 and t.instance and t.price_source.startswith("https://"), t.name
        assert t.prices_as_of == date(2026, 12, 2), t.name


@pytest.fixture(scope="module")
def routing(tmp_path_factory: pytest.TempPathFactory) -> LoadedSuite:
    d = tmp_path_factory.mktemp("suite")
    rows = [{"id": f"r{i}", "message": f"m{i}", "queue": "billing"} for i in range(20)]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "routing.yaml").write_text(
        """
name: routing
version: "1"
data: {path: rows.jsonl}
prompt: {messages: [{role: user, content: "{{ message }}"}]}
metrics:
  - {kind: classification, reference: queue, labels: [billing, shipping]}
thresholds: {primary: accuracy, tolerance: 0.03}
"""
    )
    return load(d / "routing.yaml")


def make_run(loaded: LoadedSuite, spec: str, pricing: Pricing | None, tokens_in: int, tokens_out: int) -> RunResult:
    from tasks.evaluate.metrics import ModelOutput, score_all

    target = ResolvedTarget(spec=spec, kind="frontier" if pricing else "url", base_url="http://x/v1", model="m",
                            pricing=pricing)
    recs = [ExampleRecord(index=i, id=ex.id, ok=True, output="billing", latency_s=0.1, ttft_s=0.05,
                          tokens_in=tokens_in, tokens_out=tokens_out) for i, ex in enumerate(loaded.examples)]
    per_ex, cols = score_all(loaded.suite, [ModelOutput(text="billing")] * len(recs), [e.row for e in loaded.examples])
    for r, s in zip(recs, per_ex, strict=True):
        r.scores = s
    res = RunResult(suite_name="routing", suite_version="1", suite_hash=loaded.content_hash, target=target,
                    info=TargetInfo(revision_hash="r"), records=recs,
                    stats=compute_stats(recs, 10.0, 4, Counter()), generation=loaded.suite.generation)
    res._columns = cols
    return res


def log_comparison(routing: LoadedSuite, tmp: Path) -> str:
    """A comparison run as `compare_targets` logs it: endpoint:cost-demo vs frontier:gpt-4o-mini on the cpu tier."""
    import mlflow

    from tasks.core.tracking import configure_mlflow
    from tasks.evaluate.compare import compare
    from tasks.evaluate.mlflow_logging import log_cost
    from tasks.evaluate.report import render_markdown

    prices = Pricing(price_in_per_1m=0.15, price_out_per_1m=0.60, prices_as_of=date(2025, 8, 1))
    cand = make_run(routing, "endpoint:cost-demo", None, 60, 20)  # 2 req/s x 20 = 40 output tokens/s
    base = make_run(routing, "frontier:gpt-4o-mini", prices, 300, 100)
    cmp = compare(routing.suite, cand, base, tier="cpu", n_boot=50)
    assert cmp.cost is not None and cmp.cost.eval is not None
    assert cmp.cost.eval.output_tokens_per_s == pytest.approx(40)
    assert cmp.cost.break_even_tokens_per_day == pytest.approx(8_160_000)
    assert "## $ per 1M output tokens and break-even" in render_markdown(cmp)
    configure_mlflow()
    mlflow.set_experiment("eval-cost-test")
    with mlflow.start_run() as run:
        mlflow.set_tags({"llmhost.kind": "eval-comparison"})
        mlflow.log_params({"candidate": "endpoint:cost-demo", "baseline": "frontier:gpt-4o-mini"})
        png = log_cost(cmp, tmp)
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = mlflow.MlflowClient()
    assert "break_even.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    got = client.get_run(run.info.run_id).data.metrics
    assert got["break_even_tokens_per_day"] == pytest.approx(8_160_000)
    assert got["self_usd_per_1m_out_eval"] == pytest.approx(0.08925 / (40 * 3600) * 1e6)
    return run.info.run_id


def test_cost_cli_and_dashboard_show_the_eval_figures(routing: LoadedSuite, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main
    from gateway.dashboard import data
    from tasks import store

    run_id = log_comparison(routing, tmp_path)
    store.upsert_endpoint("cost-demo", actor="test")
    now = store.utcnow()
    store.add_usage([
        {"ts": now - timedelta(hours=1), "endpoint": "cost-demo", "route": "/v1/chat/completions", "stream": False,
         "status_code": 200, "prompt_tokens": 3_000_000, "completion_tokens": 1_000_000, "latency_ms": 10.0},
        {"ts": now - timedelta(hours=30), "endpoint": "cost-demo", "route": "/v1/chat/completions", "stream": False,
         "status_code": 200, "prompt_tokens": 9, "completion_tokens": 9, "latency_ms": 10.0},  # outside 24 h
    ])
    capsys.readouterr()
    assert main(["cost", "cost-demo", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == run_id and out["tier"] == "cpu" and out["frontier"] == "frontier:gpt-4o-mini"
    assert out["break_even_tokens_per_day"] == pytest.approx(8_160_000)
    assert out["last_24h"]["tokens_in"] == 3_000_000 and out["last_24h"]["tokens_out"] == 1_000_000
    assert out["last_24h"]["api_usd"] == pytest.approx(1.05)
    assert out["last_24h"]["tier_usd"] == pytest.approx(0.08925 * 24)

    view = data.usage_cost(store.get_engine(), "cost-demo")
    assert view is not None and view["run_id"] == run_id
    assert view["break_even_tokens_per_day"] == out["break_even_tokens_per_day"]
    assert view["day"] == out["last_24h"]


def test_usage_json_has_api_spend(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main
    from tasks import store

    store.add_usage([{"ts": store.utcnow(), "endpoint": "cost-ext", "route": "/v1/chat/completions",
                      "stream": False, "status_code": 200, "prompt_tokens": 10, "completion_tokens": 5,
                      "latency_ms": 5.0, "provider": "openai", "reasoning_tokens": 3, "cost_usd": 0.25,
                      "fallback": "primary"}])
    capsys.readouterr()
    assert main(["usage", "--endpoint", "cost-ext", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["cost_usd"] == pytest.approx(0.25) and row["reasoning_tokens"] == 3 and row["fallback_requests"] == 1
    assert main(["usage", "--endpoint", "cost-ext"]) == 0
    table = capsys.readouterr().out
    assert "0.25" in table and max(len(line) for line in table.splitlines()) <= 80
