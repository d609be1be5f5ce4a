"""The one base-model loader: a folder or a hub id -> (model, tokenizer), for the CLI, the hub and the server.

The Auto class follows the task: given, else the adapter's ``task_type``, else the model's config
(``tasks.py``). A path that is not a model folder is a clear one-line error, not a hub request.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import load_adapter, read_adapter
from .adapters.peft_format import normalise_key
from .data import Example, default_label2id
from .devices import resolve_device, resolve_dtype
from .quantize import QUANTIZE, check_quantize, int4_config, keep_heap_small, quantize_model
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
    ``quantize`` ("int8", "int4"): a weight-only quantized frozen base, for adapters trained, composed or served on
    top; merging into it is refused. int8 (``quantize.py``, any device): every linear and embedding weight as int8
    rows with a scale per row, quantized one weight at a time as the model loads; it also fixes glibc's mmap
    threshold for the process (``quantize.keep_heap_small``: less memory, slower allocations). int4 (CUDA only):
    torchao's tinygemm linears, quantized by transformers as they load.
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
    if quantize is not None:
        check_quantize(quantize, target)
    if quantize == "int4":
        kwargs["quantization_config"] = int4_config()
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
    if quantize == "int8":
        quantize_model(model)  # before the move to the device: the float weights never reach it
        keep_heap_small()
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
]
