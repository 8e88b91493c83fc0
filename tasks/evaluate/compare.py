"""Bootstrap intervals, paired comparison of two runs, cost per 1k requests and the replace verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, Field

from tasks.core.errors import EvalError
from tasks.evaluate.metrics import ScoreColumn
from tasks.evaluate.runner import RunResult, RunStats
from tasks.evaluate.suite import (
    Classification,
    EvalSuite,
    ExactMatch,
    FieldF1,
    JsonSchema,
    NormalizedMatch,
    Thresholds,
    ToolCall,
)
from tasks.evaluate.targets import Pricing
from tasks.core.settings import PROJECT_ROOT

N_BOOT = 2000
TIERS_FILE = PROJECT_ROOT / "tasks" / "tiers.yaml"
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


def bootstrap_ci(col: ScoreColumn, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of a score's suite value (mean, macro-F1 or corpus BLEU)."""
    idx = _finite_idx(col)
    if len(idx) == 0:
        return Interval(value=float("nan"), low=float("nan"), high=float("nan"), n=0)
    rng = np.random.default_rng(seed)
    draws = idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))]
    corpus = col.corpus
    stats = col.values[draws].mean(axis=1) if corpus is None else np.array([corpus(d) for d in draws])
    a = (1 - level) / 2
    return Interval(
        value=col.value(idx),
        low=float(np.quantile(stats, a)),
        high=float(np.quantile(stats, 1 - a)),
        n=len(idx),
    )


def paired_bootstrap(
    cand: ScoreColumn, base: ScoreColumn, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95
) -> Interval:
    """Interval of (candidate - baseline), resampling the same examples for both."""
    if len(cand.values) != len(base.values):
        raise EvalError(
            f"score {cand.name}: runs have {len(cand.values)} and {len(base.values)} examples; "
            "compare runs of the same suite version"
        )
    idx = _finite_idx(cand, base)
    if len(idx) == 0:
        return Interval(value=float("nan"), low=float("nan"), high=float("nan"), n=0)
    rng = np.random.default_rng(seed)
    draws = idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))]
    if cand.corpus is None and base.corpus is None:
        stats = (cand.values[draws] - base.values[draws]).mean(axis=1)
    else:
        stats = np.array([cand.value(d) - base.value(d) for d in draws])
    a = (1 - level) / 2
    return Interval(
        value=cand.value(idx) - base.value(idx),
        low=float(np.quantile(stats, a)),
        high=float(np.quantile(stats, 1 - a)),
        n=len(idx),
    )


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


def tier_hourly_price(tier: str, path: Path | None = None) -> float:
    """Hourly USD price of `tier`: the sizing catalog (tasks/tiers.yaml + LLMHOST_TIERS_FILE), or `path`."""
    if path is None:
        try:
            from tasks.size.io import load_tiers
        except ImportError:  # the sizing step is optional for evaluation
            path = TIERS_FILE
        else:
            tiers = {t.name: t for t in load_tiers()}
            if tier not in tiers:
                raise EvalError(f"tier={tier!r} is not in the tier catalog; known tiers: {sorted(tiers)}")
            return float(tiers[tier].price_per_hour)
    if not path.is_file():
        raise EvalError(f"tier={tier!r}: no tier catalog at {path}; pass --hourly-price USD instead")
    raw = yaml.safe_load(path.read_text()) or {}
    entries: Any = raw.get("tiers", raw) if isinstance(raw, dict) else raw
    if isinstance(entries, dict):
        entries = [{"name": k, **(v or {})} for k, v in entries.items()]
    for e in entries or []:
        if isinstance(e, dict) and e.get("name") == tier:
            for key in ("price_per_hour", "hourly_price_usd", "usd_per_hour"):
                if e.get(key) is not None:
                    return float(e[key])
            raise EvalError(f"tier={tier!r} in {path} has no price_per_hour; pass --hourly-price USD")
    names = [e.get("name") for e in entries or [] if isinstance(e, dict)]
    raise EvalError(f"tier={tier!r} is not in {path}; known tiers: {names}")


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


def decide(
    thresholds: Thresholds,
    primary: MetricComparison,
    formats: list[MetricComparison],
    latency_p95: tuple[float | None, float | None],
    cost_per_1k: tuple[float | None, float | None],
    *,
    narrow_task: bool,
    candidate_precision: str | None = None,
) -> Verdict:
    """Ready when the primary score is not worse beyond the tolerance at 95% and latency and cost hold.

    When quality falls short the numbers pick the remedy: outputs that miss the task's format point to a
    fine-tune; a small gap on a reduced-precision deployment to higher precision; well-formed but wrong
    answers to a fine-tune on a narrow task and to a larger model on an open-ended one.
    """
    tol = thresholds.tolerance
    checks: list[Check] = []
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
                    detail=f"${cand_cost:.4f} vs ${base_cost:.4f} "
                    f"(limit {thresholds.max_cost_ratio:g}x = ${limit:.4f})",
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


class Comparison(BaseModel):
    suite: str
    suite_version: str
    suite_hash: str
    candidate: RunSide
    baseline: RunSide
    metrics: list[MetricComparison]
    primary: str
    verdict: Verdict


def _wtl(cand: ScoreColumn, base: ScoreColumn) -> tuple[int, int, int] | tuple[None, None, None]:
    if cand.corpus is not None or base.corpus is not None:
        return None, None, None
    mask = np.isfinite(cand.values) & np.isfinite(base.values)
    d = cand.values[mask] - base.values[mask]
    return int((d > 1e-9).sum()), int((np.abs(d) <= 1e-9).sum()), int((d < -1e-9).sum())


def _cost(result: RunResult, hourly_price: float | None, tier: str | None) -> CostEstimate:
    if result.target.pricing is not None:
        return frontier_cost(result.stats, result.target.pricing)
    if hourly_price is None and tier:
        hourly_price = tier_hourly_price(tier)
    if hourly_price is None:
        return CostEstimate(per_1k_requests_usd=None, basis="no hourly price: pass --tier or --hourly-price")
    return self_hosted_cost(result.stats, hourly_price, tier)


def compare(
    suite: EvalSuite,
    candidate: RunResult,
    baseline: RunResult,
    *,
    hourly_price: float | None = None,
    tier: str | None = None,
    candidate_precision: str | None = None,
    n_boot: int = N_BOOT,
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
        mcs.append(
            MetricComparison(
                name=name,
                candidate=bootstrap_ci(c, n_boot),
                baseline=bootstrap_ci(b, n_boot),
                diff=paired_bootstrap(c, b, n_boot),
                wins=w,
                ties=t,
                losses=lo,
                format_score=name in fmt_names,
            )
        )
    by_name = {m.name: m for m in mcs}
    cand_cost, base_cost = _cost(candidate, hourly_price, tier), _cost(baseline, hourly_price, tier)
    narrow = all(isinstance(m, NARROW_KINDS) for m in suite.metrics)
    verdict = decide(
        suite.thresholds,
        by_name[suite.primary],
        [m for m in mcs if m.format_score],
        (candidate.stats.latency_p95_s, baseline.stats.latency_p95_s),
        (cand_cost.per_1k_requests_usd, base_cost.per_1k_requests_usd),
        narrow_task=narrow,
        candidate_precision=candidate_precision,
    )
    return Comparison(
        suite=suite.name,
        suite_version=suite.version,
        suite_hash=candidate.suite_hash,
        candidate=RunSide(
            target=candidate.target.spec, model=candidate.target.model, stats=candidate.stats, cost=cand_cost
        ),
        baseline=RunSide(
            target=baseline.target.spec, model=baseline.target.model, stats=baseline.stats, cost=base_cost
        ),
        metrics=mcs,
        primary=suite.primary,
        verdict=verdict,
    )


# ---------------------------------------------------------------------------------------------- report


def _fmt(iv: Interval, signed: bool = False) -> str:
    if not np.isfinite(iv.value):
        return "n/a"
    s = "+" if signed else ""
    return f"{iv.value:{s}.3f} [{iv.low:{s}.3f}, {iv.high:{s}.3f}]"


def _s(v: float | None, unit: str = "s") -> str:
    return "n/a" if v is None else f"{v:.3f}{unit}"


def _delta(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a - b:+.3f}s"


def render_markdown(cmp: Comparison) -> str:
    """The comparison report (also the Prefect artifact)."""
    c, b, v = cmp.candidate, cmp.baseline, cmp.verdict
    lines = [
        f"# {cmp.suite} v{cmp.suite_version}: `{c.target}` vs `{b.target}`",
        "",
        f"**Verdict: {v.headline}**"
        + (f" — numbers point to **{v.recommendation}**" if v.recommendation else ""),
        "",
        *[
            f"- {'PASS' if ch.ok else ('UNKNOWN' if ch.ok is None else 'FAIL')} {ch.name}: {ch.detail}"
            for ch in v.checks
        ],
        *([f"- {r}" for r in v.reasons if r.startswith("numbers point to")]),
        "",
        f"Candidate `{c.target}` (model `{c.model}`) is the would-be replacement; baseline `{b.target}` "
        f"(model `{b.model}`). Suite hash `{cmp.suite_hash}`, {c.stats.n} examples, 95% percentile bootstrap "
        f"({N_BOOT} resamples, paired for differences). Primary score: `{cmp.primary}`.",
        "",
        "## Quality",
        "",
        "| score | candidate | baseline | candidate - baseline | win / tie / loss |",
        "|---|---|---|---|---|",
    ]
    for m in cmp.metrics:
        wtl = "corpus-level" if m.wins is None else f"{m.wins} / {m.ties} / {m.losses}"
        name = f"**{m.name}**" if m.name == cmp.primary else m.name
        lines.append(f"| {name} | {_fmt(m.candidate)} | {_fmt(m.baseline)} | {_fmt(m.diff, True)} | {wtl} |")
    cs, bs = c.stats, b.stats
    lines += [
        "",
        "## Latency and load",
        "",
        "| | candidate | baseline | delta |",
        "|---|---|---|---|",
        *[
            f"| {label} | {_s(getattr(cs, key))} | {_s(getattr(bs, key))} | "
            f"{_delta(getattr(cs, key), getattr(bs, key))} |"
            for label, key in (
                ("latency p50", "latency_p50_s"),
                ("latency p95", "latency_p95_s"),
                ("TTFT p50", "ttft_p50_s"),
                ("TTFT p95", "ttft_p95_s"),
            )
        ],
        f"| throughput | {cs.throughput_rps:.2f} req/s | {bs.throughput_rps:.2f} req/s | "
        f"at concurrency {cs.concurrency} |",
        f"| tokens in / out (mean) | {cs.tokens_in_mean or 0:.1f} / {cs.tokens_out_mean or 0:.1f} | "
        f"{bs.tokens_in_mean or 0:.1f} / {bs.tokens_out_mean or 0:.1f} | |",
        f"| failed / retries | {cs.n_failed} / {sum(cs.retries.values())} | "
        f"{bs.n_failed} / {sum(bs.retries.values())} | |",
        "",
        "## Cost per 1k requests",
        "",
    ]
    for label, side in (("candidate", c), ("baseline", b)):
        cost = "unknown" if side.cost.per_1k_requests_usd is None else f"${side.cost.per_1k_requests_usd:.4f}"
        lines.append(f"- {label} `{side.target}`: **{cost}** = {side.cost.basis}")
        lines += [f"  - assumes {a}" for a in side.cost.assumptions]
    return "\n".join(lines) + "\n"


def plot(cmp: Comparison, path: Path) -> Path:
    """Scores with 95% intervals and latency percentiles of both targets, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mets = [m for m in cmp.metrics if np.isfinite(m.candidate.value) and np.isfinite(m.baseline.value)]
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [max(len(mets), 2), 2]}
    )
    x = np.arange(len(mets))
    for off, side, label in (
        (-0.2, "candidate", cmp.candidate.target),
        (0.2, "baseline", cmp.baseline.target),
    ):
        vals = np.array([getattr(m, side).value for m in mets])
        err = np.array(
            [[v - getattr(m, side).low, getattr(m, side).high - v] for m, v in zip(mets, vals, strict=True)]
        ).T
        ax1.bar(x + off, vals, 0.4, yerr=err if len(mets) else None, capsize=3, label=label)
    ax1.set_xticks(x, [m.name for m in mets], rotation=30, ha="right")
    ax1.set_ylim(0, 1.05)
    ax1.set_title(f"{cmp.suite} v{cmp.suite_version}: scores (95% CI)")
    ax1.legend(fontsize=8)
    lat_names = ["latency p50", "latency p95", "TTFT p50", "TTFT p95"]
    keys = ["latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s"]
    xl = np.arange(len(keys))
    for off, run in ((-0.2, cmp.candidate), (0.2, cmp.baseline)):
        ax2.bar(xl + off, [getattr(run.stats, k) or 0 for k in keys], 0.4, label=run.target)
    ax2.set_xticks(xl, lat_names, rotation=30, ha="right")
    ax2.set_ylabel("seconds")
    ax2.set_title(f"verdict: {cmp.verdict.headline}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
