"""`llmhost eval run|compare|suites`: a suite against one target, or a candidate against a baseline."""

from __future__ import annotations

from pathlib import Path

import typer

eval_app = typer.Typer(help="Evaluate endpoints and frontier APIs on eval suites.", no_args_is_help=True)

SUITE_HELP = "Suite YAML path, or a name in eval_suites/ (see `llmhost eval suites`)."
TARGET_HELP = (
    "endpoint:NAME[:adapter] (gateway), frontier:NAME (eval_suites/frontiers.yaml) or url:BASE_URL#MODEL."
)


@eval_app.command("suites")
def suites() -> None:
    """List the shipped suites and the frontier catalog."""
    from tasks.evaluate.suite import SUITES_DIR, load_suite
    from tasks.evaluate.targets import load_frontiers

    for p in sorted(SUITES_DIR.glob("*.yaml")):
        if p.name == "frontiers.yaml":
            continue
        s = load_suite(p)
        typer.echo(f"{s.name:16} v{s.version:4} {', '.join(s.score_names)} — {s.description}")
    typer.echo("")
    for name, f in sorted(load_frontiers().items()):
        typer.echo(
            f"frontier:{name:22} {f.model:28} ${f.price_in_per_1m:g}/${f.price_out_per_1m:g} per 1M "
            f"(prices of {f.prices_as_of}; key in ${f.api_key_env})"
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
) -> None:
    """Run SUITE against one target, log it to MLflow and check the suite's pass thresholds."""
    from rich.console import Console
    from rich.table import Table

    from tasks.evaluate.compare import pass_checks, summarize
    from tasks.evaluate.mlflow_logging import experiment_name
    from tasks.evaluate.report import pass_line, score_cells, stats_line
    from tasks.evaluate.running import evaluate_target
    from tasks.evaluate.suite import load

    loaded = load(suite, limit=limit)
    result, run_id = evaluate_target(
        loaded,
        target,
        concurrency=concurrency,
        trace=traces,
        genai=genai,
        hourly_price=hourly_price,
        tier=tier,
    )
    console = Console()
    table = Table("score", "value", "95% CI", title=f"{loaded.suite.name} v{loaded.suite.version} @ {target}")
    summaries = summarize(result)
    for name, iv in summaries.items():
        table.add_row(name, *score_cells(iv))
    console.print(table)
    console.print(stats_line(result.stats))
    for f in [r for r in result.records if not r.ok][:5]:
        console.print(f"[red]failed[/red] {f.id}: {f.error}")
    for c in pass_checks(loaded.suite, summaries):
        console.print(pass_line(c))
    console.print(f"MLflow experiment {experiment_name(loaded.suite.name)!r}, run {run_id}")


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
) -> None:
    """Evaluate both targets on SUITE and print the paired comparison and the replace verdict."""
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
        trace=traces,
        genai=genai,
        out_dir=out,
    )
    console = Console()
    console.print(Markdown(outcome.markdown))
    v = outcome.comparison.verdict
    console.print(f"plot: {outcome.plot_path}; MLflow runs: {outcome.run_ids}")
    colour = "green" if v.ready else "yellow"
    tail = f" — {v.recommendation}" if v.recommendation else ""
    console.print(f"[bold {colour}]Verdict: {v.headline}{tail}[/bold {colour}]")
    for r in v.reasons:
        console.print(f"  - {r}")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
