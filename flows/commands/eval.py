"""`llmhost eval run|compare|suites`: a suite against one target, or a candidate against a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from flows.commands._output import emit_json, json_help
from tasks.core.errors import EvalError

eval_app = typer.Typer(help="Evaluate endpoints and frontier APIs on eval suites.", no_args_is_help=True)

SUITE_HELP = "Suite YAML path, or a name in eval_suites/ (see `llmhost eval suites`)."
TARGET_HELP = (
    "endpoint:NAME[:adapter] (gateway), frontier:NAME (eval_suites/frontiers.yaml) or url:BASE_URL#MODEL."
)
# The --json schemas: these keys, in this order (version 1). No key values, hashes or tokens appear in them.
RUN_KEYS = (
    "schema", "suite", "suite_version", "suite_hash", "target", "model", "status", "error_rate",
    "max_error_rate", "errors", "scores", "pass", "stats", "request", "experiment", "run_id",
)
SIDE_KEYS = ("target", "model", "status", "error_rate", "errors", "stats", "cost", "request", "run_id")
COMPARE_KEYS = (
    "schema", "suite", "suite_version", "suite_hash", "verdict", "ready", "recommendation", "reasons",
    "checks", "primary", "metrics", "candidate", "baseline", "report", "plot", "comparison_run_id",
)
RUN_JSON_NOTE = (
    "schema='llmhost.eval.run/1'; status is 'ok', or 'failed' when error_rate > max_error_rate; errors: "
    "list of {error_class, count, fix, example}; scores: {name: {value, ci_low, ci_high, n}}; pass: list of "
    "{score, value, minimum, ok}; request: {sent: parameter names, ignored, dropped, changed, adapted: lists of "
    "lines}. Exit code 1 when the run failed."
)
COMPARE_JSON_NOTE = (
    "schema='llmhost.eval.compare/1'; verdict is 'READY TO REPLACE', 'NOT YET' or 'CANNOT TELL' (a side's "
    f"run failed); candidate and baseline have keys {', '.join(SIDE_KEYS)}; metrics: list of {{name, candidate, "
    "baseline, diff, wins, ties, losses} with {value, low, high, n} intervals. Exit code 1 on CANNOT TELL."
)


def _interval(iv: Any) -> dict[str, Any]:
    import math

    def num(x: float) -> float | None:
        return None if x is None or not math.isfinite(x) else float(x)

    return {"value": num(iv.value), "low": num(iv.low), "high": num(iv.high), "n": iv.n}


def _request(result: Any) -> dict[str, Any]:
    return {"sent": sorted(result.request_params), **{k: list(v) for k, v in result.request_rules.items()}}


def _run_json(loaded: Any, result: Any, summaries: dict[str, Any], checks: list[Any], run_id: str) -> dict:
    from tasks.evaluate.mlflow_logging import experiment_name

    s = result.stats
    return {
        "schema": "llmhost.eval.run/1",
        "suite": loaded.suite.name,
        "suite_version": loaded.suite.version,
        "suite_hash": loaded.content_hash,
        "target": result.target.spec,
        "model": result.target.model,
        "status": "failed" if result.failed else "ok",
        "error_rate": s.error_rate,
        "max_error_rate": result.max_error_rate,
        "errors": [g.model_dump() for g in result.error_groups],
        "scores": {
            k: {"value": iv["value"], "ci_low": iv["low"], "ci_high": iv["high"], "n": iv["n"]}
            for k, iv in ((k, _interval(v)) for k, v in summaries.items())
        },
        "pass": [c.model_dump() for c in checks],
        "stats": s.model_dump(mode="json"),
        "request": _request(result),
        "experiment": experiment_name(loaded.suite.name),
        "run_id": run_id,
    }


@eval_app.command("suites")
def suites() -> None:
    """List the shipped suites and the frontier catalog."""
    from tasks.evaluate.frontier_rules import RuleEntry, is_reasoning, provider_of
    from tasks.evaluate.suite import SUITES_DIR, load_suite
    from tasks.evaluate.targets import load_frontiers

    for p in sorted(SUITES_DIR.glob("*.yaml")):
        if p.name == "frontiers.yaml":
            continue
        s = load_suite(p)
        typer.echo(f"{s.name:16} v{s.version:4} {', '.join(s.score_names)} — {s.description}")
    typer.echo("")
    for name, f in sorted(load_frontiers().items()):
        rules = RuleEntry(**f.model_dump(include=set(RuleEntry.model_fields)))
        flags = ", reasoning" if is_reasoning(rules) else ""
        flags += f", {f.rpm} rpm" if f.rpm else ""
        flags += f", {f.tpm} tpm" if f.tpm else ""
        typer.echo(
            f"frontier:{name:22} {f.model:28} ${f.price_in_per_1m:g}/${f.price_out_per_1m:g} per 1M "
            f"(prices of {f.prices_as_of}; key in ${f.api_key_env}; {provider_of(rules)} dialect{flags})"
        )


@eval_app.command("run")
def run(
    suite: str = typer.Argument(..., help=SUITE_HELP),
    target: str = typer.Option(..., "--target", "-t", help=TARGET_HELP),
    concurrency: int | None = typer.Option(
        None, help="Concurrent requests (default: LLMHOST_EVAL_CONCURRENCY)."
    ),
    limit: int | None = typer.Option(None, help="Only the first N examples."),
    tier: str | None = typer.Option(
        None, help="Tier of a self-hosted target, for its cost (tasks/tiers.yaml)."
    ),
    hourly_price: float | None = typer.Option(
        None, help="USD/hour of a self-hosted target (overrides --tier)."
    ),
    traces: bool = typer.Option(True, "--traces/--no-traces", help="Log one MLflow trace per example."),
    genai: bool = typer.Option(
        True, "--genai/--no-genai", help="Attach scores to traces (mlflow.genai.evaluate)."
    ),
    as_json: bool = typer.Option(False, "--json", help=json_help("one object", RUN_KEYS, RUN_JSON_NOTE)),
) -> None:
    """Run SUITE against one target, log it to MLflow and check the suite's pass thresholds.

    Failed examples count: past the suite's `thresholds.max_error_rate` (default 0.05) the run is failed
    (exit code 1, MLflow status FAILED) and the errors are listed by class, each with its fix.
    """
    from rich.console import Console
    from rich.table import Table

    from tasks.evaluate.compare import pass_checks, summarize
    from tasks.evaluate.failures import run_failed_line
    from tasks.evaluate.mlflow_logging import experiment_name
    from tasks.evaluate.report import error_lines, pass_line, rules_lines, score_cells, stats_line
    from tasks.evaluate.running import evaluate_target
    from tasks.evaluate.suite import load

    loaded = load(suite, limit=limit)
    result, run_id = evaluate_target(
        loaded,
        target,
        concurrency=concurrency,
        progress=not as_json,
        trace=traces,
        genai=genai,
        hourly_price=hourly_price,
        tier=tier,
    )
    summaries = summarize(result)
    checks = pass_checks(loaded.suite, summaries)
    # A failed run exits 1 through the CLI's one-line error (cli.main turns EvalError into exit code 1).
    failed_line = run_failed_line(result.stats.n, result.stats.n_failed, result.max_error_rate)
    if as_json:
        emit_json(_run_json(loaded, result, summaries, checks, run_id))
        if failed_line:
            raise EvalError(failed_line)
        return
    console = Console()
    table = Table("score", "value", "95% CI", title=f"{loaded.suite.name} v{loaded.suite.version} @ {target}")
    for name, iv in summaries.items():
        table.add_row(name, *score_cells(iv))
    console.print(table)
    console.print(stats_line(result.stats))
    for line in rules_lines(result.request_rules):
        console.print(f"params {line}")
    for line in error_lines(result.error_groups):
        console.print(f"[red]error[/red] {line}", soft_wrap=True)
    for c in checks:
        console.print(pass_line(c))
    console.print(f"MLflow experiment {experiment_name(loaded.suite.name)!r}, run {run_id}")
    if failed_line:
        raise EvalError(failed_line + " (errors above; MLflow run status FAILED)")


@eval_app.command("compare")
def compare(
    suite: str = typer.Argument(..., help=SUITE_HELP),
    targets: tuple[str, str] = typer.Option(
        ..., "--targets", help="CANDIDATE BASELINE: the would-be replacement first, then the incumbent."
    ),
    tier: str | None = typer.Option(None, help="Tier the self-hosted side runs on (for its hourly price)."),
    hourly_price: float | None = typer.Option(
        None, help="USD/hour of the self-hosted side (overrides --tier)."
    ),
    precision: str | None = typer.Option(
        None, help="Candidate's weight precision if reduced (fp8, int4, awq...)."
    ),
    concurrency: int | None = typer.Option(
        None, help="Concurrent requests (default: LLMHOST_EVAL_CONCURRENCY)."
    ),
    limit: int | None = typer.Option(None, help="Only the first N examples."),
    out: Path | None = typer.Option(None, help="Also write comparison.md and comparison.png here."),
    traces: bool = typer.Option(True, "--traces/--no-traces", help="Log one MLflow trace per example."),
    genai: bool = typer.Option(
        True, "--genai/--no-genai", help="Attach scores to traces (mlflow.genai.evaluate)."
    ),
    saturation: int | None = typer.Option(
        None, min=1, help="Against an API: also load the self-hosted side at this concurrency (its endpoint's "
        "max_num_seqs) and price a replica kept full, beside the eval's own concurrency."),
    as_json: bool = typer.Option(
        False, "--json", help=json_help("one object", COMPARE_KEYS, COMPARE_JSON_NOTE)
    ),
) -> None:
    """Evaluate both targets on SUITE and print the paired comparison and the replace verdict.

    When either run has more failed examples than the suite's max_error_rate the verdict is CANNOT TELL
    (exit code 1), never READY.
    """
    from rich.console import Console
    from rich.markdown import Markdown

    from tasks.evaluate.running import compare_targets
    from tasks.evaluate.suite import load

    loaded = load(suite, limit=limit)
    outcome = compare_targets(
        loaded,
        targets[0],
        targets[1],
        hourly_price=hourly_price,
        tier=tier,
        candidate_precision=precision,
        concurrency=concurrency,
        progress=not as_json,
        trace=traces,
        genai=genai,
        out_dir=out,
        saturation=saturation,
    )
    v = outcome.comparison.verdict
    cannot_tell = v.headline == "CANNOT TELL"
    if as_json:
        emit_json(_compare_json(outcome))
        if cannot_tell:
            raise EvalError("verdict CANNOT TELL: " + "; ".join(v.reasons))
        return
    console = Console()
    console.print(Markdown(outcome.markdown))
    console.print(f"plot: {outcome.plot_path}; MLflow runs: {outcome.run_ids}")
    colour = "green" if v.ready else "yellow"
    tail = f" — {v.recommendation}" if v.recommendation else ""
    console.print(f"[bold {colour}]Verdict: {v.headline}{tail}[/bold {colour}]")
    for r in v.reasons:
        console.print(f"  - {r}", soft_wrap=True)
    if cannot_tell:
        raise EvalError("verdict CANNOT TELL: a run failed; fix its errors (listed above) and re-run")


def _compare_json(outcome: Any) -> dict[str, Any]:
    cmp, v = outcome.comparison, outcome.comparison.verdict
    cand_res, base_res = outcome.results

    def side(s: Any, result: Any, run_id: str) -> dict[str, Any]:
        return {
            "target": s.target,
            "model": s.model,
            "status": "failed" if result.failed else "ok",
            "error_rate": s.stats.error_rate,
            "errors": [g.model_dump() for g in s.errors],
            "stats": s.stats.model_dump(mode="json"),
            "cost": s.cost.model_dump(mode="json"),
            "request": _request(result),
            "run_id": run_id,
        }

    return {
        "schema": "llmhost.eval.compare/1",
        "suite": cmp.suite,
        "suite_version": cmp.suite_version,
        "suite_hash": cmp.suite_hash,
        "verdict": v.headline,
        "ready": v.ready,
        "recommendation": v.recommendation,
        "reasons": v.reasons,
        "checks": [c.model_dump() for c in v.checks],
        "primary": cmp.primary,
        "metrics": [
            {
                "name": m.name,
                "candidate": _interval(m.candidate),
                "baseline": _interval(m.baseline),
                "diff": _interval(m.diff),
                "wins": m.wins,
                "ties": m.ties,
                "losses": m.losses,
            }
            for m in cmp.metrics
        ],
        "candidate": side(cmp.candidate, cand_res, outcome.run_ids["candidate"]),
        "baseline": side(cmp.baseline, base_res, outcome.run_ids["baseline"]),
        "report": outcome.markdown,
        "plot": str(outcome.plot_path),
        "comparison_run_id": outcome.run_ids["comparison"],
    }


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
