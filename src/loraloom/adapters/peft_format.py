"""Read and write PEFT adapter folders: adapter_config.json + adapter_model.safetensors.

Saved keys are ``base_model.model.<state-dict key>`` of the adapter parameters (whose names are
PEFT's: ``lora_A.weight``, ``fourierft_spectrum``, ``ia3_l``) and of ``modules_to_save``. Adapter files
are untrusted: safetensors, or a legacy ``adapter_model.bin`` through ``torch.load(weights_only=True)``;
nothing is ever unpickled. A folder is written whole into a temp folder beside it and swapped in
(``atomic_folder``): a reader sees the old folder or the new one, never new weights beside an old config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import atomic_folder
from .base import AdapterConfig, AdapterError
from .inject import (
    CONFIG_ATTR,
    adapter_layers,
    add_adapter,
    get_config,
    modules_to_save_of,
    remove_adapter,
    trainable_biases,
)
from .registry import config_from_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


# ---- writing ---------------------------------------------------------------------------------


def write_adapter_folder(out_dir: str | os.PathLike, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a PEFT folder from a config and PEFT-keyed tensors, swapped in whole (``atomic_folder``)."""
    out = Path(out_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    with atomic_folder(out, owns=(WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, CONFIG_NAME)) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(text)
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names."""
    config = get_config(model)
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        for key, t in layer.state_dict(keep_vars=True).items():
            if key.split(".")[0] in layer.adapter_param_names:
                out[f"{KEY_PREFIX}{name}.{key}"] = t
    for name in modules_to_save_of(model, config):
        for key, t in model.get_submodule(name).state_dict(keep_vars=True).items():
            out[f"{KEY_PREFIX}{name}.{key}"] = t
    for name in trainable_biases(model, config):  # PEFT's bias="all" / "lora_only"
        out[f"{KEY_PREFIX}{name}"] = model.get_parameter(name)
    return out


def peft_bias_aliases(model: nn.Module, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """With bias="all", PEFT also writes each modules_to_save bias under the trained copy's name
    (``<module>.modules_to_save.<bias>``) and loads it from there: copies under those names."""
    saved = modules_to_save_of(model, config) if getattr(config, "bias", "none") == "all" else []
    out = {}
    for name in trainable_biases(model, config):
        module = next((m for m in saved if name.startswith(m + ".")), None)
        if module is not None:
            out[f"{KEY_PREFIX}{module}.modules_to_save.{name[len(module) + 1 :]}"] = model.get_parameter(name).clone()
    return out


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Save the model's adapter as a PEFT folder that ``PeftModel.from_pretrained`` loads."""
    config = get_config(model)
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise AdapterError("the adapter is merged into the base weights; unmerge(model) before saving it")
    return write_adapter_folder(out_dir, config, {**adapter_state_dict(model), **peft_bias_aliases(model, config)})


# ---- reading ---------------------------------------------------------------------------------


def resolve_adapter_dir(path_or_id: str | os.PathLike) -> Path:
    """A local folder, or a hub id downloaded (config and weights only) through huggingface_hub."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterError(f"{path}: expected an adapter folder, found a file")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(path_or_id), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME])
    except Exception as e:  # offline, unknown repo, bad id: one message says all
        raise AdapterError(
            f"adapter {str(path_or_id)!r} is not a local folder and could not be fetched from the hub: {e}"
        ) from e
    return Path(local)


LFS_POINTER = "version https://git-lfs.github.com/spec/"


def read_json_object(file: Path) -> dict:
    """A JSON file holding one object; errors name the file (and a Git LFS pointer as such)."""
    try:
        text = file.read_text()
    except UnicodeDecodeError as e:
        raise AdapterError(f"{file}: not valid JSON ({e})") from e
    if text.startswith(LFS_POINTER):
        raise AdapterError(
            f"{file}: a Git LFS pointer, not the file itself (the repository was cloned without LFS: run `git lfs pull`)"
        )
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{file}: not valid JSON ({e})") from e
    except RecursionError:  # JSON nested thousands of levels deep
        raise AdapterError(f"{file}: JSON nested too deeply") from None
    if not isinstance(d, dict):
        raise AdapterError(f"{file}: expected a JSON object")
    return d


def read_config(folder: Path) -> AdapterConfig:
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_NAME}")
    return config_from_dict(read_json_object(file), str(file))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, checked to be finite; never unpickles."""
    st, legacy = folder / WEIGHTS_NAME, folder / LEGACY_WEIGHTS_NAME
    if st.is_file():
        file = st
        try:
            tensors = load_file(st)
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"{st}: cannot read safetensors file (truncated or corrupted?): {e}") from e
    elif legacy.is_file():
        file = legacy
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses any pickle that is not plain tensors
            raise AdapterError(f"{legacy}: cannot load safely with weights_only=True: {e}") from e
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterError(f"{legacy}: expected a dict of tensors")
    else:
        raise AdapterError(f"{folder}: no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME})")
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterError(f"{file}: tensor {key!r} holds NaN or inf values")
    return tensors


def read_adapter(path_or_id: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor], Path]:
    """(config, PEFT-keyed tensors, folder) of an adapter folder or hub id."""
    folder = resolve_adapter_dir(path_or_id)
    return read_config(folder), read_tensors(folder), folder


def normalise_key(key: str) -> str:
    """PEFT keys with the adapter name left in (older files, hand-made ones) → the saved form."""
    return key.replace(".default.", ".").replace(".modules_to_save.", ".")


def normalise_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``normalise_key`` over a file's tensors, dropping PEFT's frozen copies of modules_to_save
    (``.original_module.``, written beside the trained copy when bias="all")."""
    return {normalise_key(k): v for k, v in tensors.items() if ".original_module." not in k}


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy PEFT-keyed tensors into the model's adapter; every key and shape must match.

    PEFT also saves the full base weight of a targeted embedding or output layer (``lm_head``,
    ``embed_tokens``: the vocabulary may have been resized): such ``<layer>.base_layer.weight`` tensors of
    adapted layers are copied into the base layer, as PEFT does.
    """
    expected = adapter_state_dict(model)
    adapted = {f"{KEY_PREFIX}{name}.base_layer.weight": layer for name, layer in adapter_layers(model)}
    expected.update({k: adapted[k].base_layer.weight for k in tensors.keys() & adapted.keys()})
    given = normalise_keys(tensors)
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        raise AdapterError(
            f"{source}: missing tensor for layer {missing[0][len(KEY_PREFIX) :]!r} ({len(missing)} missing)"
        )
    if unexpected:
        raise AdapterError(
            f"{source}: tensor {unexpected[0]!r} matches no adapted layer of this model "
            f"({len(unexpected)} unexpected; is the adapter for a different base model?)"
        )
    for key, target in expected.items():
        t = given[key]
        if t.shape != target.shape:
            raise AdapterError(
                f"{source}: layer {key[len(KEY_PREFIX) :]!r} has shape {tuple(t.shape)} in the file but the model "
                f"expects {tuple(target.shape)} (adapter for a different base, or a rank mismatch with the config?)"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(given[key].to(target.dtype))


def load_adapter(base_model: nn.Module, path_or_id: str | os.PathLike, *, verbose: bool = True) -> nn.Module:
    """Load a PEFT adapter folder (or hub id) into ``base_model``; the adapter type comes from peft_type.

    The whole config is checked before the model is touched; on any error the base model is left as it was.
    """
    config, tensors, folder = read_adapter(path_or_id)
    source = str(folder)
    if getattr(base_model, CONFIG_ATTR, None) is not None:
        raise AdapterError("model already carries a loraloom adapter; merge_and_unload it first")
    requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
    try:
        add_adapter(base_model, config, verbose=False, init=False)
        load_state_into(base_model, tensors, source)
    except AdapterError as e:
        remove_adapter(base_model)
        for name, p in base_model.named_parameters():
            p.requires_grad_(requires_grad[name])
        if str(e).startswith(source):
            raise
        raise AdapterError(f"{source}: {e}") from e
    loaded = get_config(base_model)
    with torch.no_grad():
        for _, layer in adapter_layers(base_model):
            loaded.prepare_loaded(layer)
    if verbose:
        print(f"loraloom: loaded {config.peft_type} adapter from {source}")
    return base_model
