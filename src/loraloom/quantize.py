"""A weight-only int8 frozen base: each linear and embedding weight held as int8 rows with one float scale per row.

``Int8Weight`` is a tensor subclass that stands where the float weight stood, so ``nn.Linear``, ``nn.Embedding``,
PEFT and loraloom's adapter layers run on it unchanged: it reports the float dtype and shape, ``F.linear`` and
``F.embedding`` on it compute from the int8 rows, and anything else sees the dequantized weight.

Written here rather than taken from torchao (which ``int4`` on CUDA still uses) because torchao's int8 tensor
dequantizes a whole weight per call (the 32128 x 768 embedding and LM head: 94 MiB each time) and autograd through
it keeps a float copy of every weight for the backward pass; and because once torchao is installed, transformers
imports it on every model load (~90 MiB). Here the forward and the backward dequantize ``BLOCK`` elements at a
time, so a float weight never exists whole.

``quantize_model`` quantizes a loaded model in place one weight at a time, handing each float weight's pages back
as it goes, so loading peaks near the quantized size rather than the float one.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .files import libc

QUANTIZE = ("int8", "int4")

# Elements dequantized at once (16 MiB of float32): large enough for full-speed matmuls, small enough to vanish
# beside the model.
BLOCK = 1 << 22


class Int8Weight(torch.Tensor):
    """A frozen weight as int8 rows (``qdata``, out x in) and a scale per row (``scale``, out): W ≈ qdata * scale.

    It reports ``dtype`` (the float dtype it computes in) and the float weight's shape and device. ``F.linear`` and
    ``F.embedding`` compute block by block from the int8 rows; any other op sees the dequantized float weight; ops
    that would write into it are refused (a quantized base is frozen).
    """

    qdata: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=dtype, device=qdata.device)

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.qdata, self.scale = qdata, scale

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Weight:
        """Symmetric per-row int8 (scale = max |row| / 127), computed a block of rows at a time."""
        w = weight.detach()
        qdata = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        for rows in _row_blocks(w.shape):
            block = w[rows].float()
            s = block.abs().amax(dim=1).clamp(min=1e-12) / 127
            qdata[rows] = (block / s[:, None]).round_().clamp_(-127, 127).to(torch.int8)
            scale[rows] = s
        return cls(qdata, scale, w.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole float weight (for ops other than linear and embedding: it exists only while they run)."""
        return _dequantize(self.qdata, self.scale, slice(None), dtype or self.dtype)

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    # Traceable-subclass protocol: lets ``module.to(...)`` swap the tensor in place of the parameter.
    def __tensor_flatten__(self) -> tuple[list[str], torch.dtype]:
        return ["qdata", "scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner: dict, dtype: torch.dtype, outer_size: Any, outer_stride: Any) -> Int8Weight:
        return Int8Weight(inner["qdata"], inner["scale"], dtype)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if func is F.linear and isinstance(weight, Int8Weight):
            return _linear(*args, **kwargs)
        if func is F.embedding and isinstance(weight, Int8Weight):
            return _embedding(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        w = args[0]
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return Int8Weight(w.qdata, w.scale, w.dtype)
        if func is torch.ops.aten.clone.default:
            return Int8Weight(w.qdata.clone(), w.scale.clone(), w.dtype)
        if func is torch.ops.aten._to_copy.default:
            device, dtype = kwargs.get("device") or w.device, kwargs.get("dtype") or w.dtype
            return Int8Weight(w.qdata.to(device), w.scale.to(device), dtype)
        if func._schema.is_mutable:
            raise RuntimeError(f"{func}: the int8 base weight is frozen and cannot be written to")

        def plain(t: Any) -> Any:
            return t.dequantize() if isinstance(t, Int8Weight) else t

        return func(*[plain(a) for a in args], **{k: plain(v) for k, v in kwargs.items()})


def _row_blocks(shape: Sequence[int]) -> list[slice]:
    """Slices of rows holding about ``BLOCK`` elements each."""
    rows = max(1, BLOCK // max(1, shape[1]))
    return [slice(i, min(i + rows, shape[0])) for i in range(0, shape[0], rows)]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a float linear would compute in: autocast's, when it is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    dtype = _compute_dtype(x)
    y = _Int8LinearFn.apply(x.to(dtype), weight.qdata, weight.scale)
    return y if bias is None else y + bias.to(dtype)  # through autograd, for bias="all"


class _Int8LinearFn(torch.autograd.Function):
    """y = x Wᵀ with W dequantized a block of output rows at a time, in the forward and in the backward (dL/dx =
    dL/dy W). Only x's gradient is computed: the weight is frozen. The graph keeps the int8 rows, not the float W
    that autograd through a dequantized weight would keep for every layer until the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(qdata, scale)
        blocks = _row_blocks(qdata.shape)
        if len(blocks) == 1:
            return torch.matmul(x, _dequantize(qdata, scale, blocks[0], x.dtype).T)
        out = x.new_empty((*x.shape[:-1], qdata.shape[0]))
        for rows in blocks:
            out[..., rows] = torch.matmul(x, _dequantize(qdata, scale, rows, x.dtype).T)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        qdata, scale = ctx.saved_tensors
        grad_x = grad.new_zeros((*grad.shape[:-1], qdata.shape[1]))
        for rows in _row_blocks(qdata.shape):
            grad_x += torch.matmul(grad[..., rows], _dequantize(qdata, scale, rows, grad.dtype))
        return grad_x, None, None


def _dequantize(qdata: torch.Tensor, scale: torch.Tensor, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    # Scaled in place: one float block alive, not the cast and the product (16 MiB each at BLOCK elements).
    return qdata[rows].to(dtype).mul_(scale[rows, None].to(dtype))


def _embedding(
    ids: torch.Tensor,
    weight: Int8Weight,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    *_: Any,
    **__: Any,
) -> torch.Tensor:
    """The looked-up rows only, dequantized: the table stays int8. padding_idx and the rest only shape the table's
    gradient, and a frozen table has none."""
    if max_norm is not None:
        raise ValueError("an embedding with max_norm rescales its table in place; an int8 table is frozen")
    return weight.qdata[ids].to(weight.dtype) * weight.scale[ids, None].to(weight.dtype)


def is_int8(t: torch.Tensor) -> bool:
    return isinstance(t, Int8Weight)


def check_quantize(quantize: str, device: torch.device | None) -> None:
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE} or None, got {quantize!r}")
    if quantize == "int4" and (device is None or device.type != "cuda"):
        raise ValueError("--quantize int4 needs a CUDA device (torchao has no int4 kernels for the CPU); use int8")


def int4_config() -> Any:
    """transformers' config for torchao's int4 weight-only linears (tinygemm kernels, CUDA only)."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig
        from transformers import TorchAoConfig
    except ImportError as e:
        raise ValueError(f"--quantize int4 needs torchao: pip install 'loraloom[quant]' ({e})") from e
    return TorchAoConfig(Int4WeightOnlyConfig(group_size=128))


def quantize_model(model: nn.Module) -> nn.Module:
    """Quantize every linear and embedding weight of ``model`` to ``Int8Weight`` in place, one at a time.

    transformers' own path (``TorchAoConfig``) holds the float weights and the quantized ones at once. Here each
    float weight is dropped once quantized: its pages in the memory-mapped checkpoint are handed back
    (``release_file_pages``) and freed heap returned to the system, so the peak stays near the quantized size. A
    weight shared by several modules (an LM head tied to the embedding) is quantized once and stays shared.
    """
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding) and module.weight.is_floating_point():
            if not is_int8(module.weight):
                owners.setdefault(id(module.weight), []).append(module)
    for modules in owners.values():
        weight = modules[0].weight
        quantized = nn.Parameter(Int8Weight.from_float(weight), requires_grad=False)
        for module in modules:
            module.weight = quantized
        live = [t for t in [*model.parameters(), *model.buffers()] if not is_int8(t)]
        release_file_pages(weight, live)
        del weight
        trim_heap()
    return model


def release_file_pages(t: torch.Tensor, live: Sequence[torch.Tensor]) -> None:
    """Hand back the pages of a dropped tensor that lie in a file mapping (the checkpoint, mapped by
    safetensors) and in no live tensor: the kernel re-reads them from the file if they are ever touched, so
    nothing in use changes. Anonymous memory is never touched. A no-op off Linux."""
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first or not _in_file_mapping(first, last):
        return
    for other in live:
        low = other.data_ptr()
        if low < last and first < low + other.numel() * other.element_size():
            return
    c = libc()
    if c is not None:
        c.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


MADV_DONTNEED = 4


def _in_file_mapping(first: int, last: int) -> bool:
    """Whether [first, last) lies inside one mapping of a file (/proc/self/maps)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= first and last <= high:
            return len(fields) >= 6 and fields[4] != "0"  # an inode: a file, not anonymous memory
    return False


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_heap_small() -> None:
    """Serve allocations above 128 KiB from their own mappings, returned to the system when freed.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which activations and
    their gradients come from the heap, where freed blocks fragment it and stay resident: on FLAN-T5-base's shapes
    that held ~250 MiB beyond what training used, as much as the int8 weights save. A fixed threshold turns the
    raising off. Process-wide, so set only when a quantized base asks for a small footprint. A no-op off glibc.
    """
    c = libc()
    if c is not None and hasattr(c, "mallopt"):
        c.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        c.mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def trim_heap() -> None:
    """Return freed heap to the system (glibc keeps it otherwise, and the peak RSS with it)."""
    c = libc()
    if c is not None and hasattr(c, "malloc_trim"):
        c.malloc_trim(0)


__all__ = [
    "BLOCK",
    "QUANTIZE",
    "Int8Weight",
    "check_quantize",
    "int4_config",
    "is_int8",
    "keep_heap_small",
    "quantize_model",
    "release_file_pages",
    "trim_heap",
]
