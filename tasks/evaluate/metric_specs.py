"""The metrics a suite can declare (`metrics:` in its YAML): one pydantic model per kind, a union over them.

How each kind scores an output lives in `metrics.py`; these models only validate the declaration.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """A suite section: unknown keys are errors (a misspelt key must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class _MetricBase(StrictModel):
    name: str | None = Field(default=None, description="Name of the (first) score; defaults to the kind.")
    reference: str | None = Field(default=None, description="Row field holding the expected value.")

    def output_names(self) -> list[str]:
        """Score names this metric writes; the first is its main score."""
        return [self.name or self.kind]  # type: ignore[attr-defined]

    def format_names(self) -> list[str]:
        """Scores that say whether the output had the task's shape (used to point at a fine-tune)."""
        return []

    def corpus_names(self) -> list[str]:
        """Scores whose suite-level value is not the mean of per-example values."""
        return []

    def needs_reference(self) -> bool:
        return True


class ExactMatch(_MetricBase):
    """1 when the output equals the reference after stripping surrounding whitespace."""

    kind: Literal["exact_match"] = "exact_match"


class NormalizedMatch(_MetricBase):
    """SQuAD-style match: lowercase, no punctuation, no articles (a/an/the), single spaces."""

    kind: Literal["normalized_match"] = "normalized_match"


class Regex(_MetricBase):
    """1 when `pattern` matches the output (search, or whole output when `full`)."""

    kind: Literal["regex"] = "regex"
    pattern: str = Field(description="Python regular expression.")
    full: bool = Field(default=False, description="Require the whole (stripped) output to match.")
    ignore_case: bool = False

    def needs_reference(self) -> bool:
        return False

    @model_validator(mode="after")
    def _compiles(self) -> Regex:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"pattern does not compile: {exc}") from exc
        return self


class Contains(_MetricBase):
    """1 when the reference (or any of a list of references) occurs in the output."""

    kind: Literal["contains"] = "contains"
    case_sensitive: bool = False


class JsonValid(_MetricBase):
    """1 when the output parses as JSON (a ```json fence around it is allowed)."""

    kind: Literal["json_valid"] = "json_valid"

    def needs_reference(self) -> bool:
        return False

    def format_names(self) -> list[str]:
        return self.output_names()


class JsonSchema(_MetricBase):
    """1 when the output parses as JSON and conforms to `schema`."""

    kind: Literal["json_schema"] = "json_schema"
    json_schema: dict[str, Any] = Field(alias="schema", description="JSON Schema the output must satisfy.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def needs_reference(self) -> bool:
        return False

    @model_validator(mode="after")
    def _schema_ok(self) -> JsonSchema:
        import jsonschema

        try:
            jsonschema.validators.validator_for(self.json_schema).check_schema(self.json_schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"schema is not a valid JSON Schema: {exc.message}") from exc
        return self


class FieldF1(_MetricBase):
    """Extraction F1: the output's JSON object against the reference object, field by field."""

    kind: Literal["field_f1"] = "field_f1"


class Classification(_MetricBase):
    """Accuracy per example, macro-F1 over the labels for the suite, and the rate of label outputs."""

    kind: Literal["classification"] = "classification"
    labels: list[str] = Field(min_length=2, description="The allowed labels.")
    lenient: bool = Field(
        default=False, description="Accept an output that mentions exactly one label among other words."
    )

    def output_names(self) -> list[str]:
        prefix = f"{self.name}_" if self.name else ""
        return [self.name or "accuracy", f"{prefix}macro_f1", f"{prefix}valid_label"]

    def format_names(self) -> list[str]:
        return [self.output_names()[2]]

    def corpus_names(self) -> list[str]:
        return [self.output_names()[1]]


class RougeL(_MetricBase):
    """ROUGE-L F-measure (rouge-score, the package `evaluate`'s "rouge" wraps)."""

    kind: Literal["rouge_l"] = "rouge_l"


class Bleu(_MetricBase):
    """BLEU on a 0-1 scale (sacrebleu): sentence BLEU per example, corpus BLEU for the suite."""

    kind: Literal["bleu"] = "bleu"

    def corpus_names(self) -> list[str]:
        return self.output_names()


class ToolCall(_MetricBase):
    """The first tool call has the reference's name and arguments; a null reference expects no call."""

    kind: Literal["tool_call"] = "tool_call"
    arguments: Literal["exact", "subset"] = Field(
        default="exact",
        description="exact: same argument set; subset: the reference's arguments are present.",
    )
    arguments_reference: str | None = Field(
        default=None,
        description="Row field with the expected arguments; then `reference` holds just the function name.",
    )

    def output_names(self) -> list[str]:
        prefix = f"{self.name}_" if self.name else ""
        return [self.name or "tool_call", f"{prefix}tool_name", f"{prefix}tool_call_parsed"]

    def format_names(self) -> list[str]:
        return [self.output_names()[2]]


class LlmJudge(_MetricBase):
    """A judge target scores the output 1..scale against a rubric; reported as (score-1)/(scale-1)."""

    kind: Literal["llm_judge"] = "llm_judge"
    judge: str = Field(description="Target spec of the judge, e.g. frontier:gpt-4o-mini.")
    rubric: str = Field(min_length=1, description="What a good answer does; shown to the judge.")
    scale: int = Field(default=5, ge=2, le=10)
    input_field: str | None = Field(
        default=None, description="Row field shown as the question; default: prompt."
    )

    def needs_reference(self) -> bool:
        return False


MetricSpec = Annotated[
    ExactMatch
    | NormalizedMatch
    | Regex
    | Contains
    | JsonValid
    | JsonSchema
    | FieldF1
    | Classification
    | RougeL
    | Bleu
    | ToolCall
    | LlmJudge,
    Field(discriminator="kind"),
]


METRIC_CLASSES: tuple[type[_MetricBase], ...] = get_args(get_args(MetricSpec)[0])
METRIC_KINDS = {c.model_fields["kind"].default for c in METRIC_CLASSES}
