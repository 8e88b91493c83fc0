"""Predicted vs vLLM-reported KV cache capacity on the CPU runtime, for tiny models built here.

Each shape is a random-weight model written with transformers (the demo model's tokenizer is reused), served
by the real vLLM runtime one at a time, and compared against `tasks.size`'s prediction for the `cpu` tier.

    .venv/bin/python benchmarks/sizing_accuracy.py [--only NAME ...] [--workdir DIR]

Each server start takes about 50 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tasks.size import MemoryEstimate, estimate_memory  # noqa: E402
from tasks.size.io import load_tiers, make_request, read_model_config, runtime_facts  # noqa: E402

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


class TinyShape(BaseModel):
    """A small Llama-family model: the knobs that change vLLM's KV accounting."""

    name: str
    what: str
    architecture: str = "llama"
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = Field(default=None, description="None = hidden_size / heads (implicit).")
    intermediate_size: int = 256
    max_model_len: int
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    layer_types: list[str] | None = None


# The four the slow test asserts on; head_dim >= 32 because vLLM's CPU attention rejects 16.
TEST_SHAPES = [
    TinyShape(
        name="mha",
        what="MHA, 2 layers, 2 heads = 2 KV heads, head_dim 64, L not a block multiple",
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_model_len=200,
    ),
    TinyShape(
        name="gqa",
        what="GQA 8:2, 4 layers, head_dim 32 (= 256/8)",
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=512,
        max_model_len=512,
    ),
    TinyShape(
        name="explicit-head-dim",
        what="head_dim 64 explicit != hidden 96 / 4 heads, GQA 4:2",
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=192,
        max_model_len=300,
    ),
]
# Extra shapes the benchmark also runs: vLLM's sliding-window and hybrid-group accounting.
EXTRA_SHAPES = [
    TinyShape(
        name="sliding-all",
        what="Mistral-style window 64 on every layer, L 4096",
        architecture="mistral",
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_model_len=4096,
        sliding_window=64,
    ),
    TinyShape(
        name="hybrid",
        what="layer_types sliding/full alternating, window 64, L 4096",
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_model_len=4096,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
]


def build_tiny_model(shape: TinyShape, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Random-weight fp32 model + the demo tokenizer; skipped when the same shape is already there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedModel

    out_dir = Path(out_dir)
    stamp = out_dir / ".shape.json"
    if stamp.exists() and stamp.read_text() == shape.model_dump_json():
        return out_dir
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
        dtype="float32",
    )
    if shape.head_dim is not None:
        common["head_dim"] = shape.head_dim
    torch.manual_seed(seed)
    model: PreTrainedModel
    if shape.architecture == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=shape.sliding_window, **common))
    else:
        extra: dict[str, Any] = {}
        if shape.layer_types:
            extra = {"layer_types": shape.layer_types, "sliding_window": shape.sliding_window}
        model = LlamaForCausalLM(LlamaConfig(**common, **extra))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if shape.layer_types:  # keep the fields vLLM reads even if this transformers version drops them
        cfg = json.loads((out_dir / "config.json").read_text())
        cfg.update(layer_types=shape.layer_types, sliding_window=shape.sliding_window)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    # vLLM caps max_model_len at the tokenizer's model_max_length; the demo's is its own 1,024.
    tok_cfg = out_dir / "tokenizer_config.json"
    if tok_cfg.exists():
        data = json.loads(tok_cfg.read_text())
        data["model_max_length"] = shape.max_position_embeddings
        tok_cfg.write_text(json.dumps(data, indent=2) + "\n")
    stamp.write_text(shape.model_dump_json())
    return out_dir


def predict(model_dir: Path, max_model_len: int) -> MemoryEstimate:
    src = read_model_config(model_dir)
    req = make_request(tier="cpu", dtype="float32", max_model_len=max_model_len)
    return estimate_memory(
        src.config,
        req,
        load_tiers(),
        runtime=runtime_facts(),
        name=src.name,
        tokenizer_max_len=src.tokenizer_max_len,
    )


def serve_and_read(model_dir: Path, max_model_len: int, name: str) -> tuple[int | None, float | None, float]:
    """Start vLLM on the model (CPU, eager, fp32), read its logged KV capacity, stop it."""
    from tasks.core.settings import get_settings
    from tasks.serving.base import VllmArgs
    from tasks.serving.local import LocalTarget

    target = LocalTarget()
    env = {"VLLM_CPU_KVCACHE_SPACE": f"{get_settings().cpu_kvcache_space_gib:g}"}
    t0 = time.monotonic()
    replica = target.start(
        VllmArgs(
            model=str(model_dir),
            served_model_name=name,
            dtype="float32",
            max_model_len=max_model_len,
            enforce_eager=True,
        ),
        name=f"sizing-{name}",
        env=env,
    )
    try:
        return replica.kv_cache_tokens, replica.max_concurrency, time.monotonic() - t0
    finally:
        target.stop(replica)


def demo_tokenizer_dir() -> Path:
    from demo.build import build_demo_model
    from tasks.core.settings import PROJECT_ROOT

    cache = Path(os.environ.get("LLMHOST_DEMO_CACHE", PROJECT_ROOT / ".llmhost" / "demo"))
    if (cache / "model" / "config.json").exists() and (cache / "model" / "tokenizer.json").exists():
        # Only the shape and tokenizer matter here: reuse whatever build is there, don't retrain it.
        return cache / "model"
    return Path(build_demo_model(cache).model_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="Shape names to run (default: all).")
    ap.add_argument("--workdir", type=Path, default=None, help="Where the tiny models are written.")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    demo_dir = demo_tokenizer_dir()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sizing-accuracy-"))
    rows = []
    cases: list[tuple[str, str, Path, int]] = [
        ("demo", "demo model: 3 layers, MQA 2:1, head_dim 64", demo_dir, 1024)
    ]
    for shape in TEST_SHAPES + EXTRA_SHAPES:
        cases.append((shape.name, shape.what, workdir / shape.name, shape.max_model_len))
    shapes = {s.name: s for s in TEST_SHAPES + EXTRA_SHAPES}
    for name, what, model_dir, max_len in cases:
        if args.only and name not in args.only:
            continue
        if name in shapes:
            build_tiny_model(shapes[name], model_dir, demo_dir)
        est = predict(model_dir, max_len)
        try:
            got, conc, secs = serve_and_read(model_dir, max_len, name)
            err = ""
        except Exception as exc:  # report the shape vLLM could not start, keep going
            got, conc, secs, err = None, None, 0.0, str(exc).splitlines()[0][:80]
        rows.append(
            (
                name,
                what,
                max_len,
                est.kv_bytes_per_token,
                est.kv_capacity_tokens,
                got,
                round(est.max_concurrency, 2),
                conc,
                secs,
                err,
            )
        )
        print(
            f"{name}: predicted {est.kv_capacity_tokens:,}, vLLM {got if got is None else f'{got:,}'}"
            f"{' ' + err if err else ''}",
            file=sys.stderr,
            flush=True,
        )
    print(
        "\n| shape | what | max_model_len | KV B/token | predicted tokens | vLLM tokens | match "
        "| predicted conc. | vLLM conc. | start s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for name, what, max_len, bpt, pred, got, pconc, vconc, secs, err in rows:
        match = "yes" if got == pred else ("n/a: " + err if got is None else "NO")
        ok &= got == pred
        print(
            f"| {name} | {what} | {max_len:,} | {bpt:,} | {pred:,} | {'-' if got is None else f'{got:,}'} | "
            f"{match} | {pconc:.2f} | {'-' if vconc is None else f'{vconc:.2f}'} | {secs:.0f} |"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
