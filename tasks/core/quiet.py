"""The console's discipline: our step lines and progress on screen, third-party noise off or in the run's log file.

`setup(command)` is called once by the console script, before the heavy libraries are imported, so every
switch below is the library's own (env vars read at import, logger levels). Library code only calls `say`,
`step` and `progress`: they print through the console once `setup` ran and log to the `llmhost` logger
otherwise (a Prefect worker relays that logger when `PREFECT_LOGGING_EXTRA_LOGGERS=llmhost`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

# Each switch silences one thing a newcomer saw bury the demo's story; kept in one place so every command agrees.
QUIET_ENV = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # 17 "Downloading artifacts" bars per model load
    "MLFLOW_CONFIGURE_LOGGING": "false",  # mlflow's logger then reaches our log file, not its own stderr handler
    "TRANSFORMERS_VERBOSITY": "error",  # "The following generation flags are not valid ..."
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_VERBOSITY": "error",  # "Repo card metadata block was not found" (huggingface_hub.repocard)
    "DATASETS_VERBOSITY": "error",
    "EVALUATE_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # its fork warning
    # Prefect's own INFO lines (task created, finished in state ...) stay in the UI and the log file.
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
}

# Loggers whose records go to the log file only (they no longer reach the console through the root logger).
TO_FILE = ("mlflow", "prefect", "py.warnings", "alembic", "urllib3", "httpx", "httpcore", "peft", "accelerate",
           "torch", "huggingface_hub", "datasets", "evaluate", "transformers", "filelock", "asyncio")

# Commands that load models, run flows or start servers: the ones with noise to hide.
NOISY = frozenset({"register", "size", "deploy", "rollback", "eval", "finetune", "adapters", "promote",
                   "lifecycle", "demo", "demo-serve"})
# Commands that run a Prefect flow in-process; Prefect resets its loggers on import, so it is imported first.
FLOWS = frozenset({"lifecycle", "demo", "finetune"})

log = logging.getLogger("llmhost")
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)  # progress is INFO; without this the root's WARNING level would drop it


class _State:
    console: Any = None  # rich Console on stderr, once setup ran
    log_path: Path | None = None
    live: Any = None  # the one rich Progress on screen (rich allows one live display at a time)
    announced: bool = False  # whether the log path was printed


_state = _State()


def active() -> bool:
    return _state.console is not None


def log_path() -> Path | None:
    return _state.log_path


# ---------------------------------------------------------------------------------------------- setup


def log_file_for(command: str, home: Path, now: datetime | None = None) -> Path:
    """`<home>/logs/<command>-<YYYYmmdd-HHMMSS>.log` (a new file per run)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return home / "logs" / f"{command.replace(' ', '-')}-{stamp}.log"


class _ConsoleHandler(logging.Handler):
    """Prints through the shared rich console, so lines land above a live progress bar, not inside it."""

    def emit(self, record: logging.LogRecord) -> None:
        if _state.console is not None:
            announce()
            _state.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)


def setup(argv: list[str]) -> Path | None:
    """Quiet the libraries and open the run's log file for a noisy command; its path is printed once (announce).

    Returns the log path, or None for commands that load nothing noisy (their output is left as is).
    """
    command = next((a for a in argv if not a.startswith("-")), "")
    if command not in NOISY or active() or "--help" in argv:
        return _state.log_path
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if command in FLOWS or "--flow" in argv:
        import prefect.main  # noqa: F401  # configures Prefect's logging now, so it does not reset our handlers later

    from rich.console import Console

    from tasks.core.settings import get_settings

    path = log_file_for(command, get_settings().home_abs)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8", delay=True)  # created at its first line
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in TO_FILE:
        lg = logging.getLogger(name)
        lg.addHandler(to_file)
        lg.propagate = False
        if name in {"mlflow", "py.warnings", "alembic"} and lg.level == logging.NOTSET:
            lg.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn(...) from any library -> py.warnings -> the file
    logging.getLogger().addHandler(to_file)  # anything else that propagates (Prefect may later reset the root)

    # Bound to the terminal's stream now, so a library's output redirected to the log later (redirect_output_to_log)
    # does not take our own step lines with it.
    _state.console = Console(file=sys.stderr, stderr=True)
    _state.log_path = path
    screen = _ConsoleHandler()
    screen.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(screen)
    log.addHandler(to_file)
    log.propagate = False
    return path


def announce() -> None:
    """Prints `log: PATH` once, before the command's first line on the console or as it ends.

    Never for bad input refused before anything ran: that prints its one `Error:` line and nothing else.
    """
    if _state.console is not None and not _state.announced:
        _state.announced = True
        _state.console.print(f"log: {_state.log_path}", markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------- lines


def say(msg: str, also: Callable[[str], Any] | None = None) -> None:
    """One line for the reader. `also` (e.g. a Prefect run logger) keeps it in the UI too."""
    if also is not None:
        also(msg)
    if active() or also is None:
        log.info(msg)


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def step_line(step: str, event: str, seconds: float | None = None, error: str | None = None) -> str:
    """`start   deploy`, `done    deploy (74.0s)`, `FAILED  deploy after 3.1s: reason`."""
    if event == "start":
        return f"start   {step}"
    if event == "done":
        return f"done    {step} ({seconds:.1f}s)"
    return f"FAILED  {step} after {seconds:.1f}s: {error}"


def progress_line(label: str, done: int, total: int, elapsed: float, unit: str = "step",
                  **fields: float | None) -> str:
    """`fine-tune step 40/500 (8%) loss 1.234 ETA 7m40s`; the ETA is the mean pace so far times what is left."""
    pct = 100 * done / total if total else 100.0
    parts = [f"{label} {unit} {done}/{total} ({pct:.0f}%)"]
    parts += [f"{k} {v:.3f}" for k, v in fields.items() if v is not None and math.isfinite(v)]
    if 0 < done < total:
        parts.append(f"ETA {duration(elapsed / done * (total - done))}")
    elif done >= total:
        parts.append(f"in {duration(elapsed)}")
    return " ".join(parts)


def _new_live() -> Any:
    announce()
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                    console=_state.console, transient=True, refresh_per_second=4)


def _drawing() -> bool:
    return active() and bool(_state.console.is_terminal)


@contextlib.contextmanager
def step(name: str, also: Callable[[str], Any] | None = None, heartbeat_s: float = 30.0) -> Iterator[None]:
    """A start line, an end line with the time taken, and a sign of life in between.

    On a terminal the sign of life is a spinner with the elapsed time; elsewhere (a pipe, a log file) a
    `... still running` line every `heartbeat_s` seconds, only when the console is ours.
    """
    say(step_line(name, "start"), also)
    t0 = time.monotonic()
    stop = threading.Event()
    beat: threading.Thread | None = None
    live_task = None
    owns_live = False
    if _drawing():
        if _state.live is None:
            _state.live, owns_live = _new_live(), True
            _state.live.start()
        live_task = _state.live.add_task(name, total=None, detail="")
    elif active():
        def _beat() -> None:
            while not stop.wait(heartbeat_s):
                say(f"        {name}: still running ({duration(time.monotonic() - t0)})")

        beat = threading.Thread(target=_beat, name=f"heartbeat-{name}", daemon=True)
        beat.start()
    try:
        yield
    except BaseException as exc:
        _end(live_task, owns_live, stop, beat)
        say(step_line(name, "failed", time.monotonic() - t0, str(exc).splitlines()[0][:200] if str(exc)
                      else type(exc).__name__), also)
        raise
    _end(live_task, owns_live, stop, beat)
    say(step_line(name, "done", time.monotonic() - t0), also)


def _end(live_task: Any, owns_live: bool, stop: threading.Event, beat: threading.Thread | None) -> None:
    stop.set()
    if beat is not None:
        beat.join(timeout=1)
    if _state.live is not None and live_task is not None:
        _state.live.remove_task(live_task)
        if owns_live:
            _state.live.stop()
            _state.live = None


class Progress:
    """Counts units of a long step: a bar on a terminal when `draw`, else a line every ~5% of the total."""

    def __init__(self, label: str, total: int, *, unit: str = "step", draw: bool = True, lines: int = 20,
                 also: Callable[[str], Any] | None = None):
        self.label, self.total, self.unit, self.also = label, max(1, int(total)), unit, also
        self.every = max(1, math.ceil(self.total / max(1, lines)))
        self.t0 = time.monotonic()
        self.done = 0
        self.fields: dict[str, float | None] = {}
        self._owns_live = False
        self._task = None
        if draw and _drawing():
            if _state.live is None:
                _state.live, self._owns_live = _new_live(), True
                _state.live.start()
            self._task = _state.live.add_task(label, total=self.total, detail="")

    def update(self, done: int, **fields: float | None) -> None:
        if done <= self.done:
            return
        prev, self.done, self.fields = self.done, min(done, self.total), fields
        line = progress_line(self.label, self.done, self.total, time.monotonic() - self.t0, self.unit, **fields)
        if self._task is not None:
            self._task_detail(line)
        elif prev == 0 or self.done == self.total or self.done // self.every > prev // self.every:
            say(line, self.also)

    def _task_detail(self, line: str) -> None:
        detail = line[len(self.label) + 1:]
        _state.live.update(self._task, completed=self.done, detail=detail)

    def close(self) -> None:
        if self._task is not None and _state.live is not None:
            _state.live.remove_task(self._task)
            if self._owns_live:
                _state.live.stop()
                _state.live = None
            self._task = None
            # The bar is transient: leave the final count on screen as a line.
            say(progress_line(self.label, self.done, self.total, time.monotonic() - self.t0, self.unit,
                              **self.fields), self.also)


def progress(label: str, total: int, **kw: Any) -> Progress:
    return Progress(label, total, **kw)


def redirect_stdout_to_log() -> contextlib.AbstractContextManager[Any]:
    """For a library that writes banners straight to sys.stdout (mlflow.genai.evaluate): into the log file."""
    if _state.log_path is None:
        return contextlib.nullcontext()
    return _AppendTo(_state.log_path, stderr=False)


def redirect_output_to_log() -> contextlib.AbstractContextManager[Any]:
    """Stdout and stderr into the log file: for a call that draws its own progress bar on stderr (tqdm's, in
    mlflow.genai.evaluate). Our step lines keep the terminal: their console was bound to it at setup."""
    if _state.log_path is None:
        return contextlib.nullcontext()
    return _AppendTo(_state.log_path, stderr=True)


class _AppendTo(contextlib.AbstractContextManager[Any]):
    def __init__(self, path: Path, *, stderr: bool):
        self.path, self.stderr = path, stderr

    def __enter__(self) -> Any:
        self._f = self.path.open("a", encoding="utf-8")
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self._f))
        if self.stderr:
            self._stack.enter_context(contextlib.redirect_stderr(self._f))
        return self._f

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        self._f.close()


__all__ = ["QUIET_ENV", "Progress", "active", "duration", "log_file_for", "log_path", "progress",
           "progress_line", "redirect_output_to_log", "redirect_stdout_to_log", "say", "setup", "step", "step_line"]
