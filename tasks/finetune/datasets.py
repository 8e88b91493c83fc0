"""Datasets under the state dir; flows/events.py announces each addition (`llmhost.dataset.updated`)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pydantic import BaseModel

from tasks.core.errors import ConfigError
from tasks.core.settings import get_settings


class DatasetUpdate(BaseModel):
    dataset: str
    path: str
    added: int
    rows: int
    hash: str


def dataset_path(name: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise ConfigError("--dataset", name, "use letters, digits, '.', '_' or '-'")
    return get_settings().home_abs / "datasets" / name / "train.jsonl"


def _validated_lines(file: Path) -> list[str]:
    if not file.is_file():
        raise ConfigError("FILE", str(file), "give a JSONL file of chat rows ({\"messages\": [...]})")
    out = []
    for i, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}:{i}", line[:60], f"not JSON ({exc.msg}); one chat row per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
            raise ConfigError(f"{file}:{i}", line[:60], "each row needs a non-empty 'messages' list")
        out.append(json.dumps(row, sort_keys=True))
    if not out:
        raise ConfigError("FILE", str(file), "has no rows")
    return out


def add_rows(file: Path, name: str) -> DatasetUpdate:
    """Validates every line first (nothing is appended on a bad row), appends, and hashes the whole file."""
    lines = _validated_lines(Path(file))
    path = dataset_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    rows = sum(1 for line in data.splitlines() if line.strip())
    return DatasetUpdate(dataset=name, path=str(path), added=len(lines), rows=rows, hash=digest)
