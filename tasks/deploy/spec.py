"""An endpoint spec, as written in deployments/<name>.yaml: its fields, how it is read, and a stored revision's.

What the spec names (a model alias, adapters, a hardware tier) is resolved by `tasks.deploy.plan`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from tasks import store
from tasks.core.errors import ConfigError
from tasks.core.inputs import load_yaml_model
from tasks.serving.base import Dtype, KvCacheDtype, Quantization
from tasks.serving.ray import RaySettings
from tasks.smoke import SmokeConfig


class ToolCallingExplicit(BaseModel):
    model_config = {"extra": "forbid"}

    parser: str = Field(description="vLLM --tool-call-parser, e.g. hermes.")
    chat_template: str | None = Field(default=None, description="Path to a Jinja template with tool support.")


class SpecVllm(BaseModel):
    """The vLLM args a spec may set; `model` and `served_model_name` come from the revision."""

    model_config = {"extra": "forbid"}

    max_model_len: int | None = Field(default=None, gt=0)
    dtype: Dtype = "auto"
    tensor_parallel_size: int | Literal["auto"] = "auto"
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    kv_cache_dtype: KvCacheDtype = "auto"
    quantization: Quantization | None = None
    enforce_eager: bool = False
    max_num_seqs: int | None = Field(default=None, gt=0)
    max_lora_rank: int | None = Field(default=None, gt=0)
    extra_args: list[str] = Field(default_factory=list)


class Access(BaseModel):
    model_config = {"extra": "forbid"}

    users: list[str] = Field(default_factory=list)
    teams: list[str] = Field(default_factory=list)


class EndpointSpec(BaseModel):
    """One endpoint, as written in deployments/<name>.yaml."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="What clients send as `model`.")
    description: str | None = None
    usage_notes: str | None = None
    owner: str | None = None
    # `target` comes before `model`, whose check depends on it (field order does not change revision hashes).
    target: Literal["local", "ray", "external"] = Field(default="local", description=(
        "local or ray: vLLM replicas; external: a hosted OpenAI-compatible API the gateway calls for you."))
    model: str = Field(default="", validate_default=True, description=(
        "models:/NAME@ALIAS or models:/NAME/VERSION; for target: external with base_url, the provider's model."))
    replicas: int = Field(default=1, ge=1, le=16)
    ray: RaySettings | None = Field(
        default=None, description="target: ray only: the cluster's dashboard URL, replica bounds and placement."
    )
    frontier: str | None = Field(default=None, description=(
        "target: external: an entry of eval_suites/frontiers.yaml (URL, model, key variable, prices, rules)."))
    base_url: str | None = Field(default=None, pattern=r"^https?://", description=(
        "target: external without a frontier: any OpenAI-compatible base URL (with `model`)."))
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description=(
        "target: external: NAME of the env variable on the gateway host that holds the provider key."))
    api_key_file: str | None = Field(default=None, description=(
        "target: external: a file on the gateway host holding the provider key (instead of api_key_env)."))
    fallback: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description=(
        "local or ray: an external endpoint that answers while no replica is healthy. Off by default: the "
        "request's data then leaves the network."))
    hardware: str = Field(default="auto", description="A tier name from the catalog, or auto.")
    concurrency: int = Field(default=4, ge=1, description="Expected concurrent sequences, for sizing.")
    vllm: SpecVllm = Field(default_factory=SpecVllm)
    tool_calling: Literal["auto", "off"] | ToolCallingExplicit = "auto"
    adapters: dict[str, str] = Field(default_factory=dict, description="Adapter name -> models:/ ref.")
    serve_promoted: Literal["adapter", "merged"] = Field(default="adapter", description=(
        "How a promoted LoRA adapter version is served. `adapter`: the route switches to the adapter already "
        "loaded on the live replicas (no restart). `merged`: the same switch, then a background blue/green "
        "deploy replaces the replicas with the adapter merged into its base (no LoRA cost)."))
    swap: Literal["auto", "bluegreen", "hold", "sleep"] = Field(default="auto", description=(
        "How a new revision replaces the live one (tasks.deploy.swap). auto: bluegreen where both fit on this "
        "machine, else sleep (CUDA) or hold. bluegreen: start beside the old one. hold: the gateway holds "
        "requests (LLMHOST_SWAP_HOLD_S) while the old one stops and the new one starts. sleep: the same, with "
        "the old one asleep (GPU memory freed) instead of stopped, woken if the new one fails."))
    access: Access = Field(default_factory=Access)
    smoke: SmokeConfig = Field(default_factory=SmokeConfig)

    @field_validator("model")
    @classmethod
    def _model_ref(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("target") != "external" and not v.startswith("models:/"):
            raise ValueError("use models:/NAME@ALIAS or models:/NAME/VERSION (register the model first)")
        return v

    @model_validator(mode="after")
    def _external_settings(self) -> EndpointSpec:
        ext_fields = ("frontier", "base_url", "api_key_env", "api_key_file")
        if self.target != "external":
            if any(getattr(self, f) is not None for f in ext_fields):
                raise ValueError(f"{', '.join(ext_fields)} are for target: external; set target: external, "
                                 "or remove them")
            return self
        if (self.frontier is None) == (self.base_url is None):
            raise ValueError("target: external needs exactly one of `frontier: NAME` (eval_suites/frontiers.yaml) "
                             "or `base_url: URL` with `model: PROVIDER_MODEL`")
        if self.base_url is not None and not self.model:
            raise ValueError("target: external with base_url needs `model:` (the provider's model name)")
        if self.base_url is not None and not (self.api_key_env or self.api_key_file):
            raise ValueError("target: external with base_url needs api_key_env (a variable NAME) or api_key_file")
        if self.fallback is not None:
            raise ValueError("fallback is for self-hosted endpoints; an external endpoint has no replicas to lose")
        if self.adapters or self.ray is not None:
            raise ValueError("adapters and ray do not apply to target: external; remove them")
        return self

    @model_validator(mode="after")
    def _target_settings(self) -> EndpointSpec:
        if self.ray is not None and self.target != "ray":
            raise ValueError("ray: is set but target is local; set target: ray, or remove the ray block")
        if self.target == "ray":
            self.ray = self.ray or RaySettings()
            # Ray Serve owns the replica count (ray.min_replicas..max_replicas); two numbers that disagree
            # would leave one of them silently ignored.
            if self.replicas not in (1, self.ray.min_replicas):
                raise ValueError(
                    f"replicas={self.replicas} with target: ray; set ray.min_replicas (and ray.max_replicas) "
                    "instead and leave replicas out"
                )
        return self

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, ref in v.items():
            if ":" in name or not name:
                raise ValueError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (no ':')")
            if not ref.startswith("models:/"):
                raise ValueError(f"adapter {name!r}: use models:/NAME/VERSION of an adapter version")
        return v


def load_spec(path: str | Path) -> EndpointSpec:
    """Reads and validates a spec; errors name the file, the field and the problem."""
    return load_yaml_model(path, EndpointSpec, field="spec", example="an endpoint YAML, e.g. deployments/demo.yaml")


def pinned_spec(rev: store.EndpointRevision) -> EndpointSpec:
    """The spec a stored revision was planned from, with its model and adapters pinned to versions."""
    raw = (rev.spec or {}).get("spec")
    if not isinstance(raw, dict):
        raise ConfigError(
            "revision",
            rev.content_hash[:12],
            "was not deployed from a spec (attached server); deploy a spec with `llmhost deploy`",
        )
    return EndpointSpec.model_validate(raw)
