"""Registered LoRA adapter versions: a models:/ reference to a local adapter folder, its base and its rank."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, Field

from tasks.core.errors import ConfigError
from tasks.core.settings import get_settings
from tasks.register import get_version


class AdapterVersion(BaseModel):
    """A registered adapter version and its local folder (the one holding adapter_config.json)."""

    name: str = Field(description="Registered model name (the base's name).")
    version: str
    adapter_dir: Path
    base_version: str
    lora_rank: int
    tags: dict[str, str] = Field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def default_serving_name(self) -> str:
        """The adapter's name on vLLM and in the gateway (`endpoint:<this>`)."""
        return f"{self.name}-v{self.version}"


def adapter_ref(version: str, model_name: str | None = None) -> str:
    """`models:/NAME/V`, `NAME/V`, or a bare `V` of `model_name` -> a models:/ reference."""
    if version.startswith("models:/"):
        return version
    if "/" in version:
        return f"models:/{version}"
    if model_name and re.fullmatch(r"\d+", version):
        return f"models:/{model_name}/{version}"
    raise ConfigError(
        "version",
        version,
        "use models:/NAME/VERSION, NAME/VERSION, or a version number of the endpoint's model",
    )


def find_adapter_dir(root: Path) -> Path:
    found = sorted(root.rglob("adapter_config.json"))
    if not found:
        raise ConfigError(
            "version",
            str(root),
            "holds no adapter_config.json; register a PEFT adapter version (llmhost finetune)",
        )
    return found[0].parent


def resolve_adapter(ref: str) -> AdapterVersion:
    """Download (once) a registered adapter version; refuse versions that are not adapters."""
    import mlflow  # heavy; only resolving a version that is not cached yet downloads through it

    mv = get_version(ref)
    tags = dict(mv.tags)
    if tags.get("adapter") != "true":
        raise ConfigError(
            "version",
            ref,
            "is a full model, not a LoRA adapter; deploy it with `llmhost deploy`, or "
            "pick a version tagged adapter=true (llmhost finetune registers those)",
        )
    dest = get_settings().home_abs / "model_cache" / mv.name / str(mv.version)
    if not (dest / ".complete").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{mv.version}-", dir=dest.parent))
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(tmp)
            )
            (tmp / ".complete").write_text(ref)
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    adapter_dir = find_adapter_dir(dest)
    rank = tags.get("lora_rank") or str(
        json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 0)
    )
    return AdapterVersion(
        name=mv.name,
        version=str(mv.version),
        adapter_dir=adapter_dir,
        base_version=tags.get("base_version", ""),
        lora_rank=int(rank),
        tags=tags,
    )
