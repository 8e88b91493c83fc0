"""`source: demo`: the flows build the demo model (and its task data) and register it as a path: source."""

from __future__ import annotations

import os
from pathlib import Path

from demo.build import build_demo_model, default_demo_dir
from demo.data import write_task_data


def resolve_source(source: str) -> str:
    """'demo' -> the built demo model's path: SOURCE (built if missing); anything else as given."""
    if source != "demo":
        return source
    # LLMHOST_DEMO_CACHE lets tests and CI share one build across state dirs.
    where = Path(os.environ["LLMHOST_DEMO_CACHE"]) if os.environ.get("LLMHOST_DEMO_CACHE") else default_demo_dir()
    built = build_demo_model(where)
    # demo/finetune.yaml reads {home}/demo/data: write the (deterministic) task data there too.
    write_task_data(default_demo_dir() / "data")
    return f"path:{built.model_dir}"
