"""Settings read from `LLMHOST_*` environment variables; every path lives under one state dir."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    """Control-plane settings. Each field maps to `LLMHOST_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="LLMHOST_", extra="ignore")

    home: Path = Field(default=Path(".llmhost"), description="State dir: MLflow, store, runtime logs.")
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI, used when MLFLOW_TRACKING_URI is unset; default sqlite under "
        "home.",
    )
    store_url: str | None = Field(default=None, description="SQLAlchemy URL of the control-plane store.")
    vllm_python: Path = Field(
        default=PROJECT_ROOT / ".venv-vllm" / "bin" / "python",
        description="Python of the serving runtime venv (holds vLLM; the control plane never imports it).",
    )
    # vLLM 0.32 parses VLLM_CPU_KVCACHE_SPACE with int(): a fraction would crash the replica at start.
    cpu_kvcache_space_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE (GiB) for CPU replicas.")
    cpu_single_process: bool = Field(
        default=True,
        description="CPU replicas run vLLM's worker in its engine process (VLLM_ENABLE_V1_MULTIPROCESSING=0): one "
        "process spawn fewer, about 20 s off every start on 2 cores; a CPU replica has one worker anyway.",
    )
    tiers_file: Path | None = Field(default=None, description="Extra hardware tiers YAML, merged over the catalog.")
    startup_timeout_s: float = Field(default=600.0, gt=0, description="Deadline for a replica's /health.")
    stop_grace_s: float = Field(default=10.0, ge=0, description="SIGTERM grace before SIGKILL.")
    replica_max_restarts: int = Field(
        default=5, ge=0, description="Restarts of a crashed local replica allowed within replica_restart_window_s; "
        "one more crash in the window marks it `failed` (0: never restart).",
    )
    replica_restart_window_s: float = Field(default=600.0, gt=0, description="Window that counts restarts (s).")
    replica_restart_backoff_s: float = Field(
        default=1.0, gt=0, description="Wait before the first restart; it doubles with each restart in the window.",
    )
    replica_restart_backoff_max_s: float = Field(default=30.0, gt=0, description="Cap of the restart wait (s).")
    gateway_host: str = Field(default="127.0.0.1")
    gateway_port: int = Field(default=8000, gt=0, lt=65536)
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Gateway -> replica connect timeout.")
    read_timeout_s: float = Field(default=300.0, gt=0, description="Gateway -> replica read timeout.")
    health_interval_s: float = Field(default=5.0, gt=0, description="Gateway replica health probe period.")
    swap_hold_s: float = Field(
        default=120.0, gt=0, description="How long the gateway holds a request for an endpoint that is swapping "
        "revisions in place (swap: hold or sleep) before it answers 503 with Retry-After.",
    )
    health_slow_probes: int = Field(
        default=3, gt=0, description="Timed-out /health probes in a row before the gateway marks a replica down "
        "(a refused connection or a non-200 answer marks it down at once).",
    )
    hf_token_secret_block: str | None = Field(
        default=None, description="Name of a Prefect Secret block holding the HF token (else HF_TOKEN)."
    )
    eval_concurrency: int = Field(default=8, gt=0, description="Concurrent requests of the eval runner.")
    usage_journal: Literal["write", "fdatasync", "off"] = Field(
        default="write", description="The gateway's usage journal: 'write' (a row is journaled before its answer "
        "ends: survives a killed gateway), 'fdatasync' (also a power cut, one disk sync per group of requests), "
        "'off' (batched only: a crash loses up to 0.5 s of usage).",
    )
    alert_webhook_url: str | None = Field(
        default=None, description="Where the nightly-eval alerts POST (automations.yaml); unset: alerts go to an "
        "existing `llmhost-alerts` notification block, else nowhere.",
    )

    @property
    def home_abs(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def mlflow_uri(self) -> str:
        """MLFLOW_TRACKING_URI (MLflow's own variable, so a team's server is found the usual way), else
        LLMHOST_TRACKING_URI, else sqlite under home. Registry and tracking always share it."""
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri or f"sqlite:///{self.home_abs / 'mlflow.db'}"

    @property
    def mlflow_is_server(self) -> bool:
        """True for a tracking server (http, https, databricks), which picks the artifact root (proxied artifacts);
        False for a store MLflow opens itself (sqlite, a database URL, files), where llmhost picks one under home."""
        return self.mlflow_uri.split(":", 1)[0].lower() in ("http", "https", "databricks", "databricks-uc")

    @property
    def artifact_root(self) -> str:
        return (self.home_abs / "mlartifacts").as_uri()

    @property
    def store(self) -> str:
        return self.store_url or f"sqlite:///{self.home_abs / 'llmhost.db'}"

    @property
    def runs_dir(self) -> Path:
        return self.home_abs / "runs"

    def ensure_dirs(self) -> None:
        for d in (self.home_abs, self.runs_dir, self.home_abs / "mlartifacts"):
            d.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def _cached(key: tuple[tuple[str, str], ...]) -> Settings:
    return Settings()


def get_settings() -> Settings:
    """Settings for the current environment; re-read when any LLMHOST_ variable changes (tests)."""
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("LLMHOST_")))
    return _cached(key)
