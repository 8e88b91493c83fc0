"""One chat request of an eval, as the target's dialect wants it: shaped, paced, retried and classified.

`RequestPlan` is the run's request: the suite's parameters after a frontier's rules (`frontier_rules`), the
adaptations made when the API refused one, and the run's rate limiter. A request that fails for good raises
`Failure` with an error class (`failures`) so that the report can group errors and name each one's fix.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx2  # the openai SDK's HTTP client (a fork of httpx); its errors can surface mid-stream
import openai

from tasks.core.errors import EvalError
from tasks.core.settings import get_settings
from tasks.evaluate.failures import http_error_class
from tasks.evaluate.frontier_rules import adapt_to_error, apply_rules, is_reasoning, provider_of
from tasks.evaluate.metrics import ModelOutput
from tasks.evaluate.pacing import RateLimiter, estimate_tokens, retry_after_s
from tasks.evaluate.suite import GenerationParams
from tasks.evaluate.targets import ResolvedTarget, TargetInfo, endpoint_revision

RETRY_STATUS = {429, 500, 502, 503, 504}
ADAPT_CODES = ("unsupported_parameter", "unsupported_value")


class Failure(Exception):
    """A request that got no answer: the message, the retries spent and the error class."""

    def __init__(self, message: str, retries: int, error_class: str = "error"):
        self.retries = retries
        self.error_class = error_class
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


def request_params(gen: GenerationParams, suite_prompt: Any) -> dict[str, Any]:
    """The suite's chat parameters, before any target's rules."""
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


@dataclass
class RequestPlan:
    """The run's request parameters and what shaped them; shared (and adapted) by every request of a run."""

    kwargs: dict[str, Any]
    max_out: int
    reasoning: bool = False
    ignored: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    headroom: int = 0  # added when an adaptation turns max_tokens into max_completion_tokens
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def adapt(self, code: str | None, param: str | None) -> bool:
        """Change the request once after a 400 naming `param`; True when the next attempt differs."""
        with self._lock:
            if param and param not in self.kwargs and code in ADAPT_CODES:
                return True  # another request already adapted it: retry with the current parameters
            got = adapt_to_error(self.kwargs, code, param, self.headroom)
            if got is None:
                return False
            self.kwargs, note = got
            self.adapted.append(note)
            if "max_completion_tokens" in self.kwargs:
                self.reasoning = True  # the API asked for a reasoning model's budget
            return True

    def rules_report(self) -> dict[str, list[str]]:
        return {"ignored": self.ignored, "dropped": self.dropped, "changed": self.changed, "adapted": self.adapted}


def plan_for(target: ResolvedTarget, gen: GenerationParams, suite_prompt: Any) -> RequestPlan:
    """The request for `target`: a frontier's dialect rules and rate limits applied, others as the suite says."""
    return shape_request(target, request_params(gen, suite_prompt), gen.max_tokens, gen.reasoning_effort)


def shape_request(
    target: ResolvedTarget, base: dict[str, Any], max_out: int, reasoning_effort: Any = None
) -> RequestPlan:
    """`base` parameters as `target` takes them (a frontier's rules), with the target's rate limiter."""
    limiter = RateLimiter(target.rpm, target.tpm)
    if target.rules is None:
        return RequestPlan(kwargs=base, max_out=max_out, limiter=limiter)
    reasoning_dialect = target.dialects.get(f"{provider_of(target.rules)}-reasoning")
    kwargs, ignored, dropped, changed = apply_rules(
        target.rules, base, target.dialects, reasoning_effort=reasoning_effort
    )
    return RequestPlan(
        kwargs=kwargs,
        max_out=max_out,
        reasoning=is_reasoning(target.rules),
        ignored=ignored,
        dropped=dropped,
        changed=changed,
        limiter=limiter,
        headroom=reasoning_dialect.budget_headroom if reasoning_dialect else 0,
    )


async def stream_once(
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
    details = getattr(usage, "completion_tokens_details", None) if usage else None
    meta = {
        "latency_s": end - t0,
        "ttft_s": ttft,
        "tokens_in": usage.prompt_tokens if usage else None,
        "tokens_out": usage.completion_tokens if usage else None,
        "tokens_reasoning": getattr(details, "reasoning_tokens", None) if details else None,
        "finish_reason": finish,
        "started_ns": started_ns,
    }
    return out, meta


async def call_with_retries(
    client: openai.AsyncOpenAI,
    model: str,
    messages: list[dict[str, str]],
    plan: RequestPlan | dict[str, Any],
    max_retries: int,
    counts: Counter[str],
) -> tuple[ModelOutput, dict[str, Any], int]:
    """One request; 429, 5xx and timeouts are retried up to `max_retries` times and counted.

    The wait honours the server's hint (`retry-after-ms`, `Retry-After`, `x-ratelimit-reset-*`), and a 429's
    hint holds every request of the run. A 400 refusing a parameter adapts the run's request once.
    """
    if isinstance(plan, dict):
        plan = RequestPlan(kwargs=plan, max_out=int(plan.get("max_tokens") or 0))
    retries = adaptations = 0
    while True:
        await plan.limiter.acquire(estimate_tokens(messages, plan.max_out))
        try:
            out, meta = await stream_once(client, model, messages, plan.kwargs)
        except (openai.APITimeoutError, httpx2.TimeoutException) as exc:
            cause, err, eclass = "timeout", f"timeout after {type(exc).__name__}", "timeout"
            delay = 0.5 * 2**retries
        except openai.APIStatusError as exc:
            code = exc.code if isinstance(exc.code, str) else None
            param = exc.param if isinstance(exc.param, str) else None
            eclass = http_error_class(exc.status_code, code, param)
            if exc.status_code == 400 and adaptations < 3 and plan.adapt(code, param):
                adaptations += 1
                continue
            if exc.status_code not in RETRY_STATUS:
                raise Failure(f"HTTP {exc.status_code}: {exc.message}", retries, eclass) from None
            cause, err = ("429" if exc.status_code == 429 else "5xx"), f"HTTP {exc.status_code}: {exc.message}"
            hint = retry_after_s(exc.response.headers) if exc.response is not None else None
            delay = hint if hint is not None else 0.5 * 2**retries
            if exc.status_code == 429 and hint is not None:
                plan.limiter.pause(hint)
        except (openai.APIConnectionError, httpx2.TransportError) as exc:
            raise Failure(f"connection error: {exc.__cause__ or exc}", retries, "connection error") from None
        except openai.APIError as exc:  # an error event inside the stream
            raise Failure(f"API error: {exc.message}", retries, "error inside the stream") from None
        else:
            thought = plan.reasoning or bool(meta["tokens_reasoning"])
            if thought and meta["finish_reason"] == "length" and not out.text and not out.tool_calls:
                raise Failure(
                    f"no answer: the reasoning used the whole budget ({meta['tokens_reasoning']} reasoning "
                    f"tokens of max_completion_tokens {plan.kwargs.get('max_completion_tokens')})",
                    retries,
                    "reasoning budget exhausted",
                )
            return out, meta, retries
        if retries >= max_retries:
            raise Failure(f"{err} (gave up after {retries} retries)", retries, eclass)
        retries += 1
        counts[cause] += 1
        await asyncio.sleep(delay)
