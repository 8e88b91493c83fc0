"""Metrics against hand-computed values on small fixtures."""

from __future__ import annotations

import numpy as np
import pytest
from sacrebleu.metrics import BLEU

from tasks.evaluate.metric_specs import (
    Bleu,
    Classification,
    Contains,
    ExactMatch,
    FieldF1,
    JsonSchema,
    JsonValid,
    LlmJudge,
    NormalizedMatch,
    Regex,
    RougeL,
    ToolCall,
)
from tasks.evaluate.metrics import (
    ModelOutput,
    bleu_stats,
    corpus_bleu_from_stats,
    extract_label,
    field_f1,
    macro_f1,
    normalize_text,
    parse_judge,
    score_all,
    score_example,
)
from tasks.evaluate.suite import parse_suite


def out(text: str = "", tool_calls: list | None = None, failed: bool = False) -> ModelOutput:
    return ModelOutput(text=text, tool_calls=tool_calls or [], failed=failed)


def test_normalize_text_is_squad_style() -> None:
    assert normalize_text("The  Cat, sat!") == "cat sat"
    assert normalize_text("An apple a day") == "apple day"


def test_exact_normalized_regex_contains() -> None:
    row = {"y": "billing"}
    assert score_example(ExactMatch(reference="y"), out(" billing\n"), row)[0] == {"exact_match": 1.0}
    assert score_example(ExactMatch(reference="y"), out("Billing"), row)[0] == {"exact_match": 0.0}
    assert score_example(NormalizedMatch(reference="y"), out("The Billing."), row)[0] == {
        "normalized_match": 1.0
    }
    full = Regex(pattern="[a-z]+", full=True)
    assert score_example(full, out("billing"), row)[0] == {"regex": 1.0}
    assert score_example(full, out("billing queue"), row)[0] == {"regex": 0.0}
    assert score_example(Regex(pattern=r"\d{3}"), out("code 123 ok"), row)[0] == {"regex": 1.0}
    assert score_example(Contains(reference="a"), out("It's PARIS."), {"a": "paris"})[0] == {"contains": 1.0}
    assert score_example(Contains(reference="a"), out("there are 7"), {"a": ["seven", "7"]})[0] == {
        "contains": 1.0
    }
    cs = Contains(reference="a", case_sensitive=True)
    assert score_example(cs, out("It's PARIS."), {"a": "paris"})[0] == {"contains": 0.0}


def test_json_validity_and_schema() -> None:
    assert score_example(JsonValid(), out('```json\n{"a": 1}\n```'), {})[0] == {"json_valid": 1.0}
    assert score_example(JsonValid(), out("{a: 1}"), {})[0] == {"json_valid": 0.0}
    schema = {"type": "object", "required": ["name"], "properties": {"age": {"type": "integer"}}}
    spec = JsonSchema(schema=schema)
    assert score_example(spec, out('{"name": "x", "age": 3}'), {})[0] == {"json_schema": 1.0}
    assert score_example(spec, out('{"age": "3"}'), {})[0] == {"json_schema": 0.0}
    assert score_example(spec, out("not json"), {})[0] == {"json_schema": 0.0}


def test_field_f1_hand_computed() -> None:
    # TP = 1 (name matches after normalisation); P = 1/3, R = 1/2, F1 = 2PR/(P+R) = 0.4
    pred = {"name": "Ann", "city": "Paris", "zip": "1"}
    ref = {"name": "ann", "city": "Lyon"}
    assert field_f1(pred, ref) == pytest.approx(0.4)
    assert field_f1(ref, ref) == 1.0
    assert field_f1("a string", ref) == 0.0
    vals, _ = score_example(FieldF1(reference="r"), out('{"name": "Ann", "city": "Lyon"}'), {"r": ref})
    assert vals == {"field_f1": 1.0}


def test_classification_accuracy_macro_f1_against_hand_and_sklearn() -> None:
    from sklearn.metrics import f1_score

    labels = ["billing", "shipping", "returns", "technical"]
    preds_text = ["billing", "Billing.", "shipping", "I think it is nonsense"]
    gold = ["billing", "shipping", "shipping", "returns"]
    preds = [extract_label(t, labels) for t in preds_text]
    assert preds == ["billing", "billing", "shipping", None]
    # per label F1: billing 2*1/(2+1+0)=2/3, shipping 2*1/(2+0+1)=2/3, returns 0 -> macro 4/9
    assert macro_f1(preds, gold) == pytest.approx(4 / 9)
    sk = f1_score(
        gold, [p or "<invalid>" for p in preds], labels=["billing", "shipping", "returns"], average="macro"
    )
    assert macro_f1(preds, gold) == pytest.approx(sk)

    suite = parse_suite(
        """
name: t
version: "1"
data: {path: x.jsonl}
prompt: {messages: [{role: user, content: "{{ m }}"}]}
metrics:
  - {kind: classification, reference: y, labels: [billing, shipping, returns, technical]}
"""
    )
    per_ex, cols = score_all(suite, [out(t) for t in preds_text], [{"y": g} for g in gold])
    assert [p["accuracy"] for p in per_ex] == [1.0, 0.0, 1.0, 0.0]
    assert cols["accuracy"].value() == 0.5
    assert cols["macro_f1"].value() == pytest.approx(4 / 9)
    assert cols["valid_label"].value() == 0.75
    # macro-F1 on a subset of examples is recomputed, not averaged
    assert cols["macro_f1"].value(np.array([0, 2])) == 1.0
    lenient = Classification(reference="y", labels=labels, lenient=True)
    assert score_example(lenient, out("Route to shipping please"), {"y": "shipping"})[0]["accuracy"] == 1.0


def test_rouge_l_and_bleu_hand_computed() -> None:
    # LCS of "the cat sat on the mat" and "the cat is on the mat" = "the cat on the mat" (5 of 6 tokens)
    vals, _ = score_example(
        RougeL(reference="r"), out("the cat sat on the mat"), {"r": "the cat is on the mat"}
    )
    assert vals["rouge_l"] == pytest.approx(5 / 6)
    s, _ = bleu_stats("the cat sat on the mat", ["the cat sat on the mat"])
    assert s == pytest.approx(1.0)
    hyps = ["the cat sat on the mat", "hello there general kenobi", "a b c d e"]
    refs = ["the cat is on the mat", "hello there general kenobi", "a b x d e"]
    stats = np.stack([bleu_stats(h, [r])[1] for h, r in zip(hyps, refs, strict=True)])
    # corpus BLEU from summed sentence statistics equals sacrebleu's own corpus score
    assert corpus_bleu_from_stats(stats) == pytest.approx(BLEU().corpus_score(hyps, [refs]).score / 100)
    suite = parse_suite(
        """
name: t
version: "1"
data: {path: x.jsonl}
prompt: {messages: [{role: user, content: "{{ m }}"}]}
metrics: [{kind: bleu, reference: r}]
"""
    )
    _, cols = score_all(suite, [out(h) for h in hyps], [{"r": r} for r in refs])
    assert cols["bleu"].value() == pytest.approx(BLEU().corpus_score(hyps, [refs]).score / 100)
    assert Bleu(reference="r").corpus_names() == ["bleu"]


def test_tool_call_correctness() -> None:
    spec = ToolCall(reference="tool", arguments_reference="args")
    row = {"tool": "get_weather", "args": {"city": "paris"}}
    good = out(tool_calls=[{"name": "get_weather", "arguments": '{"city": "paris"}'}])
    wrong_args = out(tool_calls=[{"name": "get_weather", "arguments": '{"city": "oslo"}'}])
    wrong_fn = out(tool_calls=[{"name": "open_ticket", "arguments": '{"city": "paris"}'}])
    bad_json = out(tool_calls=[{"name": "get_weather", "arguments": '{"city": '}])
    assert score_example(spec, good, row)[0] == {"tool_call": 1.0, "tool_name": 1.0, "tool_call_parsed": 1.0}
    assert score_example(spec, wrong_args, row)[0] == {
        "tool_call": 0.0,
        "tool_name": 1.0,
        "tool_call_parsed": 1.0,
    }
    assert score_example(spec, wrong_fn, row)[0] == {
        "tool_call": 0.0,
        "tool_name": 0.0,
        "tool_call_parsed": 1.0,
    }
    assert score_example(spec, bad_json, row)[0] == {
        "tool_call": 0.0,
        "tool_name": 1.0,
        "tool_call_parsed": 0.0,
    }
    assert score_example(spec, out("it is sunny"), row)[0] == {
        "tool_call": 0.0,
        "tool_name": 0.0,
        "tool_call_parsed": 0.0,
    }
    # hermes text from a server without a tool parser
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "paris"}}</tool_call>'
    assert score_example(spec, out(text), row)[0]["tool_call"] == 1.0
    # combined reference, subset mode, and "no tool expected"
    combined = ToolCall(reference="expected", arguments="subset")
    call = out(tool_calls=[{"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}])
    assert (
        score_example(combined, call, {"expected": {"name": "get_weather", "arguments": {"city": "Oslo"}}})[
            0
        ]["tool_call"]
        == 1.0
    )
    assert score_example(combined, out("4"), {"expected": None})[0]["tool_call"] == 1.0
    assert score_example(combined, call, {"expected": None})[0]["tool_call"] == 0.0


def test_failed_request_scores_zero() -> None:
    spec = ExactMatch(reference="y")
    assert score_example(spec, out(failed=True), {"y": "billing"})[0] == {"exact_match": 0.0}
    judge = LlmJudge(judge="frontier:gpt-4o-mini", rubric="be right")
    assert score_example(judge, out(failed=True), {}, judge=None)[0] == {"llm_judge": 0.0}
    tool = ToolCall(reference="expected")
    assert score_example(tool, out(failed=True), {"expected": None})[0]["tool_call"] == 0.0


def test_judge_reply_parsing() -> None:
    assert parse_judge('{"score": 4, "reason": "mostly right"}', 5) == (0.75, "mostly right")
    assert parse_judge("Score: 2", 5)[0] == 0.25
    assert parse_judge('{"score": 9}', 5)[0] is None
    assert parse_judge("no idea", 5)[0] is None
