"""Reading user files (YAML specs, JSONL rows) into typed values, with one-line errors that name the file,
the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tasks.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def load_yaml_model(path: str | Path, model: type[M], *, field: str, example: str) -> M:
    """Parse and validate a YAML file as `model`. `field` and `example` phrase the "no such file" error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(field, str(p), f"give the path of {example}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        fix = f"fix the YAML syntax ({getattr(exc, 'problem', exc)})"
        raise ConfigError("yaml", where, fix, source=str(p)) from None
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        value = err.get("input")
        if isinstance(value, dict | list):
            value = f"<{type(value).__name__}>"
        raise ConfigError(loc, value, err["msg"].removeprefix("Value error, "), source=str(p)) from None


def read_jsonl(path: Path, *, field: str, missing_fix: str,
               error: type[ConfigError] = ConfigError) -> list[tuple[str, dict[str, Any]]]:
    """(`file:line`, row) for each non-blank line; every row must be a JSON object."""
    if not path.is_file():
        raise error(field, str(path), missing_fix)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error("row", line[:60], f"not JSON ({exc.msg})", source=f"{path}:{n}") from None
        if not isinstance(row, dict):
            raise error("row", line[:60], "each line must be a JSON object", source=f"{path}:{n}")
        rows.append((f"{path}:{n}", row))
    return rows
