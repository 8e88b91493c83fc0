"""Register models in MLflow from the HF hub, an MLflow run or a local folder, and resolve them back."""

from tasks.register.fetch import (
    MLFLOW_MODEL_NAME,
    ModelSource,
    TransientHubError,
    fetch_hf_snapshot,
    hf_token,
    parse_source,
)
from tasks.register.inspect import (
    MODEL_FILE_PATTERNS,
    ModelFacts,
    guess_tool_call_format,
    inspect_model_dir,
    params_from_config,
    params_from_safetensors,
    read_safetensors_header,
)
from tasks.register.tags import SERVING_TAGS, VersionTags
from tasks.register.versions import (
    ModelSummary,
    RegisteredVersion,
    ResolvedModel,
    find_version_by_hash,
    get_version,
    list_models,
    model_versions,
    pip_requirements,
    register_model,
    resolve_model_ref,
)

__all__ = [
    "MLFLOW_MODEL_NAME",
    "MODEL_FILE_PATTERNS",
    "SERVING_TAGS",
    "ModelFacts",
    "ModelSource",
    "ModelSummary",
    "RegisteredVersion",
    "ResolvedModel",
    "TransientHubError",
    "VersionTags",
    "fetch_hf_snapshot",
    "find_version_by_hash",
    "get_version",
    "guess_tool_call_format",
    "hf_token",
    "inspect_model_dir",
    "list_models",
    "model_versions",
    "params_from_config",
    "params_from_safetensors",
    "parse_source",
    "pip_requirements",
    "read_safetensors_header",
    "register_model",
    "resolve_model_ref",
]
