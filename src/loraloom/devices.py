"""Where a model runs and in what precision: ``--device`` and ``--dtype`` for every command that loads one.

``"auto"`` picks CUDA if there is a GPU, else Apple's MPS, else the CPU; and bfloat16 on GPUs that support it,
else float32. A device that does not exist here is one clear error, before anything loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DEVICE_CHOICES_HELP = "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps"
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device ``name`` means here; ValueError (one line) if it does not exist on this machine."""
    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r}: expected {DEVICE_CHOICES_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (no GPU, or a CPU-only torch)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not mps_available():
        raise ValueError(f"--device {name}: Apple MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r}: expected {DEVICE_CHOICES_HELP}")
    return device


def resolve_dtype(name: str | torch.dtype | None = "auto", device: torch.device | None = None) -> torch.dtype:
    """The torch dtype ``name`` means ("fp32", "bf16", "fp16" or "auto": bf16 on a GPU that supports it)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"--dtype {name}: expected fp32, bf16 or fp16")
        return name
    key = "auto" if name is None else DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key == "auto":
        device = device or resolve_device("auto")
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if key not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected auto, fp32, bf16 or fp16")
    return DTYPES[key]


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively, so autocast to it is faster than float32: CUDA GPUs
    with bf16 support, CPUs with AVX512-BF16 or AMX (elsewhere bf16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, so stay in float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def add_device_arguments(parser: Any) -> Any:
    """``--device`` and ``--dtype``, for every command (and script) that loads a model."""
    parser.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES_HELP} (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="fp32, bf16, fp16 or auto: bf16 on GPUs that support it")
    return parser


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


__all__ = ["DTYPES", "add_device_arguments", "fast_bf16", "model_device", "resolve_device", "resolve_dtype"]
