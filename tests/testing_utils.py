"""Skip markers and small shared builders in one place (like TRL's testing_utils)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tasks.serving.local import has_cuda_gpu

if TYPE_CHECKING:
    from tasks.finetune import FinetuneConfig

_SCAN = """
import json, sys
from pathlib import Path
req = json.load(sys.stdin)
needles = {what: bytes.fromhex(n) for what, n in req["needles"].items()}
hits = []
for p in req["paths"]:
    data = Path(p).read_bytes()
    hits += [[p, what] for what, n in needles.items() if n in data]
json.dump(hits, sys.stdout)
"""


def files_holding(paths: Iterable[Path], needles: Mapping[str, bytes]) -> list[tuple[str, str]]:
    """(file, what) for each needle found in each file, read by a child process.

    Never read a live SQLite database's files (the store, MLflow's, Prefect's, their -wal/-shm) from the test
    process: closing any descriptor of such a file drops every POSIX lock this process holds on it (fcntl
    semantics), so another process's connection can take itself for the first one and reset the WAL index under
    this one's connections. Seen here as a SIGBUS in SQLite and as a supervisor not finding a committed row.
    """
    req = {"paths": [str(p) for p in paths], "needles": {k: v.hex() for k, v in needles.items()}}
    out = subprocess.run([sys.executable, "-c", _SCAN], input=json.dumps(req), capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return [(p, what) for p, what in json.loads(out)]


requires_gpu = pytest.mark.skipif(not has_cuda_gpu(), reason="needs a CUDA GPU (nvidia-smi lists none)")


def small_config(data_dir: Path, base_model: str, **kw: Any) -> FinetuneConfig:
    """A few steps on the demo task: enough for the loss to fall and the outputs to change."""
    from tasks.finetune import DataSource, FinetuneConfig, LoraSettings

    fields = dict(
        base_model=base_model,
        train=[DataSource(path=data_dir / "train.jsonl"), DataSource(path=data_dir / "tools_train.jsonl")],
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        max_steps=16,
        learning_rate=3e-3,
        batch_size=8,
        eval_fraction=0.05,
        eval_steps=8,
        logging_steps=1,
        cpu_threads=1,
        progress=False,
        seed=0,
        lr_scheduler="constant",
    )
    fields.update(kw)
    return FinetuneConfig(**fields)
