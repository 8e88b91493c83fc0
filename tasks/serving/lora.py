"""One vLLM replica's runtime adapter API: load and unload a LoRA adapter without a restart, list what it serves.

A replica started with `--enable-lora` (LocalTarget then sets VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) takes new
adapters through POST /v1/load_lora_adapter and drops them through /v1/unload_lora_adapter; the adapter is then
callable by its name as `model`. Where that API is missing (the variable was not set, LoRA is off, or the
adapter's rank exceeds --max-lora-rank), the calls raise `RuntimeLoraUnavailable`: only a restart helps then.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx

from tasks.core.errors import ServingError, TransientError

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"


class AdapterError(ServingError):
    """A replica refused an adapter load or unload for a reason a restart would not fix."""


class ReplicaUnreachable(ServingError, TransientError):
    """The replica did not answer (transient: a retry may reach it)."""


class RuntimeLoraUnavailable(AdapterError):
    """The replica cannot change adapters at runtime; a restart (blue/green redeploy) is needed."""


def _root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        return str(body.get("detail") or body.get("message") or body)[:300]
    return str(body)[:300]


_NEEDS_RESTART = re.compile(
    r"(lora.*not enabled|enable[_-]lora|max_lora_rank|max-lora-rank|greater than max)", re.I
)


def _post(url: str, payload: dict[str, Any], timeout_s: float) -> httpx.Response:
    try:
        return httpx.post(url, json=payload, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ReplicaUnreachable(
            f"{url}: replica unreachable ({type(exc).__name__}: {exc}); check `llmhost endpoints "
            "list` and the replica log"
        ) from exc


def load_on_replica(
    base_url: str, lora_name: str, adapter_dir: Path | str, *, timeout_s: float = 120.0
) -> float:
    """POST the adapter to one replica; returns seconds until vLLM acknowledged it (it is callable then)."""
    started = time.monotonic()
    resp = _post(
        _root(base_url) + LOAD_PATH, {"lora_name": lora_name, "lora_path": str(adapter_dir)}, timeout_s
    )
    seconds = time.monotonic() - started
    if resp.status_code == 200:
        return seconds
    text = _error_text(resp)
    if resp.status_code == 404 and "Not Found" in text:
        raise RuntimeLoraUnavailable(
            f"{base_url}: the runtime adapter API is off (start the replica with --enable-lora and "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); redeploy with the adapter in the spec instead"
        )
    if resp.status_code == 400 and "already been loaded" in text:
        return seconds  # same name already served: loading is idempotent for callers
    if _NEEDS_RESTART.search(text):
        raise RuntimeLoraUnavailable(
            f"{base_url}: {text}; redeploy with a larger --max-lora-rank / --enable-lora"
        )
    raise AdapterError(
        f"{base_url}: vLLM refused adapter {lora_name!r} from {adapter_dir} "
        f"(HTTP {resp.status_code}: {text}); check the adapter was trained on this base model"
    )


def unload_on_replica(base_url: str, lora_name: str, *, timeout_s: float = 60.0) -> float:
    started = time.monotonic()
    resp = _post(_root(base_url) + UNLOAD_PATH, {"lora_name": lora_name}, timeout_s)
    seconds = time.monotonic() - started
    if resp.status_code == 200:
        return seconds
    text = _error_text(resp)
    if resp.status_code == 404 and "Not Found" in text and "cannot be found" not in text:
        raise RuntimeLoraUnavailable(
            f"{base_url}: the runtime adapter API is off; redeploy without the adapter"
        )
    if resp.status_code == 404:
        raise AdapterError(f"{base_url}: adapter {lora_name!r} is not loaded there; see served_adapters()")
    raise AdapterError(f"{base_url}: vLLM refused to unload {lora_name!r} (HTTP {resp.status_code}: {text})")


def served_adapters(base_url: str) -> list[str]:
    """Adapter names a replica serves (the /v1/models entries that have a parent model)."""
    resp = httpx.get(_root(base_url) + "/v1/models", timeout=10.0)
    resp.raise_for_status()
    return sorted(m["id"] for m in resp.json().get("data", []) if m.get("parent"))
