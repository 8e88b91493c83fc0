"""Registered versions: register a model folder as a version, resolve a models:/ reference back to a folder.

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
import json
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.core.errors import ConfigError, RegistryError
from tasks.core.settings import get_settings
from tasks.core.tracking import experiment_scope, get_or_create_experiment, mlflow_client
from tasks.register.fetch import (
    MLFLOW_MODEL_NAME,
    _download_once,
    _model_cache_root,
    fetch_hf_snapshot,
    fetch_run_model,
    hf_folder_from_mlflow_model,
    parse_source,
)
from tasks.register.inspect import MODEL_FILE_PATTERNS, ModelFacts, inspect_model_dir
from tasks.register.tags import Storage, VersionTags, version_tags
from tasks.register.vllm_compat import CompatResult, check_architectures, supported_architectures

REGISTRY_EXPERIMENT = "llmhost-registry"
HF_REFERENCE_DIR = "hf_reference"
# What a logged transformers model needs to load; finetune adds its own (peft, accelerate).
BASE_REQUIREMENTS = ("transformers", "torch", "safetensors", "tokenizers")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ConfigError(
            "name", name, "use letters, digits, '.', '_' or '-' (at most 100, starting alphanumeric)"
        )
    return name


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


def pip_requirements(dists: tuple[str, ...] = BASE_REQUIREMENTS) -> list[str]:
    """Pinned requirements of a logged model: each installed dist at its version, else unpinned."""
    reqs = []
    for dist in dists:
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
    if src.kind == "path":
        assert src.path is not None
        model_dir, source_ref, storage = src.path, f"path:{src.path}", "artifacts"
        origin = VersionTags(source_path=str(src.path))
    elif src.kind == "hf":
        assert src.repo is not None
        model_dir, sha = fetch_hf_snapshot(src.repo, src.revision)
        source_ref, storage = f"hf:{src.repo}@{sha}", "reference"
        origin = VersionTags(hf_repo=src.repo, hf_revision=sha)
    else:
        assert src.run_id is not None and src.artifact_path is not None
        model_dir, mlflow_source, model_id = fetch_run_model(src.run_id, src.artifact_path)
        link_run_id = src.run_id
        source_ref, storage = f"run:{src.run_id}/{src.artifact_path}", "artifacts"
        origin = VersionTags(source_run_id=src.run_id, source_artifact_path=src.artifact_path)

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

    tags = version_tags(src.kind, source_ref, facts, compat, storage, origin)
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
                        pip_requirements=pip_requirements(),
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
                            "revision": tags.hf_revision,
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
            tags=tags.to_mlflow(),
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
    tags = VersionTags.from_mlflow(mv.tags)
    if tags.storage == "reference":
        repo, sha = tags.hf_repo, tags.hf_revision
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
        source_kind=tags.source_kind,
        storage=tags.storage,
        run_id=mv.run_id,
        tags=dict(mv.tags),
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

