"""Train LoRA on chat rows: device choice, tokenisation with the loss on assistant tokens only, the Trainer run."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.core import quiet
from tasks.core.errors import FinetuneError
from tasks.finetune.config import FinetuneConfig, LoraSettings
from tasks.finetune.data import ChatRow, TrainingData
from tasks.finetune.device import (
    DeviceFacts,
    Precision,
    bnb_importable,
    check_qlora,
    choose_precision,
    detect_device,
    load_base,
    read_base_dtype,
    trainer_args,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def cuda_available() -> bool:
    return detect_device().kind == "cuda"


def preflight(cfg: FinetuneConfig, *, device: DeviceFacts | None = None) -> DeviceFacts:
    """Refuse what cannot run on `device` (default: this machine's) before anything is loaded or logged."""
    device = device or detect_device()
    check_qlora(cfg.qlora, device, bnb_importable() if cfg.qlora and device.kind == "cuda" else False)
    choose_precision(cfg.precision, device.kind, device.bf16_supported, None)
    return device


def training_precision(cfg: FinetuneConfig, base_dir: Path, device: DeviceFacts) -> Precision:
    return choose_precision(cfg.precision, device.kind, device.bf16_supported, read_base_dtype(base_dir))


# ---------------------------------------------------------------------------------------------- tokenisation


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    generation_prompt: bool,
) -> str:
    text: Any = tokenizer.apply_chat_template(
        messages,
        tools=tools,  # type: ignore[arg-type]
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )
    return str(text)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, row: ChatRow) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant turn (its end-of-turn included).

    Each turn's span starts where the chat template's generation prompt ends and stops after the eos
    token, so the model learns to answer and to stop, and never learns the prompt.
    """
    full = render_chat(tokenizer, row.messages, row.tools, False)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(row.messages):
        if m["role"] != "assistant":
            continue
        prefix = render_chat(tokenizer, row.messages[:i], row.tools, True)
        upto = render_chat(tokenizer, row.messages[: i + 1], row.tools, False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise FinetuneError(
                f"{row.where}: the chat template does not render turn {i} as a prefix of the conversation, "
                "so assistant tokens cannot be located; use a template whose output grows turn by turn"
            )
        end = upto.find(eos, len(prefix)) if eos else -1
        spans.append((len(prefix), end + len(eos) if end >= 0 else len(upto)))
    return full, spans


def tokenize_row(
    tokenizer: PreTrainedTokenizerBase, row: ChatRow, max_len: int
) -> dict[str, list[int]] | None:
    """input_ids and labels (-100 outside assistant spans); None when truncation leaves nothing to learn."""
    text, spans = assistant_spans(tokenizer, row)
    enc = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_len
    )
    ids: list[int] = enc["input_ids"]
    labels = [-100] * len(ids)
    for k, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[k] = ids[k]
    if all(x == -100 for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


class _Collator:
    """Right-pads a batch; padded positions are masked out of attention and loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(feats), width), -100, dtype=torch.long)
        mask = torch.zeros((len(feats), width), dtype=torch.long)
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def encode_rows(
    tokenizer: PreTrainedTokenizerBase, rows: list[ChatRow], max_len: int
) -> tuple[list[dict], int]:
    """(features, rows dropped because truncation cut every assistant token)."""
    feats, dropped = [], 0
    for r in rows:
        f = tokenize_row(tokenizer, r, max_len)
        if f is None:
            dropped += 1
        else:
            feats.append(f)
    return feats, dropped


# ---------------------------------------------------------------------------------------------- training


class LossHistory(BaseModel):
    train: list[tuple[int, float]] = Field(default_factory=list, description="(step, loss)")
    eval: list[tuple[int, float]] = Field(default_factory=list, description="(step, eval loss)")

    def first_last_train(self, k: int = 5) -> tuple[float, float]:
        """Mean of the first and last k logged train losses (one noisy step proves nothing)."""
        vals = [v for _, v in self.train]
        k = max(1, min(k, len(vals) // 2 or 1))
        return sum(vals[:k]) / k, sum(vals[-k:]) / k


class TrainOutcome(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: Any = Field(exclude=True, description="The trained PeftModel.")
    tokenizer: Any = Field(exclude=True)
    history: LossHistory
    steps: int
    seconds: float
    train_rows_used: int
    eval_rows_used: int
    dropped_rows: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    trainable_params: int
    device: str
    precision: Any = Field(exclude=True, description="The device.Precision it trained in.")


def _target_modules(lora: LoraSettings) -> list[str] | str:
    return lora.target_modules


def build_peft_model(base_dir: Path, cfg: FinetuneConfig, precision: Precision) -> tuple[Any, Any]:
    """Base model in the training dtype (4-bit for QLoRA) wrapped with fresh fp32 LoRA matrices, and its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_base(base_dir, precision, qlora=cfg.qlora)
    if cfg.gradient_checkpointing:
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    if cfg.qlora:
        from peft import prepare_model_for_kbit_training

        # It turns checkpointing on by default; the config decides here, as it does for LoRA.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lcfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=_target_modules(cfg.lora),
    )
    # autocast_adapter_dtype (the default) keeps the LoRA matrices in fp32 over a bf16/fp16 base, so the
    # optimizer state is fp32 and fp16's loss scaler can unscale their gradients.
    return get_peft_model(model, lcfg), tokenizer


def train_lora(
    cfg: FinetuneConfig,
    data: TrainingData,
    base_dir: Path,
    *,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    label: str = "fine-tune",
    device: DeviceFacts | None = None,
) -> TrainOutcome:
    """Train LoRA with transformers' Trainer; the loss covers assistant tokens only. `label` names the progress."""
    import torch

    device = preflight(cfg, device=device)
    precision = training_precision(cfg, base_dir, device)
    threads = torch.get_num_threads()
    if cfg.cpu_threads and device.kind == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    try:
        return _train_lora(cfg, data, base_dir, on_log, label, device, precision)
    finally:
        torch.set_num_threads(threads)


def _train_lora(
    cfg: FinetuneConfig,
    data: TrainingData,
    base_dir: Path,
    on_log: Callable[[int, dict[str, float]], None] | None,
    label: str,
    device: DeviceFacts,
    precision: Precision,
) -> TrainOutcome:
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    set_seed(cfg.seed)
    model, tokenizer = build_peft_model(base_dir, cfg, precision)
    train_feats, dropped = encode_rows(tokenizer, data.train, cfg.max_seq_len)
    eval_feats, dropped_eval = encode_rows(tokenizer, data.eval, cfg.max_seq_len)
    if not train_feats:
        raise FinetuneError(
            f"max_seq_len={cfg.max_seq_len} truncates every training row before its assistant turn; raise it"
        )
    per_step = cfg.batch_size * cfg.gradient_accumulation
    steps = cfg.max_steps or max(1, math.ceil(len(train_feats) * cfg.epochs / per_step))
    eval_steps = cfg.eval_steps or max(1, steps // 10)
    history = LossHistory()

    class _Record(TrainerCallback):  # type: ignore[misc]
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
        ) -> None:
            logs = logs or {}
            step = int(state.global_step)
            if "loss" in logs:
                history.train.append((step, float(logs["loss"])))
            # evaluate() after a final scheduled eval logs the same step twice; keep one point per step.
            if "eval_loss" in logs and (not history.eval or history.eval[-1][0] != step):
                history.eval.append((step, float(logs["eval_loss"])))
            if on_log is not None:
                on_log(step, {k: float(v) for k, v in logs.items() if isinstance(v, int | float)})

    class _Progress(TrainerCallback):  # type: ignore[misc]
        """Step / total, the latest loss and the time left: a bar on a terminal, else a line every ~5%."""

        bar: quiet.Progress | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.bar = quiet.progress(label, int(state.max_steps or steps), draw=cfg.progress)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # A step that logs reports from on_log, with its own loss rather than the previous one.
            if self.bar is not None and not control.should_log:
                self.bar.update(int(state.global_step), loss=history.train[-1][1] if history.train else None)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
        ) -> None:
            if self.bar is not None and logs and "loss" in logs:
                self.bar.update(int(state.global_step), loss=float(logs["loss"]))

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    with tempfile.TemporaryDirectory(prefix="llmhost-ft-") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=max(cfg.batch_size, 8),
            gradient_accumulation_steps=cfg.gradient_accumulation,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=int(cfg.warmup_ratio * steps),
            weight_decay=0.0,
            max_grad_norm=1.0,
            logging_steps=cfg.logging_steps,
            logging_first_step=True,
            eval_strategy="steps" if eval_feats else "no",
            eval_steps=eval_steps,
            save_strategy="no",
            report_to="none",
            seed=cfg.seed,
            data_seed=cfg.seed,
            **trainer_args(precision, device, cfg.gradient_checkpointing),
            disable_tqdm=True,  # our own progress (_Progress) replaces tqdm's bars
            remove_unused_columns=False,
            dataloader_pin_memory=False,
            optim="adamw_torch",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_feats,
            eval_dataset=eval_feats or None,
            data_collator=_Collator(tokenizer.pad_token_id),
            callbacks=[_Record(), _Progress()],
        )
        # With tqdm off, transformers prints every log dict; a flow's log_prints would relay each one.
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        before = float(trainer.evaluate()["eval_loss"]) if eval_feats else None
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started
        after = float(trainer.evaluate()["eval_loss"]) if eval_feats else None
    model.eval()
    return TrainOutcome(
        model=model,
        tokenizer=tokenizer,
        history=history,
        steps=steps,
        seconds=round(seconds, 2),
        train_rows_used=len(train_feats),
        eval_rows_used=len(eval_feats),
        dropped_rows=dropped + dropped_eval,
        eval_loss_before=before,
        eval_loss_after=after,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        device=device.kind if device.kind == "cpu" else f"{device.kind} ({device.name})",
        precision=precision,
    )
