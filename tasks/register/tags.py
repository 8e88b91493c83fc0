"""The tags of a registered model version, as one typed model.

MLflow stores tags as strings; `VersionTags.from_mlflow` reads them and `to_mlflow` writes them, so no
module spells "true"/"false", comma lists or tag names by hand. Only the tags a writer set are written
(pydantic's fields-set), so a version keeps exactly the tags it was registered with; unknown tags (set by
hand or by another tool) ride along as extras.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.core.errors import RegistryError
from tasks.register.inspect import ModelFacts
from tasks.register.vllm_compat import CompatResult

Storage = Literal["artifacts", "reference"]
_BOOLS = ("has_chat_template", "template_supports_tools", "vllm_supported", "trust_remote_code", "adapter")
_INTS = ("params_total", "params_active", "max_context", "weights_bytes", "lora_rank")
# What the serving side reads to choose vLLM flags; an adapter version carries them over from its base.
SERVING_TAGS = frozenset({
    "architectures", "model_type", "dtype", "max_context", "has_chat_template", "template_supports_tools",
    "tool_call_format", "vllm_supported",
})  # fmt: skip


class VersionTags(BaseModel):
    """Every tag llmhost writes on a model version; None means the tag is absent or empty."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    # Where the version came from and how its files are stored.
    source: str | None = Field(default=None, description="hf:REPO@SHA, run:ID/PATH, path:DIR or run:ID/model.")
    source_kind: Literal["hf", "run", "path", "finetune"] | None = None
    storage: Storage | None = Field(default=None, description="artifacts (MLflow) or reference (HF cache).")
    content_hash: str | None = Field(default=None, description="sha256 of the model (or adapter) files.")
    # What inspecting the folder found.
    architectures: list[str] | None = None
    model_type: str | None = None
    params_total: int | None = None
    params_active: int | None = None
    params_source: Literal["safetensors", "config"] | None = None
    dtype: str | None = None
    max_context: int | None = None
    has_chat_template: bool | None = None
    template_supports_tools: bool | None = None
    tool_call_format: str | None = Field(default=None, description="Guessed vLLM --tool-call-parser.")
    weights_bytes: int | None = None
    # What the installed vLLM said about it.
    vllm_supported: bool | None = None
    vllm_reason: str | None = None
    vllm_checked_against: str | None = None
    trust_remote_code: bool | None = None
    # The source's own coordinates (one group, by source kind).
    source_path: str | None = None
    hf_repo: str | None = None
    hf_revision: str | None = Field(default=None, description="The commit sha the hub resolved.")
    source_run_id: str | None = None
    source_artifact_path: str | None = None
    # A LoRA adapter version, and what it was trained on.
    adapter: bool | None = None
    base_version: str | None = Field(default=None, description="Version (same name) the adapter applies to.")
    base_model: str | None = Field(default=None, description="models:/NAME/VERSION of the base.")
    base_content_hash: str | None = None
    dataset_hash: str | None = None
    training_run_id: str | None = None
    finetune_config_hash: str | None = None
    lora_rank: int | None = None
    lora_target_modules: list[str] | str | None = Field(default=None, description="Written as JSON.")

    @field_validator(*_BOOLS, mode="before")
    @classmethod
    def _read_bool(cls, v: Any) -> Any:
        return v.strip().lower() == "true" if isinstance(v, str) else v

    @field_validator(*_INTS, mode="before")
    @classmethod
    def _read_int(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("architectures", mode="before")
    @classmethod
    def _read_list(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        return list(json.loads(v)) if v.startswith("[") else [a for a in v.split(",") if a]

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _read_json(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        try:
            return json.loads(v)
        except ValueError:
            return v

    @classmethod
    def from_mlflow(cls, tags: Mapping[str, str]) -> VersionTags:
        """Read a ModelVersion's `tags`; a malformed value names the tag."""
        try:
            return cls.model_validate(dict(tags))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise RegistryError(
                f"version tag {field}={err['input']!r} is malformed ({err['msg']}); re-register the version"
            ) from None

    def to_mlflow(self) -> dict[str, str]:
        """The tags as MLflow strings: only the fields that were set, then any extras."""
        written = [name for name in type(self).model_fields if name in self.model_fields_set]
        out = {name: _wire(name, getattr(self, name)) for name in written}
        out.update({k: str(v) for k, v in (self.model_extra or {}).items()})
        return out

    def merged(self, other: VersionTags, only: frozenset[str] | None = None) -> VersionTags:
        """A copy with the tags `other` set (all of them, or those in `only`) written over these."""
        include = set(only) if only is not None else None
        return self.model_copy(update=other.model_dump(include=include, exclude_unset=True))


def _wire(name: str, value: Any) -> str:
    if name == "lora_target_modules":
        return json.dumps(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def version_tags(
    source_kind: Literal["hf", "run", "path"],
    source_ref: str,
    facts: ModelFacts,
    compat: CompatResult,
    storage: Storage,
    origin: VersionTags,
) -> VersionTags:
    """The tags every registered version carries, plus its source's coordinates (`origin`)."""
    described = VersionTags(
        source=source_ref,
        source_kind=source_kind,
        storage=storage,
        content_hash=facts.content_hash,
        architectures=facts.architectures,
        model_type=facts.model_type or "",
        params_total=facts.params_total,
        params_active=facts.params_active,
        params_source=facts.params_source,
        dtype=facts.dtype,
        max_context=facts.max_context,
        has_chat_template=facts.has_chat_template,
        template_supports_tools=facts.template_supports_tools,
        tool_call_format=facts.tool_call_format,
        weights_bytes=facts.weights_bytes,
        vllm_supported=compat.supported,
        vllm_reason=compat.reason,
        vllm_checked_against=compat.checked_against,
        trust_remote_code=compat.trust_remote_code,
    )
    return described.merged(origin)
