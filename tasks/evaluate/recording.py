"""Recording a measured eval side into its MLflow run, in this process or in a child process beside it.

A side's run is created when its measurement starts and stays RUNNING until its records are in: the traces, the
params, metrics and per-example table, and the GenAI assessments (`mlflow_logging`). That recording is pure
Python against the tracking store: about 11 s for a 240-example side on an idle 2-core machine and twice that
inside a flow, against 5-6 s for the side's requests. It is GIL-bound, so a comparison that measured both sides
records one in a child process (`python -m tasks.evaluate.recording`, fed a pickle on stdin) while this process
records the other: the two share the tracking store as two MLflow clients would (SQLite's busy timeout
serialises their commits). Recording never overlaps a measurement: both sides are measured before either is
recorded, so no request's latency is paid for by the writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tasks.core.errors import EvalError
from tasks.core.tracking import configure_mlflow, experiment_scope
from tasks.evaluate.mlflow_logging import log_genai_assessments, log_result, log_traces
from tasks.evaluate.runner import RunResult
from tasks.evaluate.suite import LoadedSuite

RecordMode = Literal["inline", "parallel", "background"]
RECORD_MODES: tuple[str, ...] = ("inline", "parallel", "background")


def resolve_record_mode(mode: str | None) -> RecordMode:
    """`mode` checked, or the default: `parallel` where there is a second core for the child to use (on one core it
    would only add its start). `background` is never a default: its caller must collect it
    (`wait_for_background_records`)."""
    if mode is None:
        return "parallel" if (os.cpu_count() or 1) >= 2 else "inline"
    if mode not in RECORD_MODES:
        raise EvalError(f"record={mode!r} is invalid: use one of {', '.join(RECORD_MODES)}")
    return mode  # type: ignore[return-value]


def end_run_failed(run_id: str) -> None:
    """End a side's run FAILED if it is still RUNNING: its measurement or its recorder did not get to end it."""
    import mlflow

    with contextlib.suppress(Exception):
        client = mlflow.MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="FAILED")


@dataclass
class SideRecord:
    """What recording one side needs: the side's result, its (RUNNING) run, and the run's pricing context."""

    loaded: LoadedSuite
    result: RunResult
    run_id: str
    experiment_id: str
    trace: bool = True
    genai: bool = True
    hourly_price: float | None = None
    tier: str | None = None


def record_into_active_run(side: SideRecord) -> None:
    """Traces, then params/metrics/table (the table names each example's trace), then the assessments."""
    import mlflow

    result, loaded = side.result, side.loaded
    if side.trace:
        t0 = time.perf_counter()
        log_traces(result, loaded)
        mlflow.log_metric("trace_logging_s", time.perf_counter() - t0)
    log_result(result, loaded, hourly_price=side.hourly_price, tier=side.tier)
    if side.trace and side.genai:
        t0 = time.perf_counter()
        n = log_genai_assessments(result, loaded)
        mlflow.log_metric("genai_assessment_s", time.perf_counter() - t0)
        mlflow.set_tag("llmhost.genai_traces", str(n))


def record_side(side: SideRecord) -> None:
    """Resume the side's run, record into it, and end it: FINISHED, or FAILED when too many examples failed.

    An exception while recording ends the run FAILED (MLflow's own `start_run` exit) and propagates.
    """
    import mlflow

    configure_mlflow()  # in a child, MLFLOW_TRACKING_URI is its parent's URI
    # nested: in the comparison's process its parent run is active; resuming a run by id leaves its tags alone.
    with experiment_scope(side.experiment_id), mlflow.start_run(run_id=side.run_id, nested=True):
        t0 = time.perf_counter()
        record_into_active_run(side)
        mlflow.log_metric("record_s", time.perf_counter() - t0)
    if side.result.failed:
        mlflow.MlflowClient().set_terminated(side.run_id, status="FAILED")


class ChildRecorder:
    """Sides recorded one after the other by a child process; `wait()` gives each record its trace id, or raises
    EvalError naming the first side that could not be recorded (after the child has tried every side)."""

    def __init__(self, sides: list[SideRecord], tracking_uri: str):
        self.sides = sides
        self._out = tempfile.NamedTemporaryFile(prefix="llmhost-record-", suffix=".log", delete=False)  # noqa: SIM115
        self._report = Path(self._out.name).with_suffix(".json")
        # The child imports only MLflow and the eval modules (4-5 s with genai.evaluate's), not the flow's imports.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.evaluate.recording", str(self._report)],
            stdin=subprocess.PIPE,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        )
        assert self.proc.stdin is not None
        try:
            with self.proc.stdin:
                # Through a pipe, never a file: the records hold the suite's data. A key is never on a target.
                # With this process's argv[0]: MLflow names it as each trace's `mlflow.source.name`.
                pickle.dump((sys.argv[0], sides), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:
            self.kill()
            raise

    def wait(self) -> None:
        try:
            rc = self.proc.wait()
            self._out.close()
            text = Path(self._out.name).read_text(errors="replace")
            _append_to_command_log(text)
            last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), f"exit code {rc}")
            report = json.loads(self._report.read_text()) if rc == 0 and self._report.is_file() else None
            errors = []
            for i, side in enumerate(self.sides):
                got = report[i] if report is not None else {"error": last}
                if "error" in got:
                    end_run_failed(side.run_id)
                    errors.append(EvalError(f"recording the eval run {side.run_id} ({side.result.target.spec}) "
                                            f"into MLflow failed in its child process: {got['error']}"))
                    continue
                for rec, tid in zip(side.result.records, got["trace_ids"], strict=True):
                    rec.trace_id = tid
            if errors:
                raise errors[0]
        finally:
            self._cleanup()

    def kill(self) -> None:
        """Stop the child (an interrupted comparison or flow): what it had not recorded ends FAILED."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            for side in self.sides:
                end_run_failed(side.run_id)
        self._cleanup()

    def _cleanup(self) -> None:
        self._out.close()
        for p in (Path(self._out.name), self._report):
            with contextlib.suppress(OSError):
                p.unlink()


def _append_to_command_log(text: str) -> None:
    from tasks.core import quiet

    if text and (path := quiet.log_path()) is not None:
        with contextlib.suppress(OSError), path.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")


_background: list[ChildRecorder] = []
_background_lock = threading.Lock()


def _take_background() -> list[ChildRecorder]:
    with _background_lock:
        pending = list(_background)
        _background.clear()
    return pending


def wait_for_background_records() -> None:
    """Wait for every side being recorded in the background; raises the first failure once all have ended.

    Every measurement calls it first (`running`), so no request is timed while a background recorder runs.
    """
    errors: list[Exception] = []
    for child in _take_background():
        try:
            child.wait()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def stop_background_records() -> None:
    """Kill what is still recording in the background (a failed flow): its runs end FAILED."""
    for child in _take_background():
        child.kill()


def record_sides(sides: list[SideRecord], mode: RecordMode | None = None) -> None:
    """Record every side: one after the other here (`inline`); or the first ones in child processes while this
    process records the last (`parallel`), then wait for them; or all of them, one after the other, in one child
    process that this one does not wait for (`background`: for a caller with work that leaves a core idle, such
    as the lifecycle's one-thread fine-tune; `wait_for_background_records` collects it). Every side is recorded
    even when one fails; the first failure is raised after. No mode: `resolve_record_mode`'s default."""
    import mlflow

    mode = resolve_record_mode(mode)
    if mode == "background":
        child = ChildRecorder(sides, mlflow.get_tracking_uri())
        with _background_lock:
            _background.append(child)
        return
    children: list[ChildRecorder] = []
    if mode == "parallel" and len(sides) > 1:
        uri = mlflow.get_tracking_uri()
        children = [ChildRecorder([s], uri) for s in sides[:-1]]
        here = sides[-1:]
    else:
        here = sides
    errors: list[BaseException] = []
    try:
        for s in here:
            try:
                record_side(s)
            except Exception as exc:  # the children still finish their runs before this is raised
                errors.append(exc)
        for c in children:
            try:
                c.wait()
            except Exception as exc:
                errors.append(exc)
    finally:
        for c in children:  # interrupted: no child outlives the comparison
            c.kill()
    if errors:
        raise errors[0]


def _main(argv: list[str]) -> int:
    """The child: the parent's argv[0] and SideRecords, pickled, on stdin; writes, per side, its trace ids or its
    error as JSON to argv[1]."""
    argv0, sides = pickle.load(sys.stdin.buffer)  # noqa: S301 - our own parent's pipe
    sys.argv[0] = argv0  # the traces' source is the parent's program, as if it had recorded them itself
    report: list[dict[str, object]] = []
    for side in sides:
        try:
            record_side(side)
        except Exception as exc:  # the next side is still recorded; the parent raises the first error
            traceback.print_exc()
            report.append({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
        else:
            report.append({"trace_ids": [r.trace_id for r in side.result.records]})
    Path(argv[1]).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))


__all__ = [
    "RECORD_MODES",
    "ChildRecorder",
    "RecordMode",
    "SideRecord",
    "end_run_failed",
    "record_into_active_run",
    "record_side",
    "record_sides",
    "resolve_record_mode",
    "stop_background_records",
    "wait_for_background_records",
]
