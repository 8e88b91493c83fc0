"""`llmhost size`: memory sizing that agrees with vLLM, with the cheapest tier that fits."""

from __future__ import annotations

from pathlib import Path

import typer

from flows.commands._output import json_help

# Written out (not read from MemoryEstimate) so `--help` stays fast; a test checks they agree.
ESTIMATE_KEYS = ("params_total", "params_active", "weight_bytes", "kv_bytes_per_token", "kv_bytes_total",
                 "overhead_bytes", "total_bytes", "fits", "kv_capacity_tokens", "max_concurrency", "recommendation",
                 "refusal", "suggestions", "explanation")  # fmt: skip
RECOMMENDATION_KEYS = ("tier", "gpus", "tensor_parallel_size", "max_model_len", "kv_cache_dtype", "max_num_seqs",
                       "gpu_memory_utilization", "vllm_args")  # fmt: skip
_JSON_HELP = json_help(
    "one MemoryEstimate object (instead of the explanation)", ESTIMATE_KEYS,
    f"recommendation is null when nothing fits, else has keys {', '.join(RECOMMENDATION_KEYS)}; sizes are bytes.",
)


def register(app: typer.Typer) -> None:
    @app.command("size", epilog="Example: llmhost size models:/demo@champion --max-model-len 1024 --json")
    def size(
        model_ref: str | None = typer.Argument(
            None,
            help="models:/NAME/VERSION, models:/NAME@ALIAS (an adapter version sizes its base) or a local model "
            "dir holding config.json. Only config files are fetched, never weights.",
        ),
        config: Path | None = typer.Option(
            None, "--config", help="Path to a config.json instead of a model dir."
        ),
        dtype: str | None = typer.Option(
            None, help="auto, float32, float16 or bfloat16 (auto = torch_dtype)."
        ),
        quantization: str | None = typer.Option(
            None, help="none, awq, gptq, fp8, int8 or int4 (default: from config.json, else none)."
        ),
        kv_cache_dtype: str | None = typer.Option(None, help="auto or fp8."),
        max_model_len: int | None = typer.Option(None, help="Context length (default: the model's maximum)."),
        concurrency: int | None = typer.Option(
            None, help="Sequences at max_model_len that must fit at once."
        ),
        gpu_memory_utilization: float | None = typer.Option(
            None, help="Fraction of GPU memory vLLM may use (default: the installed vLLM's default)."
        ),
        tier: str | None = typer.Option(None, help="Pin a tier from the catalog (see --list-tiers)."),
        tensor_parallel_size: str | None = typer.Option(
            None, help="auto (all GPUs of the tier) or a number."
        ),
        max_num_seqs: int | None = typer.Option(None, help="vLLM --max-num-seqs (default: vLLM's)."),
        enforce_eager: bool = typer.Option(False, "--enforce-eager", help="Size without CUDA graphs."),
        overhead_gib: float | None = typer.Option(
            None, help="Per-GPU overhead in GiB, replacing the estimate."
        ),
        as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
        list_tiers: bool = typer.Option(False, "--list-tiers", help="Print the tier catalog and exit."),
    ) -> None:
        """Size weights, KV cache and overhead; pick the cheapest tier, tensor parallel size and vLLM args.

        The last line says which of this machine's GPUs it fits on (NVML), at which tensor parallel size.
        """
        from rich.console import Console
        from rich.markdown import Markdown

        from tasks.core.errors import SizingError
        from tasks.size import GiB, not_fit_line
        from tasks.size.io import load_tiers, make_request, size_model, size_model_here

        console = Console()
        if list_tiers:
            for t in load_tiers():
                kv = f", KV space {t.kv_cache_space_bytes / GiB:g} GiB" if t.kv_cache_space_bytes else ""
                typer.echo(
                    f"{t.name:16} {t.count} x {t.accelerator:10} {t.memory_bytes / GiB:7.2f} GiB/device "
                    f"${t.price_per_hour:g}/h{kv}"
                )
            return
        request = make_request(
            dtype=dtype,
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
            max_model_len=max_model_len,
            concurrency=concurrency,
            gpu_memory_utilization=gpu_memory_utilization,
            tier=tier,
            tensor_parallel_size=tensor_parallel_size,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager or None,
            overhead_gib=overhead_gib,
        )
        if as_json:
            estimate = size_model(model_ref, request, config_path=config)
            typer.echo(estimate.model_dump_json(indent=2))
        else:
            estimate, here = size_model_here(model_ref, request, config_path=config)
            console.print(Markdown(estimate.explanation))
            typer.echo(here)  # e.g. "this machine: GPU 0 (NVIDIA H100 80GB HBM3, 79.1 GiB free): fits at TP 1"
        if not estimate.fits:
            if model_ref and model_ref.startswith("models:/"):
                name = model_ref.removeprefix("models:/")
            elif model_ref:
                name = Path(model_ref).name
            else:
                name = (
                    config.parent.name if config and config.name == "config.json" else Path(str(config)).stem
                )
            raise SizingError(not_fit_line(estimate, name))
