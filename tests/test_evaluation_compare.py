"""Bootstrap on known cases, cost arithmetic, and the verdict on constructed result sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from tasks.core.errors import EvalError
from tasks.evaluate.compare import (
    bootstrap_ci,
    compare,
    frontier_cost,
    paired_bootstrap,
    self_hosted_cost,
    tier_hourly_price,
)
from tasks.evaluate.metrics import ModelOutput, ScoreColumn, score_all
from tasks.evaluate.report import plot, render_markdown, render_run_markdown
from tasks.evaluate.runner import ExampleRecord, RunResult, compute_stats
from tasks.evaluate.suite import LoadedSuite, load
from tasks.evaluate.targets import Pricing, ResolvedTarget, TargetInfo

LABELS = ["billing", "shipping", "returns", "technical"]


# ---------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_constant_is_degenerate() -> None:
    iv = bootstrap_ci(ScoreColumn("x", np.full(50, 0.7)))
    assert (iv.value, iv.low, iv.high, iv.n) == (
        pytest.approx(0.7),
        pytest.approx(0.7),
        pytest.approx(0.7),
        50,
    )


def test_bootstrap_bernoulli_matches_normal_approximation() -> None:
    # 200 of 400 correct: the bootstrap SE is sqrt(p(1-p)/n) = 0.025, so the 95% interval is 0.5 +- 0.049.
    values = np.array([1.0, 0.0] * 200)
    iv = bootstrap_ci(ScoreColumn("acc", values), n_boot=4000)
    assert iv.value == 0.5
    assert iv.low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert iv.high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)


def test_paired_bootstrap_uses_the_pairing() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 300)
    shifted = ScoreColumn("s", base + 0.1)
    d = paired_bootstrap(shifted, ScoreColumn("s", base))
    # a constant per-example shift has no paired variance at all
    assert (d.value, d.low, d.high) == (pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.1))
    noisy = ScoreColumn("s", base + 0.02 + rng.normal(0, 0.01, 300))
    d2 = paired_bootstrap(noisy, ScoreColumn("s", base))
    a, b = bootstrap_ci(noisy), bootstrap_ci(ScoreColumn("s", base))
    assert d2.low > 0  # detected although the two unpaired intervals overlap
    assert a.low < b.high


def test_nan_examples_are_left_out_of_means() -> None:
    iv = bootstrap_ci(ScoreColumn("j", np.array([1.0, np.nan, 0.0, 1.0])))
    assert iv.n == 3 and iv.value == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------- cost


def test_cost_arithmetic() -> None:
    recs = [
        ExampleRecord(index=i, id=str(i), ok=True, latency_s=0.1, ttft_s=0.05, tokens_in=50, tokens_out=2)
        for i in range(100)
    ]
    stats = compute_stats(recs, wall_s=10.0, concurrency=8, counts=Counter())
    assert stats.throughput_rps == 10.0
    pricing = Pricing(price_in_per_1m=0.15, price_out_per_1m=0.60, prices_as_of=date(2025, 8, 1))
    # (50 * 0.15 + 2 * 0.60) / 1e6 per request -> x 1000
    assert frontier_cost(stats, pricing).per_1k_requests_usd == pytest.approx(0.0087)
    sh = self_hosted_cost(stats, hourly_usd=1.80, tier="l4-24gb-x1")
    # $1.80/h / (10 req/s * 3600) * 1000
    assert sh.per_1k_requests_usd == pytest.approx(0.05)
    assert any("concurrency (8)" in a for a in sh.assumptions)


def test_tier_price_from_catalog(tmp_path: Path) -> None:
    p = tmp_path / "tiers.yaml"
    p.write_text("tiers:\n  - name: cpu-local\n    price_per_hour: 0.10\n")
    assert tier_hourly_price("cpu-local", p) == 0.10
    with pytest.raises(EvalError, match="known tiers"):
        tier_hourly_price("h100", p)
    # the sizing catalog shipped in tasks/size/tiers.yaml
    assert tier_hourly_price("cpu") == 0.08925  # aws:c7i.large, no longer $0 (issue 15)
    assert tier_hourly_price("t4-16gb-x1") > 0


# ---------------------------------------------------------------------------------------------- verdict


@pytest.fixture(scope="module")
def routing(tmp_path_factory: pytest.TempPathFactory) -> LoadedSuite:
    d = tmp_path_factory.mktemp("suite")
    rows = [{"id": f"r{i}", "message": f"m{i}", "queue": LABELS[i % 4]} for i in range(200)]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "routing.yaml").write_text(
        f"""
name: routing
version: "1"
data: {{path: rows.jsonl}}
prompt: {{messages: [{{role: user, content: "{{{{ message }}}}"}}]}}
metrics:
  - {{kind: classification, reference: queue, labels: {LABELS}}}
thresholds: {{primary: accuracy, tolerance: 0.03, max_latency_p95_ratio: 1.5, max_cost_ratio: 1.0}}
"""
    )
    return load(d / "routing.yaml")


def make_run(
    loaded: LoadedSuite,
    texts: list[str],
    *,
    spec: str = "url:http://127.0.0.1:1/v1#cand",
    latency: float = 0.1,
    wall_s: float = 20.0,
    pricing: Pricing | None = None,
) -> RunResult:
    target = ResolvedTarget(
        spec=spec, kind="frontier" if pricing else "url", base_url="http://x/v1", model="m", pricing=pricing
    )
    outputs = [ModelOutput(text=t) for t in texts]
    records = [
        ExampleRecord(
            index=i,
            id=ex.id,
            ok=True,
            output=t,
            latency_s=latency,
            ttft_s=latency / 2,
            tokens_in=50,
            tokens_out=2,
        )
        for i, (ex, t) in enumerate(zip(loaded.examples, texts, strict=True))
    ]
    per_ex, cols = score_all(loaded.suite, outputs, [ex.row for ex in loaded.examples])
    for r, s in zip(records, per_ex, strict=True):
        r.scores = s
    res = RunResult(
        suite_name=loaded.suite.name,
        suite_version=loaded.suite.version,
        suite_hash=loaded.content_hash,
        target=target,
        info=TargetInfo(revision_hash="r"),
        records=records,
        stats=compute_stats(records, wall_s, 8, Counter()),
        generation=loaded.suite.generation,
    )
    res._columns = cols
    return res


PRICES = Pricing(price_in_per_1m=0.15, price_out_per_1m=0.60, prices_as_of=date(2025, 8, 1))


def answers(loaded: LoadedSuite, wrong: int = 0, invalid: int = 0) -> list[str]:
    """Gold answers; the first `wrong` get another label and the next `invalid` get no label at all."""
    out = []
    for i, ex in enumerate(loaded.examples):
        gold = ex.row["queue"]
        if i < wrong:
            out.append(LABELS[(LABELS.index(gold) + 1) % 4])
        elif i < wrong + invalid:
            out.append("sorry , i can not help")
        else:
            out.append(gold)
    return out


def test_ready_when_quality_latency_and_cost_hold(routing: LoadedSuite) -> None:
    base = make_run(routing, answers(routing, wrong=20), spec="frontier:f", pricing=PRICES)
    cand = make_run(routing, answers(routing, wrong=20))
    cmp = compare(
        routing.suite, cand, base, hourly_price=0.10
    )  # $0.10/h at 10 req/s: $0.0028 per 1k < $0.0087
    assert cmp.verdict.ready and cmp.verdict.headline == "READY TO REPLACE"
    assert cmp.verdict.recommendation is None
    acc = cmp.metrics[0]
    assert (acc.wins, acc.ties, acc.losses) == (0, 200, 0)
    md = render_markdown(cmp)
    assert "**Verdict: READY TO REPLACE**" in md and "assumes one replica" in md


def test_not_yet_fine_tune_when_format_is_missed(routing: LoadedSuite) -> None:
    base = make_run(routing, answers(routing), spec="frontier:f", pricing=PRICES)
    cand = make_run(routing, answers(routing, invalid=60))
    cmp = compare(routing.suite, cand, base, hourly_price=0.10)
    assert not cmp.verdict.ready and cmp.verdict.recommendation == "fine-tune"
    assert any("valid_label 0.70 vs 1.00" in r for r in cmp.verdict.reasons)
    assert (cmp.metrics[0].wins, cmp.metrics[0].losses) == (0, 60)


def test_not_yet_higher_precision_for_a_small_gap_on_fp8(routing: LoadedSuite) -> None:
    base = make_run(routing, answers(routing), spec="frontier:f", pricing=PRICES)
    cand = make_run(routing, answers(routing, wrong=10))
    cmp = compare(routing.suite, cand, base, hourly_price=0.10, candidate_precision="fp8")
    assert cmp.metrics[0].diff.value == pytest.approx(-0.05)
    assert cmp.metrics[0].diff.low < -0.03
    assert not cmp.verdict.ready and cmp.verdict.recommendation == "higher precision"
    # the same numbers at full precision on a narrow task point to a fine-tune
    assert compare(routing.suite, cand, base, hourly_price=0.10).verdict.recommendation == "fine-tune"


def test_not_yet_larger_model_on_open_ended_task(tmp_path: Path) -> None:
    rows = [{"id": f"q{i}", "q": "?", "ref": f"the answer is number {i} of many"} for i in range(60)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "qa.yaml").write_text(
        'name: qa\nversion: "1"\ndata: {path: rows.jsonl}\n'
        'prompt: {messages: [{role: user, content: "{{ q }}"}]}\n'
        "metrics: [{kind: rouge_l, reference: ref}]\nthresholds: {tolerance: 0.05}\n"
    )
    qa = load(tmp_path / "qa.yaml")
    base = make_run(qa, [r["ref"] for r in rows], spec="frontier:f", pricing=PRICES)
    cand = make_run(qa, [f"maybe {i}" for i in range(60)])
    cmp = compare(qa.suite, cand, base, hourly_price=0.10)
    assert not cmp.verdict.ready and cmp.verdict.recommendation == "larger model"


def test_not_yet_on_latency_or_unknown_cost(routing: LoadedSuite) -> None:
    base = make_run(routing, answers(routing), spec="frontier:f", pricing=PRICES, latency=0.1)
    slow = make_run(routing, answers(routing), latency=0.5)
    v = compare(routing.suite, slow, base, hourly_price=0.10).verdict
    assert not v.ready and v.recommendation is None
    assert any(r.startswith("latency p95 ratio") and "5.00x" in r for r in v.reasons)
    fast = make_run(routing, answers(routing))
    v2 = compare(routing.suite, fast, base).verdict  # no hourly price for the self-hosted side
    assert not v2.ready and any("pass --tier or --hourly-price" in r for r in v2.reasons)


def test_plot_writes_png(routing: LoadedSuite, tmp_path: Path) -> None:
    base = make_run(routing, answers(routing), spec="frontier:f", pricing=PRICES)
    cmp = compare(routing.suite, make_run(routing, answers(routing, wrong=30)), base, hourly_price=0.1)
    png = plot(cmp, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_keeps_paired_draws_for_other_levels(routing: LoadedSuite) -> None:
    base = make_run(routing, answers(routing), spec="frontier:f", pricing=PRICES)
    cmp = compare(routing.suite, make_run(routing, answers(routing, wrong=30)), base, hourly_price=0.1)
    acc = cmp.metrics[0]
    assert acc.diff_at(0.95) == acc.diff
    narrow, wide = acc.diff_at(0.6), acc.diff_at(0.99)
    assert wide.low <= acc.diff.low <= narrow.low < narrow.high <= acc.diff.high <= wide.high
    # the draws stay in memory only: comparison.json is unchanged
    assert "diff_draws" not in json.dumps(cmp.model_dump(mode="json"))
    reread = type(cmp).model_validate(cmp.model_dump(mode="json")).metrics[0]
    assert reread.diff_at(0.95) == acc.diff
    with pytest.raises(EvalError, match=r"confidence=0.8: .*re-run the comparison"):
        reread.diff_at(0.8)


def test_single_target_report(routing: LoadedSuite) -> None:
    md = render_run_markdown(routing.suite, "url:x#m", make_run(routing, answers(routing, wrong=20)))
    assert md.startswith("# routing v1 @ `url:x#m`\n")
    assert "| accuracy | 0.900 | [" in md and "- 200/200 ok; latency p50 0.100s" in md


# ---------------------------------------------------------------------------------------------- MLflow logging

_LOG_SIDE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import mlflow
from tests.test_evaluation_compare import answers, make_run
from tasks.core.tracking import configure_mlflow, experiment_scope, get_or_create_experiment
from tasks.evaluate.mlflow_logging import log_genai_assessments, log_result, log_traces
from tasks.evaluate.suite import LoadedSuite, load

full = load(Path(sys.argv[2]))
loaded = LoadedSuite(suite=full.suite, examples=full.examples[:120])
res = make_run(loaded, answers(loaded, wrong=20))
configure_mlflow()
exp = get_or_create_experiment("eval/routing")
with experiment_scope(exp), mlflow.start_run() as run:
    log_traces(res, loaded)
    log_result(res, loaded)
    assessed = log_genai_assessments(res, loaded)
traces = mlflow.search_traces(locations=[exp], run_id=run.info.run_id, return_type="list")
per_trace = sorted({len([a for a in t.info.assessments if a.name == "accuracy"]) for t in traces})
right = sum(a.feedback.value for t in traces for a in t.info.assessments if a.name == "accuracy")
print(json.dumps({"traces": len(traces), "ids": len({t.info.trace_id for t in traces}), "assessed": assessed,
                  "per_trace": per_trace, "right": right}))
"""


def test_every_example_gets_a_trace_and_its_scores_past_the_export_queue(
    routing: LoadedSuite, tmp_path: Path
) -> None:
    # MLflow's async trace export drops what overflows its queue: 120 examples against a queue of 60 tasks lost
    # spans and scores before log_traces drained it. Its own process, so the size takes effect.
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "LLMHOST_HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_REGISTRY_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE": "60",
    }
    env.pop("MLFLOW_GENAI_EVAL_SCORER_RATE_LIMIT", None)
    suite_path = routing.suite.source
    assert suite_path is not None
    out = subprocess.run(
        [sys.executable, "-c", _LOG_SIDE, str(root), str(suite_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"traces": 120, "ids": 120, "assessed": 120, "per_trace": [1], "right": 100}


def _stored(run_id: str, exp_id: str) -> dict[str, object]:
    """What a side's run holds, without what differs between two recordings of one result (times, ids)."""
    import mlflow

    from tasks.evaluate.mlflow_logging import EXAMPLES_TABLE

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    timing = {"trace_logging_s", "genai_assessment_s", "record_s"}
    traces = mlflow.search_traces(locations=[exp_id], run_id=run_id, return_type="list", max_results=500)
    table = client.load_table(exp_id, EXAMPLES_TABLE, run_ids=[run_id])
    by_trace = {t.info.trace_id: t for t in traces}
    assert set(table["trace_id"]) == set(by_trace), "the table names each example's own trace"
    return {
        "status": run.info.status,
        "params": run.data.params,
        "metrics": {k: v for k, v in run.data.metrics.items() if k not in timing},
        "tags": {k: v for k, v in run.data.tags.items() if k.startswith("llmhost.")},
        "table": table.drop(columns=["trace_id"]).astype(object).where(table.notna(), None).to_dict(orient="list"),
        "traces": sorted(
            (
                t.data.spans[0].inputs["example_id"],
                [(s.name, s.span_type, json.dumps(s.inputs), json.dumps(s.outputs)) for s in t.data.spans],
                sorted((a.name, a.feedback.value if a.feedback else None) for a in t.info.assessments),
                t.info.trace_metadata.get("mlflow.source.name"),
            )
            for t in traces
        ),
    }


def test_a_side_recorded_by_a_child_process_stores_what_one_recorded_here_stores(routing: LoadedSuite) -> None:
    """`compare_targets` records the candidate's run in a child process while it records the baseline's (on two
    cores), or both in a child it does not wait for (the lifecycle, beside its fine-tune). The same results
    recorded every way store the same runs: params, metrics, tags, table, traces with their spans and assessments;
    the parent's records get their trace ids from the child; each run ends FINISHED, or FAILED where too many
    examples failed."""
    import mlflow

    from tasks.core.tracking import configure_mlflow, experiment_scope, get_or_create_experiment
    from tasks.evaluate.recording import SideRecord, record_sides, wait_for_background_records
    from tasks.evaluate.running import _side_run

    loaded = LoadedSuite(suite=routing.suite, examples=routing.examples[:40])
    configure_mlflow()
    exp = get_or_create_experiment("eval/routing-recording")

    def sides() -> list[SideRecord]:
        good = make_run(loaded, answers(loaded, wrong=6), spec="url:http://127.0.0.1:1/v1#cand")
        bad = make_run(loaded, answers(loaded, wrong=3), spec="url:http://127.0.0.1:2/v1#base")
        for r in bad.records[:5]:  # 5/40 failed, over the suite's 5% limit: the run ends FAILED
            r.ok, r.error, r.error_class = False, "Connection refused", "connection"
        bad.stats = compute_stats(bad.records, 20.0, 8, Counter())
        with experiment_scope(exp):
            return [SideRecord(loaded, res, _side_run(loaded, res.target, exp, None), exp, hourly_price=0.1,
                               tier="cpu") for res in (good, bad)]

    with experiment_scope(exp):
        inline, parallel, background = sides(), sides(), sides()
        everything = inline + parallel + background
        assert {mlflow.MlflowClient().get_run(s.run_id).info.status for s in everything} == {"RUNNING"}
        record_sides(background, "background")  # returns at once: the child has yet to import MLflow
        assert not any(r.trace_id for s in background for r in s.result.records)
        record_sides(inline, "inline")
        record_sides(parallel, "parallel")
        wait_for_background_records()
    for other in (parallel, background):
        for a, b in zip(inline, other, strict=True):
            assert all(r.trace_id for r in b.result.records), "the child's trace ids reach the parent's records"
            here, child = _stored(a.run_id, exp), _stored(b.run_id, exp)
            # The bootstrap's last bit may differ between processes (its sums' order), nothing more.
            assert child.pop("metrics") == pytest.approx(here.pop("metrics"), rel=1e-12, abs=1e-12)
            assert child == here
        assert [_stored(s.run_id, exp)["status"] for s in other] == ["FINISHED", "FAILED"]
        assert "record_s" in mlflow.MlflowClient().get_run(other[0].run_id).data.metrics


def test_a_child_that_cannot_record_fails_its_run_and_the_comparison_after_the_other_side_is_in(
    routing: LoadedSuite,
) -> None:
    import mlflow

    from tasks.core.tracking import configure_mlflow, experiment_scope, get_or_create_experiment
    from tasks.evaluate.recording import SideRecord, record_sides
    from tasks.evaluate.running import _side_run

    loaded = LoadedSuite(suite=routing.suite, examples=routing.examples[:10])
    configure_mlflow()
    exp = get_or_create_experiment("eval/routing-recording")
    client = mlflow.MlflowClient()
    with experiment_scope(exp):
        res = [make_run(loaded, answers(loaded)) for _ in range(2)]
        sides = [SideRecord(loaded, r, _side_run(loaded, r.target, exp, None), exp) for r in res]
        client.delete_run(sides[0].run_id)  # the child's resume is refused: the run is deleted
        with pytest.raises(EvalError, match=rf"recording the eval run {sides[0].run_id} .* failed in its child "
                                            r"process: .*deleted"):
            record_sides(sides, "parallel")
    assert client.get_run(sides[1].run_id).info.status == "FINISHED"
    assert client.get_run(sides[1].run_id).data.metrics["n_examples"] == 10


def test_a_flow_that_fails_stops_its_background_recorder_and_ends_its_runs_failed(routing: LoadedSuite) -> None:
    import mlflow

    from tasks.core.tracking import configure_mlflow, experiment_scope, get_or_create_experiment
    from tasks.evaluate import recording
    from tasks.evaluate.recording import SideRecord, record_sides, stop_background_records
    from tasks.evaluate.running import _side_run

    loaded = LoadedSuite(suite=routing.suite, examples=routing.examples[:10])
    configure_mlflow()
    exp = get_or_create_experiment("eval/routing-recording")
    with experiment_scope(exp):
        res = [make_run(loaded, answers(loaded)) for _ in range(2)]
        sides = [SideRecord(loaded, r, _side_run(loaded, r.target, exp, None), exp) for r in res]
        record_sides(sides, "background")
        (child,) = recording._background
        stop_background_records()  # the lifecycle's `finally`; the child is still importing MLflow here
    assert child.proc.returncode is not None
    assert [mlflow.MlflowClient().get_run(s.run_id).info.status for s in sides] == ["FAILED", "FAILED"]


def test_a_cost_check_on_a_cpu_tier_prints_costs_that_differ_apart(routing: LoadedSuite) -> None:
    # Two self-hosted runs on the demo's CPU tier price, the candidate 4% slower: about $0.0003 per 1k requests
    # each, which at 4 decimals printed as "$0.0003 vs $0.0003 (limit 1x = $0.0003)" beside a failed check.
    base = make_run(routing, answers(routing), wall_s=2.42)
    cand = make_run(routing, answers(routing), wall_s=2.5)
    cmp = compare(routing.suite, cand, base, hourly_price=0.08925)
    assert not cmp.verdict.ready
    [reason] = [r for r in cmp.verdict.reasons if r.startswith("cost per 1k requests")]
    assert reason == "cost per 1k requests: $0.000310 vs $0.000300 (limit 1x = $0.000300)", reason
    assert "**$0.000310**" in render_markdown(cmp)
