"""Eval suites: a YAML file validated by `EvalSuite`, plus its rows rendered into chat requests.

Errors name the file and the line (YAML) or the data file line (JSONL) together with the field and a fix.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from tasks.core.errors import ConfigError, EvalError
from tasks.core.inputs import read_jsonl
from tasks.core.settings import PROJECT_ROOT
from tasks.evaluate.frontier_rules import ReasoningEffort
from tasks.evaluate.metric_specs import METRIC_CLASSES, METRIC_KINDS, MetricSpec, StrictModel, ToolCall

SUITES_DIR = PROJECT_ROOT / "eval_suites"


class SuiteError(ConfigError, EvalError):
    """A malformed suite or data file; the message starts with `file:line`."""


# ---------------------------------------------------------------------------------------------- suite


class DataSpec(StrictModel):
    """Where the rows come from: a JSONL file (relative to the suite) or a `datasets` reference."""

    path: str | None = Field(default=None, description="JSONL file, relative to the suite file.")
    dataset: str | None = Field(
        default=None, description="datasets.load_dataset name, e.g. 'json' or a hub id."
    )
    config: str | None = Field(default=None, description="Dataset config name.")
    data_files: str | list[str] | None = Field(
        default=None, description="For builder datasets such as 'json'."
    )
    split: str = Field(default="test", description="Dataset split, e.g. 'validation[:50]'.")
    id_field: str = Field(default="id", description="Row field used as the example id (else the row number).")
    limit: int | None = Field(default=None, gt=0, description="Use only the first N rows.")

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("set exactly one of data.path (JSONL) or data.dataset (datasets reference)")
        return self


class MessageTemplate(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(description="Jinja2 template over the row's fields, e.g. '{{ message }}'.")


class PromptSpec(StrictModel):
    messages: list[MessageTemplate] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = Field(default=None, description="OpenAI tool definitions.")
    tool_choice: Literal["auto", "required", "none"] | None = None


class GenerationParams(StrictModel):
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=64, gt=0, le=32768)
    seed: int | None = Field(
        default=0, description="Sent when the server supports it; frontier APIs may ignore."
    )
    stop: list[str] = Field(default_factory=list, max_length=4)
    request_timeout_s: float = Field(default=60.0, gt=0, description="Per-request read timeout.")
    max_retries: int = Field(
        default=2, ge=0, le=10, description="Retries of one request on 429, 5xx or timeout."
    )
    reasoning_effort: ReasoningEffort | None = Field(
        default=None, description="Sent to reasoning models only (a frontiers.yaml entry's own setting wins)."
    )


class Thresholds(StrictModel):
    """Pass thresholds for `eval run` and the rules of the compare verdict."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    primary: str | None = Field(
        default=None, description="Score the verdict gates on; default: the first score."
    )
    pass_: dict[str, float] = Field(default_factory=dict, alias="pass", description="Score -> minimum mean.")
    tolerance: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="How much worse (absolute) the candidate may be, at 95% confidence.",
    )
    max_latency_p95_ratio: float | None = Field(
        default=1.5, gt=0, description="Candidate p95 latency / baseline p95 latency must not exceed this."
    )
    max_latency_p95_s: float | None = Field(default=None, gt=0, description="Absolute p95 latency limit.")
    max_cost_ratio: float | None = Field(
        default=1.0, gt=0, description="Candidate cost per 1k requests / baseline's must not exceed this."
    )
    max_error_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Share of examples that may fail (no answer) before the run itself counts as failed.",
    )


class EvalSuite(StrictModel):
    """One evaluation suite: data, prompt, generation params, metrics and thresholds."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Also the MLflow experiment name.")
    version: str = Field(min_length=1, description="Bump when data or prompt change meaning.")
    description: str = ""
    data: DataSpec
    prompt: PromptSpec
    generation: GenerationParams = Field(default_factory=GenerationParams)
    metrics: list[MetricSpec] = Field(min_length=1)
    thresholds: Thresholds = Field(default_factory=Thresholds)

    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _names(self) -> EvalSuite:
        seen: set[str] = set()
        for m in self.metrics:
            for n in m.output_names():
                if n in seen:
                    raise ValueError(f"score name {n!r} is produced twice; give one metric a distinct `name`")
                seen.add(n)
            if m.needs_reference() and not m.reference:
                raise ValueError(f"metric {m.kind!r} needs `reference: <row field>`")
        for key in [self.thresholds.primary, *self.thresholds.pass_]:
            if key is not None and key not in seen:
                raise ValueError(
                    f"thresholds name {key!r}, which no metric produces; scores are {sorted(seen)}"
                )
        return self

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def score_names(self) -> list[str]:
        return [n for m in self.metrics for n in m.output_names()]

    @property
    def primary(self) -> str:
        return self.thresholds.primary or self.metrics[0].output_names()[0]

    @property
    def format_scores(self) -> list[str]:
        return [n for m in self.metrics for n in m.format_names()]

    def content_hash(self, examples: list[Example]) -> str:
        """sha256 over the suite's settings and the rendered requests and rows, so a data edit changes it."""
        h = hashlib.sha256(self.model_dump_json(by_alias=True).encode())
        for ex in examples:
            h.update(json.dumps([ex.id, ex.messages, ex.row], sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


class Example(BaseModel):
    """One row rendered into a chat request."""

    index: int
    id: str
    row: dict[str, Any]
    messages: list[dict[str, str]]
    where: str = Field(description="file:line (or dataset split:row) the row came from.")


# ---------------------------------------------------------------------------------------------- loading


def resolve_suite_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a suite in eval_suites/."""
    p = Path(name_or_path)
    if p.is_file():
        return p.resolve()
    for cand in (SUITES_DIR / f"{name_or_path}.yaml", SUITES_DIR / f"{name_or_path}.yml"):
        if cand.is_file():
            return cand
    known = sorted(x.stem for x in SUITES_DIR.glob("*.yaml") if x.name != "frontiers.yaml")
    raise SuiteError("suite", str(name_or_path), f"no such file; pass a YAML path or one of {known}")


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at pydantic's error `loc` (skipping union tags that are not keys)."""
    if node is None:
        return None
    line = node.start_mark.line
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key:
                    # Point at the key's line: a block value starts on the line after it.
                    node, line = v, k.start_mark.line
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line
    return line + 1


def _field_path(loc: tuple[Any, ...], node: yaml.Node | None) -> str:
    out = ""
    for key in loc:
        if isinstance(key, int):
            out += f"[{key}]"
        elif key in {"function-after", "function-before"} or (
            # discriminated-union tags (e.g. 'classification') are not YAML keys; drop them from the path
            key in {m.__name__ for m in METRIC_CLASSES} or key in METRIC_KINDS
        ):
            continue
        else:
            out += f".{key}" if out else str(key)
    return out or "(top level)"


def parse_suite(text: str, source: str = "<suite>") -> EvalSuite:
    """Validate suite YAML text; errors name `source:line`, the field and the problem."""
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else "?"
        raise SuiteError(
            "yaml", getattr(exc, "problem", str(exc)), "fix the YAML syntax", source=f"{source}:{line}"
        ) from None
    if not isinstance(raw, dict):
        raise SuiteError("(top level)", type(raw).__name__, "a suite is a YAML mapping", source=f"{source}:1")
    try:
        return EvalSuite.model_validate(raw)
    except ValidationError as exc:
        # A misspelt key shows up as "extra" plus "missing"; the extra one names the actual mistake.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        err = errors[0]
        loc = tuple(err["loc"])
        line = _line_of(node, loc)
        value = "(missing)" if err["type"] == "missing" else err.get("input")
        if isinstance(value, dict | list):
            value = "<" + type(value).__name__ + ">"
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise SuiteError(
            _field_path(loc, node), value, msg + more, source=f"{source}:{line or '?'}"
        ) from None


def load_suite(name_or_path: str | Path) -> EvalSuite:
    """Load and validate a suite by path or by name in eval_suites/."""
    path = resolve_suite_path(name_or_path)
    suite = parse_suite(path.read_text(), source=str(path))
    suite._source = path
    return suite


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    return read_jsonl(path, field="data.path", missing_fix="file not found; build it (llmhost demo) or fix the path",
                      error=SuiteError)


def _read_dataset(spec: DataSpec, base: Path) -> list[tuple[str, dict[str, Any]]]:
    import datasets

    files = spec.data_files
    if files is not None:
        # Local data files are relative to the suite like `path`.
        files = [str(base / f) for f in ([files] if isinstance(files, str) else files)]
    try:
        ds = datasets.load_dataset(spec.dataset, spec.config, data_files=files, split=spec.split)
    except Exception as exc:  # datasets raises many types; the message is what the user needs
        raise SuiteError(
            "data.dataset", spec.dataset, f"cannot load split {spec.split!r}: {type(exc).__name__}: {exc}"
        ) from None
    return [(f"{spec.dataset}[{spec.split}]:{i}", dict(r)) for i, r in enumerate(ds)]


_ENV = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


def load_examples(suite: EvalSuite) -> list[Example]:
    """Read the suite's rows and render every request; a missing field names the row's file:line."""
    base = suite.source.parent if suite.source else Path.cwd()
    spec = suite.data
    rows = _read_jsonl(base / spec.path) if spec.path else _read_dataset(spec, base)
    if spec.limit:
        rows = rows[: spec.limit]
    if not rows:
        raise SuiteError("data", spec.path or spec.dataset, "no rows; the suite needs at least one example")
    src = str(suite.source or "<suite>")
    try:
        templates = [(m.role, _ENV.from_string(m.content)) for m in suite.prompt.messages]
    except TemplateError as exc:
        raise SuiteError("prompt.messages", str(exc), "fix the Jinja2 template", source=src) from None
    refs = {m.reference for m in suite.metrics if m.reference}
    refs |= {
        m.arguments_reference for m in suite.metrics if isinstance(m, ToolCall) and m.arguments_reference
    }
    examples, seen = [], set()
    for i, (where, row) in enumerate(rows):
        for field in sorted(refs):
            if field not in row:
                raise SuiteError(
                    "reference",
                    field,
                    f"row has no such field (fields: {sorted(row)}); fix the metric's reference",
                    source=where,
                )
        ex_id = str(row.get(spec.id_field, i))
        if ex_id in seen:
            raise SuiteError(spec.id_field, ex_id, "duplicate example id; ids must be unique", source=where)
        seen.add(ex_id)
        messages = []
        for j, (role, tpl) in enumerate(templates):
            try:
                messages.append({"role": role, "content": tpl.render(**row)})
            except UndefinedError as exc:
                raise SuiteError(
                    f"prompt.messages[{j}].content",
                    exc.message,
                    f"row lacks it (fields: {sorted(row)})",
                    source=where,
                ) from None
        examples.append(Example(index=i, id=ex_id, row=row, messages=messages, where=where))
    return examples


class LoadedSuite(BaseModel):
    """A suite with its rendered examples and content hash; what the runner takes."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    suite: EvalSuite
    examples: list[Example]

    @cached_property
    def content_hash(self) -> str:
        return self.suite.content_hash(self.examples)


def load(name_or_path: str | Path, *, limit: int | None = None) -> LoadedSuite:
    """Suite + examples in one call (the CLI and flow entry point)."""
    suite = load_suite(name_or_path)
    examples = load_examples(suite)
    if limit:
        examples = examples[:limit]
    return LoadedSuite(suite=suite, examples=examples)
