"""What an adapter folder or a full fine-tuning folder holds (``loraloom inspect``), read from file headers."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .base import AdapterConfig, AdapterError
from .inject import matches
from .peft_format import (
    CONFIG_NAME,
    KEY_PREFIX,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    normalise_key,
    read_adapter,
    read_json_object,
)


def file_size(paths: list[Path]) -> str:
    """The total size of ``paths`` for people: "812 B", "3.7 MB"."""
    size = sum(p.stat().st_size for p in paths)
    if size < 1000:
        return f"{size} B"
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            break
    return f"{size:.1f} {unit}"


def inspect_adapter(folder: Path) -> dict[str, Any]:
    config, tensors, folder = read_adapter(folder)
    targets = config.target_modules or []
    layers: set[str] = set()
    adapter_params = other_params = 0
    for key, t in tensors.items():
        parts = normalise_key(key).removeprefix(KEY_PREFIX).split(".")
        # The adapted layer is the shortest leading path that the targets match; the rest is the
        # adapter's parameter (lora_A.weight, fourierft_spectrum, ...). No match: a module trained in full.
        layer = next((".".join(parts[:i]) for i in range(1, len(parts)) if matches(targets, ".".join(parts[:i]))), None)
        if layer is None:
            other_params += t.numel()
        else:
            layers.add(layer)
            adapter_params += t.numel()
    common = {f.name for f in dataclasses.fields(AdapterConfig)}
    settings = {
        k: v for k, v in config.to_dict().items() if k not in common and k != "peft_type" and v not in ({}, None)
    }
    weights = [p for p in (folder / WEIGHTS_NAME, folder / LEGACY_WEIGHTS_NAME) if p.is_file()][:1]
    return {
        "folder": str(folder),
        "peft_type": config.peft_type,
        "task_type": config.task_type,
        "base_model": config.base_model_name_or_path,
        "targets": targets,
        "adapted_layers": len(layers),
        "trainable_params": adapter_params + other_params,
        "adapter_params": adapter_params,
        "modules_to_save": config.modules_to_save,
        "modules_to_save_params": other_params,
        "tensors": len(tensors),
        "file": weights[0].name,
        "file_size": file_size(weights),
        "settings": settings,
    }


def inspect_full_model(folder: Path) -> dict[str, Any]:
    """A full fine-tuning folder: config.json + model.safetensors (or shards); only file headers are read."""
    config = read_json_object(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json_object(index).get("weight_map", {}).values()))
        files = [folder / n for n in names]
    else:
        files = [folder / "model.safetensors"]
    params = 0
    for file in files:
        if not file.is_file():
            raise AdapterError(f"{folder}: no {file.name} (loraloom inspects safetensors weights only)")
        try:
            with safe_open(file, framework="pt") as f:
                params += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
        except (SafetensorError, OSError) as e:
            raise AdapterError(f"{file}: cannot read safetensors file: {e}") from e
    return {
        "folder": str(folder),
        "peft_type": "FULL",
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "base_model": config.get("_name_or_path") or None,
        "trainable_params": params,
        "file": files[0].name if len(files) == 1 else f"{len(files)} shards",
        "file_size": file_size(files),
        "tokenizer": any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")),
    }


def inspect_folder(path: str | Path) -> dict[str, Any]:
    """What an adapter folder (any PEFT type, made by loraloom or PEFT) or a full fine-tuning folder holds."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder")
    if not (folder / CONFIG_NAME).is_file() and (folder / "config.json").is_file():
        return inspect_full_model(folder)
    return inspect_adapter(folder)


def describe(info: dict[str, Any]) -> str:
    """``inspect_folder``'s answer as aligned "key: value" lines, for people."""
    info = dict(info)
    settings = info.pop("settings", {})
    lines = []
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) if value else "-"
        lines.append(f"{key.replace('_', ' ') + ':':24}{value if value is not None else '-'}")
    lines += [f"{key.replace('_', ' ') + ':':24}{value}" for key, value in settings.items()]
    return "\n".join(lines)


__all__ = ["describe", "file_size", "inspect_adapter", "inspect_folder", "inspect_full_model"]
