"""What every listing command shares: `--json` with a documented schema, and tables that fit 80 columns.

The JSON keys of each command are one tuple, used both to build the objects and to write the `--json` help,
so the documented schema cannot drift from the printed one. Secrets (raw keys, key hashes, tokens) are never
among them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import typer


def json_help(shape: str, keys: Iterable[str], note: str = "") -> str:
    """The `--json` option's help: the shape and every key, so scripts can rely on them."""
    return f"Print JSON instead of the table: {shape}; keys: {', '.join(keys)}.{' ' + note if note else ''}"


def json_option(shape: str, keys: Iterable[str], note: str = "") -> Any:
    return typer.Option(False, "--json", help=json_help(shape, keys, note))


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=_default))


def pick(obj: Any, keys: Iterable[str]) -> dict[str, Any]:
    """The named fields of a dataclass, row or mapping, in the documented order."""
    if isinstance(obj, Mapping):
        return {k: obj.get(k) for k in keys}
    return {k: getattr(obj, k) for k in keys}


def short(value: Any, width: int) -> str:
    """A cell shortened to `width` characters with an ellipsis (the full value is under --json or show)."""
    text = "-" if value is None or value == "" else str(value)
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def tokens(n: int | None) -> str:
    """1234567 -> 1.2M: KV capacities and token counts in a narrow column."""
    if n is None:
        return "?"
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def table(*columns: str, title: str | None = None):  # -> rich.table.Table
    """A rich table whose cells never wrap: a long value is cut with an ellipsis instead."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
              padding=(0, 1), collapse_padding=True)
    for name in columns:
        t.add_column(name, no_wrap=True, overflow="ellipsis")
    return t


def console():  # -> rich.console.Console
    from rich.console import Console

    return Console()
