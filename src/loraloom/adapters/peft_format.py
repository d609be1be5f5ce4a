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
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
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


# Adapter weights are real floating tensors: quantized, sparse, fp8, complex or integer tensors are refused
# by name before anything is read (safetensors dtype names, then torch's).
SAFETENSORS_DTYPES = {"F16", "BF16", "F32", "F64"}
TORCH_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def weights_file(folder: Path) -> Path:
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    raise AdapterError(f"{folder}: no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME})")


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from the weights file's header, every key and dtype checked; no tensor is read
    (a legacy .bin is memory-mapped where its format allows)."""
    file = weights_file(folder)
    if file.name == LEGACY_WEIGHTS_NAME:
        return {k: tuple(t.shape) for k, t in _load_bin(file).items()}
    return safetensors_shapes(file)


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a .safetensors header, every dtype checked; no tensor is read."""
    try:
        with safe_open(file, "pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            for key, piece in slices.items():
                if piece.get_dtype() not in SAFETENSORS_DTYPES:
                    raise AdapterError(
                        f"{file}: tensor {key!r} has dtype {piece.get_dtype()}; adapter weights must be one of "
                        f"{sorted(SAFETENSORS_DTYPES)} (quantized, fp8 and complex tensors are not supported)"
                    )
            return {k: tuple(piece.get_shape()) for k, piece in slices.items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{file}: cannot read safetensors file (truncated or corrupted?): {e}") from e


def read_tensors(folder: Path, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors (only ``keys`` when given), checked to be finite; never unpickles."""
    file = weights_file(folder)
    if file.name == LEGACY_WEIGHTS_NAME:
        tensors = {k: t.clone() for k, t in _load_bin(file).items() if keys is None or k in keys}
    else:
        tensor_shapes(folder)  # every dtype checked before a byte of data is read
        try:
            with safe_open(file, "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys() if keys is None or k in keys}
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"{file}: cannot read safetensors file (truncated or corrupted?): {e}") from e
    for key, t in tensors.items():
        check_finite(t, f"{file}: tensor {key!r}")
    return tensors


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise AdapterError(f"{what} holds NaN or inf values")


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A legacy .bin through ``weights_only=True``: plain dense float tensors under string keys, or an error."""
    try:
        with warnings.catch_warnings():  # torch warns about the legacy format on its way to the error below
            warnings.simplefilter("ignore")
            try:
                tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # the pre-zip format cannot be mapped: read it whole
                if "mmap" not in str(e):
                    raise
                tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any pickle that is not plain tensors
        # torch's own message suggests weights_only=False: never for a file from a hub. Keep its reason only.
        found = re.search(r"Unpickler error:\s*(.+?)\s*(?:Check the documentation|$)", str(e), re.DOTALL)
        reason = " ".join((found.group(1) if found else str(e)).split())
        raise AdapterError(
            f"{file}: torch.load(weights_only=True) refuses it, and loraloom never unpickles: {reason}"
        ) from e
    if not isinstance(tensors, dict):
        raise AdapterError(f"{file}: expected a dict of tensors, found {type(tensors).__name__}")
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise AdapterError(f"{file}: expected string keys, found {type(key).__name__} key {key!r:.40}")
        if not isinstance(t, torch.Tensor):
            raise AdapterError(f"{file}: {key!r} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.is_quantized or t.dtype not in TORCH_DTYPES:
            kind = "sparse" if t.layout != torch.strided else "quantized" if t.is_quantized else str(t.dtype)
            raise AdapterError(
                f"{file}: tensor {key!r} is {kind}; adapter weights must be dense float16/bfloat16/float32/float64"
            )
    return tensors


def read_adapter(path_or_id: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor], Path]:
    """(config, PEFT-keyed tensors, folder) of an adapter folder or hub id."""
    folder = resolve_adapter_dir(path_or_id)
    config = read_config(folder)
    config.check_file_shapes(normalise_keys(tensor_shapes(folder)), str(weights_file(folder)))
    return config, read_tensors(folder), folder


def normalise_key(key: str) -> str:
    """PEFT keys with the adapter name left in (older files, hand-made ones) → the saved form."""
    return key.replace(".default.", ".").replace(".modules_to_save.", ".")


def normalise_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``normalise_key`` over a file's tensors, dropping PEFT's frozen copies of modules_to_save
    (``.original_module.``, written beside the trained copy when bias="all")."""
    return {normalise_key(k): v for k, v in tensors.items() if ".original_module." not in k}


def expected_tensors(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, torch.Tensor]:
    """The model's adapter tensors the file must fill, checked against the file's keys and shapes (from its
    header: nothing read yet). PEFT also saves the full base weight of a targeted embedding or output layer
    (``lm_head``, ``embed_tokens``: the vocabulary may have been resized): such ``<layer>.base_layer.weight``
    tensors of adapted layers are copied into the base layer, as PEFT does."""
    expected = adapter_state_dict(model)
    adapted = {f"{KEY_PREFIX}{name}.base_layer.weight": layer for name, layer in adapter_layers(model)}
    expected.update({k: adapted[k].base_layer.weight for k in shapes.keys() & adapted.keys()})
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
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
        if tuple(shapes[key]) != tuple(target.shape):
            raise AdapterError(
                f"{source}: layer {key[len(KEY_PREFIX) :]!r} has shape {tuple(shapes[key])} in the file but the "
                f"model expects {tuple(target.shape)} (adapter for a different base, or a rank mismatch with the config?)"
            )
    return expected


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy PEFT-keyed tensors into the model's adapter; every key and shape must match, and every value be
    finite in the model's dtype (a finite 1e300 in float64 is inf in float32)."""
    given = normalise_keys(tensors)
    expected = expected_tensors(model, {k: tuple(t.shape) for k, t in given.items()}, source)
    cast = {key: given[key].to(target.dtype) for key, target in expected.items()}
    for key, t in cast.items():
        check_finite(t, f"{source}: tensor {key!r} (as {t.dtype})")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(cast[key])


def load_adapter(base_model: nn.Module, path_or_id: str | os.PathLike, *, verbose: bool = True) -> nn.Module:
    """Load a PEFT adapter folder (or hub id) into ``base_model``; the adapter type comes from peft_type.

    The config, and every key, dtype and shape of the weights file, are checked before a tensor is read or
    a layer allocated. On any error the base model is left exactly as it was.
    """
    folder = resolve_adapter_dir(path_or_id)
    source, config = str(folder), read_config(folder)
    raw_shapes = tensor_shapes(folder)
    shapes = normalise_keys(raw_shapes)
    config.check_file_shapes(shapes, str(weights_file(folder)))  # a rank of 1e6 fails here, before allocating
    if getattr(base_model, CONFIG_ATTR, None) is not None:
        raise AdapterError("model already carries a loraloom adapter; merge_and_unload it first")
    requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
    base_weights: list[tuple[torch.Tensor, torch.Tensor]] = []  # (base weight, its value before) to put back
    try:
        add_adapter(base_model, config, verbose=False, init=False)
        expected = expected_tensors(base_model, shapes, source)
        base_weights = [(t, t.detach().clone()) for k, t in expected.items() if k.endswith(".base_layer.weight")]
        wanted = {k for k in raw_shapes if ".original_module." not in k and normalise_key(k) in expected}
        load_state_into(base_model, read_tensors(folder, wanted), source)
        loaded = get_config(base_model)
        with torch.no_grad():
            for _, layer in adapter_layers(base_model):
                loaded.prepare_loaded(layer)
    except BaseException as e:
        with torch.no_grad():
            for target, before in base_weights:
                target.copy_(before)
        remove_adapter(base_model)
        for name, p in base_model.named_parameters():
            p.requires_grad_(requires_grad[name])
        if isinstance(e, AdapterError) and not str(e).startswith(source):
            raise AdapterError(f"{source}: {e}") from e
        raise
    if verbose:
        print(f"loraloom: loaded {config.peft_type} adapter from {source}")
    return base_model
