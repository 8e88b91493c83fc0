"""The demo's frontier stand-in (local): a stronger model than the demo's champion, priced as a hosted API.

`make demo` cannot reach a hosted API from here, yet it must show the whole answer to "can the self-hosted
model replace the API?". So it builds a different, stronger model, a LoRA adapter on the demo base trained
longer than the lifecycle's fine-tune and on twice the tool-call rows, serves it in the demo endpoint's own
vLLM process as one more served model (vLLM's runtime LoRA API: no second process, no restart), and writes a
catalog entry for it to `$LLMHOST_HOME/frontiers.d/demo-standin.yaml`, priced as `gpt-4o-mini` with that
entry's published prices. `standin_for` makes every report line name it "frontier stand-in (local)", so
nothing presents it as a hosted API. With a real key, `llmhost demo --frontier frontier:gpt-4o-mini` compares
with the real API instead.

The adapter is built once per machine and reused: the build is keyed on the demo base's content hash, the
recipe and the training data, like the demo model's own build.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field

from demo.build import BuildResult, build_demo_model, demo_cache_dir, dir_content_hash
from tasks.core.settings import PROJECT_ROOT, get_settings

CATALOG_NAME = "demo-standin"
SERVED_NAME = "frontier-standin"
PRICED_AS = "gpt-4o-mini"
KEY_ENV = "LLMHOST_STANDIN_KEY"  # optional: the local vLLM takes any key
DEFAULT_STEPS = 1200  # as many as the lifecycle's fine-tune, on twice its tool rows and on its held-out 5% too
TOOLS_REPEAT = 4  # the lifecycle's fine-tune repeats them twice
RECIPE_VERSION = "1"  # bump when the training changes in a way the config does not show


class StandinBuild(BaseModel):
    adapter_dir: Path
    build_key: str
    steps: int
    skipped: bool
    seconds: float
    final_loss: float | None = None


class StandinServed(BaseModel):
    frontier: str = Field(description="The eval target: frontier:demo-standin.")
    base_url: str
    served_name: str
    catalog_file: Path
    build: StandinBuild


def _recipe(base: BuildResult, steps: int) -> Any:
    """The lifecycle's demo fine-tune config, trained longer and on more of the tool-call task."""
    from tasks.finetune.config import DataSource, load_config

    cfg = load_config(PROJECT_ROOT / "demo" / "finetune.yaml")
    return cfg.model_copy(update={
        "train": [DataSource(path=base.data_dir / "train.jsonl"),
                  DataSource(path=base.data_dir / "tools_train.jsonl", repeat=TOOLS_REPEAT)],
        "max_steps": steps, "eval_fraction": 0.0, "eval_steps": None, "progress": False,
    })


def _key(base: BuildResult, cfg: Any) -> str:
    h = hashlib.sha256()
    h.update(base.content_hash.encode())
    h.update(cfg.model_dump_json(exclude={"train", "progress"}).encode())
    for src in cfg.train:
        h.update(f"{src.repeat}:".encode() + Path(src.path).read_bytes())
    h.update(RECIPE_VERSION.encode())
    return h.hexdigest()


def _built(out: Path, key: str) -> dict[str, Any] | None:
    """The build marker of `out` when it was built from `key` and is unchanged since, else None."""
    marker = out / ".build.json"
    if marker.exists():
        meta: dict[str, Any] = json.loads(marker.read_text())
        if meta.get("build_key") == key and meta.get("content_hash") == dir_content_hash(out):
            return meta
    return None


def _plan(demo_dir: Path, steps: int, log: Any) -> tuple[BuildResult, Any, str, Path]:
    """The demo base (built if missing), the recipe, its build key and the adapter's folder."""
    base = build_demo_model(demo_dir, log=log)
    cfg = _recipe(base, steps)
    out = Path(demo_dir).resolve() / f"frontier-standin-{steps}steps"  # a short test build never evicts the demo's
    return base, cfg, _key(base, cfg), out


def build_standin(demo_dir: Path, *, steps: int = DEFAULT_STEPS, log: Any = print) -> StandinBuild:
    """Writes `demo_dir/frontier-standin-<steps>steps` (a PEFT adapter); skipped when its inputs are unchanged.

    The build holds a file lock, so a call while another process builds (`build_in_background`) waits for that
    build and then reuses it."""
    base, cfg, key, out = _plan(demo_dir, steps, log)
    with (Path(demo_dir) / ".standin.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = _built(out, key)
        if meta is not None:
            return StandinBuild(adapter_dir=out, build_key=key, steps=steps, skipped=True, seconds=0.0,
                                final_loss=meta.get("final_loss"))
        from tasks.finetune.data import load_training_data
        from tasks.finetune.train import train_lora

        started = time.monotonic()
        log(f"demo: training the frontier stand-in (local), {steps} steps (once per machine)")
        outcome = train_lora(cfg, load_training_data(cfg), base.model_dir, label="frontier stand-in")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        outcome.model.save_pretrained(tmp, safe_serialization=True)
        final_loss = outcome.history.train[-1][1] if outcome.history.train else None
        (tmp / ".build.json").write_text(json.dumps({
            "build_key": key, "content_hash": dir_content_hash(tmp), "final_loss": final_loss, "steps": steps,
            "recipe": json.loads(cfg.model_dump_json(exclude={"train"})),
            "train": [{"path": str(s.path), "repeat": s.repeat} for s in cfg.train],
        }, indent=2, default=str))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return StandinBuild(adapter_dir=out, build_key=key, steps=steps, skipped=False,
                            seconds=round(time.monotonic() - started, 1), final_loss=final_loss)


def build_in_background(steps: int, log_file: Path, *, demo_dir: Path | None = None) -> subprocess.Popen[bytes] | None:
    """Start the stand-in's build in a child process (`python -m demo.standin`) unless it is already built.

    Its training runs on one thread (demo/finetune.yaml's cpu_threads), like the lifecycle's own fine-tune, so the
    two train side by side on a 2-core machine; `serve_standin` then waits on the build's lock and reuses it. None
    when the build is current (nothing to do)."""
    demo_dir = demo_dir or demo_cache_dir()
    _, _, key, adapter_dir = _plan(demo_dir, steps, lambda _m: None)
    if _built(adapter_dir, key) is not None:
        return None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:  # the child keeps its own copy of the fd
        return subprocess.Popen([sys.executable, "-u", "-m", "demo.standin", "--steps", str(steps), "--demo-dir",
                                 str(demo_dir)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=PROJECT_ROOT, start_new_session=True)


def background_failure(child: subprocess.Popen[bytes], log_file: Path, *, wait_s: float = 30.0) -> str | None:
    """One line when the build `build_in_background` started has failed, else None (done well, or still running).

    `build_standin` does not see the child: it waits on the build's lock and, finding no build behind it, trains
    in its own process. This line says why that happened and where the child's traceback is."""
    try:
        rc = child.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        return None
    if rc == 0:
        return None
    from tasks.serving.local import error_summary

    tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:]) if log_file.exists() else ""
    return (f"frontier stand-in: the background build exited with code {rc} ({error_summary(tail)}), so the "
            f"frontier step trained it in this process; the child's log: {log_file}")


def write_catalog_entry(base_url: str, *, priced_as: str = PRICED_AS) -> Path:
    """`$LLMHOST_HOME/frontiers.d/demo-standin.yaml`: the stand-in at `base_url`, priced as `priced_as`."""
    from tasks.evaluate.targets import load_frontiers

    api = load_frontiers()[priced_as]
    entry = {
        "base_url": base_url, "model": SERVED_NAME, "api_key_env": KEY_ENV, "standin_for": priced_as,
        "provider": "openai", "price_in_per_1m": api.price_in_per_1m, "price_out_per_1m": api.price_out_per_1m,
        "prices_as_of": api.prices_as_of.isoformat(), "pricing_url": api.pricing_url,
    }
    path = get_settings().home_abs / "frontiers.d" / f"{CATALOG_NAME}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Written by `llmhost demo`: the demo's frontier stand-in (local), served by the demo endpoint's\n"
              "# vLLM and priced as a hosted API. Not a hosted API. Rewritten on every demo run.\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + yaml.safe_dump({"frontiers": {CATALOG_NAME: entry}}, sort_keys=False))
    tmp.replace(path)
    return path


def serve_standin(endpoint: str, *, steps: int = DEFAULT_STEPS, demo_dir: Path | None = None,
                  log: Any = print) -> StandinServed:
    """Build (once), load into the first live replica of `endpoint` and register the catalog entry."""
    from tasks import store
    from tasks.core.errors import ConfigError
    from tasks.serving.lora import load_on_replica

    built = build_standin(demo_dir or demo_cache_dir(), steps=steps, log=log)
    reps = [r for r in store.list_replicas(endpoint) if r.state == "up"]
    if not reps:
        raise ConfigError("endpoint", endpoint, "has no live replica to serve the frontier stand-in on; deploy it")
    base_url = reps[0].base_url
    load_on_replica(base_url, SERVED_NAME, built.adapter_dir)
    return StandinServed(frontier=f"frontier:{CATALOG_NAME}", base_url=base_url, served_name=SERVED_NAME,
                         catalog_file=write_catalog_entry(base_url), build=built)


def main(argv: list[str] | None = None) -> int:
    """`python -m demo.standin [--steps N]`: build the stand-in's adapter (once; skipped when current)."""
    ap = argparse.ArgumentParser(prog="python -m demo.standin", description=main.__doc__)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--demo-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    built = build_standin(args.demo_dir or demo_cache_dir(), steps=args.steps)
    print(built.model_dump_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
