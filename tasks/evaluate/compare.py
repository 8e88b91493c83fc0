"""Bootstrap intervals, paired comparison of two runs, cost per 1k requests and the replace verdict."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from tasks.core.errors import EvalError
from tasks.evaluate.cost import (
    ApiPrice,
    CostReport,
    cost_report,
    mix_of,
    throughput_of,
    tier_hourly_price,
    tier_price,
    usd,
)
from tasks.evaluate.failures import ErrorGroup
from tasks.evaluate.metric_specs import (
    Classification,
    ExactMatch,
    FieldF1,
    JsonSchema,
    NormalizedMatch,
    ToolCall,
)
from tasks.evaluate.metrics import ScoreColumn
from tasks.evaluate.runner import RunResult, RunStats
from tasks.evaluate.suite import EvalSuite, Thresholds
from tasks.evaluate.targets import Pricing

N_BOOT = 2000
LEVEL = 0.95  # the level of every interval a comparison reports
REDUCED_PRECISION = {"fp8", "int8", "int4", "awq", "gptq", "bitsandbytes", "nf4", "w8a8", "w4a16"}

# ---------------------------------------------------------------------------------------------- bootstrap


class Interval(BaseModel):
    value: float
    low: float
    high: float
    n: int = Field(description="Examples the value is computed over.")


def _finite_idx(*cols: ScoreColumn) -> np.ndarray:
    """Examples every column scored; corpus-level columns (per-example NaN) do not restrict."""
    mask = np.ones(len(cols[0].values), dtype=bool)
    for c in cols:
        if c.corpus is None:
            mask &= np.isfinite(c.values)
    return np.flatnonzero(mask)


def _nan_interval() -> Interval:
    return Interval(value=float("nan"), low=float("nan"), high=float("nan"), n=0)


def percentile_interval(value: float, stats: np.ndarray, level: float, n: int) -> Interval:
    """The central `level` interval of bootstrap statistics around the observed `value`."""
    a = (1 - level) / 2
    return Interval(value=value, low=float(np.quantile(stats, a)), high=float(np.quantile(stats, 1 - a)), n=n)


def _resample(idx: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))]


def bootstrap_ci(col: ScoreColumn, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> Interval:
    """Percentile bootstrap interval of a score's suite value (mean, macro-F1 or corpus BLEU)."""
    idx = _finite_idx(col)
    if len(idx) == 0:
        return _nan_interval()
    draws = _resample(idx, n_boot, seed)
    corpus = col.corpus
    stats = col.values[draws].mean(axis=1) if corpus is None else np.array([corpus(d) for d in draws])
    return percentile_interval(col.value(idx), stats, level, len(idx))


def paired_draws(
    cand: ScoreColumn, base: ScoreColumn, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, np.ndarray, int]:
    """(observed candidate - baseline, its bootstrap draws, examples), resampling the same examples for both."""
    if len(cand.values) != len(base.values):
        raise EvalError(
            f"score {cand.name}: runs have {len(cand.values)} and {len(base.values)} examples; "
            "compare runs of the same suite version"
        )
    idx = _finite_idx(cand, base)
    if len(idx) == 0:
        return float("nan"), np.empty(0), 0
    draws = _resample(idx, n_boot, seed)
    if cand.corpus is None and base.corpus is None:
        stats = (cand.values[draws] - base.values[draws]).mean(axis=1)
    else:
        stats = np.array([cand.value(d) - base.value(d) for d in draws])
    return cand.value(idx) - base.value(idx), stats, len(idx)


def paired_bootstrap(
    cand: ScoreColumn, base: ScoreColumn, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> Interval:
    """Interval of (candidate - baseline), resampling the same examples for both."""
    value, stats, n = paired_draws(cand, base, n_boot, seed)
    return percentile_interval(value, stats, level, n) if n else _nan_interval()


def summarize(result: RunResult, n_boot: int = N_BOOT) -> dict[str, Interval]:
    """Each score's suite value with its 95% bootstrap interval."""
    return {name: bootstrap_ci(col, n_boot) for name, col in result.columns.items()}


# ---------------------------------------------------------------------------------------------- cost


class CostEstimate(BaseModel):
    per_1k_requests_usd: float | None
    basis: str
    assumptions: list[str] = Field(default_factory=list)


def frontier_cost(stats: RunStats, pricing: Pricing) -> CostEstimate:
    """Cost of 1k requests shaped like this run's, at the listed per-token prices."""
    if stats.tokens_in_mean is None or stats.tokens_out_mean is None:
        return CostEstimate(per_1k_requests_usd=None, basis="the API reported no token usage")
    per_req = (
        stats.tokens_in_mean * pricing.price_in_per_1m + stats.tokens_out_mean * pricing.price_out_per_1m
    ) / 1e6
    return CostEstimate(
        per_1k_requests_usd=per_req * 1000,
        basis=f"{stats.tokens_in_mean:.1f} in + {stats.tokens_out_mean:.1f} out tokens/request at "
        f"${pricing.price_in_per_1m}/${pricing.price_out_per_1m} per 1M (prices of {pricing.prices_as_of})",
        assumptions=["list prices; no batch or cached-input discounts"],
    )


def cost_comparison(
    candidate: RunResult,
    baseline: RunResult,
    hourly_price: float | None,
    tier: str | None,
    saturation: RunStats | None = None,
) -> CostReport | None:
    """$ per 1M output tokens and the break-even volume when one side is self-hosted and the other an API."""
    hosted = [r for r in (candidate, baseline) if r.target.pricing is None]
    apis = [r for r in (candidate, baseline) if r.target.pricing is not None]
    price = tier_price(tier, hourly_price)
    if len(hosted) != 1 or len(apis) != 1 or price is None:
        return None
    h, a = hosted[0], apis[0]
    p = a.target.pricing
    assert p is not None
    api = ApiPrice(name=a.target.label, price_in_per_1m=p.price_in_per_1m, price_out_per_1m=p.price_out_per_1m,
                   as_of=p.prices_as_of)
    # The API bills the tokens it counts; its own usage gives the mix (reasoning tokens are output).
    mix = mix_of(a.stats) or mix_of(h.stats)
    return cost_report(price, api, mix, throughput_of(h.stats), throughput_of(saturation) if saturation else None)


def self_hosted_cost(stats: RunStats, hourly_usd: float, tier: str | None = None) -> CostEstimate:
    """Cost of 1k requests on one replica billed by the hour, at the throughput measured in this run."""
    if stats.throughput_rps <= 0:
        return CostEstimate(per_1k_requests_usd=None, basis="no successful requests, so no throughput")
    per_1k = hourly_usd / 3600 / stats.throughput_rps * 1000
    where = f"tier {tier}" if tier else "the given hourly price"
    return CostEstimate(
        per_1k_requests_usd=per_1k,
        basis=f"${hourly_usd}/h ({where}) / ({stats.throughput_rps:.2f} req/s x 3600) x 1000",
        assumptions=[
            f"one replica, busy all the time at the eval's concurrency ({stats.concurrency}); "
            "lower utilisation costs proportionally more per request",
            "throughput measured during this run with the client on the same machine; "
            "no idle time, storage or egress included",
            f"requests shaped like this suite's ({stats.tokens_in_mean or 0:.0f} in / "
            f"{stats.tokens_out_mean or 0:.0f} out tokens on average)",
        ],
    )


def cost_of(result: RunResult, hourly_price: float | None, tier: str | None) -> CostEstimate:
    """A run's cost per 1k requests: list prices for a frontier, the hourly price (or tier's) otherwise."""
    if result.target.pricing is not None:
        return frontier_cost(result.stats, result.target.pricing)
    if hourly_price is None and tier:
        hourly_price = tier_hourly_price(tier)
    if hourly_price is None:
        return CostEstimate(per_1k_requests_usd=None, basis="no hourly price: pass --tier or --hourly-price")
    return self_hosted_cost(result.stats, hourly_price, tier)


# ---------------------------------------------------------------------------------------------- verdict


Recommendation = Literal["fine-tune", "higher precision", "larger model"]


class MetricComparison(BaseModel):
    name: str
    candidate: Interval
    baseline: Interval
    diff: Interval = Field(description="candidate - baseline, paired bootstrap.")
    wins: int | None = None
    ties: int | None = None
    losses: int | None = None
    format_score: bool = False
    diff_draws: list[float] = Field(
        default_factory=list,
        exclude=True,
        repr=False,
        description="The paired bootstrap's draws of `diff`, for an interval at another level; not serialized.",
    )

    def diff_at(self, level: float) -> Interval:
        """`diff` as an interval at `level`: the same paired bootstrap draws, other percentiles."""
        if self.diff.n == 0 or math.isclose(level, LEVEL):
            return self.diff
        if not self.diff_draws:
            raise EvalError(
                f"confidence={level:g}: the comparison of {self.name} kept no bootstrap draws (it was read back "
                f"from JSON); re-run the comparison, or use confidence={LEVEL:g}"
            )
        return percentile_interval(self.diff.value, np.asarray(self.diff_draws), level, self.diff.n)


class Check(BaseModel):
    name: str
    ok: bool | None = Field(description="None: could not be checked.")
    detail: str


class Verdict(BaseModel):
    ready: bool
    headline: str
    reasons: list[str]
    recommendation: Recommendation | None = None
    checks: list[Check]


NARROW_KINDS = (Classification, ToolCall, FieldF1, JsonSchema, ExactMatch, NormalizedMatch)


def verdict_for(
    thresholds: Thresholds,
    primary: MetricComparison,
    formats: list[MetricComparison],
    latency_p95: tuple[float | None, float | None],
    cost_per_1k: tuple[float | None, float | None],
    *,
    narrow_task: bool,
    candidate_precision: str | None = None,
    failed_runs: list[str] | None = None,
) -> Verdict:
    """Ready when the primary score is not worse beyond the tolerance at 95% and latency and cost hold.

    When quality falls short the numbers pick the remedy: outputs that miss the task's format point to a
    fine-tune; a small gap on a reduced-precision deployment to higher precision; well-formed but wrong
    answers to a fine-tune on a narrow task and to a larger model on an open-ended one.
    """
    tol = thresholds.tolerance
    checks: list[Check] = [Check(name="run failed", ok=False, detail=f) for f in failed_runs or []]
    if failed_runs:  # scores of a run whose examples went unanswered say nothing about the model
        return Verdict(
            ready=False,
            headline="CANNOT TELL",
            reasons=[f"run failed: {f}" for f in failed_runs],
            checks=checks,
        )
    d = primary.diff
    q_ok = bool(np.isfinite(d.low) and d.low >= -tol)
    checks.append(
        Check(
            name=f"quality ({primary.name})",
            ok=q_ok,
            detail=f"candidate - baseline = {d.value:+.3f}, 95% CI [{d.low:+.3f}, {d.high:+.3f}]; "
            f"must stay above -{tol:g}",
        )
    )
    cand_lat, base_lat = latency_p95
    if thresholds.max_latency_p95_ratio is not None:
        if cand_lat is None or base_lat is None or base_lat <= 0:
            checks.append(Check(name="latency p95 ratio", ok=None, detail="latency missing for one run"))
        else:
            r = cand_lat / base_lat
            checks.append(
                Check(
                    name="latency p95 ratio",
                    ok=r <= thresholds.max_latency_p95_ratio,
                    detail=f"{cand_lat:.3f}s / {base_lat:.3f}s = {r:.2f}x "
                    f"(limit {thresholds.max_latency_p95_ratio:g}x)",
                )
            )
    if thresholds.max_latency_p95_s is not None:
        checks.append(
            Check(
                name="latency p95",
                ok=None if cand_lat is None else cand_lat <= thresholds.max_latency_p95_s,
                detail=f"{'n/a' if cand_lat is None else f'{cand_lat:.3f}'}s "
                f"(limit {thresholds.max_latency_p95_s:g}s)",
            )
        )
    cand_cost, base_cost = cost_per_1k
    if thresholds.max_cost_ratio is not None:
        if cand_cost is None or base_cost is None:
            missing = "candidate (pass --tier or --hourly-price)" if cand_cost is None else "baseline"
            checks.append(Check(name="cost per 1k requests", ok=None, detail=f"unknown for the {missing}"))
        else:
            limit = base_cost * thresholds.max_cost_ratio
            checks.append(
                Check(
                    name="cost per 1k requests",
                    ok=cand_cost <= limit,
                    detail=f"{usd(cand_cost)} vs {usd(base_cost)} "
                    f"(limit {thresholds.max_cost_ratio:g}x = {usd(limit)})",
                )
            )
    reasons = [f"{c.name}: {c.detail}" for c in checks if c.ok is not True]
    ready = all(c.ok is True for c in checks)
    rec: Recommendation | None = None
    if not q_ok:
        gap = -d.value
        fmt_gaps = [f for f in formats if f.candidate.value < f.baseline.value - tol]
        precision = (candidate_precision or "").lower()
        if fmt_gaps:
            f = fmt_gaps[0]
            rec = "fine-tune"
            why = (
                f"outputs miss the task's format "
                f"({f.name} {f.candidate.value:.2f} vs {f.baseline.value:.2f}); "
                "a fine-tune on the task teaches its format and labels"
            )
        elif precision in REDUCED_PRECISION and gap <= 3 * max(tol, 0.01):
            rec = "higher precision"
            why = f"a small gap ({gap:.3f}) on a {precision} deployment; serve in bf16/fp16 and re-run"
        elif narrow_task:
            rec = "fine-tune"
            why = "well-formed but wrong answers on a narrow task; task data should close the gap"
        else:
            rec = "larger model"
            why = f"well-formed but weaker answers on an open-ended task (gap {gap:.3f}); try a larger model"
        reasons.append(f"numbers point to: {rec} ({why})")
    return Verdict(
        ready=ready,
        headline="READY TO REPLACE" if ready else "NOT YET",
        reasons=reasons,
        recommendation=rec,
        checks=checks,
    )


# ---------------------------------------------------------------------------------------------- compare


class RunSide(BaseModel):
    target: str
    model: str
    stats: RunStats
    cost: CostEstimate
    errors: list[ErrorGroup] = Field(default_factory=list, description="Failed examples by error class.")
    request_rules: dict[str, list[str]] = Field(
        default_factory=dict, description="Params the target's rules ignored, dropped, changed or adapted."
    )


class Comparison(BaseModel):
    suite: str
    suite_version: str
    suite_hash: str
    candidate: RunSide
    baseline: RunSide
    metrics: list[MetricComparison]
    primary: str
    verdict: Verdict
    cost: CostReport | None = Field(
        default=None, description="$ per 1M output tokens and break-even, when one side is an API."
    )


def _wtl(cand: ScoreColumn, base: ScoreColumn) -> tuple[int, int, int] | tuple[None, None, None]:
    if cand.corpus is not None or base.corpus is not None:
        return None, None, None
    mask = np.isfinite(cand.values) & np.isfinite(base.values)
    d = cand.values[mask] - base.values[mask]
    return int((d > 1e-9).sum()), int((np.abs(d) <= 1e-9).sum()), int((d < -1e-9).sum())


def compare(
    suite: EvalSuite,
    candidate: RunResult,
    baseline: RunResult,
    *,
    hourly_price: float | None = None,
    tier: str | None = None,
    candidate_precision: str | None = None,
    n_boot: int = N_BOOT,
    saturation: RunStats | None = None,
) -> Comparison:
    """Paired comparison of two runs of the same suite version; the candidate is the would-be replacement."""
    if candidate.suite_hash != baseline.suite_hash:
        raise EvalError(
            f"suite_hash: runs differ ({candidate.suite_hash} vs {baseline.suite_hash}); "
            "run both on the same suite version and data"
        )
    fmt_names = set(suite.format_scores)
    mcs = []
    for name in suite.score_names:
        c, b = candidate.columns[name], baseline.columns[name]
        w, t, lo = _wtl(c, b)
        value, draws, n = paired_draws(c, b, n_boot)
        mcs.append(
            MetricComparison(
                name=name,
                candidate=bootstrap_ci(c, n_boot),
                baseline=bootstrap_ci(b, n_boot),
                diff=percentile_interval(value, draws, LEVEL, n) if n else _nan_interval(),
                wins=w,
                ties=t,
                losses=lo,
                format_score=name in fmt_names,
                diff_draws=draws.tolist(),
            )
        )
    by_name = {m.name: m for m in mcs}
    cand_cost, base_cost = cost_of(candidate, hourly_price, tier), cost_of(baseline, hourly_price, tier)
    narrow = all(isinstance(m, NARROW_KINDS) for m in suite.metrics)
    verdict = verdict_for(
        suite.thresholds,
        by_name[suite.primary],
        [m for m in mcs if m.format_score],
        (candidate.stats.latency_p95_s, baseline.stats.latency_p95_s),
        (cand_cost.per_1k_requests_usd, base_cost.per_1k_requests_usd),
        narrow_task=narrow,
        candidate_precision=candidate_precision,
        failed_runs=[
            f"{r.target.label}: {r.stats.n_failed}/{r.stats.n} examples failed (error rate "
            f"{r.stats.error_rate:.2f} > max_error_rate {suite.thresholds.max_error_rate:g}); "
            + "; ".join(g.line() for g in r.error_groups)
            for r in (candidate, baseline)
            if r.stats.error_rate > suite.thresholds.max_error_rate
        ],
    )
    return Comparison(
        suite=suite.name,
        suite_version=suite.version,
        suite_hash=candidate.suite_hash,
        candidate=_side(candidate, cand_cost),
        baseline=_side(baseline, base_cost),
        metrics=mcs,
        primary=suite.primary,
        verdict=verdict,
        cost=cost_comparison(candidate, baseline, hourly_price, tier, saturation),
    )


def _side(r: RunResult, cost: CostEstimate) -> RunSide:
    return RunSide(
        target=r.target.label,
        model=r.target.model,
        stats=r.stats,
        cost=cost,
        errors=r.error_groups,
        request_rules=r.request_rules,
    )


class PassCheck(BaseModel):
    score: str
    value: float
    minimum: float
    ok: bool


def pass_checks(suite: EvalSuite, summaries: dict[str, Interval]) -> list[PassCheck]:
    """The suite's `pass` thresholds against a run's scores (`llmhost eval run`)."""
    return [
        PassCheck(score=k, value=summaries[k].value, minimum=v, ok=bool(summaries[k].value >= v))
        for k, v in suite.thresholds.pass_.items()
    ]
