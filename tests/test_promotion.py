"""Promotion policy on constructed comparisons; alias moves, rollback and `audit at` on a real MLflow + store."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from tasks.core.errors import PromotionError
from tasks.evaluate.compare import Comparison, CostEstimate, Interval, MetricComparison, RunSide, Verdict
from tasks.evaluate.runner import RunStats
from tasks.promote import PromotionPolicy, decide


def _iv(v: float, lo: float, hi: float) -> Interval:
    return Interval(value=v, low=lo, high=hi, n=100)


def _cmp(acc_diff: tuple[float, float, float], f1_diff: tuple[float, float, float] = (0.0, -0.01, 0.01),
         p95: tuple[float, float] = (0.2, 0.2)) -> Comparison:
    def side(name: str, lat: float) -> RunSide:
        stats = RunStats(n=100, n_ok=100, n_failed=0, wall_s=10, concurrency=4, throughput_rps=10,
                         latency_p50_s=lat / 2, latency_p95_s=lat)
        return RunSide(target=name, model=name, stats=stats, cost=CostEstimate(per_1k_requests_usd=None, basis="-"))

    metrics = [
        MetricComparison(name="accuracy", candidate=_iv(0.5 + acc_diff[0], 0, 1), baseline=_iv(0.5, 0, 1),
                         diff=_iv(*acc_diff)),
        MetricComparison(name="macro_f1", candidate=_iv(0.5 + f1_diff[0], 0, 1), baseline=_iv(0.5, 0, 1),
                         diff=_iv(*f1_diff)),
    ]
    verdict = Verdict(ready=True, headline="", reasons=[], checks=[])
    return Comparison(suite="demo_routing", suite_version="1", suite_hash="x", candidate=side("cand", p95[0]),
                      baseline=side("champ", p95[1]), metrics=metrics, primary="accuracy", verdict=verdict)


def test_clear_gain_is_promoted():
    d = decide(_cmp((0.6, 0.5, 0.7)), PromotionPolicy())
    assert d.promote, d.summary
    assert "PROMOTE" in d.markdown()


def test_gain_whose_interval_crosses_zero_is_rejected_with_numbers():
    d = decide(_cmp((0.05, -0.02, 0.12)), PromotionPolicy())
    assert not d.promote
    assert "accuracy improves" in d.summary and "-0.020" in d.summary


def test_regression_guard_fires_on_another_metric():
    d = decide(_cmp((0.3, 0.2, 0.4), f1_diff=(-0.2, -0.3, -0.1)), PromotionPolicy(guards={"macro_f1": 0.05}))
    assert not d.promote
    assert [c.name for c in d.checks if not c.ok] == ["macro_f1 guard"]


def test_latency_limit_rejects_a_slow_candidate():
    d = decide(_cmp((0.3, 0.2, 0.4), p95=(1.0, 0.2)), PromotionPolicy(max_latency_p95_ratio=2.0))
    assert not d.promote and "latency p95 ratio" in d.summary


def test_confidence_sets_the_interval_the_decision_is_read_at():
    # A gain of 0.03 whose paired draws have sd 0.02: zero is inside the 95% interval, outside the 80% one.
    draws = np.random.default_rng(0).normal(0.03, 0.02, 4000)
    q95, q80 = np.quantile(draws, [0.025, 0.975]), np.quantile(draws, [0.1, 0.9])
    assert q95[0] < 0 < q80[0]
    cmp = _cmp((0.03, float(q95[0]), float(q95[1])))
    cmp.metrics[0].diff_draws = draws.tolist()
    cmp.metrics[1].diff_draws = np.random.default_rng(1).normal(0.0, 0.005, 4000).tolist()
    assert not decide(cmp, PromotionPolicy()).promote
    d = decide(cmp, PromotionPolicy(confidence=0.8))
    assert d.promote, d.summary
    assert f"80% CI [{q80[0]:+.3f}" in d.checks[0].detail
    # guards are read at the same level: a drop allowed at 80% fires at 99%
    cmp.metrics[1].diff_draws = (draws - 0.05).tolist()
    strict = PromotionPolicy(confidence=0.99, must_improve=[], guards={"macro_f1": 0.05})
    assert decide(cmp, PromotionPolicy(confidence=0.8, must_improve=[], guards={"macro_f1": 0.05})).promote
    assert not decide(cmp, strict).promote


def test_policy_suite_refuses_evidence_from_another_suite():
    from tasks.core.errors import ConfigError

    assert decide(_cmp((0.6, 0.5, 0.7)), PromotionPolicy(suite="demo_routing")).promote
    with pytest.raises(ConfigError, match=r"policy.suite='support_qa' is invalid: the evidence is from suite "
                                          r"'demo_routing'"):
        decide(_cmp((0.6, 0.5, 0.7)), PromotionPolicy(suite="support_qa"))


def test_unknown_policy_metric_names_the_valid_ones():
    from tasks.core.errors import ConfigError

    with pytest.raises(ConfigError, match="accuracy, macro_f1"):
        decide(_cmp((0.3, 0.2, 0.4)), PromotionPolicy(must_improve=["bleu"]))


@pytest.fixture()
def two_versions():
    """A registered model with two versions (same weights registered under two names' sources)."""
    import mlflow

    from tasks.core.tracking import configure_mlflow, mlflow_client

    configure_mlflow()
    client = mlflow_client()
    name = f"promo-{int(time.time() * 1000)}"
    client.create_registered_model(name)
    with mlflow.start_run() as run:
        mlflow.log_text("placeholder", "m/readme.txt")
    v1 = client.create_model_version(name, f"runs:/{run.info.run_id}/m", run_id=run.info.run_id).version
    v2 = client.create_model_version(name, f"runs:/{run.info.run_id}/m", run_id=run.info.run_id).version
    client.set_registered_model_alias(name, "champion", v1)
    return name, str(v1), str(v2)


def test_promote_moves_champion_to_previous_champion_and_rollback_restores(two_versions):
    from tasks.promote import current_aliases, mark_challenger, move_aliases, rollback_aliases
    from tasks.store import audit

    name, v1, v2 = two_versions
    mark_challenger(name, v2, actor="alice")  # under test
    assert current_aliases(name) == {"champion": v1, "challenger": v2}
    rec = move_aliases(name, v2, actor="alice", evidence={"eval_runs": ["run-a", "run-b"]})
    assert rec.previous == v1
    # champion serves, previous-champion is what it replaced; the promoted version is no longer under test
    assert current_aliases(name) == {"champion": v2, "previous-champion": v1}
    entry = audit.entries(action="promote")[-1]
    assert entry.actor == "alice" and "run-a" in entry.links
    assert json.loads(entry.after) == {"champion": v2, "previous-champion": v1}
    with pytest.raises(PromotionError, match="already the champion"):
        move_aliases(name, v2, actor="alice")
    rollback_aliases(name, actor="bob")
    assert current_aliases(name) == {"champion": v1, "previous-champion": v2}
    assert [e.action for e in audit.entries(action="")][-2:] == ["promote", "rollback"]
    assert audit.verify().ok


def test_models_show_prints_each_alias_move_from_the_audit_log(two_versions, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch):
    from flows.cli import main
    from tasks.promote import alias_history, mark_challenger, move_aliases, rollback_aliases

    name, v1, v2 = two_versions
    mark_challenger(name, v2, actor="alice")
    move_aliases(name, v2, actor="alice")
    rollback_aliases(name, actor="bob")
    history = alias_history(name)
    assert [(h.action, h.actor) for h in history] == [("alias.challenger", "alice"), ("promote", "alice"),
                                                      ("rollback", "bob")]
    assert history[1].changes == {"champion": (v1, v2), "challenger": (v2, None), "previous-champion": (None, v1)}
    assert history[2].changes == {"champion": (v2, v1), "previous-champion": (v1, v2)}
    monkeypatch.setenv("COLUMNS", "200")  # the full moves on one line; at 80 columns they are cut with …
    capsys.readouterr()
    assert main(["models", "show", name]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"champion {v1}->{v2}" in out and f"previous-champion -->{v1}" in out and "rollback" in out, out


def test_rollback_without_a_previous_champion_is_refused(two_versions):
    from tasks.promote import rollback_aliases

    name, _, _ = two_versions
    with pytest.raises(PromotionError, match="no previous-champion alias"):
        rollback_aliases(name, actor="bob")


def test_served_at_reads_the_route_and_its_promotion_evidence():
    from tasks import store
    from tasks.promote import served_at
    from tasks.store import audit

    ep = f"ep-{int(time.time() * 1000)}"
    store.upsert_endpoint(ep, actor="ops")
    r1 = store.add_revision(ep, {"v": 1}, served_model_name=ep, model_version="m/1", actor="ops")
    store.set_live_revision(ep, r1.id, actor="ops")
    time.sleep(0.01)
    between = datetime.now(UTC)
    time.sleep(0.01)
    audit.record("ops", "promote", "model:m", before={"champion": "1"}, after={"champion": "2"}, endpoint=ep,
                 eval_runs=["run-x"])
    r2 = store.add_revision(ep, {"v": 2}, served_model_name=ep, model_version="m/2", actor="ops")
    store.set_live_revision(ep, r2.id, actor="ops")
    early = served_at(ep, between)
    assert early.model_version == "m/1" and early.promotion is None
    late = served_at(ep, datetime.now(UTC))
    assert late.model_version == "m/2"
    assert late.promotion and late.promotion["eval_runs"] == ["run-x"]
