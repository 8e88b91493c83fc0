"""Named secrets (the HF token's Prefect Secret block) read through a reader that flows/ installs.

tasks/ never imports Prefect; flows/__init__ installs the Prefect reader, and this module stays import-free
so installing it costs the CLI nothing at startup.
"""

from __future__ import annotations

from collections.abc import Callable

SecretReader = Callable[[str], str | None]

_reader: SecretReader | None = None


def set_secret_reader(reader: SecretReader | None) -> None:
    """Install how a named secret is read (None uninstalls it)."""
    global _reader
    _reader = reader


def secret_reader() -> SecretReader | None:
    """The installed reader; None outside flows/ (the CLI and the Prefect flows)."""
    return _reader
