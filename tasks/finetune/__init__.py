"""Fine-tune a registered model with PEFT LoRA, log the run to MLflow, register the adapter as a new version.

The lifecycle sentence: check the training rows against every eval suite (contamination) -> train LoRA with
the loss on assistant tokens only -> log params, per-step losses and a loss plot -> log the adapter with
`mlflow.transformers.log_model(base_model_path=...)` and prove a reload gives the same logits -> register it
as a new version of the base's registered model, tagged `adapter=true`.

Why `base_model_path`: a PEFT model logged the default way comes back with randomly re-initialised base
weights (MLflow issue #23761, reproduced here), so the adapter is stored alone with a link to the base
version's local folder, and every run re-loads it and compares logits before registering.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.core.errors import ConfigError, FinetuneError
from tasks.core.inputs import load_yaml_model, read_jsonl
from tasks.core.settings import PROJECT_ROOT, get_settings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FINETUNE_EXPERIMENT = "llmhost-finetune"
MLFLOW_MODEL_NAME = "model"
SUITES_DIR = PROJECT_ROOT / "eval_suites"
# The row fields that hold the prompt text in task-format eval files ({"message": ..., "queue": ...}).
PROMPT_FIELDS = ("message", "prompt", "question", "input", "text", "query")
RELOAD_ATOL = 1e-4


class ContaminationError(FinetuneError):
    """Training rows overlap an eval suite beyond the allowed fraction."""


# ---------------------------------------------------------------------------------------------- config


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
    qlora: bool = Field(default=False, description="4-bit base weights (bitsandbytes); needs a CUDA GPU.")
    logging_steps: int = Field(default=1, ge=1, description="Log train loss every N steps.")
    eval_steps: int | None = Field(
        default=None, ge=1, description="Eval loss every N steps; None = ~10 per run."
    )
    contamination: ContaminationSettings = Field(default_factory=ContaminationSettings)
    register_version: bool = Field(default=True, description="Register the adapter as a new model version.")
    experiment: str = Field(default=FINETUNE_EXPERIMENT, description="MLflow experiment of the run.")
    run_name: str | None = None
    progress: bool = Field(default=True, description="Show a progress bar.")
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
    body = cfg.model_dump(mode="json", exclude={"progress", "run_name", "cpu_threads"})
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


# ---------------------------------------------------------------------------------------------- preflight


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def preflight(cfg: FinetuneConfig, *, has_cuda: bool | None = None) -> None:
    """Refuse what cannot run here before anything is loaded."""
    has_cuda = cuda_available() if has_cuda is None else has_cuda
    if cfg.qlora and not has_cuda:
        raise FinetuneError(
            "qlora=True needs a CUDA GPU (bitsandbytes 4-bit weights) and this machine has none; "
            "set qlora: false to train LoRA in full precision on the CPU"
        )
    if cfg.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise FinetuneError(
                "qlora=True needs the bitsandbytes package; pip install bitsandbytes, or set qlora: false"
            ) from None


# ---------------------------------------------------------------------------------------------- data


class ChatRow(BaseModel):
    """One training conversation; `where` is file:line for error messages and contamination reports."""

    id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    where: str


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    fix = "file not found; build the demo data (llmhost demo-serve) or fix the path"
    return read_jsonl(path, field="path", missing_fix=fix)


def _read_source_raw(src: DataSource) -> list[tuple[str, dict[str, Any]]]:
    if src.path is not None:
        return _read_jsonl(src.path)
    import datasets

    try:
        ds = datasets.load_dataset(src.dataset, src.config, data_files=src.data_files, split=src.split)
    except Exception as exc:  # datasets raises many types; its message is what the user needs
        raise ConfigError(
            "dataset", src.dataset, f"cannot load split {src.split!r}: {type(exc).__name__}: {exc}"
        ) from None
    return [(f"{src.label()}:{i}", dict(r)) for i, r in enumerate(ds)]


def _as_chat(where: str, row: dict[str, Any], index: int) -> ChatRow:
    msgs = row.get("messages")
    fix = "chat rows look like {'messages': [{'role': 'user', ...}, {'role': 'assistant', ...}]}"
    if not isinstance(msgs, list) or not msgs:
        raise ConfigError("messages", type(msgs).__name__, fix, source=where)
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in {"system", "user", "assistant", "tool"}:
            raise ConfigError(
                "messages[].role", m.get("role") if isinstance(m, dict) else m, fix, source=where
            )
    if not any(m["role"] == "assistant" for m in msgs):
        raise ConfigError(
            "messages", "no assistant turn", "each row needs an assistant turn to learn from", source=where
        )
    tools = row.get("tools")
    return ChatRow(id=str(row.get("id", f"{where}")), messages=msgs, tools=tools or None, where=where)


def read_chat_rows(src: DataSource) -> list[ChatRow]:
    return [_as_chat(where, row, i) for i, (where, row) in enumerate(_read_source_raw(src))]


class TrainingData(BaseModel):
    train: list[ChatRow]
    eval: list[ChatRow]
    dataset_hash: str = Field(description="sha256 of the distinct training rows (before oversampling).")
    rows: int = Field(description="Distinct training rows.")
    rows_oversampled: int = Field(description="Training rows after `repeat`.")
    sources: list[str]


def rows_hash(rows: list[ChatRow]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps({"messages": r.messages, "tools": r.tools}, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def load_training_data(cfg: FinetuneConfig) -> TrainingData:
    """Train rows (oversampled per source) and held-out rows (explicit, or a seeded split of train)."""
    import random

    rng = random.Random(cfg.seed)
    distinct: list[ChatRow] = []
    train: list[ChatRow] = []
    held: list[ChatRow] = []
    for src in cfg.train:
        rows = read_chat_rows(src)
        if not cfg.eval and cfg.eval_fraction > 0 and len(rows) > 1:
            idx = list(range(len(rows)))
            rng.shuffle(idx)
            n_eval = max(1, round(len(rows) * cfg.eval_fraction))
            out = set(idx[:n_eval])
            held += [r for i, r in enumerate(rows) if i in out]
            rows = [r for i, r in enumerate(rows) if i not in out]
        distinct += rows
        train += rows * src.repeat
    for src in cfg.eval:
        held += read_chat_rows(src)
    if not train:
        raise ConfigError("train", [s.label() for s in cfg.train], "no training rows; check the files")
    return TrainingData(
        train=train,
        eval=held,
        dataset_hash=rows_hash(distinct),
        rows=len(distinct),
        rows_oversampled=len(train),
        sources=[s.label() for s in cfg.train],
    )


# ---------------------------------------------------------------------------------------------- contamination

_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, single spaces: catches re-spaced or re-cased copies."""
    return " ".join(text.lower().translate(_PUNCT).split())


def prompt_texts(messages: list[dict[str, Any]]) -> list[str]:
    """The user turns of a conversation: what an eval example asks (system prompts are shared by design)."""
    return [str(m.get("content") or "") for m in messages if m.get("role") == "user" and m.get("content")]


def _row_prompt_texts(row: dict[str, Any]) -> list[str]:
    if isinstance(row.get("messages"), list):
        return prompt_texts(row["messages"])
    return [str(row[f]) for f in PROMPT_FIELDS if isinstance(row.get(f), str) and row[f].strip()]


class EvalSet(BaseModel):
    """Prompts of one eval set: (example id, prompt texts)."""

    name: str
    examples: list[tuple[str, list[str]]]


class OverlapResult(BaseModel):
    name: str
    examples: int
    exact: list[str] = Field(description="Eval ids whose prompt appears verbatim in training.")
    normalized: list[str] = Field(description="Eval ids whose normalised prompt appears in training.")
    train_ids: list[str] = Field(default_factory=list, description="Training ids that hold those prompts.")

    @property
    def fraction(self) -> float:
        return len(self.normalized) / self.examples if self.examples else 0.0


class ContaminationReport(BaseModel):
    checked: list[OverlapResult]
    skipped: dict[str, str] = Field(default_factory=dict, description="Suite -> why it could not be read.")
    max_overlap: float

    @property
    def worst(self) -> float:
        return max((r.fraction for r in self.checked), default=0.0)

    @property
    def passed(self) -> bool:
        return self.worst <= self.max_overlap

    def summary(self) -> str:
        parts = [f"{r.name}: {len(r.normalized)}/{r.examples}" for r in self.checked]
        return "contamination " + ("OK" if self.passed else "FOUND") + " (" + ", ".join(parts) + ")"


def suite_eval_sets(names: list[str] | None) -> tuple[list[EvalSet], dict[str, str]]:
    """Rendered prompts of the named suites (default: all in eval_suites/); unreadable defaults skipped."""
    from tasks.evaluate.suite import load

    explicit = names is not None
    wanted = (
        names
        if names is not None
        else sorted(p.stem for p in SUITES_DIR.glob("*.yaml") if p.name != "frontiers.yaml")
    )
    sets, skipped = [], {}
    for name in wanted:
        try:
            loaded = load(name)
        except Exception as exc:
            if explicit:
                raise
            skipped[name] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        sets.append(
            EvalSet(
                name=f"suite:{loaded.suite.name}",
                examples=[(ex.id, prompt_texts(ex.messages)) for ex in loaded.examples],
            )
        )
    return sets, skipped


def file_eval_set(path: Path) -> EvalSet:
    rows = _read_jsonl(path)
    return EvalSet(
        name=f"file:{path}", examples=[(str(r.get("id", where)), _row_prompt_texts(r)) for where, r in rows]
    )


def overlap(
    train: list[ChatRow], sets: list[EvalSet], max_overlap: float, skipped: dict[str, str] | None = None
) -> ContaminationReport:
    """Exact and normalised overlap of each eval set's prompts with the training prompts."""
    exact_idx: dict[str, list[str]] = {}
    norm_idx: dict[str, list[str]] = {}
    for r in train:
        for t in prompt_texts(r.messages):
            exact_idx.setdefault(t.strip(), []).append(r.id)
            norm_idx.setdefault(normalize(t), []).append(r.id)
    results = []
    for s in sets:
        exact, norm, train_ids = [], [], []
        for ex_id, texts in s.examples:
            hit_exact = [t for t in texts if t.strip() in exact_idx]
            hit_norm = [t for t in texts if normalize(t) and normalize(t) in norm_idx]
            if hit_exact:
                exact.append(ex_id)
            if hit_norm:
                norm.append(ex_id)
                train_ids += norm_idx[normalize(hit_norm[0])][:1]
        results.append(
            OverlapResult(
                name=s.name,
                examples=len(s.examples),
                exact=exact,
                normalized=norm,
                train_ids=sorted(set(train_ids)),
            )
        )
    return ContaminationReport(checked=results, skipped=skipped or {}, max_overlap=max_overlap)


def check_contamination(train: list[ChatRow], settings: ContaminationSettings) -> ContaminationReport:
    """Build the report; raise ContaminationError (naming the overlapping ids) above the threshold."""
    sets, skipped = suite_eval_sets(settings.suites)
    sets += [file_eval_set(p) for p in settings.eval_files]
    report = overlap(train, sets, settings.max_overlap, skipped)
    if not report.passed:
        bad = max(report.checked, key=lambda r: r.fraction)
        ids = ", ".join(bad.normalized[:8]) + (
            f" (+{len(bad.normalized) - 8} more)" if len(bad.normalized) > 8 else ""
        )
        raise ContaminationError(
            f"contamination: {len(bad.normalized)}/{bad.examples} rows of {bad.name} "
            f"({bad.fraction:.1%}) appear in the training data (ids: {ids}; training ids: "
            f"{', '.join(bad.train_ids[:8])}), above max_overlap={settings.max_overlap}; remove them from "
            "the training files or raise contamination.max_overlap"
        )
    return report


# ---------------------------------------------------------------------------------------------- tokenisation


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    generation_prompt: bool,
) -> str:
    text: Any = tokenizer.apply_chat_template(
        messages,
        tools=tools,  # type: ignore[arg-type]
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )
    return str(text)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, row: ChatRow) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant turn (its end-of-turn included).

    Each turn's span starts where the chat template's generation prompt ends and stops after the eos
    token, so the model learns to answer and to stop, and never learns the prompt.
    """
    full = _render(tokenizer, row.messages, row.tools, False)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(row.messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, row.messages[:i], row.tools, True)
        upto = _render(tokenizer, row.messages[: i + 1], row.tools, False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise FinetuneError(
                f"{row.where}: the chat template does not render turn {i} as a prefix of the conversation, "
                "so assistant tokens cannot be located; use a template whose output grows turn by turn"
            )
        end = upto.find(eos, len(prefix)) if eos else -1
        spans.append((len(prefix), end + len(eos) if end >= 0 else len(upto)))
    return full, spans


def tokenize_row(
    tokenizer: PreTrainedTokenizerBase, row: ChatRow, max_len: int
) -> dict[str, list[int]] | None:
    """input_ids and labels (-100 outside assistant spans); None when truncation leaves nothing to learn."""
    text, spans = assistant_spans(tokenizer, row)
    enc = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_len
    )
    ids: list[int] = enc["input_ids"]
    labels = [-100] * len(ids)
    for k, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[k] = ids[k]
    if all(x == -100 for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


class _Collator:
    """Right-pads a batch; padded positions are masked out of attention and loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(feats), width), -100, dtype=torch.long)
        mask = torch.zeros((len(feats), width), dtype=torch.long)
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def encode_rows(
    tokenizer: PreTrainedTokenizerBase, rows: list[ChatRow], max_len: int
) -> tuple[list[dict], int]:
    """(features, rows dropped because truncation cut every assistant token)."""
    feats, dropped = [], 0
    for r in rows:
        f = tokenize_row(tokenizer, r, max_len)
        if f is None:
            dropped += 1
        else:
            feats.append(f)
    return feats, dropped


# ---------------------------------------------------------------------------------------------- training


class LossHistory(BaseModel):
    train: list[tuple[int, float]] = Field(default_factory=list, description="(step, loss)")
    eval: list[tuple[int, float]] = Field(default_factory=list, description="(step, eval loss)")

    def first_last_train(self, k: int = 5) -> tuple[float, float]:
        """Mean of the first and last k logged train losses (one noisy step proves nothing)."""
        vals = [v for _, v in self.train]
        k = max(1, min(k, len(vals) // 2 or 1))
        return sum(vals[:k]) / k, sum(vals[-k:]) / k


class TrainOutcome(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: Any = Field(exclude=True, description="The trained PeftModel.")
    tokenizer: Any = Field(exclude=True)
    history: LossHistory
    steps: int
    seconds: float
    train_rows_used: int
    eval_rows_used: int
    dropped_rows: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    trainable_params: int
    device: str


def _target_modules(lora: LoraSettings) -> list[str] | str:
    return lora.target_modules


def build_peft_model(base_dir: Path, cfg: FinetuneConfig) -> tuple[Any, Any]:
    """Base model (fp32 on CPU; 4-bit for QLoRA) wrapped with fresh LoRA matrices, and its tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {}
    if cfg.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    else:
        kwargs["dtype"] = torch.float32 if not cuda_available() else "auto"
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if cfg.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    lcfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=_target_modules(cfg.lora),
    )
    return get_peft_model(model, lcfg), tokenizer


def train_lora(
    cfg: FinetuneConfig,
    data: TrainingData,
    base_dir: Path,
    *,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainOutcome:
    """Train LoRA with transformers' Trainer; the loss covers assistant tokens only."""
    import torch

    threads = torch.get_num_threads()
    if cfg.cpu_threads and not cuda_available():
        torch.set_num_threads(cfg.cpu_threads)
    try:
        return _train_lora(cfg, data, base_dir, on_log)
    finally:
        torch.set_num_threads(threads)


def _train_lora(
    cfg: FinetuneConfig,
    data: TrainingData,
    base_dir: Path,
    on_log: Callable[[int, dict[str, float]], None] | None,
) -> TrainOutcome:
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    set_seed(cfg.seed)
    model, tokenizer = build_peft_model(base_dir, cfg)
    train_feats, dropped = encode_rows(tokenizer, data.train, cfg.max_seq_len)
    eval_feats, dropped_eval = encode_rows(tokenizer, data.eval, cfg.max_seq_len)
    if not train_feats:
        raise FinetuneError(
            f"max_seq_len={cfg.max_seq_len} truncates every training row before its assistant turn; raise it"
        )
    per_step = cfg.batch_size * cfg.gradient_accumulation
    steps = cfg.max_steps or max(1, math.ceil(len(train_feats) * cfg.epochs / per_step))
    eval_steps = cfg.eval_steps or max(1, steps // 10)
    history = LossHistory()

    class _Record(TrainerCallback):  # type: ignore[misc]
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
        ) -> None:
            logs = logs or {}
            step = int(state.global_step)
            if "loss" in logs:
                history.train.append((step, float(logs["loss"])))
            # evaluate() after a final scheduled eval logs the same step twice; keep one point per step.
            if "eval_loss" in logs and (not history.eval or history.eval[-1][0] != step):
                history.eval.append((step, float(logs["eval_loss"])))
            if on_log is not None:
                on_log(step, {k: float(v) for k, v in logs.items() if isinstance(v, int | float)})

    with tempfile.TemporaryDirectory(prefix="llmhost-ft-") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=max(cfg.batch_size, 8),
            gradient_accumulation_steps=cfg.gradient_accumulation,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=int(cfg.warmup_ratio * steps),
            weight_decay=0.0,
            max_grad_norm=1.0,
            logging_steps=cfg.logging_steps,
            logging_first_step=True,
            eval_strategy="steps" if eval_feats else "no",
            eval_steps=eval_steps,
            save_strategy="no",
            report_to="none",
            seed=cfg.seed,
            data_seed=cfg.seed,
            use_cpu=not cuda_available(),
            disable_tqdm=not cfg.progress,
            remove_unused_columns=False,
            dataloader_pin_memory=False,
            optim="adamw_torch",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_feats,
            eval_dataset=eval_feats or None,
            data_collator=_Collator(tokenizer.pad_token_id),
            callbacks=[_Record()],
        )
        if not cfg.progress:
            # With tqdm off, transformers prints every log dict; a flow's log_prints would relay each one.
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        before = float(trainer.evaluate()["eval_loss"]) if eval_feats else None
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started
        after = float(trainer.evaluate()["eval_loss"]) if eval_feats else None
    model.eval()
    return TrainOutcome(
        model=model,
        tokenizer=tokenizer,
        history=history,
        steps=steps,
        seconds=round(seconds, 2),
        train_rows_used=len(train_feats),
        eval_rows_used=len(eval_feats),
        dropped_rows=dropped + dropped_eval,
        eval_loss_before=before,
        eval_loss_after=after,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        device="cuda" if cuda_available() else "cpu",
    )


# ---------------------------------------------------------------------------------------------- generation


def generate_replies(
    model: Any,
    tokenizer: Any,
    conversations: list[dict[str, Any]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> list[str]:
    """Greedy replies to {'messages', 'tools'?} prompts with transformers (tests; vLLM serves for real)."""
    import torch

    out: list[str] = []
    tokenizer.padding_side = "left"
    for i in range(0, len(conversations), batch_size):
        chunk = conversations[i : i + batch_size]
        texts = [_render(tokenizer, c["messages"], c.get("tools"), True) for c in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in gen[:, enc["input_ids"].shape[1] :]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    tokenizer.padding_side = "right"
    return out


# ---------------------------------------------------------------------------------------------- mlflow


def flat_params(cfg: FinetuneConfig) -> dict[str, str]:
    """The config as dotted MLflow params (values as strings, cut to MLflow's 6000-char limit)."""
    out: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        else:
            out[prefix] = (json.dumps(v) if isinstance(v, list) else str(v))[:6000]

    walk("", cfg.model_dump(mode="json"))
    return out


def plot_losses(history: LossHistory, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history.train:
        ax.plot(*zip(*history.train, strict=True), label="train loss", lw=1)
    if history.eval:
        ax.plot(*zip(*history.eval, strict=True), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _probe_inputs(tokenizer: Any, rows: list[ChatRow]) -> Any:
    texts = [_render(tokenizer, r.messages, r.tools, False) for r in rows[:4]]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def logits_of(model: Any, enc: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(**enc).logits


def reload_max_diff(model_uri: str, enc: Any, expected: Any) -> float:
    """Reload the logged model through MLflow and return the largest logit difference on `enc`."""
    import mlflow

    comps = mlflow.transformers.load_model(model_uri, return_type="components")
    reloaded = comps["model"]
    reloaded.eval()
    got = logits_of(reloaded, enc)
    return float((got - expected).abs().max())


def adapter_content_hash(adapter_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(adapter_dir.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(adapter_dir).as_posix().encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _pip_requirements() -> list[str]:
    from importlib import metadata

    reqs = []
    for dist in ("transformers", "torch", "peft", "safetensors", "tokenizers", "accelerate"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


class FinetuneResult(BaseModel):
    """What a run produced: scores, where it was logged, and the registered version."""

    run_id: str
    experiment_id: str
    model_uri: str = Field(description="The logged model (models:/<model_id>).")
    registered_name: str | None = None
    registered_version: str | None = None
    base_name: str
    base_version: str
    base_dir: str
    dataset_hash: str
    config_hash: str
    rows: int
    steps: int
    train_seconds: float
    first_loss: float
    last_loss: float
    eval_loss_before: float | None
    eval_loss_after: float | None
    reload_max_abs_diff: float
    contamination: str
    lora_rank: int
    tags: dict[str, str] = Field(default_factory=dict)


def _mlflow_versions(ref: str) -> Any:
    from tasks.register import get_version

    return get_version(ref)


def trainable_base(ref: str) -> str:
    """The version a new adapter of `ref` trains on: `ref` itself, or its base when `ref` is an adapter.

    After a promotion the champion is an adapter; a retrain starts a fresh adapter from the same base
    (with the grown dataset) rather than stacking adapters.
    """
    mv = _mlflow_versions(ref)
    tags = dict(mv.tags)
    if tags.get("adapter") == "true" and tags.get("base_version"):
        return f"models:/{mv.name}/{tags['base_version']}"
    return f"models:/{mv.name}/{mv.version}"


def resolve_base(cfg: FinetuneConfig) -> tuple[Any, Path]:
    """(MLflow ModelVersion, local HF folder) of the base; adapter versions are refused as bases."""
    from tasks.register import resolve_model_ref

    mv = _mlflow_versions(cfg.base_model)
    if dict(mv.tags).get("adapter") == "true":
        base = dict(mv.tags).get("base_version")
        raise ConfigError(
            "base_model",
            cfg.base_model,
            f"that version is a LoRA adapter; fine-tune its base instead (models:/{mv.name}/{base})",
        )
    resolved = resolve_model_ref(f"models:/{mv.name}/{mv.version}")
    return mv, Path(resolved.local_dir)


def finetune(cfg: FinetuneConfig, *, log: Callable[[str], None] = print) -> FinetuneResult:
    """Contamination check -> LoRA training -> MLflow run -> logged adapter (reload-checked) -> version."""
    import mlflow

    from tasks.core.tracking import get_or_create_experiment, mlflow_client

    preflight(cfg)
    data = load_training_data(cfg)
    if cfg.contamination.skip:
        contamination = "contamination check skipped"
    else:
        contamination = check_contamination(data.train, cfg.contamination).summary()
    base_mv, base_dir = resolve_base(cfg)
    log(
        f"finetune: {data.rows} rows ({data.rows_oversampled} with oversampling), {len(data.eval)} held out; "
        f"{contamination}"
    )
    chash = config_hash(cfg)
    client = mlflow_client()
    exp_id = get_or_create_experiment(cfg.experiment)
    with mlflow.start_run(
        experiment_id=exp_id,
        run_name=cfg.run_name or f"lora-{base_mv.name}-v{base_mv.version}",
        tags={"llmhost.step": "finetune", "llmhost.base_model": f"{base_mv.name}/{base_mv.version}"},
    ) as run:
        run_id = run.info.run_id
        mlflow.log_params(flat_params(cfg))
        mlflow.log_params(
            {
                "dataset_hash": data.dataset_hash,
                "dataset_rows": data.rows,
                "dataset_rows_oversampled": data.rows_oversampled,
                "eval_rows": len(data.eval),
                "finetune_config_hash": chash,
                "base_version": str(base_mv.version),
            }
        )
        mlflow.log_text(contamination, "contamination.txt")

        def on_log(step: int, logs: dict[str, float]) -> None:
            keep = {
                ("train_loss" if k == "loss" else k): v
                for k, v in logs.items()
                if k in {"loss", "eval_loss", "learning_rate", "grad_norm"}
            }
            if keep:
                mlflow.log_metrics(keep, step=step)

        outcome = train_lora(cfg, data, base_dir, on_log=on_log)
        first, last = outcome.history.first_last_train()
        mlflow.log_metrics(
            {
                "train_seconds": outcome.seconds,
                "train_loss_first": first,
                "train_loss_last": last,
                "trainable_params": outcome.trainable_params,
                "dropped_rows": outcome.dropped_rows,
            }
        )
        if outcome.eval_loss_before is not None:
            mlflow.log_metrics(
                {
                    "eval_loss_before": outcome.eval_loss_before,
                    "eval_loss_after": outcome.eval_loss_after or float("nan"),
                }
            )
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(plot_losses(outcome.history, Path(tmp) / "loss.png")))
            (Path(tmp) / "losses.json").write_text(outcome.history.model_dump_json())
            mlflow.log_artifact(str(Path(tmp) / "losses.json"))
        log(
            f"finetune: {outcome.steps} steps in {outcome.seconds:.1f}s on {outcome.device}; train loss "
            f"{first:.3f} -> {last:.3f}; held-out loss {outcome.eval_loss_before} -> "
            f"{outcome.eval_loss_after}"
        )

        from huggingface_hub import ModelCard

        card = ModelCard(
            f"LoRA adapter (r={cfg.lora.r}) on {base_mv.name} v{base_mv.version}, "
            f"dataset {data.dataset_hash[:12]}, config {chash[:12]}."
        )
        info = mlflow.transformers.log_model(
            transformers_model={"model": outcome.model, "tokenizer": outcome.tokenizer},
            name=MLFLOW_MODEL_NAME,
            task="text-generation",
            base_model_path=str(base_dir),
            pip_requirements=_pip_requirements(),
            model_card=card,
        )
        enc = _probe_inputs(outcome.tokenizer, data.eval or data.train)
        diff = reload_max_diff(info.model_uri, enc, logits_of(outcome.model, enc))
        mlflow.log_metric("reload_max_abs_diff", diff)
        if not diff <= RELOAD_ATOL:
            raise FinetuneError(
                f"reload check: the logged adapter reloads with logits off by {diff:.3g} (> {RELOAD_ATOL}); "
                f"it was not registered (run {run_id}); see MLflow issue #23761 and log with base_model_path"
            )
        with tempfile.TemporaryDirectory() as tmp:
            outcome.model.save_pretrained(tmp)
            adapter_hash = adapter_content_hash(Path(tmp))
        tags = {
            "adapter": "true",
            "base_version": str(base_mv.version),
            "base_model": f"models:/{base_mv.name}/{base_mv.version}",
            "base_content_hash": dict(base_mv.tags).get("content_hash", ""),
            "dataset_hash": data.dataset_hash,
            "training_run_id": run_id,
            "finetune_config_hash": chash,
            "lora_rank": str(cfg.lora.r),
            "lora_target_modules": json.dumps(cfg.lora.target_modules),
            "content_hash": adapter_hash,
            "storage": "artifacts",
            "source_kind": "finetune",
            "source": f"run:{run_id}/{MLFLOW_MODEL_NAME}",
        }
        # Tags the serving side reads to choose vLLM flags carry over from the base.
        for k in (
            "architectures",
            "model_type",
            "dtype",
            "max_context",
            "has_chat_template",
            "template_supports_tools",
            "tool_call_format",
            "vllm_supported",
        ):
            if k in base_mv.tags:
                tags[k] = base_mv.tags[k]
        version: str | None = None
        if cfg.register_version:
            mv = client.create_model_version(
                base_mv.name,
                source=info.model_uri,
                run_id=run_id,
                tags=tags,
                model_id=info.model_id,
                description=f"LoRA r={cfg.lora.r} adapter on version {base_mv.version}; {contamination}",
            )
            version = str(mv.version)
            mlflow.set_tag("llmhost.registered_version", f"{base_mv.name}/{version}")
            log(f"finetune: registered {base_mv.name} version {version} (adapter on v{base_mv.version})")
    return FinetuneResult(
        run_id=run_id,
        experiment_id=exp_id,
        model_uri=info.model_uri,
        registered_name=base_mv.name,
        registered_version=version,
        base_name=base_mv.name,
        base_version=str(base_mv.version),
        base_dir=str(base_dir),
        dataset_hash=data.dataset_hash,
        config_hash=chash,
        rows=data.rows,
        steps=outcome.steps,
        train_seconds=outcome.seconds,
        first_loss=first,
        last_loss=last,
        eval_loss_before=outcome.eval_loss_before,
        eval_loss_after=outcome.eval_loss_after,
        reload_max_abs_diff=diff,
        contamination=contamination,
        lora_rank=cfg.lora.r,
        tags=tags,
    )


# ---------------------------------------------------------------------------------------------- tasks


@task(name="contamination-check")
def contamination_task(cfg: FinetuneConfig) -> str:
    """Refuses (ContaminationError) before any training when eval rows are in the training data."""
    if cfg.contamination.skip:
        return "contamination check skipped"
    return check_contamination(load_training_data(cfg).train, cfg.contamination).summary()


@task(name="finetune-lora")
def finetune_task(cfg: FinetuneConfig) -> FinetuneResult:
    # No retries: a failed training run is not transient I/O, and retrying would double the MLflow runs.
    return finetune(cfg)
