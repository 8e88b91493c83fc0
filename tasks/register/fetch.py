"""Fetch a model folder from its source: `hf:ORG/NAME[@REV]` (the HF cache), `run:RUN_ID[/PATH]`, `path:DIR`.

Hub models are downloaded once into the HF cache (offline: found there); MLflow models are downloaded once
into the state dir's model cache, atomically, so concurrent resolves of one version share a copy.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks.core.errors import ConfigError, RegistryError, TransientError
from tasks.core.secrets import secret_reader
from tasks.core.settings import get_settings
from tasks.core.tracking import mlflow_client
from tasks.register.inspect import MODEL_FILE_PATTERNS, TOKENIZER_FILES

MLFLOW_MODEL_NAME = "model"  # `name=` of log_model; also the flavour's folder holding the HF checkpoint

SourceKind = Literal["hf", "run", "path"]

_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")



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


def _hf_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None



def hf_token() -> str | None:
    """HF_TOKEN, else the Prefect Secret block named in settings, read by flows/' reader (never logged)."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    block = get_settings().hf_token_secret_block
    if not block:
        return None
    read = secret_reader()
    if read is None:
        raise ConfigError(
            "hf_token_secret_block", block, "set HF_TOKEN; Prefect Secret blocks are read under the CLI and flows only"
        )
    return read(block)


class TransientHubError(RegistryError, TransientError):
    """The hub could not be reached; the only registry error a retry can fix."""


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
