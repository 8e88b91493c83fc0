"""Secrets kept in Prefect blocks, read for tasks/ (which never imports Prefect) through an installed reader."""

from __future__ import annotations

from typing import Any

from tasks.core.errors import ConfigError
from tasks.core.secrets import set_secret_reader


def read_secret_block(name: str) -> str | None:
    """The value of the Prefect Secret block `name` (the HF token's, named by LLMHOST_HF_TOKEN_SECRET_BLOCK)."""
    from prefect.blocks.system import Secret  # Prefect loads only when a block is named: the CLI starts faster

    try:
        secret: Any = Secret.load(name)  # sync in a sync context; typed as maybe-awaitable
        value = secret.get()
    except ValueError as exc:
        raise ConfigError("hf_token_secret_block", name, "create that Prefect Secret block or set HF_TOKEN") from exc
    return str(value) if value else None


def install() -> None:
    """Let `tasks.register.hf_token` read the Secret block; every entry point imports flows/, which calls this."""
    set_secret_reader(read_secret_block)
