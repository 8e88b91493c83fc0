"""The eval reports, in one place: a comparison (Markdown and plot) and a single-target run.

The CLI, the flows' Prefect artifacts and the MLflow comparison run all format through these functions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.evaluate.compare import (
    N_BOOT,
    Comparison,
    Interval,
    PassCheck,
    RunSide,
    Verdict,
    pass_checks,
    summarize,
)
from tasks.evaluate.cost import usd
from tasks.evaluate.failures import ErrorGroup, run_failed_line
from tasks.evaluate.runner import RunResult, RunStats
from tasks.evaluate.suite import EvalSuite


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
        cost = usd(side.cost.per_1k_requests_usd)
        lines.append(f"- {label} `{side.target}`: **{cost}** = {side.cost.basis}")
        lines += [f"  - assumes {a}" for a in side.cost.assumptions]
    if cmp.cost is not None:
        lines += ["", "## $ per 1M output tokens and break-even", "", *[f"- {ln}" for ln in cmp.cost.lines()]]
    lines += _sides_notes(c, b)
    return "\n".join(lines) + "\n"


def error_lines(groups: list[ErrorGroup]) -> list[str]:
    """One line per error class: count, class, fix (`24x 400 unsupported_parameter max_tokens: ...`)."""
    return [g.line() for g in groups]


def rules_lines(rules: dict[str, list[str]]) -> list[str]:
    """What the target's request rules did: `ignored: seed: ignored by anthropic`, one line each."""
    return [f"{kind}: {line}" for kind in ("ignored", "dropped", "changed", "adapted") for line in rules.get(kind, [])]


def _sides_notes(c: RunSide, b: RunSide) -> list[str]:
    out: list[str] = []
    if c.errors or b.errors:
        out += ["", "## Errors", ""]
        for label, side in (("candidate", c), ("baseline", b)):
            out += [f"- {label} `{side.target}`: {line}" for line in error_lines(side.errors)]
    if c.request_rules or b.request_rules:
        notes = [
            f"- {label} `{side.target}`: {line}"
            for label, side in (("candidate", c), ("baseline", b))
            for line in rules_lines(side.request_rules)
        ]
        if notes:
            out += ["", "## Request parameters", "", "Parameters a side ignored or did not send make the "
                    "two runs less comparable on them:", "", *notes]
    for label, side in (("candidate", c), ("baseline", b)):
        if side.stats.n_no_usage:
            out.append(f"- {label}: {side.stats.n_no_usage} answers carried no `usage`; their tokens are unknown")
    return out


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


# ---------------------------------------------------------------------------------------------- one target


def score_cells(iv: Interval) -> tuple[str, str]:
    """(value, 95% CI) cells of one score."""
    return f"{iv.value:.3f}", f"[{iv.low:.3f}, {iv.high:.3f}]"


def pass_line(check: PassCheck) -> str:
    return f"{'PASS' if check.ok else 'FAIL'} {check.score} {check.value:.3f} (minimum {check.minimum:g})"


def stats_line(s: RunStats) -> str:
    """Load-side numbers of a run on one line (`llmhost eval run`)."""
    return (
        f"{s.n_ok}/{s.n} ok, {s.n_failed} failed (error rate {s.error_rate:.2f}), retries {s.retries}; "
        f"{s.throughput_rps:.2f} req/s at "
        f"concurrency {s.concurrency}; latency p50 {s.latency_p50_s or 0:.3f}s "
        f"p95 {s.latency_p95_s or 0:.3f}s; TTFT p50 {s.ttft_p50_s or 0:.3f}s; "
        f"tokens in/out {s.tokens_in_mean or 0:.1f}/{s.tokens_out_mean or 0:.1f}"
    )


def render_run_markdown(suite: EvalSuite, target: str, result: RunResult) -> str:
    """The report of one target's run: scores with intervals, pass thresholds, load (the Prefect artifact)."""
    sums = summarize(result)
    lines = [
        f"# {suite.name} v{suite.version} @ `{target}`",
        "",
        "| score | value | 95% CI |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {' | '.join(score_cells(v))} |" for k, v in sums.items()]
    lines += ["", *[f"- {pass_line(c)}" for c in pass_checks(suite, sums)]]
    s = result.stats
    lines.append(
        f"- {s.n_ok}/{s.n} ok; latency p50 {s.latency_p50_s or 0:.3f}s, p95 {s.latency_p95_s or 0:.3f}s; "
        f"TTFT p50 {s.ttft_p50_s or 0:.3f}s; {s.throughput_rps:.2f} req/s"
    )
    if failed := run_failed_line(s.n, s.n_failed, result.max_error_rate):
        lines.insert(2, f"**{failed}**\n")
    lines += [f"- error: {e}" for e in error_lines(result.error_groups)]
    lines += [f"- params {r}" for r in rules_lines(result.request_rules)]
    return "\n".join(lines) + "\n"


def verdict_line(v: Verdict) -> str:
    """`READY TO REPLACE`, or `NOT YET (first failing check; ...)`."""
    return v.headline if v.ready else f"{v.headline} ({'; '.join(v.reasons[:2])})"


def verdict_lines(who: str, cmp: Comparison) -> list[str]:
    """A comparison in a few console lines: the verdict with its gap and 95% CI, latency, $ and break-even.

    `who` names the candidate side (e.g. "base v1"); the baseline is named by its report label, which for a
    local stand-in says so.
    """
    c, b = cmp.candidate, cmp.baseline
    out = [f"{who} vs {b.target}: {verdict_line(cmp.verdict)}"]
    m = next((x for x in cmp.metrics if x.name == cmp.primary), None)
    if m is not None and np.isfinite(m.diff.value):
        out.append(f"  {m.name}: {m.candidate.value:.3f} vs {m.baseline.value:.3f}, gap {m.diff.value:+.3f} "
                   f"(95% CI {m.diff.low:+.3f} to {m.diff.high:+.3f}, n={m.diff.n})")
    cl, bl = c.stats.latency_p95_s, b.stats.latency_p95_s
    if cl is not None and bl is not None and bl > 0:
        out.append(f"  latency p95: {cl:.2f}s vs {bl:.2f}s ({cl / bl:.2f}x)")
    if cmp.cost is not None:
        k = cmp.cost
        full = (f", {usd(k.self_per_1m_out_saturation)} kept full ({k.saturation.concurrency} concurrent)"
                if k.saturation is not None else "")
        out.append(f"  $ per 1M output tokens: self-hosted {usd(k.self_per_1m_out_eval)} on tier {k.tier.tier} "
                   f"(${k.tier.hourly_usd:g}/h, at the eval's concurrency{full}) vs API {usd(k.api_per_1m_out)}")
        if (line := k.break_even_line()) is not None:
            out.append(f"  {line}")
    return out
