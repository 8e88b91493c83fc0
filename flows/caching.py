"""Prefect cache keys for the steps that create registry entries: content digests and the state dir's identity.

A rerun after a failure resumes where it stopped instead of registering or training again.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext

from demo.build import dir_content_hash
from tasks.core.settings import get_settings
from tasks.finetune import config_hash

CACHE_FOR = timedelta(days=30)


def source_digest(source: str) -> str:
    """A content key for caching: the folder's file hashes for path:, the string otherwise."""
    if source.startswith("path:"):
        p = Path(source[5:])
        if p.is_dir():
            return dir_content_hash(p)
    return hashlib.sha256(source.encode()).hexdigest()


def files_digest(paths: list[Path]) -> list[str]:
    """sha256 of each file's bytes: training data edits must invalidate a cached fine-tune."""
    out = []
    for p in paths:
        p = Path(str(p).replace("{home}", str(get_settings().home_abs)))
        out.append(hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else f"missing:{p}")
    return out


def state_instance_id() -> str:
    """A random id written once per state dir: a wiped and recreated dir at the same path gets a new one."""
    settings = get_settings()
    settings.ensure_dirs()
    path = settings.home_abs / "instance-id"
    if not path.exists():
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(uuid.uuid4().hex + "\n")
        try:
            os.link(tmp, path)  # first writer wins; a concurrent one reads the winner's id
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def cache_key(step: str, *parts: str) -> str:
    """Prefect cache key over the MLflow store and this state dir's instance id.

    Prefect keeps its results outside the state dir (~/.prefect), so after `make clean-state` a key of the
    URI alone would hand back versions from the deleted registry.
    """
    ident = [get_settings().mlflow_uri, state_instance_id()]
    h = hashlib.sha256("|".join([*ident, *parts]).encode()).hexdigest()
    return f"llmhost-{step}-{h[:32]}"


def register_key(ctx: TaskRunContext, args: dict[str, Any]) -> str:
    return cache_key("register", args["name"], source_digest(args["source"]))


def finetune_key(ctx: TaskRunContext, args: dict[str, Any]) -> str:
    cfg = args["config"]
    return cache_key("finetune", config_hash(cfg), *files_digest([s.path for s in cfg.train if s.path]))
