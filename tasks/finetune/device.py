"""Where and in what precision a fine-tune runs, and how closely its reloaded adapter must match.

The decisions (`choose_precision`, `reload_tolerance`, `check_qlora`) are pure: the hardware comes in as
arguments, so every GPU case is testable on a CPU. The helpers below them touch torch and import it lazily.
This module imports only the standard library and `tasks.core.errors`, so `scripts/gpu_check.py` can load it
by file on a GPU machine that has torch, transformers and peft but no pydantic, MLflow or Prefect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tasks.core.errors import ConfigError

PrecisionChoice = Literal["auto", "bf16", "fp16", "fp32"]
PrecisionName = Literal["bf16", "fp16", "fp32"]
DeviceKind = Literal["cpu", "cuda"]

DTYPES: dict[PrecisionName, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_NAMES = {v: k for k, v in DTYPES.items()}
AUTO_FIX = "use precision: auto (fp32 on a CPU; bf16, or fp16 where a GPU lacks bf16) or fp32"


@dataclass(frozen=True)
class DeviceFacts:
    """What the training machine offers; `detect_device()` reads it, tests state it."""

    kind: DeviceKind
    bf16_supported: bool = False
    name: str = "cpu"


@dataclass(frozen=True)
class Precision:
    """The training precision: the dtype the frozen base weights load in and autocast computes in."""

    name: PrecisionName
    reason: str

    @property
    def dtype(self) -> str:
        """torch dtype name, e.g. 'bfloat16'."""
        return DTYPES[self.name]

    @property
    def loss_scaling(self) -> bool:
        """fp16 gradients underflow without a scaled loss; bf16 has fp32's exponent range and needs none."""
        return self.name == "fp16"

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"


@dataclass(frozen=True)
class Tolerance:
    """Elementwise |reloaded - trained| <= atol + rtol * |trained|, as torch.allclose reads it."""

    atol: float
    rtol: float

    def __str__(self) -> str:
        return f"atol={self.atol:g} rtol={self.rtol:g}"


def base_dtype(config: dict[str, Any]) -> str | None:
    """The dtype a base checkpoint was saved in (`dtype` in transformers 5, `torch_dtype` before)."""
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def read_base_dtype(base_dir: Path) -> str | None:
    path = Path(base_dir) / "config.json"
    return base_dtype(json.loads(path.read_text())) if path.is_file() else None


def choose_precision(
    requested: PrecisionChoice, device_kind: DeviceKind, bf16_supported: bool, base_torch_dtype: str | None
) -> Precision:
    """The precision to train in; an explicit request the hardware cannot honour is refused, never swapped.

    `auto` keeps the base's weights in the dtype they were saved in where the device computes in it, because
    a cast is lossy (fp16 -> bf16 drops mantissa bits; bf16 -> fp16 drops range). A bf16 base on a GPU without
    bf16 trains in fp16, which is what vLLM serves it in on such a GPU. fp32 checkpoints (small models) train
    in bf16, else fp16. The CPU trains in fp32: its half-precision matmuls are slow or emulated.
    """
    if device_kind == "cpu":
        if requested in ("bf16", "fp16"):
            raise ConfigError("precision", requested, f"this machine has no CUDA GPU and trains in fp32; {AUTO_FIX}")
        return Precision("fp32", f"{requested}: CPU training runs in fp32")
    if requested == "bf16" and not bf16_supported:
        raise ConfigError("precision", requested, f"this GPU has no native bf16 (it needs Ampere or newer); {AUTO_FIX}")
    if requested != "auto":
        return Precision(requested, f"{requested}: asked for in the config")
    base = _NAMES.get(base_torch_dtype or "")
    if base == "fp16":
        return Precision("fp16", "auto: the base is saved in fp16, so its weights load without a lossy cast")
    if bf16_supported:
        return Precision("bf16", f"auto: the GPU supports bf16 (base saved in {base_torch_dtype or 'no stated dtype'})")
    return Precision("fp16", f"auto: the GPU lacks bf16, so fp16 with loss scaling (base {base_torch_dtype})")


def reload_tolerance(dtype: str) -> Tolerance:
    """How far a reloaded adapter's logits may sit from the trained model's, for the dtype it computes in.

    The reload computes in the same dtype, device and autocast as the trained model, so the logits should agree
    to a few units in the last place: rtol is 4 ulps of the dtype, and atol is that rtol at a logit of 4, because
    the error of a logit near 0 comes from the hidden states rather than its own size. Measured on the CPU with
    the demo model: a matching reload differs by 0 in every dtype, the same reload without autocast by 0.08 in
    bf16 and 0.008 in fp16, and the failure this guards against (MLflow issue #23761: q/v base weights
    re-initialised on reload) by 14, far outside all of them.
    """
    name = _NAMES.get(dtype.removeprefix("torch."), dtype)
    if name == "fp32":
        return Tolerance(atol=1e-4, rtol=0.0)
    if name in ("fp16", "bf16"):
        ulp = 2**-10 if name == "fp16" else 2**-7
        return Tolerance(atol=16 * ulp, rtol=4 * ulp)
    raise ConfigError("dtype", dtype, "use one of bfloat16, float16, float32")


def check_qlora(qlora: bool, device: DeviceFacts, bnb_importable: bool) -> None:
    """QLoRA needs bitsandbytes on a CUDA GPU; refuse it elsewhere before anything is loaded or logged."""
    if not qlora:
        return
    if device.kind != "cuda":
        raise ConfigError("qlora", True, "4-bit QLoRA needs a CUDA GPU and this machine has none; set qlora: false")
    if not bnb_importable:
        raise ConfigError("qlora", True, "4-bit QLoRA needs bitsandbytes; pip install bitsandbytes or set qlora: false")


# ---------------------------------------------------------------------------------------------- torch edge


def detect_device() -> DeviceFacts:
    """The first CUDA GPU if torch sees one (bf16 counted only where native), else the CPU."""
    try:
        import torch
    except ImportError:
        return DeviceFacts("cpu")
    if not torch.cuda.is_available():
        return DeviceFacts("cpu")
    return DeviceFacts(
        "cuda", bool(torch.cuda.is_bf16_supported(including_emulation=False)), torch.cuda.get_device_name(0)
    )


def bnb_importable() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def torch_dtype(precision: Precision) -> Any:
    import torch

    return getattr(torch, precision.dtype)


def trainer_args(precision: Precision, device: DeviceFacts, gradient_checkpointing: bool) -> dict[str, Any]:
    """TrainingArguments fields for the precision (fp16 turns on the Trainer's loss scaler) and checkpointing."""
    return {
        "bf16": precision.name == "bf16",
        "fp16": precision.name == "fp16",
        "use_cpu": device.kind == "cpu",
        "gradient_checkpointing": gradient_checkpointing,
        # Non-reentrant checkpointing back-propagates into LoRA matrices behind frozen embeddings.
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if gradient_checkpointing else None,
    }


def load_base(
    base_dir: Path | str, precision: Precision, *, qlora: bool = False, device: str | int | None = None
) -> Any:
    """The base model in the training dtype (4-bit NF4 weights computing in it for QLoRA), on `device`."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(precision)}
    if qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype(precision)
        )
        kwargs["device_map"] = {"": device or 0}
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    return model if qlora or device is None else model.to(device)


def model_device(model: Any) -> Any:
    return next(model.parameters()).device


def match_dtypes(model: Any, reference: Any) -> None:
    """Cast each of `model`'s parameters to the dtype of the same-named one in `reference`."""
    ref = {n: p.dtype for n, p in reference.named_parameters()}
    for name, p in model.named_parameters():
        want = ref.get(name)
        if want is not None and p.dtype != want and p.dtype.is_floating_point:
            p.data = p.data.to(want)


def logits_on(model: Any, enc: Any, precision: Precision) -> Any:
    """fp32 logits of `enc` on the model's device, under the same autocast the Trainer trained with."""
    import torch

    dev = model_device(model)
    batch = {k: v.to(dev) for k, v in dict(enc).items()}
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch_dtype(precision), enabled=precision.mixed):
        return model(**batch).logits.float()


def compare_logits(got: Any, expected: Any, tol: Tolerance) -> tuple[float, bool]:
    """(largest absolute difference, whether every element is within the tolerance)."""
    diff = (got.float() - expected.float().to(got.device)).abs()
    ok = bool((diff <= tol.atol + tol.rtol * expected.float().to(got.device).abs()).all())
    return float(diff.max()), ok
