"""Put adapter layers into a model and take them out again.

``add_adapter`` resolves a private copy of the config for the model (targets, task type, base name),
finds the target modules by PEFT's rules, builds each adapter layer with the config's ``make_layer``,
installs them with ``install_layers``, and freezes everything else (but ``modules_to_save`` and the
biases ``bias`` names). ``remove_adapter`` undoes it with ``uninstall_layers``. Adapter-type agnostic.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..tasks import peft_task_type_of
from .base import ADAPTABLE_LAYERS, AdapterConfig, AdapterError, AdapterLayer, check_mergeable

# Heads trained in full for sequence classification (PEFT adds the same for task_type SEQ_CLS).
CLASSIFIER_HEADS = ("classifier", "score")

# The attribute that marks a model as carrying a loraloom adapter and holds its config.
CONFIG_ATTR = "loraloom_config"

# PEFT's shorthand for every linear layer but the output head.
ALL_LINEAR = "all-linear"


def adaptable_layer_names(model: nn.Module, layer_types: tuple[type[nn.Module], ...] = ADAPTABLE_LAYERS) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, layer_types)]


# ---- which modules: PEFT's matching rules ------------------------------------------------------


def matches(patterns: list[str] | str, module_name: str) -> bool:
    """PEFT's rule: a string is a regex for the whole path; a list matches a whole path or a "."-suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def layer_index(module_name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer number in a module path, as PEFT reads it: the first number after one of
    ``layers_pattern`` (e.g. "layers", "h"), or without a pattern the first ``<name>.<number>.``."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module_name))), None)
    return int(match["idx"]) if match else None


def is_target(config: AdapterConfig, module_name: str) -> bool:
    """Whether ``module_name`` is adapted under ``config`` (PEFT's check_target_module_exists)."""
    if config.exclude_modules and matches(config.exclude_modules, module_name):
        return False
    # A module trained in full (or inside one) never carries an adapter too.
    if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", module_name) for m in config.modules_to_save or []):
        return False
    if not matches(config.target_modules or [], module_name):
        return False
    wanted = getattr(config, "layers_to_transform", None)
    if wanted is None or (isinstance(wanted, list) and not wanted) or isinstance(config.target_modules, str):
        return True
    index = layer_index(module_name, getattr(config, "layers_pattern", None))
    return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)


def _summarise(names: list[str], limit: int = 12) -> str:
    # Collapse layer indices so a 24-layer model lists each projection once.
    unique = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", n) for n in names))
    shown = ", ".join(unique[:limit])
    return shown + (f", ... ({len(unique) - limit} more)" if len(unique) > limit else "")


def find_targets(
    model: nn.Module,
    targets: AdapterConfig | list[str] | str,
    layer_types: tuple[type[nn.Module], ...] | None = None,
) -> list[str]:
    """Names of the modules to adapt; a clear error if none, or if a named one cannot be adapted.

    ``targets`` is a resolved config (every PEFT matching rule applies) or just target_modules.
    """
    config = targets if isinstance(targets, AdapterConfig) else AdapterConfig(target_modules=targets)
    layer_types = layer_types or config.layer_types
    names = []
    for name, module in model.named_modules():
        if not name or not is_target(config, name):
            continue
        free_layer(model, name)
        if not isinstance(module, layer_types):
            if isinstance(config.target_modules, str):
                continue  # a regex may also match containers; PEFT skips those too
            kinds = ", ".join(t.__name__ for t in layer_types)
            raise AdapterError(f"target module {name!r} is a {type(module).__name__}; only {kinds} can be adapted")
        names.append(name)
    if not names:
        raise AdapterError(
            f"target_modules {config.target_modules!r} matched no layer of {type(model).__name__}"
            + (f" (exclude_modules {config.exclude_modules!r})" if config.exclude_modules else "")
            + (
                f" (layers_to_transform {config.layers_to_transform!r})"
                if getattr(config, "layers_to_transform", None) is not None
                else ""
            )
            + f"; adaptable layers in this model: {_summarise(adaptable_layer_names(model, layer_types))}"
        )
    return names


def all_linear_names(model: nn.Module, task_type: str | None) -> list[str]:
    """PEFT's "all-linear": every nn.Linear / Conv1D but the output head (the classifier for SEQ_CLS)."""
    names = adaptable_layer_names(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, h) for h in CLASSIFIER_HEADS if getattr(model, h, None) is not None), None)
    if head is not None:
        names = [n for n in names if model.get_submodule(n) is not head]
    return names


def resolve_config(model: nn.Module, config: AdapterConfig, *, saved: bool = False) -> AdapterConfig:
    """The config ``model`` keeps: a deep copy of ``config`` with the model-dependent fields filled in
    (default targets, "all-linear" expanded, task type, base name, classifier heads for SEQ_CLS).
    ``config`` itself is never changed. A ``saved`` config (read from a folder) keeps its task_type as
    written, as PEFT does: None means no task head was trained or saved."""
    resolved = copy.deepcopy(config)
    model_config = getattr(model, "config", None)
    model_type = getattr(model_config, "model_type", None)
    resolved.fill_model_defaults(model_type)
    if not resolved.target_modules:
        raise AdapterError(
            f"no default target_modules for model type {model_type!r}; pass target_modules=[...] "
            f"(adaptable layers: {_summarise(adaptable_layer_names(model, resolved.layer_types))})"
        )
    if resolved.task_type is None and not saved:
        resolved.task_type = peft_task_type_of(model)
    if isinstance(resolved.target_modules, str) and resolved.target_modules.lower() == ALL_LINEAR:
        resolved.target_modules = all_linear_names(model, resolved.task_type)
    if resolved.base_model_name_or_path is None:
        resolved.base_model_name_or_path = getattr(model_config, "_name_or_path", None) or None
    if resolved.task_type == "SEQ_CLS":  # PEFT adds (and saves) both head names
        resolved.modules_to_save = list(dict.fromkeys([*(resolved.modules_to_save or []), *CLASSIFIER_HEADS]))
    return resolved


def modules_to_save_of(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules trained in full: those ``config.modules_to_save`` names (a path or a "."-suffix)."""
    wanted = list(config.modules_to_save or [])
    names = [n for n, _ in model.named_modules() if n and matches(wanted, n)]
    # PEFT writes both head names for SEQ_CLS; only a head that no model has may be absent.
    missing = [w for w in wanted if w not in CLASSIFIER_HEADS and not any(matches([w], n) for n in names)]
    if missing:
        params = [w for w in missing if any(matches([w], n) for n, _ in model.named_parameters())]
        what = f" ({', '.join(params)}: a parameter, not a module; PEFT saves modules only)" if params else ""
        raise AdapterError(f"modules_to_save {missing} not found in {type(model).__name__}{what}")
    # A module inside another one listed is saved with it.
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def trainable_biases(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the bias parameters that train and are saved with the adapter: PEFT's ``bias`` option
    ("all": every bias in the model; "<type>_only", e.g. "lora_only": those of the adapted layers)."""
    bias = getattr(config, "bias", "none")
    if bias == "none":
        return []
    if bias == "all":
        return [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    return [f"{name}.base_layer.bias" for name, layer in adapter_layers(model) if layer.base_layer.bias is not None]


# ---- one install / uninstall path ------------------------------------------------------------


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def free_layer(model: nn.Module, name: str) -> nn.Module:
    """The base layer ``name`` of ``model``, refused if it already carries an adapter: the one such check."""
    module = model.get_submodule(name)
    if isinstance(module, AdapterLayer):
        raise AdapterError(f"layer {name!r} already carries an adapter; merge_and_unload it first")
    return module


def install_layers(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    """Swap each named base layer of ``model`` for its adapter layer (whose ``base_layer`` it must be).

    All checks run first: a layer that already carries an adapter is an error and nothing is swapped.
    The one install path of loraloom: add_adapter, load_adapter and compositions use it.
    """
    for name, layer in layers.items():
        if layer.base_layer is not free_layer(model, name):
            raise AdapterError(f"layer {name!r}: the adapter layer was built for another module")
    for name, layer in layers.items():
        layer.train(layer.base_layer.training)  # new sub-modules (dropout) follow the model's train/eval mode
        set_submodule(model, name, layer)


def uninstall_layers(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Put the base layer back in place of each named adapter layer (every adapter layer if ``names`` is
    None); merged deltas stay in the base weights. Names that hold no adapter layer are skipped."""
    wanted = None if names is None else set(names)
    for name, layer in list(adapter_layers(model)):
        if wanted is None or name in wanted:
            set_submodule(model, name, layer.base_layer)
            layer.release()


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


# ---- add / remove ----------------------------------------------------------------------------


def add_adapter(model: nn.Module, config: AdapterConfig, *, verbose: bool = True, init: bool = True) -> nn.Module:
    """Wrap the target layers of ``model`` (in place) with adapter layers and freeze the rest.

    ``config`` is not changed: the model keeps a resolved copy (``get_config(model)``), which is what
    ``save_adapter`` writes. With ``init=False`` (``load_adapter``: a saved config, whose weights are loaded
    right after) the layers get no initialisation beyond zeros, the base weights are left alone, and the
    config's task_type stays as written.
    Returns the same model object.
    """
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise AdapterError("model already carries a loraloom adapter; merge_and_unload it first")
    resolved = resolve_config(model, config, saved=not init)
    names = find_targets(model, resolved)
    save_names = modules_to_save_of(model, resolved)
    make = resolved.make_layer if init else resolved.make_empty_layer
    layers = {name: make(name, model.get_submodule(name)) for name in names}
    if init:
        for name, layer in layers.items():
            resolved.init_layer(name, layer)
    # PEFT records Conv1D targets (GPT-2) as fan_in_fan_out=True and warns otherwise.
    resolved.fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())
    install_layers(model, layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        for pname in layer.adapter_param_names:
            getattr(layer, pname).requires_grad_(True)
    for name in save_names:
        model.get_submodule(name).requires_grad_(True)
    for name in trainable_biases(model, resolved):
        model.get_parameter(name).requires_grad_(True)
    setattr(model, CONFIG_ATTR, resolved)
    if verbose:
        trainable, total = count_parameters(model)
        print(
            f"loraloom: {resolved.peft_type} on {len(names)} layers | trainable params: {trainable:,} "
            f"|| all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
        )
    return model


def get_config(model: nn.Module) -> AdapterConfig:
    """The model's own (resolved) adapter config."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise AdapterError(f"{type(model).__name__} carries no loraloom adapter; call add_adapter or load_adapter")
    return config


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Add every adapter's delta into its base weight; forward then costs what the base model costs."""
    get_config(model)
    layers = list(adapter_layers(model))
    for name, layer in layers:
        check_mergeable(name, layer.base_layer.weight)  # all checked before any layer changes
    for _, layer in layers:
        layer.merge()
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    get_config(model)
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def remove_adapter(model: nn.Module) -> nn.Module:
    """Put the base layers back, discarding any unmerged adapter (merged deltas stay in the weights). A base
    weight that an init rewrote (PiSSA, OLoRA: W - s·B·A) gets its original tensor back, bit for bit."""
    uninstall_layers(model)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapter into the base weights and return the plain transformers model."""
    merge(model)
    return remove_adapter(model)
