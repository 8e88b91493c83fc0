"""Skip markers and small shared builders in one place (like TRL's testing_utils)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tasks.serving.local import has_cuda_gpu

if TYPE_CHECKING:
    from tasks.finetune import FinetuneConfig

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
