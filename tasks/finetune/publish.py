"""Publish a fine-tune: the MLflow run (params, losses, plot), the logged adapter, the reload check, the version.

Why `base_model_path`: a PEFT model logged the default way comes back with randomly re-initialised base
weights (MLflow issue #23761, reproduced here), so the adapter is stored alone with a link to the base
version's local folder, and every run re-loads it and compares logits before registering.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.core.errors import ConfigError, FinetuneError
from tasks.core.tracking import get_or_create_experiment, mlflow_client
from tasks.finetune.config import FinetuneConfig, config_hash
from tasks.finetune.data import ChatRow, TrainingData, check_contamination, load_training_data
from tasks.finetune.device import (
    Precision,
    compare_logits,
    load_base,
    logits_on,
    match_dtypes,
    model_device,
    reload_tolerance,
    torch_dtype,
)
from tasks.finetune.train import (
    LossHistory,
    TrainOutcome,
    preflight,
    render_chat,
    train_lora,
    training_precision,
)
from tasks.register import (
    MLFLOW_MODEL_NAME,
    SERVING_TAGS,
    VersionTags,
    get_version,
    pip_requirements,
    resolve_model_ref,
)

# What a logged adapter needs to load besides the base requirements.
ADAPTER_REQUIREMENTS = ("transformers", "torch", "peft", "safetensors", "tokenizers", "accelerate")


def flat_params(cfg: FinetuneConfig) -> dict[str, str]:
    """The config as dotted MLflow params (values as strings, cut to MLflow's 6000-char limit)."""
    out: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        else:
            out[prefix] = (json.dumps(v) if isinstance(v, list) else str(v))[:6000]

    walk("", cfg.model_dump(mode="json"))
    return out


def plot_losses(history: LossHistory, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history.train:
        ax.plot(*zip(*history.train, strict=True), label="train loss", lw=1)
    if history.eval:
        ax.plot(*zip(*history.eval, strict=True), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _probe_inputs(tokenizer: Any, rows: list[ChatRow]) -> Any:
    texts = [render_chat(tokenizer, r.messages, r.tools, False) for r in rows[:4]]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def reload_logged(model_uri: str, reference: Any, precision: Precision, base_dir: Path, *, qlora: bool) -> Any:
    """The logged adapter reloaded on the trained model's device, its parameters in the trained dtypes."""
    import mlflow

    device = model_device(reference)
    if qlora:
        # MLflow would reload the base in full precision, but QLoRA trained on NF4 weights: put the logged
        # adapter on the same 4-bit base so that like is compared with like.
        import yaml
        from peft import PeftModel

        local = Path(mlflow.artifacts.download_artifacts(model_uri))
        adapter = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["transformers"]["peft_adaptor"]
        base = load_base(base_dir, precision, qlora=True, device=device.index or 0)
        reloaded = PeftModel.from_pretrained(base, str(local / adapter))
    else:
        comps = mlflow.transformers.load_model(model_uri, return_type="components", dtype=torch_dtype(precision))
        reloaded = comps["model"].to(device)
    # The Trainer's model may hold some tensors in fp32 (prepare_model_for_kbit_training casts norms; PEFT keeps
    # LoRA matrices in fp32): the reload must compute exactly as it did.
    match_dtypes(reloaded, reference)
    return reloaded.eval()


def adapter_content_hash(adapter_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(adapter_dir.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(adapter_dir).as_posix().encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


class FinetuneResult(BaseModel):
    """What a run produced: scores, where it was logged, and the registered version."""

    run_id: str
    experiment_id: str
    model_uri: str = Field(description="The logged model (models:/<model_id>).")
    registered_name: str | None = None
    registered_version: str | None = None
    base_name: str
    base_version: str
    base_dir: str
    dataset_hash: str
    config_hash: str
    rows: int
    steps: int
    train_seconds: float
    first_loss: float
    last_loss: float
    eval_loss_before: float | None
    eval_loss_after: float | None
    reload_max_abs_diff: float
    precision: str = Field(default="fp32", description="What it trained in: bf16, fp16 or fp32.")
    contamination: str
    lora_rank: int
    tags: dict[str, str] = Field(default_factory=dict)


def trainable_base(ref: str) -> str:
    """The version a new adapter of `ref` trains on: `ref` itself, or its base when `ref` is an adapter.

    After a promotion the champion is an adapter; a retrain starts a fresh adapter from the same base
    (with the grown dataset) rather than stacking adapters.
    """
    mv = get_version(ref)
    tags = VersionTags.from_mlflow(mv.tags)
    if tags.adapter and tags.base_version:
        return f"models:/{mv.name}/{tags.base_version}"
    return f"models:/{mv.name}/{mv.version}"


def resolve_base(cfg: FinetuneConfig) -> tuple[Any, Path]:
    """(MLflow ModelVersion, local HF folder) of the base; adapter versions are refused as bases."""
    mv = get_version(cfg.base_model)
    tags = VersionTags.from_mlflow(mv.tags)
    if tags.adapter:
        raise ConfigError(
            "base_model",
            cfg.base_model,
            f"that version is a LoRA adapter; fine-tune its base instead (models:/{mv.name}/{tags.base_version})",
        )
    resolved = resolve_model_ref(f"models:/{mv.name}/{mv.version}")
    return mv, Path(resolved.local_dir)


def adapter_tags(
    cfg: FinetuneConfig, base_mv: Any, data: TrainingData, run_id: str, chash: str, adapter_hash: str
) -> VersionTags:
    """The adapter version's tags: what it was trained on, plus the serving tags carried over from its base."""
    base = VersionTags.from_mlflow(base_mv.tags)
    own = VersionTags(
        adapter=True,
        base_version=str(base_mv.version),
        base_model=f"models:/{base_mv.name}/{base_mv.version}",
        base_content_hash=base.content_hash or "",
        dataset_hash=data.dataset_hash,
        training_run_id=run_id,
        finetune_config_hash=chash,
        lora_rank=cfg.lora.r,
        lora_target_modules=cfg.lora.target_modules,
        content_hash=adapter_hash,
        storage="artifacts",
        source_kind="finetune",
        source=f"run:{run_id}/{MLFLOW_MODEL_NAME}",
    )
    return own.merged(base, only=SERVING_TAGS)


def _on_log(step: int, logs: dict[str, float]) -> None:
    """Per-step Trainer logs as MLflow metrics of the active run."""
    import mlflow

    keep = {
        ("train_loss" if k == "loss" else k): v
        for k, v in logs.items()
        if k in {"loss", "eval_loss", "learning_rate", "grad_norm"}
    }
    if keep:
        mlflow.log_metrics(keep, step=step)


def _log_outcome(outcome: TrainOutcome) -> tuple[float, float]:
    """Summary metrics, the loss plot and the loss history into the active run; returns (first, last) loss."""
    import mlflow

    first, last = outcome.history.first_last_train()
    mlflow.log_metrics(
        {
            "train_seconds": outcome.seconds,
            "train_loss_first": first,
            "train_loss_last": last,
            "trainable_params": outcome.trainable_params,
            "dropped_rows": outcome.dropped_rows,
        }
    )
    if outcome.eval_loss_before is not None:
        mlflow.log_metrics(
            {
                "eval_loss_before": outcome.eval_loss_before,
                "eval_loss_after": outcome.eval_loss_after or float("nan"),
            }
        )
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifact(str(plot_losses(outcome.history, Path(tmp) / "loss.png")))
        (Path(tmp) / "losses.json").write_text(outcome.history.model_dump_json())
        mlflow.log_artifact(str(Path(tmp) / "losses.json"))
    return first, last


def _log_adapter(
    cfg: FinetuneConfig, outcome: TrainOutcome, data: TrainingData, base_mv: Any, base_dir: Path, chash: str
) -> tuple[Any, float, bool]:
    """Log the adapter (linked to the base folder) and reload it on the training device.

    Returns (model info, max logit difference, whether every logit is within the dtype's tolerance).
    """
    import mlflow
    from huggingface_hub import ModelCard

    card = ModelCard(
        f"LoRA adapter (r={cfg.lora.r}) on {base_mv.name} v{base_mv.version}, "
        f"dataset {data.dataset_hash[:12]}, config {chash[:12]}."
    )
    info = mlflow.transformers.log_model(
        transformers_model={"model": outcome.model, "tokenizer": outcome.tokenizer},
        name=MLFLOW_MODEL_NAME,
        task="text-generation",
        base_model_path=str(base_dir),
        pip_requirements=pip_requirements(ADAPTER_REQUIREMENTS),
        model_card=card,
    )
    precision: Precision = outcome.precision
    enc = _probe_inputs(outcome.tokenizer, data.eval or data.train)
    expected = logits_on(outcome.model, enc, precision)
    reloaded = reload_logged(info.model_uri, outcome.model, precision, base_dir, qlora=cfg.qlora)
    diff, ok = compare_logits(logits_on(reloaded, enc, precision), expected, reload_tolerance(precision.dtype))
    del reloaded  # a second copy of the base: free it before registering
    mlflow.log_metric("reload_max_abs_diff", diff)
    return info, diff, ok


def finetune(cfg: FinetuneConfig, *, log: Callable[[str], None] = print) -> FinetuneResult:
    """Contamination check -> LoRA training -> MLflow run -> logged adapter (reload-checked) -> version."""
    device = preflight(cfg)  # first: a refusal costs no import, no data read and no run
    import mlflow

    data = load_training_data(cfg)
    if cfg.contamination.skip:
        contamination = "contamination check skipped"
    else:
        contamination = check_contamination(data.train, cfg.contamination).summary()
    base_mv, base_dir = resolve_base(cfg)
    log(
        f"finetune: {data.rows} rows ({data.rows_oversampled} with oversampling), {len(data.eval)} held out; "
        f"{contamination}"
    )
    chash = config_hash(cfg)
    precision = training_precision(cfg, base_dir, device)
    tolerance = reload_tolerance(precision.dtype)
    client = mlflow_client()
    exp_id = get_or_create_experiment(cfg.experiment)
    with mlflow.start_run(
        experiment_id=exp_id,
        run_name=cfg.run_name or f"lora-{base_mv.name}-v{base_mv.version}",
        tags={
            "llmhost.step": "finetune",
            "llmhost.base_model": f"{base_mv.name}/{base_mv.version}",
            "llmhost.precision": precision.reason,
            "llmhost.device": device.name,
        },
    ) as run:
        run_id = run.info.run_id
        mlflow.log_params(flat_params(cfg))
        mlflow.log_params(
            {
                "dataset_hash": data.dataset_hash,
                "dataset_rows": data.rows,
                "dataset_rows_oversampled": data.rows_oversampled,
                "eval_rows": len(data.eval),
                "finetune_config_hash": chash,
                "base_version": str(base_mv.version),
                "train_dtype": precision.dtype,
                "loss_scaling": precision.loss_scaling,
                "reload_atol": tolerance.atol,
                "reload_rtol": tolerance.rtol,
            }
        )
        mlflow.log_text(contamination, "contamination.txt")
        outcome = train_lora(cfg, data, base_dir, on_log=_on_log, device=device)
        first, last = _log_outcome(outcome)
        log(
            f"finetune: {outcome.steps} steps in {outcome.seconds:.1f}s on {outcome.device} in {precision.name}; "
            f"train loss "
            f"{first:.3f} -> {last:.3f}; held-out loss {outcome.eval_loss_before} -> "
            f"{outcome.eval_loss_after}"
        )
        info, diff, ok = _log_adapter(cfg, outcome, data, base_mv, base_dir, chash)
        if not ok:
            raise FinetuneError(
                f"reload check: the logged adapter reloads with logits off by up to {diff:.3g}, outside "
                f"{precision.dtype}'s {tolerance}; it was not registered (run {run_id}); see MLflow issue #23761 "
                "and log with base_model_path"
            )
        with tempfile.TemporaryDirectory() as tmp:
            outcome.model.save_pretrained(tmp)
            adapter_hash = adapter_content_hash(Path(tmp))
        tags = adapter_tags(cfg, base_mv, data, run_id, chash, adapter_hash).to_mlflow()
        version: str | None = None
        if cfg.register_version:
            mv = client.create_model_version(
                base_mv.name,
                source=info.model_uri,
                run_id=run_id,
                tags=tags,
                model_id=info.model_id,
                description=f"LoRA r={cfg.lora.r} adapter on version {base_mv.version}; {contamination}",
            )
            version = str(mv.version)
            mlflow.set_tag("llmhost.registered_version", f"{base_mv.name}/{version}")
            log(f"finetune: registered {base_mv.name} version {version} (adapter on v{base_mv.version})")
    return FinetuneResult(
        run_id=run_id,
        experiment_id=exp_id,
        model_uri=info.model_uri,
        registered_name=base_mv.name,
        registered_version=version,
        base_name=base_mv.name,
        base_version=str(base_mv.version),
        base_dir=str(base_dir),
        dataset_hash=data.dataset_hash,
        config_hash=chash,
        rows=data.rows,
        steps=outcome.steps,
        train_seconds=outcome.seconds,
        first_loss=first,
        last_loss=last,
        eval_loss_before=outcome.eval_loss_before,
        eval_loss_after=outcome.eval_loss_after,
        reload_max_abs_diff=diff,
        precision=precision.name,
        contamination=contamination,
        lora_rank=cfg.lora.r,
        tags=tags,
    )
