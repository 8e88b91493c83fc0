"""Training rows (chat JSONL or `datasets`), the held-out split, and the contamination check against eval data.

The check runs before any training: every eval suite's prompts (and extra eval files) are compared with the
training prompts, verbatim and normalised, and overlap above `max_overlap` refuses the run.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.core.errors import ConfigError, FinetuneError
from tasks.core.inputs import read_jsonl
from tasks.evaluate import suite as eval_suite
from tasks.finetune.config import ContaminationSettings, DataSource, FinetuneConfig

# The row fields that hold the prompt text in task-format eval files ({"message": ..., "queue": ...}).
PROMPT_FIELDS = ("message", "prompt", "question", "input", "text", "query")


class ContaminationError(FinetuneError):
    """Training rows overlap an eval suite beyond the allowed fraction."""


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
    explicit = names is not None
    wanted = (
        names
        if names is not None
        else sorted(p.stem for p in eval_suite.SUITES_DIR.glob("*.yaml") if p.name != "frontiers.yaml")
    )
    sets, skipped = [], {}
    for name in wanted:
        try:
            loaded = eval_suite.load(name)
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
