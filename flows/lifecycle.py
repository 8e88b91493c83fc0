"""The lifecycle: register -> size -> deploy -> smoke -> evaluate -> fine-tune -> redeploy -> compare -> promote."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from demo.standin import DEFAULT_STEPS, background_failure, build_in_background
from flows import lifecycle_support as support
from flows.demo_source import resolve_source
from flows.gateway import ensure_gateway, gateway_url
from flows.lifecycle_models import LifecycleParams, LifecycleSummary, StepTiming
from flows.tasks import (
    compare_task,
    deploy_task,
    finetune_cached,
    load_adapter_task,
    promote_task,
    register_model_cached,
    size_task,
    standin_task,
)
from tasks.core import quiet
from tasks.core.procs import kill_group
from tasks.core.settings import get_settings
from tasks.deploy import load_spec, sizing_request
from tasks.evaluate.compare import Comparison
from tasks.evaluate.recording import RecordMode, stop_background_records, wait_for_background_records
from tasks.evaluate.report import verdict_line, verdict_lines
from tasks.finetune import trainable_base
from tasks.promote import decide, mark_challenger
from tasks.register import resolve_model_ref

__all__ = ["LifecycleParams", "LifecycleSummary", "lifecycle"]

P = ParamSpec("P")
R = TypeVar("R")


def _primary_score(cmp: Comparison, metric: str) -> tuple[float | None, float | None]:
    for m in cmp.metrics:
        if m.name == metric:
            return m.candidate.value, m.baseline.value
    return None, None


@flow(name="lifecycle", log_prints=True)
def lifecycle(params: LifecycleParams = LifecycleParams()) -> LifecycleSummary:  # noqa: B008
    """Runs every step in order; a failed step stops the flow with its reason."""
    log = get_run_logger()
    timings: list[StepTiming] = []

    def timed(step: str, fn: Callable[P, R], *args: P.args, **kw: P.kwargs) -> R:
        # One line as each step starts and ends (and a sign of life between) on the console; the run log keeps both.
        # Our prints reach the run logger (log_prints), so what still writes to stdout during a step is a library's
        # own banner (mlflow.genai.evaluate's, with ANSI codes): under the CLI it goes to the run's log file.
        t0 = time.monotonic()
        with quiet.step(step, also=log.info), quiet.redirect_stdout_to_log():
            out = fn(*args, **kw)
        timings.append(StepTiming(step=step, seconds=round(time.monotonic() - t0, 1)))
        return out

    spec = load_spec(params.endpoint_spec)
    model = params.model_name
    parent = support.start_parent_run(f"lifecycle {model}")
    summary = LifecycleSummary(model=model, champion_before="?", endpoint=spec.name, gateway_url=gateway_url(),
                               mlflow_uri=get_settings().mlflow_uri, parent_run_id=parent,
                               metric=params.policy.must_improve[0])
    status = "FAILED"
    building: subprocess.Popen[bytes] | None = None
    try:
        registered = timed("register", register_model_cached, resolve_source(params.source), model)
        champion = summary.champion_before = support.ensure_champion(model, registered.version, actor="lifecycle")
        # After a promotion the champion is an adapter: size the base weights it is served on, with the very
        # request deploy enforces.
        resolved = resolve_model_ref(trainable_base(f"models:/{model}/{champion}"))
        timed("size", size_task, str(resolved.local_dir), sizing_request(spec), artifact_key="lifecycle-sizing")
        ensure_gateway()
        timed("deploy", deploy_task, spec)

        champion_target = f"endpoint:{spec.name}"
        frontier = params.frontier
        standin_steps = params.standin_steps or DEFAULT_STEPS
        ok = False

        def frontier_branch(record: RecordMode | None = None) -> None:
            """The champion against the frontier (or its stand-in): the question before any fine-tuning."""
            nonlocal frontier, ok
            if frontier is None and params.frontier_standin:
                frontier = timed("frontier-standin", standin_task, spec.name, standin_steps).frontier
            ok, summary.frontier = support.frontier_available(frontier)
            if ok and frontier:
                front = timed("evaluate-frontier", compare_task, params.suite, champion_target, frontier,
                              limit=params.eval_limit, tier=params.tier, gateway_key_for=spec.name,
                              artifact_key="lifecycle-eval", record=record)
                support.attach_runs(parent, [front.run_ids["comparison"]])
                summary.frontier_verdict = verdict_line(front.comparison.verdict)
                summary.frontier_lines = verdict_lines(f"champion v{champion}", front.comparison)
            else:
                log.warning(summary.frontier)

        # A stand-in not yet built on this machine trains in a child process beside the fine-tune (each on one of
        # a 2-core machine's cores); the frontier branch then follows the fine-tune, once both are trained, so that
        # no comparison is measured while a training shares the machine.
        standin_log = quiet.log_file_for("standin-build", get_settings().home_abs)
        building = (build_in_background(standin_steps, standin_log)
                    if frontier is None and params.frontier_standin else None)
        if building is None:
            # Its two side runs are recorded into MLflow by a child process on the core the fine-tune leaves idle
            # (~30 s of GIL-bound writes); the fine-tune's end collects it, before anything else is measured.
            frontier_branch(record="background")
        else:
            quiet.say(f"frontier stand-in: training in the background beside the fine-tune (pid {building.pid}, "
                      f"log {standin_log})", also=log.info)

        ft_cfg = support.finetune_config_for(params.finetune_config, f"models:/{model}/{champion}",
                                             params.finetune_max_steps)
        ft = timed("fine-tune", finetune_cached, ft_cfg, quiet=True)
        support.attach_runs(parent, [ft.run_id])
        wait_for_background_records()  # the frontier comparison's side runs, if recorded beside the fine-tune
        if building is not None:
            try:
                frontier_branch()  # serve_standin waits on the build's lock, then reuses what the child built
            finally:
                if failed := background_failure(building, standin_log):
                    quiet.say(failed, also=log.warning)
        summary.candidate = ft.registered_version
        mark_challenger(model, str(ft.registered_version), actor="lifecycle")  # under test from here on
        adapter = f"v{ft.registered_version}"
        timed("redeploy", load_adapter_task, spec.name, f"models:/{model}/{ft.registered_version}", adapter)

        cmp_out = timed("compare", compare_task, params.suite, f"{champion_target}:{adapter}", champion_target,
                        limit=params.eval_limit, tier=params.tier, gateway_key_for=spec.name,
                        artifact_key="lifecycle-eval")
        support.attach_runs(parent, [cmp_out.run_ids["comparison"]])
        cmp = cmp_out.comparison
        summary.tuned_score, summary.base_score = _primary_score(cmp, summary.metric)
        summary.verdict = verdict_line(cmp.verdict)

        if ok and frontier:
            # The same frontier run again, now against the tuned candidate: the question the project answers.
            cand_front = timed("candidate-vs-frontier", compare_task, params.suite, f"{champion_target}:{adapter}",
                               frontier, limit=params.eval_limit, tier=params.tier, gateway_key_for=spec.name,
                               artifact_key="lifecycle-eval", saturation=params.saturation)
            support.attach_runs(parent, [cand_front.run_ids["comparison"]])
            summary.candidate_frontier_verdict = verdict_line(cand_front.comparison.verdict)
            summary.frontier_lines += verdict_lines(f"candidate v{ft.registered_version}", cand_front.comparison)

        decision = decide(cmp, params.policy)
        create_markdown_artifact(decision.markdown(), key="lifecycle-promotion", description="Promotion decision")
        summary.decision = decision.summary
        if decision.promote:
            timed("promote", promote_task, model, str(ft.registered_version), spec,
                  {"endpoint": spec.name, "eval_runs": sorted(cmp_out.run_ids.values()),
                   "lifecycle_run": parent, "decision": decision.summary})
            summary.promoted = True
        summary.timings = timings
        status = "FINISHED"
        print(summary.text())
        return summary
    finally:
        summary.timings = timings
        stop_background_records()  # a failed run leaves no recorder behind (its side runs end FAILED)
        if building is not None and building.poll() is None:  # a failed run leaves no training behind
            kill_group(building.pid)  # its own session (start_new_session): the next run builds again
        support.end_parent_run(parent, summary, status)
