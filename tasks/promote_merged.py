"""`serve_promoted: merged`: after a promoted adapter serves by route switch, merged weights replace it.

The background is its own process (`python -m tasks.promote_merged`), so it outlives the flow or command that
promoted: merge -> register the merged version (tags link it to the adapter) -> blue/green deploy of the spec pinned
to it -> `champion` moves to the merged version, which is now what serves. `previous-champion` keeps the version the
promotion replaced, so rollback still goes back to before the promotion. Every step is an audit entry; if one fails,
the adapter keeps serving and `champion` keeps naming it.

    python -m tasks.promote_merged NAME ADAPTER_VERSION SPEC_JSON [--actor A]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field

from tasks.core.errors import PromotionError
from tasks.core.settings import PROJECT_ROOT, get_settings
from tasks.core.tracking import mlflow_client
from tasks.deploy.promoted import ServingChange, serve_version
from tasks.deploy.spec import EndpointSpec
from tasks.finetune.merge import merge_adapter_version
from tasks.promote import CHAMPION, current_aliases
from tasks.store import audit


class MergedRollout(BaseModel):
    """A background merge-and-redeploy that was started."""

    pid: int
    log_path: str = Field(description="Its output; the audit log has its steps.")
    adapter: str = Field(description="NAME/VERSION of the promoted adapter.")
    endpoint: str


class MergedServing(BaseModel):
    adapter: str
    merged: str = Field(description="NAME/VERSION of the merged version that now serves.")
    max_abs_diff: float
    serving: ServingChange


def serve_merged(name: str, version: str, spec: EndpointSpec, *, actor: str) -> MergedServing:
    """Merge the promoted adapter, deploy the merged version blue/green, then point `champion` at it."""
    adapter = f"{name}/{version}"
    merged = merge_adapter_version(f"models:/{adapter}")
    m = merged.merged.version
    audit.record(actor, "merge", f"model:{name}", before={"adapter": adapter},
                 after={"merged": f"{name}/{m}", "base": merged.base, "max_abs_diff": merged.max_abs_diff},
                 endpoint=spec.name, model_version=f"{name}/{m}")
    if current_aliases(name).get(CHAMPION) != str(version):
        raise PromotionError(f"{adapter} is no longer the champion; merged version {m} is registered, not served")
    serving = serve_version(spec, f"models:/{name}/{m}", actor=actor)
    mlflow_client().set_registered_model_alias(name, CHAMPION, m)
    audit.record(actor, "promote.merged", f"model:{name}", before={CHAMPION: str(version)}, after={CHAMPION: m},
                 endpoint=spec.name, revision=serving.revision, model_version=f"{name}/{m}", merged_from=adapter,
                 serving=serving.method, serving_seconds=serving.seconds)
    return MergedServing(adapter=adapter, merged=f"{name}/{m}", max_abs_diff=merged.max_abs_diff, serving=serving)


def start_merged_rollout(name: str, version: str, spec: EndpointSpec, *, actor: str) -> MergedRollout:
    """Start `serve_merged` in its own process (it survives this one); returns at once."""
    runs = get_settings().runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    stem = runs / f"merge-{name}-v{version}-{int(time.time())}"
    spec_file = stem.with_suffix(".spec.json")
    spec_file.write_text(spec.model_dump_json())
    log_path = stem.with_suffix(".log")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.promote_merged", name, str(version), str(spec_file), "--actor", actor],
            cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    audit.record(actor, "promote.merge_started", f"model:{name}", after={"adapter": f"{name}/{version}",
                 "pid": proc.pid, "log": str(log_path)}, endpoint=spec.name)
    return MergedRollout(pid=proc.pid, log_path=str(log_path), adapter=f"{name}/{version}", endpoint=spec.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("version")
    ap.add_argument("spec_json", type=Path)
    ap.add_argument("--actor", default=None)
    args = ap.parse_args(argv)
    spec = EndpointSpec.model_validate_json(args.spec_json.read_text())
    actor = args.actor or audit.default_actor()
    try:
        done = serve_merged(args.name, args.version, spec, actor=actor)
    except Exception as exc:
        audit.record(actor, "promote.merge_failed", f"model:{args.name}", endpoint=spec.name,
                     after={"adapter": f"{args.name}/{args.version}", "error": f"{type(exc).__name__}: {exc}"[:2000]})
        raise
    print(f"{done.merged} (merged from {done.adapter}, max logit diff {done.max_abs_diff:.1e}) serves "
          f"{spec.name}: {done.serving.method} in {done.serving.seconds:.0f}s, revision {done.serving.revision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
