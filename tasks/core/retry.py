"""The one transient-error predicate: every @task wrapper retries on it and on nothing else."""

from __future__ import annotations

from typing import Any

from tasks.core.errors import TransientError


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry can fix; bad input, refusals and failed checks fail the same way again."""
    return isinstance(exc, TransientError)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the failed state's exception is transient."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the state's own exception, re-raised by result()
        return is_transient(exc)
    return False
