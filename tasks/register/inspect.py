"""Read a Hugging Face model folder: files, safetensors headers, parameter counts, chat template, tool format.

`inspect_model_dir` validates the folder (config, tokenizer, complete safetensors weights) and returns its
facts; bad input raises a one-line RegistryError naming the fix.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks.core.errors import LlmhostError, RegistryError
from tasks.core.hf_config import moe_shape, text_config

# The parameter arithmetic for packed (quantised) weights is the sizing step's; it imports nothing of register.
from tasks.register.shape import count_params, parse_config

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
    moe = moe_shape(text_config(config))
    if not moe or not expert:
        return total, total
    experts, top_k = moe
    return total, total - expert + expert * top_k // experts


def params_from_config(config: dict[str, Any]) -> tuple[int, int] | None:
    """(total, active) by the sizing step's arithmetic, for when shapes do not tell (packed weights)."""
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
    c = text_config(config)
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
    config_dtype = config.get("dtype") or config.get("torch_dtype") or text_config(config).get("dtype")
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
