"""`source: demo`: the flows build the demo model (and its task data) and register it as a path: source."""

from __future__ import annotations

from demo.build import build_demo_model, default_demo_dir, demo_cache_dir
from demo.data import write_task_data


def resolve_source(source: str) -> str:
    """'demo' -> the built demo model's path: SOURCE (built if missing); anything else as given."""
    if source != "demo":
        return source
    built = build_demo_model(demo_cache_dir())
    # demo/finetune.yaml reads {home}/demo/data: write the (deterministic) task data there too.
    write_task_data(default_demo_dir() / "data")
    return f"path:{built.model_dir}"
