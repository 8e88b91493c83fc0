"""The edge of sizing: read config.json, the tier catalog and the installed vLLM's defaults.

The other modules of `tasks/size` stay pure; everything that touches files or the environment lives here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tasks.core.errors import ConfigError
from tasks.core.gpus import Gpu
from tasks.core.settings import Settings, get_settings
from tasks.size.estimate import estimate_memory
from tasks.size.plan import GiB, MemoryEstimate, MiB, RuntimeFacts, SizingRequest, Tier

TIERS_PATH = Path(__file__).with_name("tiers.yaml")
TIERS_ENV = "LLMHOST_TIERS_FILE"
_UTIL_RE = re.compile(r"gpu_memory_utilization:\s*float\s*=\s*Field\(\s*default=([0-9.]+)")


class ModelConfigSource:
    """A parsed config.json with what else vLLM reads to size it (tokenizer max length)."""

    def __init__(self, config: dict[str, Any], name: str, path: Path, tokenizer_max_len: int | None):
        self.config, self.name, self.path, self.tokenizer_max_len = config, name, path, tokenizer_max_len


def _read_json(path: Path, field: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            field,
            str(path),
            "no such file; pass a model dir holding config.json or --config path/to/config.json",
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(field, str(path), f"is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(field, str(path), "must hold a JSON object")
    return data


def read_model_config(
    model_ref: str | Path | None = None, config_path: str | Path | None = None
) -> ModelConfigSource:
    """config.json from a local model dir (MODEL_REF) or an explicit file (--config)."""
    if (model_ref is None) == (config_path is None):
        raise ConfigError("model", model_ref or config_path, "pass exactly one of MODEL_REF or --config")
    if model_ref is not None and str(model_ref).startswith("models:/"):
        return registry_model_config(str(model_ref))
    if model_ref is not None and str(model_ref).startswith(("runs:/", "hf://", "hf:")):
        raise ConfigError(
            "model",
            str(model_ref),
            "register it first (llmhost register ...), then size models:/NAME/VERSION or models:/NAME@ALIAS",
        )
    if config_path is not None:
        path = Path(config_path)
        if path.is_dir():
            path = path / "config.json"
        field, name = "config", path.parent.name if path.name == "config.json" else path.stem
    else:
        root = Path(str(model_ref))
        if not root.exists():
            raise ConfigError(
                "model", str(model_ref), "no such directory; pass a local model dir or --config"
            )
        path = root / "config.json" if root.is_dir() else root
        field, name = "model", root.name if root.is_dir() else root.stem
    config = _read_json(path, field)
    return ModelConfigSource(config, name, path, _tokenizer_max_len(path.parent / "tokenizer_config.json"))


def _tokenizer_max_len(path: Path) -> int | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("model_max_length")
    except (json.JSONDecodeError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int | float) and value < 10**9 else None


def registry_model_config(ref: str) -> ModelConfigSource:
    """config.json of a registered version (an adapter's base for a LoRA adapter), without its weights.

    Only the small files are downloaded: sizing a 70B hub model must not fetch 140 GB.
    """
    import tempfile

    from tasks.core.errors import RegistryError
    from tasks.core.tracking import mlflow_client
    from tasks.register import VersionTags, get_version
    from tasks.register.fetch import MLFLOW_MODEL_NAME

    mv = get_version(ref)
    tags = VersionTags.from_mlflow(mv.tags)
    label = f"models:/{mv.name}/{mv.version}"
    if tags.adapter:
        base = tags.base_model or (f"models:/{mv.name}/{tags.base_version}" if tags.base_version else None)
        if base is None:
            raise RegistryError(
                f"model_ref={ref!r}: {label} is a LoRA adapter without a base_model tag; "
                "size its base with models:/NAME/VERSION"
            )
        mv = get_version(base)
        tags = VersionTags.from_mlflow(mv.tags)
        label = f"models:/{mv.name}/{mv.version} (the base of adapter {ref})"
    root = mlflow_client().get_model_version_download_uri(mv.name, str(mv.version)).rstrip("/")
    # By reference (hub) the descriptor sits at the top; logged models keep the checkpoint in model/.
    folders = ["", f"{MLFLOW_MODEL_NAME}/"] if tags.storage == "reference" else [f"{MLFLOW_MODEL_NAME}/", ""]
    with tempfile.TemporaryDirectory(prefix="llmhost-size-") as tmp:
        config_path = _first_download(root, [f"{f}config.json" for f in folders], Path(tmp) / "cfg")
        if config_path is None:
            raise RegistryError(
                f"model_ref={ref!r}: {label} stores no config.json; re-register it with llmhost register"
            )
        config = _read_json(config_path, "model")
        tok = _first_download(
            root, [f"{folders[0]}tokenizer_config.json", f"{folders[0]}components/tokenizer/tokenizer_config.json"],
            Path(tmp) / "tok",
        )
        tok_max = _tokenizer_max_len(tok) if tok else None
    where = Path(f"{root}/{folders[0]}config.json")
    return ModelConfigSource(config, f"{mv.name}/{mv.version}", where, tok_max)


def _first_download(root: str, candidates: list[str], dest: Path) -> Path | None:
    """The first of `candidates` (paths under the artifact URI `root`) that exists, downloaded into `dest`."""
    from mlflow.exceptions import MlflowException

    from tasks.register.fetch import mlflow_artifacts_download

    # One small file each: MLflow's progress bar would only add noise to `llmhost size`.
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        for rel in candidates:
            try:
                return Path(mlflow_artifacts_download(f"{root}/{rel}", str(dest)))
            except (MlflowException, OSError):
                continue
        return None
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def machine_memory_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _tier_entries(path: Path) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(TIERS_ENV, str(path), "no such file; fix the path or unset it") from None
    except yaml.YAMLError as exc:
        raise ConfigError("tiers", str(path), f"is not valid YAML: {str(exc).splitlines()[0]}") from None
    entries = data.get("tiers") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError("tiers", str(path), "must be a mapping with a `tiers:` list")
    return entries


def _to_tier(entry: dict[str, Any], settings: Settings, source: Path) -> Tier:
    if not isinstance(entry, dict):
        raise ConfigError("tiers[]", entry, "each tier is a mapping", source=str(source))
    e = dict(entry)
    name = e.get("name", "?")
    mem_mib, mem_gib = e.pop("memory_mib", None), e.pop("memory_gib", None)
    if mem_gib == "auto":
        e["memory_bytes"] = machine_memory_bytes()
    elif mem_gib is not None:
        e["memory_bytes"] = int(float(mem_gib) * GiB)
    elif mem_mib is not None:
        e["memory_bytes"] = int(float(mem_mib) * MiB)
    kv = e.pop("kv_cache_space_gib", None)
    if kv == "setting":
        e["kv_cache_space_bytes"] = int(settings.cpu_kvcache_space_gib * GiB)
    elif kv is not None:
        e["kv_cache_space_bytes"] = int(float(kv) * GiB)
    try:
        tier = Tier.model_validate(e)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "tier"
        raise ConfigError(
            f"tiers[{name}].{field}", err.get("input"), err["msg"], source=str(source)
        ) from None
    if tier.device == "cpu" and tier.kv_cache_space_bytes is None:
        raise ConfigError(
            f"tiers[{name}].kv_cache_space_gib",
            None,
            "a cpu tier needs its KV space (a number of GiB, or `setting`)",
            source=str(source),
        )
    return tier


def load_tiers(settings: Settings | None = None, extra_path: str | Path | None = None) -> list[Tier]:
    """The packaged catalog, then LLMHOST_TIERS_FILE (or extra_path): same name replaces, new names add."""
    settings = settings or get_settings()
    tiers: dict[str, Tier] = {}
    sources = [TIERS_PATH]
    extra = extra_path or os.environ.get(TIERS_ENV)
    if extra:
        sources.append(Path(extra))
    for src in sources:
        for entry in _tier_entries(src):
            tier = _to_tier(entry, settings, src)
            tiers[tier.name] = tier
    return list(tiers.values())


def runtime_facts(settings: Settings | None = None) -> RuntimeFacts:
    """vLLM's version and gpu_memory_utilization default from the runtime venv's files (no import)."""
    settings = settings or get_settings()
    venv = Path(settings.vllm_python).parent.parent  # a venv's python is a symlink: don't resolve it
    for site in sorted(venv.glob("lib/python*/site-packages")):
        version = None
        for dist in sorted(site.glob("vllm*.dist-info")):
            m = re.match(r"vllm(?:_cpu)?-([^-]+)\.dist-info$", dist.name)
            if m:
                version = m.group(1)
        cache_py = site / "vllm" / "config" / "cache.py"
        if version and cache_py.exists():
            found = _UTIL_RE.search(cache_py.read_text(errors="replace"))
            if found:
                return RuntimeFacts(
                    vllm_version=version,
                    gpu_memory_utilization=float(found.group(1)),
                    source=f"read from {cache_py}",
                )
    return RuntimeFacts()


def make_request(**options: Any) -> SizingRequest:
    """SizingRequest from CLI/flow options; a bad value becomes one ConfigError line naming the field."""
    try:
        return SizingRequest(**{k: v for k, v in options.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"] if not isinstance(x, int)) or "request"
        field = field.split(".")[0]
        msg = err["msg"]
        if "literal" in err["type"] or "enum" in err["type"]:
            msg = msg.replace("Input should be", "use one of")
        raise ConfigError(field, err.get("input"), msg) from None


def size_model(
    model_ref: str | Path | None,
    request: SizingRequest,
    *,
    config_path: str | Path | None = None,
    settings: Settings | None = None,
) -> MemoryEstimate:
    """Read the config, the tiers and the runtime's defaults, then size (pure)."""
    return _sized(model_ref, request, config_path, settings)[2]


def _sized(
    model_ref: str | Path | None, request: SizingRequest, config_path: str | Path | None, settings: Settings | None
) -> tuple[ModelConfigSource, RuntimeFacts, MemoryEstimate]:
    settings = settings or get_settings()
    src = read_model_config(model_ref, config_path)
    runtime = runtime_facts(settings)
    estimate = estimate_memory(
        src.config,
        request,
        load_tiers(settings),
        runtime=runtime,
        name=src.name,
        tokenizer_max_len=src.tokenizer_max_len,
    )
    return src, runtime, estimate


def size_model_here(
    model_ref: str | Path | None,
    request: SizingRequest,
    *,
    config_path: str | Path | None = None,
    settings: Settings | None = None,
    gpus: list[Gpu] | None = None,
) -> tuple[MemoryEstimate, str]:
    """`size_model`, and one line on which of this machine's GPUs (None: read through NVML) it fits."""
    from tasks.size.machine import fit_line

    src, runtime, estimate = _sized(model_ref, request, config_path, settings)
    if gpus is None:
        from tasks.core.gpus import inventory

        gpus = list(inventory())
    line = fit_line(src.config, request, gpus, runtime=runtime, name=src.name, tokenizer_max_len=src.tokenizer_max_len)
    return estimate, line
