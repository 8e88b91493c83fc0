"""What an eval run logs to MLflow: one experiment per suite, one run per target per suite version.

Each run holds params (target, model), tags (suite content hash, revision hash), each score's mean with its
95% bootstrap interval, latency/TTFT/tokens, the per-example table, one trace per example (explicit spans:
the example, and under it the chat call with tokens and tool calls), and MLflow GenAI assessments on them
(`mlflow.genai.evaluate` with `@scorer`s), so the results show in MLflow's evaluation views.
The runner scores first and the scorers hand MLflow those values, so the scores are computed once and the
async runner keeps its throughput; MLflow's own predict loop would run a blocking call per worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.evaluate.compare import Comparison, Interval, cost_of, summarize
from tasks.evaluate.cost import plot_break_even
from tasks.evaluate.runner import ExampleRecord, RunResult
from tasks.evaluate.suite import LoadedSuite

EXAMPLES_TABLE = "eval_examples.json"
BREAK_EVEN_PLOT = "break_even.png"


def experiment_name(suite_name: str) -> str:
    return f"eval/{suite_name}"


def _chat_completion(result: RunResult, rec: ExampleRecord) -> dict[str, Any]:
    """The answer in OpenAI's chat.completion shape, which MLflow's trace UI renders as a chat."""
    calls = [
        {
            "id": c.get("id") or f"call_{i}",
            "type": "function",
            "function": {"name": c.get("name"), "arguments": c.get("arguments")},
        }
        for i, c in enumerate(rec.tool_calls)
    ]
    message: dict[str, Any] = {"role": "assistant", "content": rec.output}
    if calls:
        message["tool_calls"] = calls
    out: dict[str, Any] = {
        "object": "chat.completion",
        "model": result.target.model,
        "choices": [{"index": 0, "message": message, "finish_reason": rec.finish_reason}],
    }
    if rec.tokens_in is not None and rec.tokens_out is not None:
        out["usage"] = {
            "prompt_tokens": rec.tokens_in,
            "completion_tokens": rec.tokens_out,
            "total_tokens": rec.tokens_in + rec.tokens_out,
        }
    return out


def log_traces(result: RunResult, loaded: LoadedSuite) -> int:
    """One trace per example, written from the records with the measured start and end times.

    The root span is the example; its child is the chat call with the request, the answer (tool calls
    included), token usage and a `first_token` event at TTFT. Writing them after the timed phase keeps
    tracing off the request path (live spans cost the client CPU that the server on the same box needs).
    """
    import mlflow
    from mlflow.entities import SpanEvent
    from mlflow.environment_variables import MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE
    from mlflow.tracing.constant import SpanAttributeKey

    t = result.target
    now = time.time_ns()
    # The async exporter drops what overflows its queue (a warning, then lost spans): a suite of more than about
    # two thirds of the queue's size lost scores. configure_mlflow raises the default size; past half of whatever
    # it is, the queue is drained every third of it (a drain stops and restarts the exporter's threads, ~2 s).
    queue_size = MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE.get()
    drain_every = max(1, queue_size // 3) if len(result.records) > queue_size // 2 else 0
    for n, (ex, rec) in enumerate(zip(loaded.examples, result.records, strict=True), 1):
        start = rec.started_ns or now
        end = start + int((rec.latency_s or 0.0) * 1e9)
        root = mlflow.start_span_no_context(
            name=f"eval {rec.id}",
            span_type="CHAIN",
            inputs={"example_id": rec.id, "messages": ex.messages},
            attributes={"llmhost.target": t.spec, "llmhost.suite": result.suite_name},
            start_time_ns=start,
        )
        attrs: dict[str, Any] = {
            SpanAttributeKey.MESSAGE_FORMAT: "openai",
            "llmhost.latency_s": rec.latency_s,
            "llmhost.ttft_s": rec.ttft_s,
            "llmhost.retries": rec.retries,
        }
        if rec.tokens_in is not None and rec.tokens_out is not None:
            attrs[SpanAttributeKey.CHAT_USAGE] = {
                "input_tokens": rec.tokens_in,
                "output_tokens": rec.tokens_out,
                "total_tokens": rec.tokens_in + rec.tokens_out,
            }
        call = mlflow.start_span_no_context(
            name="chat.completions",
            span_type="CHAT_MODEL",
            parent_span=root,
            inputs={"model": t.model, "messages": ex.messages, **result.request_params},
            attributes=attrs,
            start_time_ns=start,
        )
        if rec.ttft_s is not None:
            call.add_event(SpanEvent(name="first_token", timestamp=start + int(rec.ttft_s * 1e9)))  # type: ignore[abstract]
        status = "OK" if rec.ok else "ERROR"
        call.end(
            outputs=_chat_completion(result, rec) if rec.ok else {"error": rec.error},
            status=status,
            end_time_ns=end,
        )
        root.end(
            outputs={
                "output": rec.output,
                "tool_calls": rec.tool_calls,
                "scores": rec.scores,
                "error": rec.error,
            },
            status=status,
            end_time_ns=end,
        )
        rec.trace_id = root.trace_id
        if drain_every and n % drain_every == 0:
            with contextlib.suppress(Exception):
                mlflow.flush_trace_async_logging()
    with contextlib.suppress(Exception):
        mlflow.flush_trace_async_logging()
    return len(result.records)


def metrics_of(result: RunResult, summaries: dict[str, Interval]) -> dict[str, float]:
    """The run's MLflow metrics: scores with intervals, latency, TTFT, tokens, load."""
    out: dict[str, float] = {}
    for name, iv in summaries.items():
        if iv.n:
            out[name], out[f"{name}_ci_low"], out[f"{name}_ci_high"] = iv.value, iv.low, iv.high
    s = result.stats
    for key in (
        "latency_p50_s",
        "latency_p95_s",
        "ttft_p50_s",
        "ttft_p95_s",
        "tokens_in_mean",
        "tokens_out_mean",
    ):
        v = getattr(s, key)
        if v is not None:
            out[key] = float(v)
    out.update(
        tokens_in_total=s.tokens_in_total,
        tokens_out_total=s.tokens_out_total,
        throughput_rps=s.throughput_rps,
        wall_s=s.wall_s,
        n_examples=s.n,
        n_failed=s.n_failed,
        error_rate=s.error_rate,
        tokens_reasoning_total=s.tokens_reasoning_total,
        n_no_usage=s.n_no_usage,
        rate_limit_wait_s=s.rate_limit_wait_s,
        **{f"retries_{k}": float(v) for k, v in s.retries.items()},
    )
    return out


def examples_table(result: RunResult, loaded: LoadedSuite) -> dict[str, list[Any]]:
    """Per-example columns for `mlflow.log_table`."""
    names = loaded.suite.score_names
    cols: dict[str, list[Any]] = {
        k: [] for k in ("id", "input", "output", "tool_calls", "ok", "error", "error_class")
    }
    for n in names:
        cols[n] = []
    for k in ("latency_s", "ttft_s", "tokens_in", "tokens_out", "retries", "trace_id", "row"):
        cols[k] = []
    for ex, rec in zip(loaded.examples, result.records, strict=True):
        cols["id"].append(rec.id)
        cols["input"].append(ex.messages[-1]["content"])
        cols["output"].append(rec.output)
        cols["tool_calls"].append(json.dumps(rec.tool_calls) if rec.tool_calls else "")
        cols["ok"].append(rec.ok)
        cols["error"].append(rec.error or "")
        cols["error_class"].append(rec.error_class or "")
        for n in names:
            cols[n].append(rec.scores.get(n))
        for k in ("latency_s", "ttft_s", "tokens_in", "tokens_out", "retries", "trace_id"):
            cols[k].append(getattr(rec, k))
        cols["row"].append(json.dumps(ex.row, default=str))
    return cols


def log_genai_assessments(result: RunResult, loaded: LoadedSuite) -> int:
    """Attach each per-example score to its trace via `mlflow.genai.evaluate`; returns traces assessed."""
    import mlflow
    from mlflow.entities import Feedback
    from mlflow.genai.scorers import scorer

    by_trace = {r.trace_id: r for r in result.records if r.trace_id}
    if not by_trace:
        return 0
    traces = _read_traces(list(by_trace))
    corpus = {n for n, c in result.columns.items() if c.corpus is not None}

    def make(name: str) -> Any:
        def fn(trace: Any) -> Feedback:
            rec = by_trace[trace.info.trace_id]
            v = rec.scores.get(name)
            if v is None:
                why = rec.judge_notes.get(name) or rec.error or "not scored"
                return Feedback(name=name, error=why)
            return Feedback(name=name, value=float(v), rationale=rec.error or None)

        fn.__name__ = name
        return scorer(fn, name=name)

    scorers = [make(n) for n in loaded.suite.score_names if n not in corpus]
    from tasks.core.quiet import redirect_output_to_log

    # Its banner goes straight to stdout and its tqdm bar to stderr: both into the command's log file, if any.
    with redirect_output_to_log(), _scorers_unthrottled():
        mlflow.genai.evaluate(data=traces, scorers=scorers)
    return len(traces)


def _read_traces(trace_ids: list[str]) -> list[Any]:
    """The run's traces in `trace_ids` order, read back in one search rather than a `get_trace` each.

    `genai.evaluate` wants the stored traces (their ids, root span and inputs/outputs); one search over the
    active run's traces reads them in a few batched queries. Any id the search did not return (a trace not
    linked to the run) is read on its own, as before.
    """
    import mlflow

    run = mlflow.active_run()
    found: dict[str, Any] = {}
    if run is not None:
        found = {
            t.info.trace_id: t
            for t in mlflow.search_traces(
                locations=[run.info.experiment_id], run_id=run.info.run_id, return_type="list"
            )
        }
    out = []
    for tid in trace_ids:
        t = found.get(tid) or mlflow.get_trace(tid)
        if t is not None:
            out.append(t)
    return out


_unthrottle_lock = threading.Lock()
_unthrottle_users = 0


@contextlib.contextmanager
def _scorers_unthrottled() -> Iterator[None]:
    """No rate limit on scorer calls for the duration of a `genai.evaluate`, unless the environment sets one.

    Without MLFLOW_GENAI_EVAL_SCORER_RATE_LIMIT, `genai.evaluate` paces scorer calls at 10/s per scorer (adaptive,
    up to 2x), a guard for LLM judges behind a paid API. These scorers only hand MLflow scores computed by the
    runner, so the pacing was all wait: 960 calls (240 examples, 4 scores) spent ~19 s of a side's ~23 s asleep
    in the limiter. "0" is the documented value that disables it. Two sides logged at once (threads) share the
    override: the last to leave removes it, so neither finds it gone halfway.
    """
    global _unthrottle_users
    key = "MLFLOW_GENAI_EVAL_SCORER_RATE_LIMIT"
    with _unthrottle_lock:
        if _unthrottle_users == 0 and key in os.environ:
            ours = False  # the user's own setting: leave it alone
        else:
            ours = True
            _unthrottle_users += 1
            os.environ[key] = "0"
    try:
        yield
    finally:
        if ours:
            with _unthrottle_lock:
                _unthrottle_users -= 1
                if _unthrottle_users == 0:
                    os.environ.pop(key, None)


def log_result(
    result: RunResult,
    loaded: LoadedSuite,
    *,
    hourly_price: float | None = None,
    tier: str | None = None,
) -> dict[str, Interval]:
    """Log params, tags, metrics and the per-example table into the active run."""
    import mlflow

    t = result.target
    summaries = summarize(result)
    params = {
        "target": t.spec,
        "target_kind": t.kind,
        "model": t.model,
        "base_url": t.base_url,
        "suite": result.suite_name,
        "suite_version": result.suite_version,
        "concurrency": result.stats.concurrency,
        "temperature": result.generation.temperature,
        "max_tokens": result.generation.max_tokens,
    }
    # What was sent, and what the target's rules did to the suite's params: two runs are comparable only
    # when neither ignored or dropped a parameter the other honoured.
    params["params_sent"] = ",".join(sorted(k for k in result.request_params if k != "tools"))
    for kind, lines in result.request_rules.items():
        if lines:
            params[f"params_{kind}"] = "; ".join(lines)[:500]
    params["max_error_rate"] = result.max_error_rate
    if mv := result.info.model_entry.get("model_version"):
        params["model_version"] = mv
    if t.pricing is not None:
        params |= {
            "price_in_per_1m": t.pricing.price_in_per_1m,
            "price_out_per_1m": t.pricing.price_out_per_1m,
            "prices_as_of": str(t.pricing.prices_as_of),
        }
    mlflow.log_params(params)
    mlflow.set_tags(
        {
            "llmhost.kind": "eval",
            "llmhost.suite": result.suite_name,
            "llmhost.suite_version": result.suite_version,
            "llmhost.suite_hash": result.suite_hash,
            "llmhost.revision_hash": result.info.revision_hash,
            "llmhost.target": t.spec,
            "llmhost.run_failed": str(result.failed).lower(),
        }
    )
    metrics = metrics_of(result, summaries)
    if (cost := cost_of(result, hourly_price, tier).per_1k_requests_usd) is not None:
        metrics["cost_per_1k_requests_usd"] = cost
    mlflow.log_metrics(metrics)
    mlflow.log_table(examples_table(result, loaded), artifact_file=EXAMPLES_TABLE)
    if groups := result.error_groups:
        mlflow.log_dict({"errors": [g.model_dump() for g in groups]}, "eval_errors.json")
    return summaries


def log_cost(cmp: Comparison, out_dir: Path) -> Path | None:
    """Into the active comparison run: the cost figures as metrics and the break-even plot as an artifact."""
    import mlflow

    if cmp.cost is None:
        return None
    mlflow.log_metrics(cmp.cost.metrics())
    mlflow.log_dict(cmp.cost.model_dump(mode="json"), "cost.json")
    png = plot_break_even(cmp.cost, out_dir / BREAK_EVEN_PLOT)
    if png is not None:
        mlflow.log_artifact(str(png))
    return png
