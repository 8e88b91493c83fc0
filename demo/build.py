"""Builds the demo base model deterministically: tokenizer, small Llama, brief pretraining, task data.

No download of any kind: the tokenizer is trained here with `tokenizers`, the weights start from a
fixed seed. The build is keyed on a content hash of its inputs and skipped when already done.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from demo import data

BUILDER_VERSION = "1"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Not "special": they must survive detokenisation so vLLM's hermes parser can see them.
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tools>", "</tools>", "<tool_response>", "</tool_response>"]
TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")


class DemoModelConfig(BaseModel):
    """Shape and pretraining budget of the demo base model."""

    vocab_size: int = Field(default=1024, ge=300)
    hidden_size: int = Field(default=128, gt=0)
    intermediate_size: int = Field(default=384, gt=0)
    num_hidden_layers: int = Field(default=3, ge=2, le=4)
    num_attention_heads: int = Field(default=2, gt=0)
    num_key_value_heads: int = Field(default=1, gt=0)
    head_dim: int = Field(default=64, ge=32, description="CPU attention in vLLM needs >= 32.")
    max_position_embeddings: int = Field(default=1024, gt=0)
    steps: int = Field(default=800, ge=1, description="Pretraining steps.")
    batch_size: int = Field(default=16, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    tool_sft_steps: int = Field(default=0, ge=0, description="Instruction steps on tool calls, answer-masked.")
    seed: int = data.SEED


class BuildResult(BaseModel):
    model_dir: Path
    data_dir: Path
    content_hash: str = Field(description="sha256 over the written model files.")
    build_key: str = Field(description="sha256 of the builder's inputs; equal keys skip the build.")
    skipped: bool
    seconds: float
    final_loss: float | None = None


def _build_key(cfg: DemoModelConfig) -> str:
    h = hashlib.sha256()
    h.update(BUILDER_VERSION.encode())
    h.update(cfg.model_dump_json().encode())
    for src in (Path(data.__file__), Path(__file__), TEMPLATE_PATH):
        h.update(src.read_bytes())
    return h.hexdigest()


def dir_content_hash(model_dir: Path) -> str:
    """sha256 over every model file (name and bytes), excluding the build marker."""
    h = hashlib.sha256()
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and p.name != ".build.json":
            h.update(p.relative_to(model_dir).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _train_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _render_docs(tokenizer: Any, docs: list[tuple[str, Any]]) -> list[str]:
    out = []
    for kind, payload in docs:
        if kind == "chat":
            out.append(tokenizer.apply_chat_template(
                payload["messages"], tools=payload.get("tools"), tokenize=False))
        else:
            out.append(payload + "<|endoftext|>")
    return out


def build_demo_model(out_dir: Path, cfg: DemoModelConfig | None = None, *, force: bool = False,
                     log: Any = print) -> BuildResult:
    """Writes `out_dir/model` (HF folder) and `out_dir/data` (task JSONL); idempotent on the build key.

    Concurrent callers (parallel test sessions, a demo and a test) serialise on a lock file, and the model
    folder is swapped in whole, so nobody reads a half-written model.
    """
    import fcntl

    cfg = cfg or DemoModelConfig()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(out_dir, cfg, force=force, log=log)


def _build_locked(out_dir: Path, cfg: DemoModelConfig, *, force: bool, log: Any) -> BuildResult:
    model_dir, data_dir = out_dir / "model", out_dir / "data"
    key = _build_key(cfg)
    marker = model_dir / ".build.json"
    started = time.monotonic()
    if not force and marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("build_key") == key and dir_content_hash(model_dir) == meta.get("content_hash"):
            data.write_task_data(data_dir)
            return BuildResult(model_dir=model_dir, data_dir=data_dir, content_hash=meta["content_hash"],
                               build_key=key, skipped=True, seconds=0.0, final_loss=meta.get("final_loss"))

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    # One thread: fixed, so float reductions (and the hash) match across machines; and for a 0.7M-parameter
    # model it is also the fastest on a busy 2-core machine (thread hand-offs cost more than the matmuls).
    torch.set_num_threads(1)

    rng = random.Random(cfg.seed)
    docs = list(data.pretraining_documents(rng))
    template = TEMPLATE_PATH.read_text()

    # First pass: a throwaway tokenizer only to render chats to text for tokenizer training.
    probe = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(["a"], 300), eos_token="<|im_end|>")
    probe.chat_template = template
    text_corpus = _render_docs(probe, docs) + [data.ROUTING_SYSTEM_PROMPT] + [
        r["message"] for r in data.routing_rows("train")]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(text_corpus, cfg.vocab_size),
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        model_max_length=cfg.max_position_embeddings,
    )
    tokenizer.add_tokens(ADDED_TOKENS, special_tokens=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5, dtype="float32",
    )
    model = LlamaForCausalLM(config)

    texts = _render_docs(tokenizer, docs)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    log(f"demo: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {len(encoded)} documents, "
        f"{cfg.steps} steps")
    loss_val = _train(model, [(e, 0) for e in encoded], cfg.steps, cfg, rng, tokenizer.pad_token_id, log, "pretrain")
    if cfg.tool_sft_steps:
        # Like an instruct model's tuning: the base learns the hermes tool-call format, loss on the answer only.
        sft = []
        for row in data.tool_rows("train"):
            chat = data.tool_chat(row)
            prompt = tokenizer.apply_chat_template(chat["messages"][:1], tools=chat["tools"], tokenize=False,
                                                   add_generation_prompt=True)
            full = tokenizer.apply_chat_template(chat["messages"], tools=chat["tools"], tokenize=False)
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            sft.append((tokenizer(full, add_special_tokens=False)["input_ids"], n_prompt))
        loss_val = _train(model, sft, cfg.tool_sft_steps, cfg, rng, tokenizer.pad_token_id, log, "tool-sft")
    model.eval()
    torch.set_num_threads(threads)

    import shutil

    final_dir, model_dir = model_dir, out_dir / "model.tmp"
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    # generation_config: stop at <|im_end|>; greedy by default so the demo answers are reproducible.
    gen = json.loads((model_dir / "generation_config.json").read_text())
    gen.update({"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
                "do_sample": False, "max_new_tokens": 64})
    (model_dir / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    content_hash = dir_content_hash(model_dir)
    meta = {"build_key": key, "content_hash": content_hash, "final_loss": loss_val, "config": cfg.model_dump()}
    (model_dir / ".build.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final_dir, ignore_errors=True)
    model_dir.rename(final_dir)
    model_dir = final_dir
    data.write_task_data(data_dir)
    return BuildResult(model_dir=model_dir, data_dir=data_dir, content_hash=content_hash, build_key=key,
                       skipped=False, seconds=round(time.monotonic() - started, 1), final_loss=loss_val)


def _train(model: Any, examples: list[tuple[list[int], int]], steps: int, cfg: DemoModelConfig,
           rng: random.Random, pad_id: int, log: Any, phase: str) -> float:
    """AdamW with one-cycle LR over (ids, n_masked_prefix) examples; returns the last loss."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    model.train()
    order: list[int] = []
    loss_val = float("nan")
    for step in range(steps):
        if len(order) < cfg.batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        batch = [examples[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        width = max(len(b) for b, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (b, n_prefix) in enumerate(batch):
            ids[i, : len(b)] = torch.tensor(b)
            labels[i, n_prefix: len(b)] = torch.tensor(b[n_prefix:])
            mask[i, : len(b)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_val = float(loss.detach())
        if step % 100 == 0 or step == steps - 1:
            log(f"demo: {phase} step {step:4d} loss {loss_val:.3f}")
    return loss_val


def default_demo_dir() -> Path:
    from tasks.core.settings import get_settings

    return get_settings().home_abs / "demo"


def demo_cache_dir() -> Path:
    """Where the demo model (and the frontier stand-in) are built: LLMHOST_DEMO_CACHE, which lets tests and CI
    share one build across state dirs, else the state dir's demo/."""
    import os

    cache = os.environ.get("LLMHOST_DEMO_CACHE")
    return Path(cache) if cache else default_demo_dir()


if __name__ == "__main__":
    res = build_demo_model(default_demo_dir())
    print(res.model_dump_json(indent=2))
