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

import httpx2  # the openai SDK's HTTP client (a fork of httpx); its errors can surface mid-stream
import numpy as np
import openai
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from tasks.core.errors import EvalError
from tasks.core.settings import get_settings
from tasks.evaluate.metric_specs import LlmJudge
from tasks.evaluate.metrics import ModelOutput, ScoreColumn, judge_messages, parse_judge, score_all
from tasks.evaluate.suite import Example, GenerationParams, LoadedSuite
from tasks.evaluate.targets import ResolvedTarget, TargetInfo, endpoint_revision, resolve_target

RETRY_STATUS = {429, 500, 502, 503, 504}


class ExampleRecord(BaseModel):
    """One example's outcome against one target."""

    index: int
    id: str
    ok: bool
    error: str | None = None
    output: str = ""
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    finish_reason: str | None = None
    scores: dict[str, float | None] = Field(default_factory=dict)
    latency_s: float | None = None
    ttft_s: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
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
    _columns: dict[str, ScoreColumn] = PrivateAttr(default_factory=dict)

    @property
    def columns(self) -> dict[str, ScoreColumn]:
        return self._columns


# ---------------------------------------------------------------------------------------------- calls


class _Failure(Exception):
    def __init__(self, message: str, retries: int):
        self.retries = retries
        super().__init__(message)


def make_client(
    target: ResolvedTarget, timeout_s: float, api_key: str | None = None
) -> openai.AsyncOpenAI:
    """Async client with SDK retries off: the runner retries itself so that it can count them.

    `api_key` is the gateway key for an `endpoint:` target; without it the key comes from the environment.
    """
    s = get_settings()
    return openai.AsyncOpenAI(
        base_url=target.base_url,
        api_key=target.api_key(api_key),
        max_retries=0,
        timeout=openai.Timeout(timeout_s, connect=s.connect_timeout_s),
    )


async def preflight(client: openai.AsyncOpenAI, target: ResolvedTarget) -> TargetInfo:
    """Fail fast, naming the URL and HTTP error, when the target is unreachable or lacks the model."""
    url = f"{target.base_url}/models"
    try:
        page = await client.models.list()
    except openai.APIConnectionError as exc:
        cause = exc.__cause__ or exc
        raise EvalError(
            f"target {target.spec}: {url} is unreachable: {type(cause).__name__}: {cause}"
        ) from None
    except openai.NotFoundError:
        return TargetInfo.from_entry(target, None)  # some APIs have no /models; the first call will tell
    except openai.APIStatusError as exc:
        hint = f"; check {target.api_key_env}" if exc.status_code in (401, 403) and target.api_key_env else ""
        raise EvalError(
            f"target {target.spec}: GET {url} answered HTTP {exc.status_code}: {exc.message}{hint}"
        ) from None
    entries = {m.id: m.model_dump() for m in page.data}
    if target.self_hosted and target.model not in entries:
        raise EvalError(
            f"target {target.spec}: model {target.model!r} is not served at {url}; "
            f"it serves {sorted(entries)}"
        )
    entry = dict(entries.get(target.model) or {})
    revision, model_version = endpoint_revision(target)
    if revision:
        entry["revision"] = revision
    if model_version:
        entry["model_version"] = model_version
    return TargetInfo.from_entry(target, entry)


async def _stream_once(
    client: openai.AsyncOpenAI, model: str, messages: list[dict[str, str]], params: dict[str, Any]
) -> tuple[ModelOutput, dict[str, Any]]:
    started_ns = time.time_ns()
    t0 = time.perf_counter()
    first: float | None = None
    first_chunk: float | None = None
    parts: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    usage = None
    finish = None
    stream = await client.chat.completions.create(  # type: ignore[call-overload]
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **params
    )
    async for chunk in stream:
        now = time.perf_counter()
        first_chunk = first_chunk or now
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            if d.content:
                first = first or now
                parts.append(d.content)
            for tc in d.tool_calls or []:
                first = first or now
                acc = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                acc["id"] = tc.id or acc["id"]
                if tc.function is not None:
                    acc["name"] += tc.function.name or ""
                    acc["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    end = time.perf_counter()
    out = ModelOutput(text="".join(parts), tool_calls=[calls[i] for i in sorted(calls)])
    ttft = (first or first_chunk or end) - t0
    meta = {
        "latency_s": end - t0,
        "ttft_s": ttft,
        "tokens_in": usage.prompt_tokens if usage else None,
        "tokens_out": usage.completion_tokens if usage else None,
        "finish_reason": finish,
        "started_ns": started_ns,
    }
    return out, meta


async def call_with_retries(
    client: openai.AsyncOpenAI,
    model: str,
    messages: list[dict[str, str]],
    params: dict[str, Any],
    max_retries: int,
    counts: Counter[str],
) -> tuple[ModelOutput, dict[str, Any], int]:
    """One request; 429, 5xx and timeouts are retried up to `max_retries` times with backoff, and counted."""
    retries = 0
    while True:
        try:
            out, meta = await _stream_once(client, model, messages, params)
            return out, meta, retries
        except (openai.APITimeoutError, httpx2.TimeoutException) as exc:
            cause, err = "timeout", f"timeout after {type(exc).__name__}"
            delay = 0.5 * 2**retries
        except openai.APIStatusError as exc:
            if exc.status_code not in RETRY_STATUS:
                raise _Failure(f"HTTP {exc.status_code}: {exc.message}", retries) from None
            cause, err = (
                ("429" if exc.status_code == 429 else "5xx"),
                f"HTTP {exc.status_code}: {exc.message}",
            )
            retry_after = exc.response.headers.get("retry-after") if exc.response is not None else None
            try:
                delay = min(float(retry_after), 30.0) if retry_after else 0.5 * 2**retries
            except ValueError:
                delay = 0.5 * 2**retries
        except (openai.APIConnectionError, httpx2.TransportError) as exc:
            raise _Failure(f"connection error: {exc.__cause__ or exc}", retries) from None
        except openai.APIError as exc:  # an error event inside the stream
            raise _Failure(f"API error: {exc.message}", retries) from None
        if retries >= max_retries:
            raise _Failure(f"{err} (gave up after {retries} retries)", retries)
        retries += 1
        counts[cause] += 1
        await asyncio.sleep(delay)


def request_params(gen: GenerationParams, suite_prompt: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "max_tokens": gen.max_tokens,
    }
    if gen.seed is not None:
        params["seed"] = gen.seed
    if gen.stop:
        params["stop"] = gen.stop
    if suite_prompt.tools:
        params["tools"] = suite_prompt.tools
        if suite_prompt.tool_choice:
            params["tool_choice"] = suite_prompt.tool_choice
    return params


# ---------------------------------------------------------------------------------------------- run


@contextlib.contextmanager
def _progress(enabled: bool, total: int, label: str):  # type: ignore[no-untyped-def]
    if not enabled:
        yield lambda: None
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
            await _stream_once(client, target.model, ex.messages, params)

    await asyncio.gather(*(one(ex) for ex in examples))


async def _run_examples(
    client: openai.AsyncOpenAI,
    target: ResolvedTarget,
    examples: list[Example],
    params: dict[str, Any],
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
                    client, target.model, ex.messages, params, gen.max_retries, counts
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
            except _Failure as exc:
                rec = ExampleRecord(index=ex.index, id=ex.id, ok=False, error=str(exc), retries=exc.retries)
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
    params = {"temperature": 0.0, "max_tokens": 128}

    async def one(i: int, ex: Example, rec: ExampleRecord, tick: Any) -> None:
        if not rec.ok:
            tick()
            return
        question = str(ex.row[spec.input_field]) if spec.input_field else ex.messages[-1]["content"]
        ref = ex.row.get(spec.reference) if spec.reference else None
        async with sem:
            try:
                out, _, _ = await call_with_retries(
                    client, judge.model, judge_messages(spec, question, rec.output, ref), params, 2, counts
                )
                scores[i], notes[i] = parse_judge(out.text, spec.scale)
                if scores[i] is None:
                    notes[i] = f"judge gave no score 1-{spec.scale}: {notes[i]}"
            except _Failure as exc:
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
        params = request_params(suite.generation, suite.prompt)
        if target.self_hosted:  # a frontier is not warmed: every request is billed
            await _warm_up(client, target, loaded.examples[:conc], params)
        records, outputs, wall = await _run_examples(
            client,
            target,
            loaded.examples,
            params,
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
        stats=compute_stats(records, wall, conc, counts),
        generation=suite.generation,
        request_params=params,
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
