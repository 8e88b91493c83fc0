"""The async runner: every example of a suite against one target, with bounded concurrency and retries.

Requests stream with `include_usage` so each record carries time-to-first-token as well as latency and
token counts. A failed request becomes a record with `ok=False` and its error; nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import openai
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from tasks.core.errors import EvalError
from tasks.core.settings import get_settings
from tasks.evaluate.calls import (  # noqa: F401 - make_client and request_params are used from here too
    Failure,
    RequestPlan,
    call_with_retries,
    make_client,
    plan_for,
    preflight,
    request_params,
    shape_request,
    stream_once,
)
from tasks.evaluate.failures import ErrorGroup, group_errors
from tasks.evaluate.metric_specs import LlmJudge
from tasks.evaluate.metrics import ModelOutput, ScoreColumn, judge_messages, parse_judge, score_all
from tasks.evaluate.suite import Example, GenerationParams, LoadedSuite
from tasks.evaluate.targets import ResolvedTarget, TargetInfo, resolve_target


class ExampleRecord(BaseModel):
    """One example's outcome against one target."""

    index: int
    id: str
    ok: bool
    error: str | None = None
    error_class: str | None = Field(default=None, description="e.g. `400 unsupported_parameter max_tokens`.")
    output: str = ""
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    finish_reason: str | None = None
    scores: dict[str, float | None] = Field(default_factory=dict)
    latency_s: float | None = None
    ttft_s: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    tokens_reasoning: int | None = Field(default=None, description="Hidden reasoning tokens (billed as output).")
    retries: int = 0
    started_ns: int | None = Field(default=None, description="Wall-clock start of the answered attempt (ns).")
    judge_notes: dict[str, str] = Field(default_factory=dict)
    trace_id: str | None = None


class RunStats(BaseModel):
    """Load-side numbers of one run."""

    n: int
    n_ok: int
    n_failed: int
    wall_s: float = Field(description="First request sent to last answer received (generation only).")
    concurrency: int
    throughput_rps: float = Field(description="Successful examples per second at `concurrency`.")
    retries: dict[str, int] = Field(default_factory=dict, description="Retries by cause: 429, 5xx, timeout.")
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    tokens_in_mean: float | None = None
    tokens_out_mean: float | None = None
    tokens_in_total: int = 0
    tokens_out_total: int = 0
    tokens_reasoning_total: int = 0
    n_no_usage: int = Field(default=0, description="Answers that carried no `usage` (tokens, cost unknown).")
    rate_limit_wait_s: float = Field(default=0.0, description="Time held by the client-side rpm/tpm limiter.")

    @property
    def error_rate(self) -> float:
        return self.n_failed / self.n if self.n else 0.0


class RunResult(BaseModel):
    """A suite run against one target: per-example records, load stats and per-score columns."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    suite_name: str
    suite_version: str
    suite_hash: str
    target: ResolvedTarget
    info: TargetInfo
    records: list[ExampleRecord]
    stats: RunStats
    generation: GenerationParams
    request_params: dict[str, Any] = Field(default_factory=dict, description="Sent with every request.")
    request_rules: dict[str, list[str]] = Field(
        default_factory=dict,
        description="What the target's rules did to the suite's params: ignored, dropped, changed, adapted.",
    )
    max_error_rate: float = Field(default=0.05, description="The suite's limit on failed examples.")
    _columns: dict[str, ScoreColumn] = PrivateAttr(default_factory=dict)

    @property
    def columns(self) -> dict[str, ScoreColumn]:
        return self._columns

    @property
    def failed(self) -> bool:
        """Too many examples got no answer for the scores to mean anything."""
        return self.stats.error_rate > self.max_error_rate

    @property
    def error_groups(self) -> list[ErrorGroup]:
        return group_errors(self.records, target=self.target.spec, key_env=self.target.api_key_env)


# ---------------------------------------------------------------------------------------------- calls


# ---------------------------------------------------------------------------------------------- run


@contextlib.contextmanager
def _progress(enabled: bool, total: int, label: str):  # type: ignore[no-untyped-def]
    if not enabled:
        from tasks.core import quiet

        # In a flow or a CLI step (the lifecycle's compare): a line every ~5% to the console or the `llmhost`
        # logger, never a bar.
        count = quiet.progress(f"eval {label}", total, unit="example", draw=False)
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            count.update(done)

        try:
            yield tick
        finally:
            count.close()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
        refresh_per_second=4,  # the client shares the CPU with a local server; redraws are not free
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


async def _warm_up(
    client: openai.AsyncOpenAI, target: ResolvedTarget, examples: list[Example], params: dict[str, Any]
) -> None:
    """Unrecorded requests (one per concurrency slot) before the timed phase of a self-hosted target.

    One-time costs, such as the first use of a hot-loaded LoRA adapter, otherwise land in the first batch's
    latencies and skew p95 against a target that was already warm. A failure here is not an error: the
    timed phase sends the same requests and records what happens.
    """

    async def one(ex: Example) -> None:
        with contextlib.suppress(Exception):
            await stream_once(client, target.model, ex.messages, params)

    await asyncio.gather(*(one(ex) for ex in examples))


async def _run_examples(
    client: openai.AsyncOpenAI,
    target: ResolvedTarget,
    examples: list[Example],
    plan: RequestPlan,
    gen: GenerationParams,
    concurrency: int,
    counts: Counter[str],
    progress: bool,
    label: str,
) -> tuple[list[ExampleRecord], list[ModelOutput], float]:
    sem = asyncio.Semaphore(concurrency)
    records: list[ExampleRecord | None] = [None] * len(examples)
    outputs: list[ModelOutput] = [ModelOutput(failed=True)] * len(examples)

    async def one(i: int, ex: Example, tick: Any) -> None:
        async with sem:
            try:
                out, meta, retries = await call_with_retries(
                    client, target.model, ex.messages, plan, gen.max_retries, counts
                )
                rec = ExampleRecord(
                    index=ex.index,
                    id=ex.id,
                    ok=True,
                    output=out.text,
                    tool_calls=out.tool_calls,
                    retries=retries,
                    **meta,
                )
                outputs[i] = out
            except Failure as exc:
                rec = ExampleRecord(
                    index=ex.index,
                    id=ex.id,
                    ok=False,
                    error=str(exc),
                    error_class=exc.error_class,
                    retries=exc.retries,
                )
            records[i] = rec
            tick()

    with _progress(progress, len(examples), label) as tick:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, ex, tick) for i, ex in enumerate(examples)))
        wall = time.perf_counter() - t0
    return [r for r in records if r is not None], outputs, wall


async def _judge(
    loaded: LoadedSuite,
    spec: LlmJudge,
    records: list[ExampleRecord],
    concurrency: int,
    progress: bool,
    api_key: str | None,
) -> tuple[list[float | None], list[str]]:
    judge = resolve_target(spec.judge)
    client = make_client(judge, loaded.suite.generation.request_timeout_s, api_key)
    await preflight(client, judge)
    counts: Counter[str] = Counter()
    sem = asyncio.Semaphore(concurrency)
    scores: list[float | None] = [None] * len(records)
    notes = [""] * len(records)
    plan = shape_request(judge, {"temperature": 0.0, "max_tokens": 128}, 128)

    async def one(i: int, ex: Example, rec: ExampleRecord, tick: Any) -> None:
        if not rec.ok:
            tick()
            return
        question = str(ex.row[spec.input_field]) if spec.input_field else ex.messages[-1]["content"]
        ref = ex.row.get(spec.reference) if spec.reference else None
        async with sem:
            try:
                out, _, _ = await call_with_retries(
                    client, judge.model, judge_messages(spec, question, rec.output, ref), plan, 2, counts
                )
                scores[i], notes[i] = parse_judge(out.text, spec.scale)
                if scores[i] is None:
                    notes[i] = f"judge gave no score 1-{spec.scale}: {notes[i]}"
            except Failure as exc:
                notes[i] = f"judge failed: {exc}"
        tick()

    with _progress(progress, len(records), f"judge {judge.spec}") as tick:
        await asyncio.gather(
            *(one(i, ex, r, tick) for i, (ex, r) in enumerate(zip(loaded.examples, records, strict=True)))
        )
    return scores, notes


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def compute_stats(
    records: list[ExampleRecord], wall_s: float, concurrency: int, counts: Counter[str]
) -> RunStats:
    ok = [r for r in records if r.ok]
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tin = [r.tokens_in for r in ok if r.tokens_in is not None]
    tout = [r.tokens_out for r in ok if r.tokens_out is not None]
    treason = [r.tokens_reasoning for r in ok if r.tokens_reasoning is not None]
    return RunStats(
        n=len(records),
        n_ok=len(ok),
        n_failed=len(records) - len(ok),
        wall_s=wall_s,
        concurrency=concurrency,
        throughput_rps=len(ok) / wall_s if wall_s > 0 else 0.0,
        retries={k: counts.get(k, 0) for k in ("429", "5xx", "timeout")},
        latency_p50_s=_pct(lat, 50),
        latency_p95_s=_pct(lat, 95),
        ttft_p50_s=_pct(ttft, 50),
        ttft_p95_s=_pct(ttft, 95),
        tokens_in_mean=float(np.mean(tin)) if tin else None,
        tokens_out_mean=float(np.mean(tout)) if tout else None,
        tokens_in_total=int(sum(tin)),
        tokens_out_total=int(sum(tout)),
        tokens_reasoning_total=int(sum(treason)),
        n_no_usage=sum(1 for r in ok if r.tokens_in is None),
    )


async def run_suite_async(
    loaded: LoadedSuite,
    target: ResolvedTarget | str,
    *,
    concurrency: int | None = None,
    progress: bool = True,
    api_key: str | None = None,
) -> RunResult:
    """Run every example against `target`, then score.

    Only the requests run in the timed phase (traces are written afterwards from the records), so the
    measured throughput, which the self-hosted cost is computed from, is the server's. `api_key` is the
    gateway key for `endpoint:` targets (and an `endpoint:` judge); it is used for the client only.
    """
    if isinstance(target, str):
        target = resolve_target(target)
    suite = loaded.suite
    conc = concurrency or get_settings().eval_concurrency
    client = make_client(target, suite.generation.request_timeout_s, api_key)
    try:
        info = await preflight(client, target)
        counts: Counter[str] = Counter()
        plan = plan_for(target, suite.generation, suite.prompt)
        if target.self_hosted:  # a frontier is not warmed: every request is billed
            await _warm_up(client, target, loaded.examples[:conc], plan.kwargs)
        records, outputs, wall = await _run_examples(
            client,
            target,
            loaded.examples,
            plan,
            suite.generation,
            conc,
            counts,
            progress,
            f"{suite.name} @ {target.spec}",
        )
    finally:
        await client.close()
    judge_scores: dict[str, Sequence[float | None]] = {}
    for spec in suite.metrics:
        if isinstance(spec, LlmJudge):
            name = spec.output_names()[0]
            judge_scores[name], notes = await _judge(loaded, spec, records, conc, progress, api_key)
            for rec, note in zip(records, notes, strict=True):
                if note:
                    rec.judge_notes[name] = note
    per_example, columns = score_all(suite, outputs, [ex.row for ex in loaded.examples], judge_scores)
    for rec, sc in zip(records, per_example, strict=True):
        rec.scores = sc
    result = RunResult(
        suite_name=suite.name,
        suite_version=suite.version,
        suite_hash=loaded.content_hash,
        target=target,
        info=info,
        records=records,
        stats=compute_stats(records, wall, conc, counts).model_copy(
            update={"rate_limit_wait_s": plan.limiter.waited_s}
        ),
        generation=suite.generation,
        request_params=plan.kwargs,
        request_rules=plan.rules_report(),
        max_error_rate=suite.thresholds.max_error_rate,
    )
    result._columns = columns
    return result


def run_suite(
    loaded: LoadedSuite,
    target: ResolvedTarget | str,
    *,
    concurrency: int | None = None,
    progress: bool = True,
    api_key: str | None = None,
) -> RunResult:
    """Sync entry point for the CLI, flows and tests."""
    return asyncio.run(
        run_suite_async(loaded, target, concurrency=concurrency, progress=progress, api_key=api_key)
    )


def saturation_requests(concurrency: int, n_examples: int) -> int:
    """Requests in a saturation load: four waves of `concurrency`, at least one pass over the suite."""
    return max(4 * concurrency, n_examples)


async def measure_saturation_async(
    loaded: LoadedSuite, target: ResolvedTarget, concurrency: int, *, requests: int | None = None,
    api_key: str | None = None, progress: bool = False,
) -> RunStats:
    """A short load at `concurrency` (the endpoint's max_num_seqs): the suite's prompts, cycled, unscored.

    Only the throughput matters here (the cost per 1M output tokens of a replica kept full), so nothing is
    scored or traced; the stats are logged with the comparison that asked for them.
    """
    if not loaded.examples:
        raise EvalError(f"suite {loaded.suite.name!r} has no examples to load the target with")
    n = requests or saturation_requests(concurrency, len(loaded.examples))
    examples = [loaded.examples[i % len(loaded.examples)] for i in range(n)]
    client = make_client(target, loaded.suite.generation.request_timeout_s, api_key)
    counts: Counter[str] = Counter()
    try:
        plan = plan_for(target, loaded.suite.generation, loaded.suite.prompt)
        await _warm_up(client, target, examples[:concurrency], plan.kwargs)
        records, _, wall = await _run_examples(client, target, examples, plan, loaded.suite.generation,
                                               concurrency, counts, progress,
                                               f"saturation {target.spec} @ {concurrency}")
    finally:
        await client.close()
    return compute_stats(records, wall, concurrency, counts)


def measure_saturation(
    loaded: LoadedSuite, target: ResolvedTarget, concurrency: int, *, requests: int | None = None,
    api_key: str | None = None, progress: bool = False,
) -> RunStats:
    return asyncio.run(measure_saturation_async(loaded, target, concurrency, requests=requests, api_key=api_key,
                                                progress=progress))
