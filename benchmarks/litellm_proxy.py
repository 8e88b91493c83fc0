"""LiteLLM's proxy as a comparison arm: config file only, no database, in its own process and venv.

The venv is `.venv-bench` (`make bench-env`), kept apart because litellm[proxy] pins its own FastAPI, uvicorn
and pydantic ranges, which need not agree with Prefect's in `.venv`.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / ".venv-bench"
MASTER_KEY = "sk-bench-litellm"


def litellm_bin(venv: Path = BENCH_VENV) -> Path | None:
    """The proxy's console script, or None when `make bench-env` has not been run."""
    path = venv / "bin" / "litellm"
    return path if path.exists() else None


def write_config(directory: Path, *, upstream_base_url: str, upstream_model: str, model_name: str) -> Path:
    """model_list with one openai/ compatible model pointing at the upstream; a master key; nothing stored."""
    config = {
        "model_list": [{"model_name": model_name, "litellm_params": {
            "model": f"openai/{upstream_model}", "api_base": upstream_base_url, "api_key": "unused"}}],
        # No callbacks and no request logging: the proxy's bare forwarding cost is what is compared.
        "litellm_settings": {"telemetry": False, "turn_off_message_logging": True, "set_verbose": False},
        "general_settings": {"master_key": MASTER_KEY, "disable_spend_logs": True},
    }
    path = directory / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def command(config: Path, port: int, venv: Path = BENCH_VENV) -> list[str]:
    """One proxy process (one uvicorn worker), like one llmhost gateway process."""
    exe = litellm_bin(venv)
    if exe is None:
        raise SystemExit(f"{venv}/bin/litellm is missing: run `make bench-env` (or pass --no-litellm).")
    return [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]


def environment() -> dict[str, str]:
    """The proxy's env: no network (the cost map ships in the package), no database, quiet logs."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False",
               DISABLE_ADMIN_UI="True", NO_DOCS="True")
    return env
