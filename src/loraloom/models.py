"""The one base-model loader: a folder or a hub id -> (model, tokenizer), for the CLI, the hub and the server.

The Auto class follows the task: given, else the adapter's ``task_type``, else the model's config
(``tasks.py``). A path that is not a model folder is a clear one-line error, not a hub request.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import load_adapter, read_adapter
from .adapters.base import is_quantized
from .adapters.peft_format import normalise_key
from .data import Example, default_label2id
from .devices import resolve_device, resolve_dtype
from .files import libc
from .tasks import TASKS, task_of_adapter, task_of_config

# Head weights whose first dimension is the number of labels of a saved classifier.
CLASSIFIER_KEYS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def model_classes() -> dict[str, Any]:
    """task -> transformers Auto class (imported on first use: transformers is slow to import)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    return {
        "seq2seq": AutoModelForSeq2SeqLM,
        "causal": AutoModelForCausalLM,
        "classification": AutoModelForSequenceClassification,
    }


def model_source(name_or_path: str | os.PathLike) -> str:
    """A local folder (``~`` expanded) or a hub id; a path that is not a folder is an error naming it."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    # A hub id is "name" or "owner/name": anything else is a mistyped path, not worth a hub request.
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or isinstance(name_or_path, Path):
        raise ValueError(f"{text}: not a model folder")
    return text


QUANTIZE = ("int8", "int4")


def quantization_config(quantize: str, device: torch.device | None) -> Any:
    """torchao's config for a weight-only quantized frozen base: int8 runs on the CPU and CUDA, int4 (torchao's
    tinygemm kernels) on CUDA only. Linear layers are quantized; embeddings stay as they are."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE} or None, got {quantize!r}")
    if quantize == "int4" and (device is None or device.type != "cuda"):
        raise ValueError("--quantize int4 needs a CUDA device (torchao has no int4 kernels for the CPU); use int8")
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as e:
        raise ValueError(f"a quantized base needs torchao: pip install 'loraloom[quant]' ({e})") from e
    return Int8WeightOnlyConfig() if quantize == "int8" else Int4WeightOnlyConfig(group_size=128)


def quantize_linears(model: nn.Module, config: Any) -> nn.Module:
    """Quantize the model's linear layers in place, one at a time, releasing each float weight as it goes.

    transformers' own path (``TorchAoConfig``) holds the float weights and the quantized ones at once: on a
    FLAN-T5-base shape its load peaks above the float model's. Here each layer's float weight is dropped once
    quantized: its pages in the memory-mapped checkpoint are handed back (``release_file_pages``) and freed
    heap returned to the system, so the peak stays near the quantized size. A linear whose weight is tied to
    another module (an LM head sharing the embedding) stays as it is.
    """
    from torchao.quantization import quantize_

    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for module in [m for m in model.modules() if isinstance(m, nn.Linear)]:
        if owners[id(module.weight)] > 1:
            continue
        weight = module.weight.data
        quantize_(module, config)
        module.__class__ = QuantizedLinear
        live = [t for t in [*model.parameters(), *model.buffers()] if not is_quantized(t)]
        release_file_pages(weight, live)
        del weight
        trim_heap()
    return model


class QuantizedLinear(nn.Linear):
    """A linear layer whose weight is quantized (torchao): the same forward, and a backward that dequantizes the
    weight only for the moment it needs it. Autograd through the quantized weight would keep a float copy of
    every layer's weight for the backward pass, as much memory as the float model, on a base that never trains."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or self.weight.requires_grad:
            return super().forward(x)
        return _QuantizedLinearFn.apply(x, self.bias, self)


class _QuantizedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, layer: nn.Linear) -> torch.Tensor:
        ctx.layer, ctx.x_dtype, ctx.has_bias = layer, x.dtype, bias is not None
        return nn.functional.linear(x, layer.weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ ctx.layer.weight.dequantize().to(grad.dtype)).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None


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


def trim_heap() -> None:
    """Return freed heap to the system (glibc keeps it otherwise, and the peak RSS with it)."""
    c = libc()
    if c is not None and hasattr(c, "malloc_trim"):
        c.malloc_trim(0)


def load_base(
    name_or_path: str | os.PathLike,
    task: str | None = None,
    *,
    examples: Sequence[Example] | None = None,
    adapter: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    quantize: str | None = None,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) in eval mode from a local folder or a hub id, with ``adapter`` loaded if given.

    The Auto class follows ``task``, else the adapter's task_type, else the base config; an explicit
    ``task`` that contradicts the adapter's is an error naming both. For classification, unless the config
    already names every label of ``examples``, their labels (numbered as ``train`` numbers them) replace
    the config's and the head is built anew for them; without examples a saved head sets the label count.

    ``device`` / ``dtype`` (``devices.py``: "auto", "cpu", "cuda:1", ...; "fp32", "bf16", "fp16"): where the model
    runs and in what precision; None keeps transformers' defaults (the CPU, the checkpoint's float32).
    ``device_map="auto"`` spreads a base larger than one device over all of them (transformers + accelerate).
    ``quantize`` ("int8", "int4"): the frozen base's linear weights quantized as they load (torchao, weight-only),
    for adapters trained, composed or served on top; merging into such a base is refused.
    """
    from transformers import AutoConfig, AutoTokenizer

    target = resolve_device(device) if device is not None else None
    torch_dtype = resolve_dtype(dtype, target) if dtype is not None else None
    source = model_source(name_or_path)
    config = AutoConfig.from_pretrained(source)
    adapter_config, tensors, _ = read_adapter(adapter) if adapter else (None, {}, None)
    adapter_task = task_of_adapter(adapter_config.task_type, adapter_config.auto_mapping) if adapter_config else None
    if task and adapter_task and task != adapter_task:
        raise ValueError(
            f"--task {task} contradicts the adapter {adapter}: it was trained for {adapter_task} "
            f"(task_type {adapter_config.task_type or adapter_config.auto_mapping})"
        )
    task = task or adapter_task or task_of_config(config)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    kwargs: dict[str, Any] = {} if torch_dtype is None else {"dtype": torch_dtype}
    quantized = quantization_config(quantize, target) if quantize is not None else None
    if quantized is not None and (device_map is not None or (target is not None and target.type != "cpu")):
        from transformers import TorchAoConfig  # on a GPU: quantized as it loads, the float model never there

        kwargs["quantization_config", "quantize_linears"] = TorchAoConfig(quantized)
    if device_map is not None:
        kwargs["device_map"] = device_map
    label2id = default_label2id(examples) if task == "classification" and examples else None
    head = [t for k, t in tensors.items() if normalise_key(k).endswith(CLASSIFIER_KEYS)]
    if task == "classification" and not label2id and head and head[0].shape[0] != config.num_labels:
        config.num_labels = head[0].shape[0]  # the adapter's head decides; labels are then LABEL_0, ...
        kwargs["ignore_mismatched_sizes"] = True
    if label2id and not set(label2id) <= set(config.label2id or {}):
        config.num_labels = max(label2id.values()) + 1
        config.label2id = dict(label2id)
        config.id2label = {i: label for label, i in label2id.items()}
        kwargs["ignore_mismatched_sizes"] = True  # the base's head (if any) has other labels
    model = model_classes()[task].from_pretrained(source, config=config, **kwargs).eval()
    if quantized is not None and "quantization_config" not in kwargs:
        quantize_linears(model, quantized)
    if target is not None and device_map is None:
        model.to(target)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if adapter:
        load_adapter(model, adapter)
    return model, tokenizer


__all__ = [
    "CLASSIFIER_KEYS",
    "QUANTIZE",
    "load_base",
    "model_classes",
    "model_source",
    "quantization_config",
    "quantize_linears",
]
