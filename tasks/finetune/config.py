"""The fine-tune config: data sources, LoRA shape, contamination settings and the run's knobs, from YAML."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.core.inputs import load_yaml_model
from tasks.core.settings import get_settings

FINETUNE_EXPERIMENT = "llmhost-finetune"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSource(_Strict):
    """One source of chat rows: a local JSONL file or a `datasets` reference."""

    path: Path | None = Field(default=None, description="JSONL of chat rows ({'messages': [...], 'tools'?}).")
    dataset: str | None = Field(default=None, description="datasets.load_dataset name or hub id.")
    config: str | None = Field(default=None, description="datasets config name.")
    data_files: str | list[str] | None = Field(
        default=None, description="For builder datasets such as 'json'."
    )
    split: str = Field(default="train", description="datasets split, e.g. 'train[:1000]'.")
    repeat: int = Field(
        default=1, ge=1, le=100, description="Oversample this source N times (training only)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("set exactly one of path (JSONL) or dataset (datasets reference)")
        return self

    def label(self) -> str:
        return str(self.path) if self.path is not None else f"{self.dataset}[{self.split}]"


class LoraSettings(_Strict):
    """LoRA shape; vLLM serves the adapter only if its rank is <= the replica's --max-lora-rank."""

    r: int = Field(default=16, ge=1, le=512, description="Rank of the update matrices.")
    alpha: int = Field(default=32, ge=1, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="Module names, or every linear layer except the output head."
    )


class ContaminationSettings(_Strict):
    """Which eval data the training rows are checked against, and how much overlap is tolerated."""

    suites: list[str] | None = Field(
        default=None,
        description="Suite names or YAML paths; None = every suite in eval_suites/ (suites do not declare "
        "their task, so checking all of them is the safe superset of 'suites of the same task').",
    )
    eval_files: list[Path] = Field(
        default_factory=list, description="Extra eval JSONL files (task rows or chat rows) to check."
    )
    max_overlap: float = Field(
        default=0.0, ge=0, le=1, description="Largest tolerated fraction of an eval set found in training."
    )
    skip: bool = Field(
        default=False, description="Skip the check (logged as skipped; not for promotion runs)."
    )


class FinetuneConfig(_Strict):
    """Everything one fine-tuning run needs; its hash tags the registered adapter version."""

    base_model: str = Field(
        description="Registered base version: models:/NAME/VERSION or models:/NAME@ALIAS."
    )
    train: list[DataSource] = Field(min_length=1, description="Chat-format training data.")
    eval: list[DataSource] = Field(
        default_factory=list, description="Held-out chat rows for the eval loss; empty = split off train."
    )
    eval_fraction: float = Field(
        default=0.05, ge=0, le=0.5, description="Share of train rows held out when `eval` is empty."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps; overrides epochs.")
    epochs: float = Field(default=1.0, gt=0, le=100)
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    batch_size: int = Field(default=8, ge=1, le=1024, description="Rows per device step.")
    gradient_accumulation: int = Field(default=1, ge=1, le=1024)
    max_seq_len: int = Field(default=1024, ge=16, le=1_048_576, description="Longer rows are truncated.")
    seed: int = Field(default=0, ge=0)
    qlora: bool = Field(
        default=False,
        description="4-bit NF4 base weights computing in `precision` (QLoRA); needs bitsandbytes on a CUDA GPU, "
        "refused elsewhere before anything runs.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="Training dtype of the frozen base and of autocast. auto: fp32 on a CPU; on a GPU the base's "
        "saved dtype where the GPU computes in it, else bf16, else fp16 with loss scaling. An explicit value the "
        "hardware lacks (bf16/fp16 on a CPU, bf16 before Ampere) is refused rather than swapped.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass: less GPU memory for longer rows, ~30% slower.",
    )
    logging_steps: int = Field(default=1, ge=1, description="Log train loss every N steps.")
    eval_steps: int | None = Field(
        default=None, ge=1, description="Eval loss every N steps; None = ~10 per run."
    )
    contamination: ContaminationSettings = Field(default_factory=ContaminationSettings)
    register_version: bool = Field(default=True, description="Register the adapter as a new model version.")
    experiment: str = Field(default=FINETUNE_EXPERIMENT, description="MLflow experiment of the run.")
    run_name: str | None = None
    progress: bool = Field(
        default=True,
        description="Draw a progress bar (step / total, loss, time left) on a terminal; off, as in flows, the "
        "same line is logged every ~5% of the steps instead.",
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="torch CPU threads while training; None = torch's default. A tiny model trains several "
        "times faster on 1 thread than on 2 busy cores (measured: 0.13 s vs 0.6-3 s per step).",
    )

    @field_validator("base_model")
    @classmethod
    def _model_ref(cls, v: str) -> str:
        if not re.fullmatch(r"models:/[^/@]+(@[\w.-]+|/\w+)", v):
            raise ValueError("use models:/NAME/VERSION or models:/NAME@ALIAS (register the base model first)")
        return v


def config_hash(cfg: FinetuneConfig) -> str:
    """sha256 of the config's canonical JSON (paths as given); equal configs get equal hashes."""
    # Speed and memory knobs do not change what is learned; `precision: auto` is left out so that configs
    # written before the field existed keep their hash (and flows/caching.py its cache hits).
    body = cfg.model_dump(mode="json", exclude={"progress", "run_name", "cpu_threads", "gradient_checkpointing"})
    if body.get("precision") == "auto":
        del body["precision"]
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _expand(path: Path, base: Path) -> Path:
    """`{home}` -> the state dir, `$VARS` expanded, relative paths taken from the config file's folder."""
    text = os.path.expandvars(str(path)).replace("{home}", str(get_settings().home_abs))
    p = Path(text).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def resolve_paths(cfg: FinetuneConfig, base: Path) -> FinetuneConfig:
    """A copy whose file paths are absolute (relative ones are taken from `base`)."""
    out = cfg.model_copy(deep=True)
    for src in [*out.train, *out.eval]:
        if src.path is not None:
            src.path = _expand(src.path, base)
    out.contamination.eval_files = [_expand(p, base) for p in out.contamination.eval_files]
    return out


def load_config(path: str | Path) -> FinetuneConfig:
    """Read a fine-tune YAML; errors name the file, the field and the fix."""
    cfg = load_yaml_model(path, FinetuneConfig, field="config", example="a fine-tune YAML, e.g. demo/finetune.yaml")
    return resolve_paths(cfg, Path(path).resolve().parent)
