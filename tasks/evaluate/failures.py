"""Failed examples, grouped by the class of error, each class with what to change to fix it.

A failed example is a failure of the run, not a wrong answer: past the suite's `max_error_rate` the run is
failed (non-zero exit, MLflow status FAILED) and a comparison with it cannot tell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel, Field


class _Rec(Protocol):
    ok: bool
    error: str | None
    error_class: str | None


def http_error_class(status: int, code: str | None, param: str | None) -> str:
    """`400 unsupported_parameter max_tokens`, `429 rate limited`, `503 server error`, `401 ...`."""
    if status == 429:
        return "429 rate limited"
    if status >= 500:
        return f"{status} server error"
    return " ".join(str(x) for x in (status, code, param) if x)


def fix_for(error_class: str, *, target: str, key_env: str | None = None) -> str:
    """The change that removes this class of error, in the user's words (the file and field to edit)."""
    parts = error_class.split()
    status = int(parts[0]) if parts and parts[0].isdigit() else None
    code = parts[1] if len(parts) > 1 else ""
    param = parts[2] if len(parts) > 2 else ""
    frontier = target.startswith("frontier:")
    where = f"for {target.removeprefix('frontier:')} in frontiers.yaml" if frontier else "in the suite's generation"
    if code in ("unsupported_parameter", "unsupported_value"):
        if param == "max_tokens":
            return f"this model takes max_completion_tokens; set `reasoning: true` {where}"
        if param in ("temperature", "top_p") and frontier:
            return (
                f"this model accepts only the default {param} (1): set `reasoning: true` {where}, "
                f"or `params: {{{param}: 1}}`"
            )
        return f"the model refuses {param or 'a parameter'}: set `params: {{{param or 'NAME'}: null}}` {where}"
    if status in (401, 403):
        return f"the API refused the key: check ${key_env or 'the key variable'} (a valid key for this provider)"
    if status == 404:
        return f"the API does not know the model: check `model` {where}"
    if status == 429:
        return (
            "rate limited after every retry: set `rpm`/`tpm` " + (where if frontier else "for the target")
            + " to your account's limits, lower --concurrency, or raise generation.max_retries"
        )
    if status is not None and status >= 500:
        return "the server kept failing: re-run later, or raise generation.max_retries in the suite"
    if status == 400:
        return "the API rejected the request: check the suite's generation params against the model's limits"
    if error_class == "timeout":
        return "raise generation.request_timeout_s in the suite, or lower --concurrency"
    if error_class == "connection error":
        return "the target could not be reached mid-run: check base_url and the network, then re-run"
    if error_class == "reasoning budget exhausted":
        return "hidden reasoning tokens count against the budget: raise generation.max_tokens in the suite"
    return "see the example's error in the run's eval_examples table"


class ErrorGroup(BaseModel):
    """One class of error: how many examples it failed, the fix, and one example's message."""

    error_class: str
    count: int
    fix: str
    example: str = Field(description="The first failed example's error message.")

    def line(self) -> str:
        return f"{self.count}x {self.error_class}: {self.fix}"


def group_errors(records: Sequence[_Rec], *, target: str, key_env: str | None = None) -> list[ErrorGroup]:
    """Failed records grouped by error class, the largest group first."""
    groups: dict[str, list[_Rec]] = {}
    for r in records:
        if not r.ok:
            groups.setdefault(r.error_class or "error", []).append(r)
    return [
        ErrorGroup(
            error_class=cls,
            count=len(rs),
            fix=fix_for(cls, target=target, key_env=key_env),
            example=rs[0].error or "",
        )
        for cls, rs in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    ]


def run_failed_line(n: int, n_failed: int, max_error_rate: float) -> str | None:
    """`FAILED: ...` when the share of failed examples exceeds `max_error_rate`, else None."""
    rate = n_failed / n if n else 0.0
    if rate <= max_error_rate:
        return None
    return (
        f"FAILED: {n_failed}/{n} examples got no answer (error rate {rate:.2f} > max_error_rate "
        f"{max_error_rate:g}); the scores do not measure the model. Fix the errors below and re-run"
    )
