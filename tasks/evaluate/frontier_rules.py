"""Each hosted API's request dialect: which chat-completion parameters a model takes, refuses or ignores.

The rules are data in `eval_suites/frontiers.yaml` (`dialects:`, each with its documentation URL and date);
this module only applies them. `apply_rules` is pure, so the eval runner and the gateway shape a request the
same way and report the same parameters as dropped or ignored.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any, Literal, NamedTuple
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field

Provider = Literal["openai", "anthropic", "gemini", "groq"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]

# Reasoning families by model name: o1, o3, o4..., gpt-5 and later (gpt-5, gpt-5-mini, gpt-5.1, gpt-6...).
REASONING_NAME = re.compile(r"(?:^|/)(?:o\d+(?:-|$)|gpt-(?:[5-9]|\d{2,})(?:[.-]|$))")

# Hosts whose OpenAI-compatible layer has its own dialect; any other host is taken to speak OpenAI's.
_HOSTS: dict[str, Provider] = {
    "api.openai.com": "openai",
    "openai.azure.com": "openai",
    "anthropic.com": "anthropic",
    "googleapis.com": "gemini",
    "groq.com": "groq",
}


class Dialect(BaseModel):
    """One provider's (or model family's) documented parameter rules, with where and when they were read."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="URL of the provider's page the rules were read from.")
    as_of: date = Field(description="Date the page was read.")
    rename: dict[str, str] = Field(default_factory=dict, description="Parameter -> the name this model takes.")
    refuse: list[str] = Field(default_factory=list, description="Answered with HTTP 400: never sent.")
    only: dict[str, float] = Field(
        default_factory=dict, description="Parameter -> the one value accepted; any other value is not sent."
    )
    cap: dict[str, float] = Field(default_factory=dict, description="Parameter -> largest value honoured.")
    ignored: list[str] = Field(default_factory=list, description="Accepted but without effect: reported.")
    reasoning_effort: bool = Field(default=False, description="Takes `reasoning_effort`.")
    budget_headroom: int = Field(
        default=0,
        ge=0,
        description="Added to a renamed `max_tokens`: hidden reasoning tokens count against the new budget.",
    )


class RuleEntry(BaseModel):
    """What `apply_rules` needs to know about a frontier entry (a subset of the catalog's `FrontierEntry`)."""

    base_url: str
    model: str
    provider: Provider | None = None
    reasoning: bool | None = None
    reasoning_effort: ReasoningEffort | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class Applied(NamedTuple):
    """The request to send and what the rules did to it, each item a readable `param: why` line."""

    kwargs: dict[str, Any]
    ignored: list[str]
    dropped: list[str]
    changed: list[str]


def provider_of(entry: RuleEntry) -> Provider:
    """The entry's provider: as set, else from its base URL's host (an unknown host speaks OpenAI's dialect)."""
    if entry.provider is not None:
        return entry.provider
    host = (urlparse(entry.base_url).hostname or "").lower()
    for suffix, provider in _HOSTS.items():
        if host == suffix or host.endswith("." + suffix):
            return provider
    return "openai"


def is_reasoning(entry: RuleEntry) -> bool:
    """As set by `reasoning:`, else recognised by model name (o1, o3, o4, gpt-5 and later)."""
    if entry.reasoning is not None:
        return entry.reasoning
    return bool(REASONING_NAME.search(entry.model.lower()))


def dialects_for(entry: RuleEntry, dialects: dict[str, Dialect]) -> list[tuple[str, Dialect]]:
    """The dialects that apply, in order: the provider's, then `<provider>-reasoning` for a reasoning model."""
    provider = provider_of(entry)
    names = [provider] + ([f"{provider}-reasoning"] if is_reasoning(entry) else [])
    return [(n, dialects[n]) for n in names if n in dialects]


def apply_rules(
    entry: RuleEntry,
    request_kwargs: dict[str, Any],
    dialects: dict[str, Dialect],
    *,
    reasoning_effort: ReasoningEffort | None = None,
) -> Applied:
    """Shape `request_kwargs` (chat-completion parameters, no messages) for `entry`'s model.

    Order: the entry's `params` overrides (a null value removes the parameter), then the dialect rules, so
    a user's `max_tokens: 256` is still renamed for a reasoning model. `reasoning_effort` comes from the
    entry, else from the caller (the suite); a model that does not take it does not get it.
    """
    kwargs = dict(request_kwargs)
    dropped: list[str] = []
    changed: list[str] = []
    ignored: list[str] = []
    for k, v in entry.params.items():
        if v is None:
            if kwargs.pop(k, None) is not None:
                dropped.append(f"{k}: removed by `params` in frontiers.yaml")
        else:
            kwargs[k] = v
    effort = entry.reasoning_effort or reasoning_effort or kwargs.pop("reasoning_effort", None)
    applicable = dialects_for(entry, dialects)
    takes_effort = is_reasoning(entry) and (
        any(d.reasoning_effort for _, d in applicable) or not applicable
    )
    for name, d in applicable:
        for old, new in d.rename.items():
            if old in kwargs:
                value = kwargs.pop(old)
                if new in kwargs:  # set explicitly (an entry's `params`): that value stands
                    changed.append(f"{old}={value}: not sent, {new}={kwargs[new]} is ({name} rules)")
                    continue
                extra = d.budget_headroom if old == "max_tokens" else 0
                kwargs[new] = value + extra if extra else value
                room = f" + {extra} for hidden reasoning" if extra else ""
                changed.append(f"{old}={value} -> {new}={kwargs[new]}{room} ({name} rules)")
        for k in d.refuse:
            if k in kwargs:
                kwargs.pop(k)
                dropped.append(f"{k}: refused by {name} models")
        for k, only in d.only.items():
            if k in kwargs and float(kwargs[k]) != only:
                dropped.append(f"{k}={kwargs.pop(k)}: {name} models accept only {only:g}")
        for k, cap in d.cap.items():
            if k in kwargs and float(kwargs[k]) > cap:
                changed.append(f"{k}: {kwargs[k]} capped at {cap:g} ({name})")
                kwargs[k] = cap
    if effort is not None:
        ignoring = [n for n, d in applicable if "reasoning_effort" in d.ignored]
        if takes_effort or ignoring:
            kwargs["reasoning_effort"] = effort
        else:
            dropped.append(f"reasoning_effort={effort}: {entry.model} is not a reasoning model")
    for name, d in applicable:
        ignored += [f"{k}: ignored by {name}" for k in d.ignored if k in kwargs]
    return Applied(kwargs, ignored, dropped, changed)


def adapt_to_error(
    kwargs: dict[str, Any], code: str | None, param: str | None, headroom: int = 0
) -> tuple[dict[str, Any], str] | None:
    """The request changed once after a 400 `unsupported_parameter`/`unsupported_value` naming `param`.

    `max_tokens` becomes `max_completion_tokens` plus `headroom` for hidden reasoning (OpenAI's reasoning
    models ask for exactly that); any other named parameter is left out. None: nothing to adapt (another
    error, or the parameter is not sent).
    """
    if code not in ("unsupported_parameter", "unsupported_value") or not param or param not in kwargs:
        return None
    out = dict(kwargs)
    value = out.pop(param)
    if param == "max_tokens":
        out.setdefault("max_completion_tokens", value + headroom)
        return out, (
            f"max_tokens={value} -> max_completion_tokens={out['max_completion_tokens']} "
            f"(the API answered 400 {code} for max_tokens)"
        )
    return out, f"{param}={value}: left out (the API answered 400 {code} for it)"


def param_names(lines: list[str]) -> list[str]:
    """The parameter names of `apply_rules` lines (`seed: ignored by anthropic` -> `seed`)."""
    return [re.split(r"[:= ]", line, maxsplit=1)[0] for line in lines]
