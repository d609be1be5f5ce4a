"""Stable Diffusion LoRA files as the image community shares them (kohya-ss / A1111) <-> PEFT folders.

A kohya file is one .safetensors holding, per adapted layer, ``<name>.lora_down.weight`` (A),
``<name>.lora_up.weight`` (B) and ``<name>.alpha`` (the layer's scale is alpha / rank; no alpha means
alpha = rank). ``<name>`` is ``lora_unet_`` / ``lora_te_`` (SDXL: ``lora_te1_``, ``lora_te2_``) followed
by the layer's path in the diffusers UNet or the transformers CLIP text encoder with every "." written
as "_" (kohya's sd-scripts name them so; for SDXL it uses the original SD UNet's names, ``input_blocks``,
``middle_block``, ``output_blocks``, which ``sgm_block_paths`` relates to the diffusers UNet's). "_" is
also inside names (``down_blocks``, ``to_q``), so the path cannot be read back from the name alone: it is
looked up among the target model's own layers, under both namings. diffusers' converter
(``loaders/lora_conversion_utils.py``) does the same with string rewrite rules.

One PEFT folder is written per model (``unet``, ``text_encoder``, ``text_encoder_2``); per-layer ranks
and alphas that differ from the most common ones go into ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters.base import AdapterError
from .adapters.lora import LoraConfig, lora_scaling
from .adapters.peft_format import (
    CONFIG_NAME,
    KEY_PREFIX,
    check_finite,
    read_adapter,
    safetensors_shapes,
    write_adapter_folder,
)
from .files import atomic_write

# kohya name prefix -> the pipeline component (diffusers' folder name) it adapts.
KOHYA_PREFIXES: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _few(keys, n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _key_style(keys: list[str]) -> str:
    """What a file that is not kohya-style looks like, for the error message."""
    if any(k.startswith(KEY_PREFIX) for k in keys):
        return "a PEFT adapter's weights (convert a PEFT folder, not its .safetensors file)"
    if any(k.startswith(("unet.", "text_encoder.")) and ".lora" in k for k in keys):
        return "a diffusers-format LoRA (load it with diffusers' load_lora_weights)"
    if any(re.search(r"\.(hada_|lokr_|lora_mid\.|dora_scale|diff$|diff_b$)", k) for k in keys):
        return "a LyCORIS (LoHa / LoKr / LoCon-Tucker) or DoRA file, which is not plain LoRA"
    return "an unknown key style"


def read_kohya(path: str | os.PathLike) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """component -> kohya layer name (prefix stripped) -> {"down", "up", "alpha"?} from a kohya file.

    Any key that is not ``lora_(unet|te|te1|te2)_<name>.(lora_down.weight|lora_up.weight|alpha)``, or a
    layer missing its down or up weight, is an error naming the file and a few keys.
    """
    path = Path(path)
    safetensors_shapes(path)  # dtypes checked from the header before anything is read
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read safetensors file: {e}") from e
    if not tensors:
        raise AdapterError(f"{path}: holds no tensors")
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    source_keys: dict[tuple[str, str, str], str] = {}  # (component, layer, part) -> the key it came from
    unknown = []
    for key, t in tensors.items():
        name, _, suffix = key.partition(".")
        prefix = next((p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if name.startswith(p)), None)
        if prefix is None or suffix not in KOHYA_SUFFIXES:
            unknown.append(key)
            continue
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[suffix]
        component, layer = KOHYA_PREFIXES[prefix], name.removeprefix(prefix)
        if (component, layer, part) in source_keys:  # lora_te_ and lora_te1_ both name the first text encoder
            raise AdapterError(f"{path}: keys {source_keys[component, layer, part]!r} and {key!r} are the same layer")
        source_keys[component, layer, part] = key
        out.setdefault(component, {}).setdefault(layer, {})[part] = t
    if unknown:
        raise AdapterError(
            f"{path}: not a kohya / A1111 LoRA file: {len(unknown)} of {len(tensors)} keys are not "
            f"lora_(unet|te|te1|te2)_<layer>.(lora_down.weight|lora_up.weight|alpha); this looks like "
            f"{_key_style(list(tensors))}. Keys: {_few(unknown)}"
        )
    for component, layers in out.items():
        incomplete = [n for n, parts in layers.items() if "down" not in parts or "up" not in parts]
        if incomplete:
            raise AdapterError(f"{path}: {component} layers without both lora_down and lora_up: {_few(incomplete)}")
    return out


def kohya_path(component: str, module_path: str) -> str:
    """The path kohya names a layer by. Text encoders keep CLIP's ``text_model.`` level, which transformers
    5's ``CLIPTextModel`` no longer has (its layers are ``encoder.layers...``)."""
    if component != "unet" and not module_path.startswith(("text_model.", "text_projection")):
        return "text_model." + module_path
    return module_path


# Layers inside a resnet block: diffusers name -> original-SD (LDM/SGM) name.
SGM_RESNET_LAYERS = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def sgm_block_paths(unet: nn.Module) -> dict[str, str]:
    """diffusers UNet block / layer path -> the original Stable Diffusion (LDM, SGM) path of the same module.

    SD's own UNet numbers its blocks in one sequence: ``input_blocks.0.0`` is conv_in; then, per down
    block, one ``input_blocks.k`` per layer ([resnet, attention]) and one for the downsampler
    (``.0.op``); ``middle_block.0/1/2`` are resnet, attention, resnet; ``output_blocks.k`` hold
    [resnet, attention, upsampler] per up-block layer. kohya's sd-scripts names SDXL LoRA keys this way.
    """
    out = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    k = 1
    for i, block in enumerate(getattr(unet, "down_blocks", [])):
        attention = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            if attention is not None:
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
            k += 1
        if getattr(block, "downsamplers", None) is not None:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    k = 0
    for i, block in enumerate(getattr(unet, "up_blocks", [])):
        attention = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            if attention is not None:
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
            k += 1
        if getattr(block, "upsamplers", None) is not None:  # in the block's last layer, after the attention
            out[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{k - 1}.{2 if attention is not None else 1}.conv"
    return out


def sgm_path(blocks: dict[str, str], module_path: str) -> str | None:
    """The original-SD path of a diffusers UNet layer (``blocks`` from ``sgm_block_paths``), or None."""
    parts = module_path.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in blocks:
            rest = parts[n:]
            if ".resnets." in f".{prefix}." and rest:
                rest = SGM_RESNET_LAYERS.get(rest[0], rest[0]).split(".") + rest[1:]
            return ".".join([blocks[prefix], *rest])
    return None


def kohya_layer_names(model: nn.Module, component: str = "unet") -> dict[str, str]:
    """kohya name (path with "." -> "_", prefix excluded) -> module path, for every layer LoRA can adapt.

    A UNet's layers are also found under their original-SD (LDM/SGM) names, as SDXL files use them.
    """
    blocks = sgm_block_paths(model) if component == "unet" else {}
    names: dict[str, str] = {}
    for path, module in model.named_modules():
        if path and isinstance(module, LoraConfig.layer_types):
            aliases = [kohya_path(component, path), sgm_path(blocks, path)]
            for flat in {a.replace(".", "_") for a in aliases if a}:
                if flat in names:
                    raise AdapterError(f"layers {names[flat]!r} and {path!r} have the same kohya name {flat!r}")
                names[flat] = path
    return names


def _fit(t: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    """A kohya tensor in the shape PEFT's layer wants: 1x1 convs and linear layers are interchangeable."""
    if t.shape == shape:
        return t
    if t.numel() == shape.numel() and (
        t.ndim == 4 and t.shape[2:] == (1, 1) or len(shape) == 4 and shape[2:] == (1, 1)
    ):
        return t.reshape(shape)
    raise AdapterError(f"{key}: shape {tuple(t.shape)} does not fit the model's layer (expects {tuple(shape)})")


def kohya_to_peft(path: str | os.PathLike, models: dict[str, nn.Module], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Convert a kohya / A1111 SD LoRA file into one PEFT folder per component under ``out_dir``.

    ``models`` maps component names ("unet", "text_encoder", "text_encoder_2") to the diffusers UNet /
    transformers text encoder the file is for; only their layer names and shapes are read, so a model
    built on the meta device will do. Returns component -> folder written.
    """
    path = Path(path)
    by_component = read_kohya(path)
    missing = sorted(set(by_component) - set(models))
    if missing:
        raise AdapterError(f"{path}: has LoRA layers for {missing} but no such model was given (got {sorted(models)})")
    converted: dict[str, tuple[LoraConfig, dict[str, torch.Tensor]]] = {}
    for component, layers in by_component.items():
        model = models[component]
        lookup = kohya_layer_names(model, component)
        unknown = [n for n in layers if n not in lookup]
        if unknown:
            raise AdapterError(
                f"{path}: {len(unknown)} {component} layer names match no layer of {type(model).__name__} "
                f"(a LoRA for another model?): {_few(unknown)}"
            )
        tensors, ranks, alphas, origin = {}, {}, {}, {}
        for flat, parts in layers.items():
            module_path = lookup[flat]
            if module_path in origin:  # a diffusers name and an SGM name for one block
                raise AdapterError(
                    f"{path}: {component} layers {origin[module_path]!r} and {flat!r} are both {module_path!r}"
                )
            origin[module_path] = flat
            r, alpha = _rank_and_alpha(parts, f"{path}: {flat}")
            a_shape, b_shape = _peft_shapes(model.get_submodule(module_path), r)
            tensors[f"{KEY_PREFIX}{module_path}.lora_A.weight"] = _fit(
                parts["down"], a_shape, f"{path}: {flat}.lora_down"
            )
            tensors[f"{KEY_PREFIX}{module_path}.lora_B.weight"] = _fit(parts["up"], b_shape, f"{path}: {flat}.lora_up")
            ranks[module_path], alphas[module_path] = r, alpha
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=sorted(ranks),
            rank_pattern={re.escape(p): v for p, v in sorted(ranks.items()) if v != r},
            alpha_pattern={re.escape(p): v for p, v in sorted(alphas.items()) if v != alpha},
        )
        converted[component] = (config, tensors)
    # Everything is checked before the first folder is written: a bad layer leaves no partial output.
    return {c: write_adapter_folder(Path(out_dir) / c, cfg, t) for c, (cfg, t) in converted.items()}


def _rank_and_alpha(parts: dict[str, torch.Tensor], where: str) -> tuple[int, float]:
    """A layer's rank and alpha, after the checks loraloom's loader makes: a folder that convert writes
    always loads (no rank 0, no NaN, down and up agreeing)."""
    down, up = parts["down"], parts["up"]
    for part, t in (("lora_down", down), ("lora_up", up)):
        if t.ndim not in (2, 4):
            raise AdapterError(
                f"{where}.{part}: a {t.ndim}-dim tensor; expected a 2-dim (linear) or 4-dim (conv) weight"
            )
        check_finite(t.float(), f"{where}.{part} (as float32)")  # 1e300 in float64 loads as inf
    r = down.shape[0]
    if r < 1 or up.shape[1] != r:
        raise AdapterError(f"{where}: lora_down has rank {r} but lora_up {up.shape[1]} (must agree and be >= 1)")
    if "alpha" not in parts:
        return r, float(r)
    if parts["alpha"].numel() != 1:
        raise AdapterError(f"{where}.alpha: holds {parts['alpha'].numel()} values; expected one number")
    alpha = float(parts["alpha"].item())
    if not math.isfinite(alpha):
        raise AdapterError(f"{where}.alpha: is {alpha}; expected a finite number")
    return r, alpha


def _peft_shapes(base: nn.Module, r: int) -> tuple[torch.Size, torch.Size]:
    """Shapes of PEFT's lora_A / lora_B weights for ``base`` at rank ``r``."""
    if isinstance(base, nn.Conv2d):
        return torch.Size((r, base.in_channels, *base.kernel_size)), torch.Size((base.out_channels, r, 1, 1))
    if isinstance(base, nn.Linear):
        return torch.Size((r, base.in_features)), torch.Size((base.out_features, r))
    raise AdapterError(f"kohya LoRA on a {type(base).__name__} is not supported (Linear and Conv2d only)")


def peft_to_kohya(folders: dict[str, str | os.PathLike], out_file: str | os.PathLike) -> Path:
    """Write PEFT LoRA folders (component -> folder) as one kohya / A1111 .safetensors file.

    Text encoders are named ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` when there are two). Only plain
    LoRA on Linear / Conv2d layers has a kohya form: DoRA, embedding LoRA, lora_bias and modules_to_save
    are refused by name.
    """
    unknown = sorted(set(folders) - set(COMPONENTS))
    if unknown:
        raise AdapterError(f"unknown components {unknown}; expected some of {list(COMPONENTS)}")
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
    if "text_encoder_2" in folders:
        prefixes["text_encoder"] = "lora_te1_"
    out: dict[str, torch.Tensor] = {}
    for component, folder in folders.items():
        config, tensors, folder = read_adapter(folder)
        if not isinstance(config, LoraConfig):
            raise AdapterError(f"{folder}: a {config.peft_type} adapter has no kohya form; only LoRA")
        for field, bad in (("use_dora", config.use_dora), ("lora_bias", config.lora_bias)):
            if bad:
                raise AdapterError(f"{folder}: {field}=True has no kohya LoRA form")
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            module_path, _, param = key.removeprefix(KEY_PREFIX).rpartition(".lora_")
            if not key.startswith(KEY_PREFIX) or param not in ("A.weight", "B.weight"):
                raise AdapterError(f"{folder}: tensor {key!r} has no kohya form (only lora_A / lora_B weights do)")
            layers.setdefault(module_path.replace(".default", ""), {})[param[0]] = t
        for module_path, ab in sorted(layers.items()):
            r, alpha = config.rank_and_alpha(module_path)
            name = prefixes[component] + kohya_path(component, module_path).replace(".", "_")
            if f"{name}.lora_down.weight" in out:
                raise AdapterError(f"{folder}: two layers have the kohya name {name!r} (one is {module_path!r})")
            out[f"{name}.lora_down.weight"] = ab["A"].contiguous()
            out[f"{name}.lora_up.weight"] = ab["B"].contiguous()
            # kohya scales by alpha / rank: keep PEFT's scale (alpha / sqrt(r) under rsLoRA) exactly.
            out[f"{name}.alpha"] = torch.tensor(lora_scaling(r, alpha, config.use_rslora) * r, dtype=torch.float32)
    out_file = Path(out_file)
    metadata = {"ss_network_module": "networks.lora", "loraloom_components": json.dumps(sorted(folders))}
    atomic_write(out_file, lambda tmp: save_file(out, tmp, metadata=metadata))
    return out_file


# ---- the models a kohya file is for, without their weights ------------------------------------


def model_skeleton(folder: str | os.PathLike) -> nn.Module:
    """The model saved in ``folder`` (a diffusers model or a transformers model with config.json), built
    on the meta device from its config: layer names and shapes, no weights read and no memory used."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise AdapterError(f"{folder}: no config.json (expected a diffusers or transformers model folder)")
    config = json.loads(config_file.read_text())
    with torch.device("meta"):
        if "_class_name" in config:  # diffusers
            try:
                import diffusers
            except ImportError as e:
                raise AdapterError(f"{folder}: is a diffusers model; install diffusers to read it") from e
            cls = getattr(diffusers, config["_class_name"], None)
            if cls is None:
                raise AdapterError(f"{config_file}: unknown diffusers class {config['_class_name']!r}")
            return cls.from_config(config)
        import transformers

        archs = config.get("architectures") or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            raise AdapterError(f"{config_file}: names no transformers model class in 'architectures'")
        return cls(transformers.AutoConfig.from_pretrained(folder))


def pipeline_skeletons(base: str | os.PathLike) -> dict[str, nn.Module]:
    """component -> model skeleton for a diffusers pipeline folder (``unet/``, ``text_encoder/``, ...), or
    {"unet": ...} for a single UNet folder, {"text_encoder": ...} for a single text encoder folder."""
    base = Path(base)
    found = {c: model_skeleton(base / c) for c in COMPONENTS if (base / c / "config.json").is_file()}
    if found:
        return found
    model = model_skeleton(base)
    return {"unet" if "_class_name" in json.loads((base / "config.json").read_text()) else "text_encoder": model}


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    component: str | None = None,
) -> list[Path]:
    """``loraloom convert``: a kohya .safetensors file -> one PEFT folder per component under ``out`` (needs
    ``base``, the pipeline or model folder the file is for), or PEFT folder(s) -> a kohya file ``out``.

    A PEFT source is one adapter folder (for ``component``, default "unet") or a folder holding
    ``unet/``, ``text_encoder/``, ``text_encoder_2/`` adapter folders (what the other direction writes).
    """
    source = Path(source)
    if source.is_file():
        if base is None:
            raise AdapterError(
                f"{source}: converting a kohya file needs --base, the diffusers pipeline (or UNet / text encoder) "
                "folder it is for: its layer names decide each key's module"
            )
        return list(kohya_to_peft(source, pipeline_skeletons(base), out).values())
    if not source.is_dir():
        raise AdapterError(f"{source}: no such file or folder")
    if (source / CONFIG_NAME).is_file():
        folders = {component or "unet": source}
    else:
        folders = {c: source / c for c in COMPONENTS if (source / c / CONFIG_NAME).is_file()}
    if not folders:
        raise AdapterError(
            f"{source}: not a PEFT adapter folder, nor a folder of {', '.join(COMPONENTS)} adapter folders"
        )
    return [peft_to_kohya(folders, out)]


__all__ = [
    "KOHYA_PREFIXES",
    "convert",
    "kohya_layer_names",
    "kohya_path",
    "kohya_to_peft",
    "sgm_block_paths",
    "sgm_path",
    "model_skeleton",
    "peft_to_kohya",
    "pipeline_skeletons",
    "read_kohya",
]
