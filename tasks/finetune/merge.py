"""Merge a registered LoRA adapter version into its base and register the result as its own full model version.

Served merged, a promoted adapter costs nothing at inference (LoRA cost about a third of the throughput here). The
merged folder is registered like any model folder (`register_model("path:...")`): plain weights, so MLflow's PEFT
logging problem (issue #23761) does not arise, and the registered copy is reloaded and compared before it is
returned. Tags link the two versions both ways.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel, Field

from tasks.core.errors import FinetuneError
from tasks.core.settings import get_settings
from tasks.core.tracking import mlflow_client
from tasks.deploy.resolve import resolve_adapter
from tasks.register import RegisteredVersion, VersionTags, register_model, resolve_model_ref

MERGE_ATOL = 1e-4  # fp32 on both sides: merging only reorders the same sums
WEIGHT_MARKS = (".safetensors", ".bin", ".pt", ".pth")  # weights and their shard indexes come from the merge
PROBE = "hey team , something is off with my invoice ."


class MergedVersion(BaseModel):
    adapter: str = Field(description="NAME/VERSION of the adapter that was merged.")
    base: str = Field(description="NAME/VERSION it was merged into.")
    merged: RegisteredVersion
    max_abs_diff: float = Field(description="Largest logit difference, adapter on base vs the registered merge.")


def _logits(model, tokenizer):  # noqa: ANN001, ANN202 - torch types stay out of the module's imports
    import torch

    enc = tokenizer(PROBE, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**enc).logits


def merge_adapter_version(ref: str) -> MergedVersion:
    """merge_and_unload() the adapter into its base (fp32), register it, reload the registered copy and compare."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = resolve_adapter(ref)
    base = resolve_model_ref(f"models:/{adapter.name}/{adapter.base_version}")
    out = get_settings().home_abs / "merged" / f"{adapter.name}-v{adapter.version}"
    tokenizer = AutoTokenizer.from_pretrained(base.local_dir)
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base.local_dir, dtype=torch.float32), str(adapter.adapter_dir))
    expected = _logits(with_adapter, tokenizer)
    merged = with_adapter.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    # The base's tokenizer and chat template byte for byte: the registry reads tool support from the template.
    for f in Path(base.local_dir).iterdir():
        if f.is_file() and not (out / f.name).exists() and not any(w in f.name for w in WEIGHT_MARKS):
            shutil.copy2(f, out / f.name)
    reg = register_model(f"path:{out}", adapter.name)
    reloaded = AutoModelForCausalLM.from_pretrained(
        resolve_model_ref(f"models:/{reg.name}/{reg.version}").local_dir, dtype=torch.float32)
    diff = float((_logits(reloaded, tokenizer) - expected).abs().max())
    if not diff <= MERGE_ATOL:
        raise FinetuneError(f"merged {adapter.ref} reloads with logits {diff:.2e} away from the adapter on its base "
                            f"(tolerance {MERGE_ATOL:g}); version {reg.version} must not be served")
    client = mlflow_client()
    for k, v in VersionTags.model_validate({"merged_from": f"{adapter.name}/{adapter.version}",
                                            "merged_base": f"{base.name}/{base.version}"}).to_mlflow().items():
        client.set_model_version_tag(reg.name, reg.version, k, v)
    for k, v in VersionTags.model_validate({"merged_version": str(reg.version)}).to_mlflow().items():
        client.set_model_version_tag(adapter.name, adapter.version, k, v)
    return MergedVersion(adapter=f"{adapter.name}/{adapter.version}", base=f"{base.name}/{base.version}",
                         merged=reg, max_abs_diff=diff)

