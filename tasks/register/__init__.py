"""Register models in MLflow from the HF hub, an MLflow run or a local folder, and resolve them back.

`register_model("path:DIR" | "run:RUN_ID[/ARTIFACT_PATH]" | "hf:ORG/NAME[@REV]", name)` validates the
model folder, checks it against the installed vLLM, and creates (or reuses, by content hash) a registered
model version whose tags describe it. `resolve_model_ref("models:/NAME@ALIAS")` turns a version back into a
local Hugging Face folder that vLLM can load.

Storage: local and run models keep their weights as MLflow artifacts (the transformers flavour, whose
`model/` folder is the HF checkpoint); hub models are registered by reference (repo + commit sha), and
only a small descriptor (config, tokenizer, reference.json) is stored: multi-GB weights stay in the HF cache.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import BaseModel, Field

from tasks.core.errors import ConfigError, LlmhostError, RegistryError
from tasks.core.settings import get_settings
from tasks.core.tracking import experiment_scope, get_or_create_experiment, mlflow_client
from tasks.register.vllm_compat import CompatResult, check_architectures, supported_architectures

REGISTRY_EXPERIMENT = "llmhost-registry"
MLFLOW_MODEL_NAME = "model"  # `name=` of log_model; also the flavour's folder holding the HF checkpoint
HF_REFERENCE_DIR = "hf_reference"

# What a serving runtime needs from a repo: config, tokenizer, generation config and safetensors weights.
# The same patterns define the content hash, so a folder hashes alike wherever it came from.
MODEL_FILE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "model.safetensors.index.json",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")

SourceKind = Literal["hf", "run", "path"]
Storage = Literal["artifacts", "reference"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}  # fmt: skip

# Ordered: the first marker found in the chat template names vLLM's --tool-call-parser.
_TOOL_FORMATS: list[tuple[str, tuple[str, ...]]] = [
    ("qwen3_coder", ("<tool_call>", "<function=")),
    ("glm45", ("<tool_call>", "<arg_key>")),
    ("hermes", ("<tool_call>",)),
    ("mistral", ("[TOOL_CALLS]",)),
    ("llama3_json", ("<|python_tag|>",)),
    ("llama3_json", ("ipython", '"parameters"')),
    ("deepseek_v3", ("<｜tool▁calls▁begin｜>",)),
    ("kimi_k2", ("<|tool_calls_section_begin|>",)),
    ("phi4_mini_json", ("functools[",)),
    ("internlm", ("<|plugin|>",)),
    ("openai", ("to=functions",)),
    ("functiongemma", ("<start_function_call>",)),
]


# ---------------------------------------------------------------------------------------------- models


class ModelSource(BaseModel):
    """A parsed `SOURCE` argument."""

    kind: SourceKind
    raw: str = Field(description="The SOURCE string as given.")
    repo: str | None = Field(default=None, description="hf: repo id ORG/NAME.")
    revision: str | None = Field(default=None, description="hf: branch, tag or sha as given (None = main).")
    run_id: str | None = Field(default=None, description="run: MLflow run id.")
    artifact_path: str | None = Field(
        default=None, description="run: name/artifact path of the logged model."
    )
    path: Path | None = Field(default=None, description="path: absolute model folder.")


class ModelFacts(BaseModel):
    """What registration reads from a Hugging Face model folder."""

    architectures: list[str]
    model_type: str | None = None
    params_total: int = Field(ge=0, description="All parameters (tied weights once).")
    params_active: int = Field(ge=0, description="Parameters used per token (MoE: shared + top-k experts).")
    params_source: Literal["safetensors", "config"]
    dtype: str = Field(description="Weights dtype (config, else the dominant safetensors dtype).")
    max_context: int | None = Field(default=None, gt=0, description="Positions the model was built for.")
    has_chat_template: bool
    template_supports_tools: bool
    tool_call_format: str = Field(description="Guessed vLLM --tool-call-parser; 'none' or 'unknown'.")
    content_hash: str = Field(description="sha256 over (file name, sha256) of config, tokenizer and weights.")
    weights_bytes: int = Field(ge=0)
    files: list[str] = Field(description="Files that went into the content hash.")
    config: dict[str, Any] = Field(default_factory=dict, exclude=True)


class RegisteredVersion(BaseModel):
    """The outcome of `register_model`."""

    name: str
    version: str
    created: bool = Field(description="False when a version with the same content hash already existed.")
    model_uri: str = Field(description="models:/NAME/VERSION")
    source: str
    run_id: str | None = None
    tags: dict[str, str]


class ResolvedModel(BaseModel):
    """A registered version turned into a local Hugging Face folder for vLLM."""

    name: str
    version: str
    local_dir: Path = Field(description="HF model folder (config, tokenizer, safetensors) vLLM can load.")
    source_kind: str | None = None
    storage: str | None = None
    run_id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- parsing


def parse_source(source: str) -> ModelSource:
    """Parse `hf:ORG/NAME[@REV]`, `run:RUN_ID[/ARTIFACT_PATH]` or `path:DIR`."""
    kind, sep, rest = source.partition(":")
    fix = "use hf:ORG/NAME[@REVISION], run:RUN_ID[/ARTIFACT_PATH] or path:DIR"
    if not sep or not rest or kind not in ("hf", "run", "path"):
        raise ConfigError("source", source, fix)
    if kind == "hf":
        repo, _, revision = rest.partition("@")
        if not _HF_REPO_RE.match(repo) or ".." in repo or (_ and not revision):
            raise ConfigError("source", source, "hub sources look like hf:ORG/NAME or hf:ORG/NAME@REVISION")
        return ModelSource(kind="hf", raw=source, repo=repo, revision=revision or None)
    if kind == "run":
        run_id, _, artifact_path = rest.partition("/")
        if not re.fullmatch(r"[0-9a-f]{32}", run_id):
            raise ConfigError("source", source, "run sources look like run:<32-hex run id>[/ARTIFACT_PATH]")
        return ModelSource(
            kind="run", raw=source, run_id=run_id, artifact_path=artifact_path.strip("/") or "model"
        )
    return ModelSource(kind="path", raw=source, path=Path(rest).expanduser().absolute())


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ConfigError(
            "name", name, "use letters, digits, '.', '_' or '-' (at most 100, starting alphanumeric)"
        )
    return name


# ---------------------------------------------------------------------------------------------- inspection


def _matches(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pat) for pat in MODEL_FILE_PATTERNS)


def file_digest(path: Path) -> str:
    """sha256 of a file; HF cache blobs of LFS files are already named by it, so they are not re-read."""
    real = path.resolve()
    if real.parent.name == "blobs" and _SHA256_RE.match(real.name):
        return real.name
    h = hashlib.sha256()
    with real.open("rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(model_dir: Path, files: Iterable[str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\t{file_digest(model_dir / rel)}\n".encode())
    return h.hexdigest()


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise ValueError("not a safetensors file (a git-lfs pointer?)")
        header = json.loads(fh.read(n))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"truncated: header promises {8 + n + end} bytes, file has {size}")
    return header


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs keep the language model's fields under text_config."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def _moe_shape(cfg: dict[str, Any]) -> tuple[int, int] | None:
    experts = next(
        (
            cfg[k]
            for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
            if isinstance(cfg.get(k), int) and cfg[k] > 1
        ),
        None,
    )
    top_k = next(
        (
            cfg[k]
            for k in ("num_experts_per_tok", "moe_top_k", "num_experts_per_token")
            if isinstance(cfg.get(k), int) and cfg[k] > 0
        ),
        None,
    )
    return (experts, top_k) if experts and top_k else None


def params_from_safetensors(headers: list[dict[str, Any]], config: dict[str, Any]) -> tuple[int, int]:
    """(total, active) from tensor shapes; routed-expert tensors count top_k/num_experts towards active."""
    total = expert = 0
    for header in headers:
        for key, t in header.items():
            if key == "__metadata__":
                continue
            n = math.prod(t["shape"])
            total += n
            if re.search(r"\.experts\.", key):
                expert += n
    moe = _moe_shape(_text_config(config))
    if not moe or not expert:
        return total, total
    experts, top_k = moe
    return total, total - expert + expert * top_k // experts


def params_from_config(config: dict[str, Any]) -> tuple[int, int] | None:
    """(total, active) by the sizing step's arithmetic, for when shapes do not tell (packed weights)."""
    from tasks.size import count_params, parse_config

    try:
        counted = count_params(parse_config(config))
    except LlmhostError:
        return None  # the config lacks a field the arithmetic needs; shapes are the better guess then
    return counted.total, counted.active


def chat_templates(model_dir: Path) -> list[str]:
    """Every chat template the tokenizer ships (chat_template.jinja, chat_template.json, tokenizer_config)."""
    out: list[str] = []
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        out.append(jinja.read_text(encoding="utf-8", errors="replace"))
    for fname in ("chat_template.json", "tokenizer_config.json"):
        p = model_dir / fname
        if not p.is_file():
            continue
        try:
            value = json.loads(p.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            continue
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            out += [t.get("template", "") for t in value if isinstance(t, dict)]
    return [t for t in out if t.strip()]


def guess_tool_call_format(templates: list[str]) -> tuple[bool, str]:
    """(template uses `tools`, vLLM tool parser name guessed from the template's markers)."""
    text = "\n".join(templates)
    supports = bool(re.search(r"\btools\b", text))
    for name, markers in _TOOL_FORMATS:
        if all(m in text for m in markers):
            return supports, name
    return supports, "unknown" if supports else "none"


def _max_context(config: dict[str, Any]) -> int | None:
    c = _text_config(config)
    for key in (
        "max_position_embeddings",
        "n_positions",
        "max_seq_len",
        "seq_length",
        "max_sequence_length",
        "n_ctx",
    ):
        value = c.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def inspect_model_dir(model_dir: Path, *, label: str) -> ModelFacts:
    """Validate a Hugging Face model folder and read its facts; bad input raises a one-line RegistryError."""
    try:
        if not model_dir.exists():
            raise RegistryError(f"{label}: folder does not exist; pass the folder holding config.json")
        if not model_dir.is_dir():
            raise RegistryError(f"{label}: not a folder; pass the folder holding config.json, not a file")
        names = sorted(p.name for p in model_dir.iterdir())
        config_path = model_dir / "config.json"
        if "config.json" not in names:
            raise RegistryError(
                f"{label}: config.json is missing; save the model with model.save_pretrained(DIR) "
                "or point at the folder that holds config.json"
            )
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RegistryError(f"{label}: config.json is not valid JSON ({exc}); re-save the model") from exc
        if not isinstance(config, dict):
            raise RegistryError(f"{label}: config.json is not a JSON object; re-save the model")

        weights = [n for n in names if n.endswith(".safetensors")]
        if not weights:
            other = [n for n in names if n.endswith((".bin", ".pt", ".gguf", ".pth"))]
            hint = f" (found {', '.join(other[:3])}; convert to safetensors)" if other else ""
            raise RegistryError(
                f"{label}: no *.safetensors weights{hint}; "
                "save with model.save_pretrained(DIR) (safetensors is the default)"
            )
        index_path = model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            shards = set(json.loads(index_path.read_text()).get("weight_map", {}).values())
            missing = sorted(shards - set(weights))
            if missing:
                raise RegistryError(
                    f"{label}: weights are incomplete, {len(missing)} shard(s) listed in "
                    f"model.safetensors.index.json are missing (e.g. {missing[0]}); copy or re-download them"
                )
        if not any(n in names for n in TOKENIZER_FILES):
            raise RegistryError(
                f"{label}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.*); "
                "save the tokenizer into the same folder with tokenizer.save_pretrained(DIR)"
            )

        headers = []
        for w in weights:
            try:
                headers.append(read_safetensors_header(model_dir / w))
            except (ValueError, OSError) as exc:
                if isinstance(exc, PermissionError):
                    raise
                raise RegistryError(
                    f"{label}: {w} is not readable safetensors ({exc}); re-save the weights"
                ) from exc

        files = [n for n in names if _matches(n) and (model_dir / n).is_file()]
        digest = content_hash(model_dir, files)
    except PermissionError as exc:
        raise RegistryError(
            f"{label}: cannot read {exc.filename or model_dir} (permission denied); "
            "make the folder and its files readable by this user"
        ) from exc

    counts: tuple[int, int] | None = None
    params_source: Literal["safetensors", "config"] = "safetensors"
    if config.get("quantization_config"):
        # Packed low-bit tensors hold several weights per element, so shapes undercount.
        counts, params_source = params_from_config(config), "config"
    if counts is None:
        counts, params_source = params_from_safetensors(headers, config), "safetensors"

    dtype_counts: dict[str, int] = {}
    for header in headers:
        for key, t in header.items():
            if key != "__metadata__":
                dtype_counts[t["dtype"]] = dtype_counts.get(t["dtype"], 0) + math.prod(t["shape"])
    config_dtype = config.get("dtype") or config.get("torch_dtype") or _text_config(config).get("dtype")
    st_dtype = (
        _ST_DTYPES.get(max(dtype_counts, key=dtype_counts.__getitem__), "unknown") if dtype_counts else None
    )
    templates = chat_templates(model_dir)
    supports_tools, tool_format = guess_tool_call_format(templates)
    archs = config.get("architectures") or []
    return ModelFacts(
        architectures=[str(a) for a in archs] if isinstance(archs, list) else [str(archs)],
        model_type=config.get("model_type"),
        params_total=counts[0],
        params_active=counts[1],
        params_source=params_source,
        dtype=str(config_dtype or st_dtype or "unknown"),
        max_context=_max_context(config),
        has_chat_template=bool(templates),
        template_supports_tools=supports_tools,
        tool_call_format=tool_format,
        content_hash=digest,
        weights_bytes=sum((model_dir / w).stat().st_size for w in weights),
        files=files,
        config=config,
    )


def _bool(value: bool) -> str:
    return "true" if value else "false"


def version_tags(
    source: ModelSource,
    source_ref: str,
    facts: ModelFacts,
    compat: CompatResult,
    storage: Storage,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The tags every registered version carries (MLflow tags are strings)."""
    tags = {
        "source": source_ref,
        "source_kind": source.kind,
        "storage": storage,
        "content_hash": facts.content_hash,
        "architectures": ",".join(facts.architectures),
        "model_type": facts.model_type or "",
        "params_total": str(facts.params_total),
        "params_active": str(facts.params_active),
        "params_source": facts.params_source,
        "dtype": facts.dtype,
        "max_context": str(facts.max_context or ""),
        "has_chat_template": _bool(facts.has_chat_template),
        "template_supports_tools": _bool(facts.template_supports_tools),
        "tool_call_format": facts.tool_call_format,
        "weights_bytes": str(facts.weights_bytes),
        "vllm_supported": _bool(compat.supported),
        "vllm_reason": compat.reason,
        "vllm_checked_against": compat.checked_against,
        "trust_remote_code": _bool(compat.trust_remote_code),
    }
    tags.update(extra or {})
    return tags


# ---------------------------------------------------------------------------------------------- sources


def _hf_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None


def hf_token() -> str | None:
    """HF_TOKEN, else the Prefect Secret block named in settings (never logged)."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    block = get_settings().hf_token_secret_block
    if not block:
        return None
    from prefect.blocks.system import Secret

    try:
        secret: Any = Secret.load(block)  # sync in a sync context; typed as maybe-awaitable
        value = secret.get()
    except ValueError as exc:
        raise ConfigError(
            "hf_token_secret_block", block, "create that Prefect Secret block or set HF_TOKEN"
        ) from exc
    return str(value) if value else None


class TransientHubError(RegistryError):
    """The hub could not be reached; the task wrapper retries these only."""


def fetch_hf_snapshot(repo: str, revision: str | None) -> tuple[Path, str]:
    """Download (or, offline, find in the cache) config/tokenizer/safetensors; returns (snapshot dir, sha)."""
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _hf_offline()
    label = f"hf:{repo}" + (f"@{revision}" if revision else "")
    token = None if offline else hf_token()
    licence = (
        f"accept the licence on https://huggingface.co/{repo} and pass a token with access "
        "(HF_TOKEN or the Prefect Secret block named by LLMHOST_HF_TOKEN_SECRET_BLOCK)"
    )
    try:
        path = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=MODEL_FILE_PATTERNS,
            cache_dir=_hf_cache_dir(),
            local_files_only=offline,
            token=token,
        )
    except GatedRepoError as exc:
        who = "no token was given" if not token else "the token has no access"
        raise RegistryError(f"{label}: the repo is gated and {who}; {licence}") from exc
    except RevisionNotFoundError as exc:
        raise RegistryError(
            f"{label}: revision {revision!r} does not exist; use a branch, tag or commit sha of the repo"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise RegistryError(
            f"{label}: repo not found, or private and the token has no access; check the id, or {licence}"
        ) from exc
    except HFValidationError as exc:
        raise ConfigError("source", label, "hub sources look like hf:ORG/NAME[@REVISION]") from exc
    except LocalEntryNotFoundError as exc:
        if offline:
            raise RegistryError(
                f"{label}: not in the local HF cache ({_hf_cache_dir() or 'default'}) and HF_HUB_OFFLINE=1; "
                "check the repo id and revision, or download it once with network access (HF_HUB_OFFLINE=0)"
            ) from exc
        raise TransientHubError(f"{label}: the hub could not be reached ({exc}); retry later") from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise RegistryError(f"{label}: access denied (HTTP {status}); {licence}") from exc
        raise TransientHubError(f"{label}: the hub answered HTTP {status}; retry later") from exc
    except httpx.HTTPError as exc:
        raise TransientHubError(
            f"{label}: the hub could not be reached ({type(exc).__name__}); retry later"
        ) from exc
    snapshot = Path(path)
    return snapshot, snapshot.name


def _model_cache_root() -> Path:
    return get_settings().home_abs / "model_cache"


def _download_once(artifact_uri: str, dest: Path) -> Path:
    """Download MLflow artifacts to `dest` unless a completed copy is there (downloads land atomically)."""
    import mlflow

    marker = dest / ".complete"
    if marker.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        # A folder URI lands in a subfolder named after it, a models:/ URI at the top: use what it returns.
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(tmp)))
        (local / ".complete").write_text(artifact_uri)
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)  # an incomplete copy from an interrupted download
        try:
            local.rename(dest)
        except OSError:
            if not marker.is_file():  # a concurrent caller finishing first is fine; anything else is not
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def hf_folder_from_mlflow_model(root: Path) -> Path:
    """The HF checkpoint inside a downloaded transformers-flavour MLflow model.

    Logged from a folder, `model/` is a verbatim copy with the tokenizer; logged from objects, the tokenizer
    sits in `components/tokenizer/`, so a merged folder of symlinks is built next to it.
    """
    model = root / MLFLOW_MODEL_NAME
    if not (model / "config.json").is_file():
        raise RegistryError(
            f"{root}: the MLflow model has no {MLFLOW_MODEL_NAME}/config.json; it was not "
            "logged with mlflow.transformers.log_model(save_pretrained=True)"
        )
    if any((model / n).is_file() for n in TOKENIZER_FILES):
        return model
    tokenizer = root / "components" / "tokenizer"
    merged = root / "hf"
    if (merged / "config.json").exists():
        return merged
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=root))
    for src_dir in (model, tokenizer):
        if src_dir.is_dir():
            for f in src_dir.iterdir():
                if f.is_file() and not (tmp / f.name).exists():
                    (tmp / f.name).symlink_to(os.path.relpath(f, tmp.parent / merged.name))
    try:
        tmp.rename(merged)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (merged / "config.json").exists():  # lost a race with a concurrent resolve: theirs is fine
            raise
    return merged


def _logged_model_for_run(client: Any, run: Any, artifact_path: str) -> Any | None:
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    return next((m for m in found if m.name == artifact_path), None)


def fetch_run_model(run_id: str, artifact_path: str) -> tuple[Path, str, str | None]:
    """Download a transformers model logged in a run; returns (HF folder, MLflow model source, model_id)."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    client = mlflow_client()
    label = f"run:{run_id}/{artifact_path}"
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(
            f"{label}: no such run in {get_settings().mlflow_uri}; copy the run id from the MLflow UI"
        ) from exc
    logged = _logged_model_for_run(client, run, artifact_path)
    source = logged.model_uri if logged else f"runs:/{run_id}/{artifact_path}"
    meta_uri = f"{logged.artifact_location}/MLmodel" if logged else f"{source}/MLmodel"
    no_model = (
        f"{label}: the run has no transformers model named {artifact_path!r}; log one with "
        f"mlflow.transformers.log_model(..., name={artifact_path!r}) or pass run:{run_id}/<name>"
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mlmodel = Model.load(mlflow_artifacts_download(meta_uri, tmp))
    except (MlflowException, OSError) as exc:
        raise RegistryError(no_model) from exc
    flavor = mlmodel.flavors.get("transformers")
    if flavor is None:
        found = ", ".join(sorted(mlmodel.flavors)) or "none"
        raise RegistryError(f"{no_model} (its flavours: {found})")
    if flavor.get("peft_adaptor"):
        raise RegistryError(
            f"{label}: the model is a PEFT adapter; merge it (merge_and_unload()) and log the "
            "merged model, or serve the adapter with its base"
        )
    if not flavor.get("model_binary"):
        ref = flavor.get("source_model_name")
        raise RegistryError(
            f"{label}: the model was logged with save_pretrained=False (weights not stored); "
            f"register hf:{ref}@{flavor.get('source_model_revision', 'main')} instead"
        )
    dest = _model_cache_root() / "runs" / run_id / artifact_path.replace("/", "__")
    root = _download_once(logged.artifact_location if logged else source, dest)
    return hf_folder_from_mlflow_model(root), source, (logged.model_id if logged else None)


def mlflow_artifacts_download(uri: str, dst: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)


# ---------------------------------------------------------------------------------------------- registry


def find_version_by_hash(name: str, digest: str) -> Any | None:
    """The existing version of `name` with this content hash, if any."""
    client = mlflow_client()
    found = client.search_model_versions(f"name = '{name}' and tags.content_hash = '{digest}'")
    live = [v for v in found if getattr(v, "status", "READY") != "FAILED_REGISTRATION"]
    return min(live, key=lambda v: int(v.version)) if live else None


def _as_registered(mv: Any, created: bool) -> RegisteredVersion:
    return RegisteredVersion(
        name=mv.name,
        version=str(mv.version),
        created=created,
        model_uri=f"models:/{mv.name}/{mv.version}",
        source=mv.source,
        run_id=mv.run_id,
        tags=dict(mv.tags),
    )


def _pip_requirements() -> list[str]:
    reqs = []
    for dist in ("transformers", "torch", "safetensors", "tokenizers"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _model_card(model_dir: Path) -> Any:
    """The folder's README as the model card; without one MLflow would look the path up on the hub."""
    from huggingface_hub import ModelCard

    readme = model_dir / "README.md"
    text = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else ""
    return ModelCard(text or f"Registered by llmhost from {model_dir}.")


def _description(facts: ModelFacts, compat: CompatResult) -> str:
    size = f"{facts.params_total / 1e6:.2f}M params"
    if facts.params_active != facts.params_total:
        size += f" ({facts.params_active / 1e6:.2f}M active)"
    vllm = "vLLM: supported" if compat.supported else "vLLM: NOT supported"
    return f"{','.join(facts.architectures) or '?'}, {size}, {facts.dtype}, ctx {facts.max_context}; {vllm}"


def register_model(source: str, name: str, *, force: bool = False) -> RegisteredVersion:
    """Register SOURCE as a version of NAME (or return the version that already has the same content)."""
    import mlflow

    validate_name(name)
    src = parse_source(source)
    model_id: str | None = None
    storage: Storage
    mlflow_source: str | None = None
    link_run_id: str | None = None
    extra: dict[str, str] = {}
    if src.kind == "path":
        assert src.path is not None
        model_dir, source_ref, storage = src.path, f"path:{src.path}", "artifacts"
        extra["source_path"] = str(src.path)
    elif src.kind == "hf":
        assert src.repo is not None
        model_dir, sha = fetch_hf_snapshot(src.repo, src.revision)
        source_ref, storage = f"hf:{src.repo}@{sha}", "reference"
        extra.update(hf_repo=src.repo, hf_revision=sha)
    else:
        assert src.run_id is not None and src.artifact_path is not None
        model_dir, mlflow_source, model_id = fetch_run_model(src.run_id, src.artifact_path)
        link_run_id = src.run_id
        source_ref, storage = f"run:{src.run_id}/{src.artifact_path}", "artifacts"
        extra.update(source_run_id=src.run_id, source_artifact_path=src.artifact_path)

    facts = inspect_model_dir(model_dir, label=source_ref)
    compat = check_architectures(facts.architectures, facts.config, supported_architectures())
    if not compat.supported and not force:
        # The reason names the architecture, the list checked and the closest supported names.
        raise RegistryError(
            f"{source_ref}: {compat.reason}; pass --force to register it anyway, marked vllm_supported=false"
        )
    existing = find_version_by_hash(name, facts.content_hash)
    if existing is not None:
        return _as_registered(existing, created=False)

    tags = version_tags(src, source_ref, facts, compat, storage, extra)
    client = mlflow_client()
    created_run: str | None = None
    created_model = False
    created_version: str | None = None
    try:
        if src.kind != "run":
            experiment_id = get_or_create_experiment(REGISTRY_EXPERIMENT)
            run = client.create_run(
                experiment_id,
                run_name=f"register-{name}",
                tags={"llmhost.step": "register", "llmhost.source": source_ref},
            )
            created_run = link_run_id = run.info.run_id
            with experiment_scope(experiment_id), mlflow.start_run(
                run_id=run.info.run_id, nested=mlflow.active_run() is not None
            ):
                mlflow.log_params({"source": source_ref, "name": name, "content_hash": facts.content_hash})
                if src.kind == "path":
                    info = mlflow.transformers.log_model(
                        transformers_model=str(model_dir),
                        name=MLFLOW_MODEL_NAME,
                        model_card=_model_card(model_dir),
                        task="llm/v1/chat" if facts.has_chat_template else "text-generation",
                        pip_requirements=_pip_requirements(),
                    )
                    mlflow_source, model_id = info.model_uri, info.model_id
                else:
                    # By reference: only the small files that describe the model, plus where to fetch it.
                    with tempfile.TemporaryDirectory() as tmp:
                        for rel in facts.files:
                            if not rel.endswith(".safetensors"):
                                shutil.copy(model_dir / rel, Path(tmp) / rel)
                        ref = {
                            "repo": src.repo,
                            "revision": extra["hf_revision"],
                            "allow_patterns": MODEL_FILE_PATTERNS,
                        }
                        (Path(tmp) / "reference.json").write_text(json.dumps(ref, indent=2))
                        mlflow.log_artifacts(tmp, HF_REFERENCE_DIR)
                    mlflow_source = f"{run.info.artifact_uri}/{HF_REFERENCE_DIR}"
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(name, description="Registered by llmhost.")
            created_model = True
        assert mlflow_source is not None
        mv = client.create_model_version(
            name,
            source=mlflow_source,
            run_id=link_run_id,
            tags=tags,
            description=_description(facts, compat),
            model_id=model_id,
        )
        created_version = str(mv.version)
        return _as_registered(mv, created=True)
    except BaseException:
        _cleanup(client, name, created_version, created_model, created_run)
        raise


def _cleanup(client: Any, name: str, version: str | None, model: bool, run_id: str | None) -> None:
    """Undo what a failed registration created, so no half-registered model is left behind."""
    from mlflow.exceptions import MlflowException

    steps: list[tuple[Any, tuple[Any, ...]]] = []
    if version is not None:
        steps.append((client.delete_model_version, (name, version)))
    if model:
        steps.append((client.delete_registered_model, (name,)))
    if run_id is not None:
        steps.append((client.delete_run, (run_id,)))
    for fn, args in steps:
        # Best effort: the original error is the one to report.
        with contextlib.suppress(MlflowException):
            fn(*args)


def _parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS | models:/NAME/VERSION | models:/NAME/latest -> (name, version, alias)."""
    m = re.fullmatch(r"models:/([^/@]+)(?:@([\w.-]+)|/(\w+))", ref)
    if not m:
        raise ConfigError("model_ref", ref, "use models:/NAME@ALIAS or models:/NAME/VERSION")
    return m.group(1), m.group(3), m.group(2)


def get_version(ref: str) -> Any:
    """The MLflow ModelVersion a models:/ reference points at."""
    from mlflow.exceptions import MlflowException

    name, version, alias = _parse_ref(ref)
    client = mlflow_client()
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise RegistryError(
                    f"model_ref={ref!r}: {name} has no versions; register one with llmhost register"
                )
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(
            f"model_ref={ref!r} does not exist in {get_settings().mlflow_uri}; list versions with "
            f"`llmhost models show {name}`"
        ) from exc


def resolve_model_ref(ref: str) -> ResolvedModel:
    """A local HF folder for a registered version: the HF cache snapshot (by reference) or its artifacts."""
    mv = get_version(ref)
    tags = dict(mv.tags)
    if tags.get("storage") == "reference":
        repo, sha = tags.get("hf_repo"), tags.get("hf_revision")
        if not repo or not sha:
            raise RegistryError(
                f"model_ref={ref!r}: version {mv.version} lacks hf_repo/hf_revision tags; re-register it"
            )
        local_dir, _ = fetch_hf_snapshot(repo, sha)
    else:
        dest = _model_cache_root() / mv.name / str(mv.version)
        root = _download_once(f"models:/{mv.name}/{mv.version}", dest)
        local_dir = hf_folder_from_mlflow_model(root)
    return ResolvedModel(
        name=mv.name,
        version=str(mv.version),
        local_dir=local_dir,
        source_kind=tags.get("source_kind"),
        storage=tags.get("storage"),
        run_id=mv.run_id,
        tags=tags,
    )


class ModelSummary(BaseModel):
    name: str
    latest_version: str | None
    aliases: dict[str, str] = Field(default_factory=dict, description="alias -> version")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags of the latest version.")


def list_models() -> list[ModelSummary]:
    client = mlflow_client()
    out = []
    for rm in client.search_registered_models(max_results=1000):
        latest = max(
            (v for v in client.search_model_versions(f"name = '{rm.name}'")),
            key=lambda v: int(v.version),
            default=None,
        )
        out.append(
            ModelSummary(
                name=rm.name,
                latest_version=str(latest.version) if latest else None,
                aliases={alias: str(v) for alias, v in (rm.aliases or {}).items()},
                tags=dict(latest.tags) if latest else {},
            )
        )
    return sorted(out, key=lambda m: m.name)


def model_versions(name: str) -> list[RegisteredVersion]:
    client = mlflow_client()
    versions = client.search_model_versions(f"name = '{validate_name(name)}'")
    if not versions:
        raise RegistryError(f"name={name!r}: no registered model of that name; see `llmhost models list`")
    return [_as_registered(v, created=False) for v in sorted(versions, key=lambda v: int(v.version))]


# ---------------------------------------------------------------------------------------------- tasks


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only when the hub could not be reached; bad input never gets better by retrying."""
    try:
        state.result()
    except TransientHubError:
        return True
    except Exception:
        return False
    return False


@task(name="register-model", retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_transient)
def register_model_task(source: str, name: str, force: bool = False) -> RegisteredVersion:
    return register_model(source, name, force=force)


@task(name="resolve-model-ref", retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_transient)
def resolve_model_ref_task(ref: str) -> ResolvedModel:
    return resolve_model_ref(ref)
