"""Metrics: pure per-example scoring plus suite-level aggregation (means, macro-F1, corpus BLEU).

ROUGE-L and BLEU use `rouge-score` and `sacrebleu`, the packages that `evaluate`'s "rouge" and "sacrebleu"
metrics wrap: `evaluate.load("rouge")` fetches its metric script from the Hugging Face hub even with the
package installed, so it cannot load on an offline machine. The scorer settings match evaluate's defaults
(ROUGE-L F-measure without stemming; sacrebleu's default 13a tokenizer and exp smoothing).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

import numpy as np

from tasks.evaluate.metric_specs import (
    Bleu,
    Classification,
    Contains,
    ExactMatch,
    FieldF1,
    JsonSchema,
    JsonValid,
    LlmJudge,
    MetricSpec,
    NormalizedMatch,
    Regex,
    RougeL,
    ToolCall,
)
from tasks.evaluate.suite import EvalSuite


@dataclass
class ModelOutput:
    """What a target returned for one example (empty for a failed request)."""

    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"name": str, "arguments": str(JSON)}
    failed: bool = False


# ---------------------------------------------------------------------------------------------- helpers

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    s = s.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


def parse_json(text: str) -> tuple[bool, Any]:
    """(True, value) when `text` is JSON, allowing one ```json fence (chat models add them unasked)."""
    s = text.strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1).strip()
    try:
        return True, json.loads(s)
    except (json.JSONDecodeError, ValueError):
        return False, None


def _as_list(ref: Any) -> list[str]:
    return [str(r) for r in ref] if isinstance(ref, list) else [str(ref)]


def _as_obj(ref: Any) -> Any:
    if isinstance(ref, str):
        ok, val = parse_json(ref)
        return val if ok else ref
    return ref


def _canon(v: Any) -> str:
    return normalize_text(v) if isinstance(v, str) else json.dumps(v, sort_keys=True)


def field_f1(pred: Any, ref: dict[str, Any]) -> float:
    """F1 over (field, normalised value) pairs of two JSON objects; a non-object prediction scores 0."""
    if not isinstance(pred, dict):
        return 0.0
    if not pred and not ref:
        return 1.0
    tp = sum(1 for k, v in pred.items() if k in ref and _canon(v) == _canon(ref[k]))
    if tp == 0:
        return 0.0
    p, r = tp / len(pred), tp / len(ref)
    return 2 * p * r / (p + r)


def extract_label(text: str, labels: Sequence[str], lenient: bool = False) -> str | None:
    """The label the output names, or None when it names none (or several, when lenient)."""
    by_lower = {lab.lower(): lab for lab in labels}
    norm = text.strip().strip(".!?\"'`*").strip().lower()
    if norm in by_lower:
        return by_lower[norm]
    if lenient:
        low = text.lower()
        found = [lab for lab in labels if re.search(rf"\b{re.escape(lab.lower())}\b", low)]
        if len(found) == 1:
            return found[0]
    return None


def macro_f1(pred: Sequence[str | None], gold: Sequence[str]) -> float:
    """Macro-F1 over the labels present in gold or (valid) predictions, as sklearn's default label set."""
    labels = {g for g in gold} | {p for p in pred if p is not None}
    if not labels:
        return 0.0
    total = 0.0
    for lab in labels:
        tp = sum(1 for p, g in zip(pred, gold, strict=True) if p == lab and g == lab)
        fp = sum(1 for p, g in zip(pred, gold, strict=True) if p == lab and g != lab)
        fn = sum(1 for p, g in zip(pred, gold, strict=True) if p != lab and g == lab)
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(labels)


_TOOL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(output: ModelOutput) -> list[dict[str, Any]]:
    """Calls as {"name", "arguments": dict}; reads hermes `<tool_call>` text when the server has no parser."""
    calls = []
    raw = output.tool_calls or []
    if not raw:
        for m in _TOOL_TAG.finditer(output.text):
            ok, val = parse_json(m.group(1))
            if ok and isinstance(val, dict) and "name" in val:
                raw.append({"name": val["name"], "arguments": val.get("arguments", {})})
    for c in raw:
        args = c.get("arguments", {})
        if isinstance(args, str):
            ok, args = parse_json(args) if args.strip() else (True, {})
            if not ok:
                args = None
        calls.append({"name": c.get("name"), "arguments": args if isinstance(args, dict) else None})
    return calls


def tool_call_scores(output: ModelOutput, ref: Any, mode: str) -> tuple[float, float, float]:
    """(right call, right function, a call was parsed) for the first call against the reference."""
    ref = _as_obj(ref)
    calls = parse_tool_calls(output)
    if ref in (None, "", {}):
        none = 0.0 if calls else 1.0
        return none, none, 1.0
    if not calls:
        return 0.0, 0.0, 0.0
    first = calls[0]
    parsed = 1.0 if first["arguments"] is not None else 0.0
    name_ok = 1.0 if first["name"] == ref.get("name") else 0.0
    want = _as_obj(ref.get("arguments", {})) or {}
    got = first["arguments"]
    if got is None:
        args_ok = False
    elif mode == "subset":
        args_ok = all(k in got and got[k] == v for k, v in want.items())
    else:
        args_ok = got == want
    return (1.0 if name_ok and args_ok else 0.0), name_ok, parsed


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(pred: str, refs: list[str]) -> float:
    """ROUGE-L F-measure against the best-matching reference."""
    scorer = _rouge_scorer()
    return max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)


@lru_cache(maxsize=1)
def _bleu() -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True)


def bleu_stats(pred: str, refs: list[str]) -> tuple[float, np.ndarray]:
    """(sentence BLEU 0-1, sufficient stats [4 matches, 4 totals, sys_len, ref_len]) for one example."""
    s = _bleu().sentence_score(pred, refs)
    return s.score / 100.0, np.array([*s.counts, *s.totals, s.sys_len, s.ref_len], dtype=float)


def corpus_bleu_from_stats(stats: np.ndarray) -> float:
    """Corpus BLEU (0-1) from summed per-sentence statistics; equals sacrebleu's corpus_score."""
    from sacrebleu.metrics import BLEU

    tot = stats.sum(axis=0)
    s = BLEU.compute_bleu(
        [int(x) for x in tot[:4]], [int(x) for x in tot[4:8]], int(tot[8]), int(tot[9]), smooth_method="exp"
    )
    return float(s.score) / 100.0


# ---------------------------------------------------------------------------------------------- judge


def judge_messages(spec: LlmJudge, question: str, answer: str, reference: Any = None) -> list[dict[str, str]]:
    """The judge's request: rubric, question, answer (and reference), asking for a JSON score."""
    ref = f"\nReference answer:\n{reference}\n" if reference not in (None, "") else ""
    return [
        {
            "role": "system",
            "content": "You grade answers strictly against a rubric. Reply with JSON only: "
            f'{{"score": <integer 1-{spec.scale}>, "reason": "<one sentence>"}}.',
        },
        {
            "role": "user",
            "content": f"Rubric:\n{spec.rubric}\n\nQuestion:\n{question}\n{ref}\n"
            f"Answer to grade:\n{answer}\n",
        },
    ]


def parse_judge(text: str, scale: int) -> tuple[float | None, str]:
    """(score normalised to 0-1, reason) from the judge's reply; None when it gave no usable score."""
    m = re.search(r"\{.*\}", text, re.DOTALL)
    score, reason = None, text.strip()[:200]
    if m:
        ok, val = parse_json(m.group(0))
        if ok and isinstance(val, dict) and isinstance(val.get("score"), int | float):
            score, reason = val["score"], str(val.get("reason", ""))
    if score is None:
        n = re.search(r"\b(\d+)\b", text)
        score = int(n.group(1)) if n else None
    if score is None or not 1 <= score <= scale:
        return None, reason
    return (float(score) - 1) / (scale - 1), reason


# ---------------------------------------------------------------------------------------------- scoring


def score_example(
    spec: MetricSpec, output: ModelOutput, row: dict[str, Any], judge: float | None = None
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Scores of one metric on one example, plus what suite-level aggregation needs (labels, BLEU stats).

    A failed request scores 0 on every metric: a caller of that endpoint got nothing useful.
    """
    names = spec.output_names()
    ref = row.get(spec.reference) if spec.reference else None
    text = output.text
    if isinstance(spec, ExactMatch):
        return {names[0]: float(any(text.strip() == r.strip() for r in _as_list(ref)))}, {}
    if isinstance(spec, NormalizedMatch):
        return {names[0]: float(any(normalize_text(text) == normalize_text(r) for r in _as_list(ref)))}, {}
    if isinstance(spec, Regex):
        flags = re.IGNORECASE if spec.ignore_case else 0
        hit = (
            re.fullmatch(spec.pattern, text.strip(), flags)
            if spec.full
            else re.search(spec.pattern, text, flags)
        )
        return {names[0]: float(hit is not None)}, {}
    if isinstance(spec, Contains):
        hay = text if spec.case_sensitive else text.lower()
        refs = _as_list(ref) if spec.case_sensitive else [r.lower() for r in _as_list(ref)]
        return {names[0]: float(any(r in hay for r in refs))}, {}
    if isinstance(spec, JsonValid):
        return {names[0]: float(parse_json(text)[0])}, {}
    if isinstance(spec, JsonSchema):
        import jsonschema

        ok, val = parse_json(text)
        valid = ok and jsonschema.validators.validator_for(spec.json_schema)(spec.json_schema).is_valid(val)
        return {names[0]: float(valid)}, {}
    if isinstance(spec, FieldF1):
        ok, val = parse_json(text)
        refobj = _as_obj(ref)
        return {names[0]: field_f1(val if ok else None, refobj if isinstance(refobj, dict) else {})}, {}
    if isinstance(spec, Classification):
        pred = None if output.failed else extract_label(text, spec.labels, spec.lenient)
        gold = extract_label(str(ref), spec.labels) or str(ref)
        return {names[0]: float(pred == gold), names[1]: None, names[2]: float(pred is not None)}, {
            "pred": pred,
            "gold": gold,
        }
    if isinstance(spec, RougeL):
        return {names[0]: 0.0 if output.failed else rouge_l(text, _as_list(ref))}, {}
    if isinstance(spec, Bleu):
        sent, stats = bleu_stats(text, _as_list(ref))
        return {names[0]: sent}, {"stats": stats}
    if isinstance(spec, ToolCall):
        if output.failed:
            return dict.fromkeys(names, 0.0), {}
        if spec.arguments_reference:
            ref = (
                None
                if ref in (None, "")
                else {"name": ref, "arguments": row.get(spec.arguments_reference) or {}}
            )
        right, name_ok, parsed = tool_call_scores(output, ref, spec.arguments)
        return {names[0]: right, names[1]: name_ok, names[2]: parsed}, {}
    if isinstance(spec, LlmJudge):
        return {names[0]: 0.0 if output.failed else judge}, {}
    raise TypeError(f"unknown metric {spec!r}")


@dataclass
class ScoreColumn:
    """One score over all examples: per-example values (NaN = not scored) and how its suite value forms."""

    name: str
    values: np.ndarray
    corpus: Callable[[np.ndarray], float] | None = None  # None: the suite value is the mean

    def value(self, idx: np.ndarray | None = None) -> float:
        idx = np.arange(len(self.values)) if idx is None else idx
        if self.corpus is not None:
            return self.corpus(idx)
        sel = self.values[idx]
        return float(np.nanmean(sel)) if np.isfinite(sel).any() else float("nan")


def score_all(
    suite: EvalSuite,
    outputs: Sequence[ModelOutput],
    rows: Sequence[dict[str, Any]],
    judge_scores: dict[str, Sequence[float | None]] | None = None,
) -> tuple[list[dict[str, float | None]], dict[str, ScoreColumn]]:
    """Per-example score dicts (one per row) and the suite-level columns, in `suite.score_names` order."""
    judge_scores = judge_scores or {}
    per_example: list[dict[str, float | None]] = [{} for _ in rows]
    columns: dict[str, ScoreColumn] = {}
    for spec in suite.metrics:
        names = spec.output_names()
        aux_all = []
        js = judge_scores.get(names[0])
        for i, (out, row) in enumerate(zip(outputs, rows, strict=True)):
            vals, aux = score_example(spec, out, row, judge=js[i] if js is not None else None)
            per_example[i].update(vals)
            aux_all.append(aux)
        for n in names:
            arr = np.array(
                [np.nan if per_example[i].get(n) is None else per_example[i][n] for i in range(len(rows))],
                dtype=float,
            )
            columns[n] = ScoreColumn(n, arr)
        if isinstance(spec, Classification):
            preds = [a["pred"] for a in aux_all]
            golds = [a["gold"] for a in aux_all]
            columns[names[1]].corpus = partial(_macro_f1_at, preds, golds)
        elif isinstance(spec, Bleu):
            columns[names[0]].corpus = partial(_corpus_bleu_at, np.stack([a["stats"] for a in aux_all]))
    return per_example, columns


# Module-level (not lambdas), so a result's columns pickle: a side is recorded in a child process (recording).
def _macro_f1_at(preds: list[Any], golds: list[Any], idx: np.ndarray) -> float:
    return macro_f1([preds[i] for i in idx], [golds[i] for i in idx])


def _corpus_bleu_at(stats: np.ndarray, idx: np.ndarray) -> float:
    return corpus_bleu_from_stats(stats[idx])
