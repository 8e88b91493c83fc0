"""Smoke tests of a replica: health, model list, chat, streaming and tool-call conformance.

Each check returns a record with its evidence, so a failed deploy can say exactly what broke.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from pydantic import BaseModel, Field

DEFAULT_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

# Markup a model emits for a tool call, and the vLLM parser that reads it (vLLM docs, "Tool Calling").
MARKUP_TO_PARSER: list[tuple[str, str]] = [
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
    ("<function=", "llama4_pythonic"),
    ("<|tool_call_begin|>", "kimi_k2"),
    ('{"name":', "llama3_json"),
]


class SmokeConfig(BaseModel):
    """What the smoke test sends; the defaults suit any chat model with tools."""

    prompt: str = Field(
        default="hello , can you help me ?", description="Chat prompt for the chat/stream checks."
    )
    max_tokens: int = Field(default=32, gt=0, le=4096)
    tool_prompt: str = Field(
        default="what is the weather in paris ?", description="Should trigger a tool call."
    )
    tools: list[dict[str, Any]] = Field(default_factory=lambda: [DEFAULT_TOOL])
    expect_tool: str | None = Field(default=None, description="Function name the call must use, if known.")
    timeout_s: float = Field(default=60.0, gt=0)


class SmokeCheck(BaseModel):
    name: str
    passed: bool
    detail: str
    seconds: float
    evidence: dict[str, Any] = Field(default_factory=dict)


class SmokeReport(BaseModel):
    base_url: str
    model: str
    checks: list[SmokeCheck]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[SmokeCheck]:
        return [c for c in self.checks if not c.passed]

    def markdown(self) -> str:
        rows = [
            f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.detail.replace('|', '/')} | "
            f"{c.seconds:.2f}s |"
            for c in self.checks
        ]
        return "\n".join(
            [
                f"Smoke test of `{self.model}` at {self.base_url}",
                "",
                "| check | result | detail | time |",
                "|---|---|---|---|",
                *rows,
            ]
        )


def suggest_parser(content: str) -> str | None:
    """The tool-call parser whose markup appears in `content`, if any."""
    for markup, parser in MARKUP_TO_PARSER:
        if markup in content:
            return parser
    return None


def _validate_args(arguments: str, tools: list[dict[str, Any]], name: str) -> str | None:
    """None when `arguments` is JSON matching the named tool's schema; otherwise why not."""
    import jsonschema

    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as exc:
        return f"arguments are not JSON ({exc.msg}): {arguments[:120]!r}"
    schema = next((t["function"].get("parameters") for t in tools if t["function"]["name"] == name), None)
    if schema is None:
        return f"called unknown function {name!r}; offered {[t['function']['name'] for t in tools]}"
    try:
        jsonschema.validate(parsed, schema)
    except jsonschema.ValidationError as exc:
        return f"arguments {parsed} do not match the schema: {exc.message}"
    return None


def _timed(name: str, fn: Callable[[], tuple[bool, str, dict[str, Any]]]) -> SmokeCheck:
    t0 = time.monotonic()
    try:
        ok, detail, evidence = fn()
    except Exception as exc:  # a smoke check reports every failure as evidence, never raises
        ok, detail, evidence = False, f"{type(exc).__name__}: {exc}"[:300], {}
    return SmokeCheck(
        name=name, passed=ok, detail=detail, seconds=round(time.monotonic() - t0, 3), evidence=evidence
    )


def run_smoke(
    base_url: str,
    model: str,
    config: SmokeConfig | None = None,
    *,
    api_key: str = "unused",
    tool_calling: bool = True,
    tool_call_parser: str | None = None,
) -> SmokeReport:
    """Runs every check against an OpenAI-compatible base URL (ending in /v1)."""
    import openai

    cfg = config or SmokeConfig()
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=cfg.timeout_s)
    root = base_url.rstrip("/").removesuffix("/v1")
    checks: list[SmokeCheck] = []

    def health() -> tuple[bool, str, dict[str, Any]]:
        r = httpx.get(f"{root}/health", timeout=cfg.timeout_s)
        return r.status_code == 200, f"GET /health -> {r.status_code}", {"status": r.status_code}

    def models() -> tuple[bool, str, dict[str, Any]]:
        ids = [m.id for m in client.models.list().data]
        ok = model in ids
        return ok, f"/v1/models lists {ids}" + ("" if ok else f"; {model!r} missing"), {"models": ids}

    def chat() -> tuple[bool, str, dict[str, Any]]:
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": cfg.prompt}],
            max_tokens=cfg.max_tokens,
            temperature=0,
        )
        text = r.choices[0].message.content or ""
        usage = r.usage.model_dump() if r.usage else {}
        ok = bool(text.strip()) and bool(usage.get("completion_tokens"))
        why = "non-empty with usage" if ok else ("empty content" if not text.strip() else "no usage reported")
        return ok, f"{why}: {text[:60]!r}", {"content": text, "usage": usage}

    def stream() -> tuple[bool, str, dict[str, Any]]:
        s = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": cfg.prompt}],
            max_tokens=cfg.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts, finish, chunks, usage = [], None, 0, None
        for chunk in s:
            chunks += 1
            if chunk.usage:
                usage = chunk.usage.model_dump()
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        text = "".join(parts)
        ok = finish in {"stop", "length"} and bool(text.strip())
        return (
            ok,
            f"{chunks} chunks, finish_reason={finish}",
            {"content": text, "usage": usage, "finish": finish},
        )

    def tools() -> tuple[bool, str, dict[str, Any]]:
        # Tools are plain dicts, as any client sends them; the SDK's overloads want its TypedDicts.
        r = client.chat.completions.create(  # type: ignore[call-overload]
            model=model,
            messages=[{"role": "user", "content": cfg.tool_prompt}],
            tools=cfg.tools,
            tool_choice="auto",
            max_tokens=max(cfg.max_tokens, 64),
            temperature=0,
        )
        msg = r.choices[0].message
        content = msg.content or ""
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in (msg.tool_calls or [])]
        evidence = {"content": content, "tool_calls": calls}
        markup = suggest_parser(content)
        if not calls:
            if markup and markup == tool_call_parser:
                hint = (
                    f"tool call landed in content, not tool_calls: the model wrote {markup} markup but the "
                    f"{markup} parser could not read it (malformed call?): {content[:120]!r}"
                )
            elif markup:
                hint = (
                    f"tool call landed in content, not tool_calls: the parser "
                    f"{tool_call_parser or '(none)'!r} likely does not match the model's format; "
                    f"use --tool-call-parser {markup} (tool_calling: {{parser: {markup}}} in the spec)"
                )
            else:
                hint = f"no tool call in the answer: {content[:120]!r}"
            return False, hint, evidence
        for c in calls:
            if cfg.expect_tool and c["name"] != cfg.expect_tool:
                return False, f"called {c['name']!r}, expected {cfg.expect_tool!r}", evidence
            problem = _validate_args(c["arguments"], cfg.tools, c["name"])
            if problem:
                return False, problem, evidence
        if markup and markup != "llama3_json":
            return False, f"tool_calls present but raw {markup} markup also left in content", evidence
        return True, f"{len(calls)} call(s): {calls[0]['name']}({calls[0]['arguments']})", evidence

    checks.append(_timed("health", health))
    checks.append(_timed("models", models))
    checks.append(_timed("chat", chat))
    checks.append(_timed("stream", stream))
    if tool_calling:
        checks.append(_timed("tool_calls", tools))
    return SmokeReport(base_url=base_url, model=model, checks=checks)
