"""The lifecycle: register -> size -> deploy -> smoke -> evaluate -> fine-tune -> redeploy -> compare -> promote."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext

from tasks import lifecycle as steps
from tasks.lifecycle import LifecycleParams, LifecycleSummary, StepTiming

if TYPE_CHECKING:
    # Concrete return types: with `Any`, type checkers pick Prefect's async overload for these tasks.
    from tasks.deploy.adapters import AdapterChange
    from tasks.deploy import DeployResult
    from tasks.finetune import FinetuneResult
    from tasks.promote import PromotionRecord
    from tasks.register import RegisteredVersion
    from tasks.size import MemoryEstimate

# Steps that produce registry entries are cached on content hashes, so a rerun after a failure resumes
# where it stopped instead of registering or training again.
CACHE_FOR = timedelta(days=30)


def _register_key(ctx: TaskRunContext, args: dict[str, Any]) -> str:
    return steps.cache_key("register", args["name"], steps.source_digest(args["source"]))


def _finetune_key(ctx: TaskRunContext, args: dict[str, Any]) -> str:
    from tasks.finetune import config_hash

    cfg = args["config"]
    return steps.cache_key("finetune", config_hash(cfg), *steps.files_digest([s.path for s in cfg.train if s.path]))


@task(name="register", retries=2, retry_delay_seconds=10, cache_key_fn=_register_key, cache_expiration=CACHE_FOR,
      persist_result=True)
def register(source: str, name: str) -> RegisteredVersion:
    from tasks.register import register_model

    return register_model(source, name)


@task(name="size", retries=0)
def size(model_dir: str, spec_path: str) -> MemoryEstimate:
    from tasks.deploy import load_spec
    from tasks.size.io import make_request, size_model

    spec = load_spec(spec_path)
    est = size_model(model_dir, make_request(
        dtype=spec.vllm.dtype, max_model_len=spec.vllm.max_model_len, concurrency=spec.concurrency,
        tier=None if spec.hardware == "auto" else spec.hardware))
    create_markdown_artifact(est.explanation, key="lifecycle-sizing", description="Sizing of the champion")
    return est


@task(name="deploy", retries=1, retry_delay_seconds=10)
def deploy(spec_path: str, force: bool = False) -> DeployResult:
    from tasks.deploy import deploy as do_deploy
    from tasks.deploy import load_spec

    result = do_deploy(load_spec(spec_path), force=force)
    rows = [{"replica": rp.base_url, "check": c.name, "passed": c.passed, "detail": c.detail}
            for rp in result.smoke for c in rp.checks]
    if rows:
        create_table_artifact(rows, key="lifecycle-smoke", description=f"Smoke tests of revision {result.revision}")
    if result.outcome in {"failed", "refused"}:
        raise RuntimeError(result.message)
    return result


@task(name="evaluate", retries=0)
def evaluate(
    suite: str, candidate: str, baseline: str | None, limit: int | None, tier: str | None
) -> dict[str, Any]:
    from tasks.evaluate.mlflow_log import compare_targets, evaluate_target
    from tasks.evaluate.suite import load

    loaded = load(suite, limit=limit)
    if baseline is None:
        result, run_id = evaluate_target(loaded, candidate, progress=False, tier=tier)
        return {"run_ids": {candidate: run_id}, "result": result}
    outcome = compare_targets(loaded, candidate, baseline, progress=False, tier=tier)
    create_markdown_artifact(outcome.markdown, key="lifecycle-eval",
                             description=f"{candidate} vs {baseline} on {suite}")
    return {"run_ids": outcome.run_ids, "comparison": outcome.comparison, "markdown": outcome.markdown}


@task(name="fine-tune", retries=0, cache_key_fn=_finetune_key, cache_expiration=CACHE_FOR, persist_result=True)
def finetune(config: Any) -> FinetuneResult:
    from tasks.finetune import finetune as do_finetune

    return do_finetune(config, log=lambda _m: None)


@task(name="load-adapter", retries=2, retry_delay_seconds=5)
def load_adapter(endpoint: str, version_ref: str, name: str) -> AdapterChange:
    from tasks.deploy.adapters import load_into_endpoint

    return load_into_endpoint(endpoint, version_ref, name=name)


@task(name="promote", retries=0)
def promote(model: str, version: str, spec_path: str, evidence: dict[str, Any]) -> PromotionRecord:
    from tasks.promote import move_aliases

    record = move_aliases(model, version, actor="lifecycle", evidence=evidence)
    # The spec serves models:/NAME@champion: redeploying moves traffic blue/green with no failed request.
    deploy.fn(spec_path)
    return record


def _primary_score(cmp: Any, metric: str) -> tuple[float | None, float | None]:
    for m in cmp.metrics:
        if m.name == metric:
            return m.candidate.value, m.baseline.value
    return None, None


def _verdict_line(v: Any) -> str:
    """`READY TO REPLACE`, or `NOT YET (first failing check; ...)`."""
    return v.headline if v.ready else f"{v.headline} ({'; '.join(v.reasons[:2])})"


@flow(name="lifecycle", log_prints=True)
def lifecycle(params: LifecycleParams = LifecycleParams()) -> LifecycleSummary:  # noqa: B008
    """Runs every step in order; a failed step stops the flow with its reason."""
    from tasks.deploy import load_spec
    from tasks.finetune import trainable_base
    from tasks.promote import decide
    from tasks.register import resolve_model_ref
    from tasks.core.settings import get_settings

    log = get_run_logger()
    timings: list[StepTiming] = []

    def timed(step: str, fn: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.monotonic()
        out = fn(*args, **kw)
        timings.append(StepTiming(step=step, seconds=round(time.monotonic() - t0, 1)))
        log.info("%s done in %.1fs", step, timings[-1].seconds)
        return out

    spec = load_spec(params.endpoint_spec)
    parent = steps.start_parent_run(f"lifecycle {params.model_name}")
    summary = LifecycleSummary(model=params.model_name, champion_before="?", endpoint=spec.name,
                               gateway_url=steps.gateway_url(), mlflow_uri=get_settings().mlflow_uri,
                               parent_run_id=parent, metric=params.policy.must_improve[0])
    status = "FAILED"
    try:
        source = steps.resolve_source(params.source)
        registered = timed("register", register, source, params.model_name)
        champion = steps.ensure_champion(params.model_name, registered.version, actor="lifecycle")
        summary.champion_before = champion
        # After a promotion the champion is an adapter: size the base weights it is served on.
        resolved = resolve_model_ref(trainable_base(f"models:/{params.model_name}/{champion}"))
        timed("size", size, str(resolved.local_dir), params.endpoint_spec)
        steps.ensure_gateway()
        timed("deploy", deploy, params.endpoint_spec)
        # The eval runner reads the gateway key from LLMHOST_API_KEY; it lives in this process only.
        os.environ["LLMHOST_API_KEY"] = steps.service_key(spec.name)
        champion_target = f"endpoint:{spec.name}"
        ok, why = steps.frontier_available(params.frontier)
        summary.frontier = why
        if ok:
            front = timed("evaluate-frontier", evaluate, params.suite, champion_target, params.frontier,
                          params.eval_limit, params.tier)
            steps.attach_runs(parent, list(front["run_ids"].values()))
            summary.frontier_verdict = _verdict_line(front["comparison"].verdict)
        else:
            log.warning(why)
        ft_cfg = steps.finetune_config_for(params.finetune_config, f"models:/{params.model_name}/{champion}",
                                           params.finetune_max_steps)
        ft = timed("fine-tune", finetune, ft_cfg)
        steps.attach_runs(parent, [ft.run_id])
        summary.candidate = ft.registered_version
        adapter_name = f"v{ft.registered_version}"
        timed("redeploy", load_adapter, spec.name, f"models:/{params.model_name}/{ft.registered_version}",
              adapter_name)
        cmp_out = timed("compare", evaluate, params.suite, f"{champion_target}:{adapter_name}", champion_target,
                        params.eval_limit, params.tier)
        steps.attach_runs(parent, list(cmp_out["run_ids"].values()))
        cmp = cmp_out["comparison"]
        summary.tuned_score, summary.base_score = _primary_score(cmp, summary.metric)
        summary.verdict = _verdict_line(cmp.verdict)
        decision = decide(cmp, params.policy)
        create_markdown_artifact(decision.markdown(), key="lifecycle-promotion",
                                 description="Promotion decision")
        summary.decision = decision.summary
        if decision.promote:
            timed("promote", promote, params.model_name, str(ft.registered_version), params.endpoint_spec,
                  {"endpoint": spec.name, "eval_runs": sorted(cmp_out["run_ids"].values()),
                   "lifecycle_run": parent, "decision": decision.summary})
            summary.promoted = True
        summary.timings = timings
        status = "FINISHED"
        print(summary.text())
        return summary
    finally:
        summary.timings = timings
        steps.end_parent_run(parent, summary, status)
