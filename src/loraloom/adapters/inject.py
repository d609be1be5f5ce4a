"""Put adapter layers into a model and take them out again.

Find the target modules, swap each for its adapter layer, freeze everything else (but
``modules_to_save``), and undo it all on merge_and_unload. Adapter-type agnostic: the config's
``make_layer`` builds the layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from .base import ADAPTABLE_LAYERS, AdapterConfig, AdapterError, AdapterLayer

# Default LoRA targets per `model.config.model_type`, as in PEFT.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "umt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}

# Heads trained in full for sequence classification (PEFT adds the same for task_type SEQ_CLS).
CLASSIFIER_HEADS = ("classifier", "score")

# The attribute that marks a model as carrying a loraloom adapter and holds its config.
CONFIG_ATTR = "loraloom_config"


def adaptable_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, ADAPTABLE_LAYERS)]


def task_type_of(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model class, from its name."""
    cls = type(model).__name__
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("ForConditionalGeneration") or cls.endswith("ForSeq2SeqLM"):
        return "SEQ_2_SEQ_LM"
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if cls.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def resolve_targets(model: nn.Module, target_modules: list[str] | str | None) -> list[str] | str:
    if target_modules:
        return target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise AdapterError(
            f"no default target_modules for model type {model_type!r}; pass target_modules=[...] "
            f"(adaptable layers: {_summarise(adaptable_layer_names(model))})"
        )
    return list(DEFAULT_TARGETS[model_type])


def matches(target_modules: list[str] | str, module_name: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in target_modules)


def _summarise(names: list[str], limit: int = 12) -> str:
    # Collapse layer indices so a 24-layer model lists each projection once.
    unique = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", n) for n in names))
    shown = ", ".join(unique[:limit])
    return shown + (f", ... ({len(unique) - limit} more)" if len(unique) > limit else "")


def find_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the modules to adapt; a clear error if none, or if one is not a linear layer."""
    names = []
    for name, module in model.named_modules():
        if not name or not matches(target_modules, name):
            continue
        if isinstance(module, AdapterLayer):
            raise AdapterError(f"layer {name!r} already carries an adapter; merge_and_unload first")
        if not isinstance(module, ADAPTABLE_LAYERS):
            if isinstance(target_modules, str):
                continue  # a regex may also match containers; PEFT skips those too
            raise AdapterError(
                f"target module {name!r} is a {type(module).__name__}; only nn.Linear and Conv1D can be adapted"
            )
        names.append(name)
    if not names:
        raise AdapterError(
            f"target_modules {target_modules!r} matched no layer of {type(model).__name__}; "
            f"linear layers in this model: {_summarise(adaptable_layer_names(model))}"
        )
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def modules_to_save_of(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules trained in full: the config's, plus the classifier head for SEQ_CLS."""
    wanted = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":
        wanted += [h for h in CLASSIFIER_HEADS if h not in wanted]
    names = [n for n, _ in model.named_modules() if n and any(n == w or n.endswith("." + w) for w in wanted)]
    # PEFT writes both head names for SEQ_CLS; only a head that no model has may be absent.
    missing = [
        w
        for w in config.modules_to_save or []
        if w not in CLASSIFIER_HEADS and not any(n == w or n.endswith("." + w) for n in names)
    ]
    if missing:
        raise AdapterError(f"modules_to_save {missing} not found in {type(model).__name__}")
    return names


def add_adapter(model: nn.Module, config: AdapterConfig, *, verbose: bool = True) -> nn.Module:
    """Wrap the target layers of ``model`` (in place) with adapter layers and freeze the rest.

    Returns the same model object, now carrying ``model.loraloom_config``.
    """
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise AdapterError("model already carries a loraloom adapter; merge_and_unload it first")
    config.fill_model_defaults(getattr(getattr(model, "config", None), "model_type", None))
    config.target_modules = resolve_targets(model, config.target_modules)
    if config.task_type is None:
        config.task_type = task_type_of(model)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    names = find_targets(model, config.target_modules)
    save_names = modules_to_save_of(model, config)

    layers = {name: config.make_layer(name, model.get_submodule(name)) for name in names}
    # PEFT records Conv1D targets (GPT-2) as fan_in_fan_out=True and warns otherwise.
    config.fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        for pname in layer.adapter_param_names:
            getattr(layer, pname).requires_grad_(True)
    for name in save_names:
        model.get_submodule(name).requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    if verbose:
        trainable, total = count_parameters(model)
        print(
            f"loraloom: {config.peft_type} on {len(names)} layers | trainable params: {trainable:,} "
            f"|| all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
        )
    return model


def get_config(model: nn.Module) -> AdapterConfig:
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
    for _, layer in adapter_layers(model):
        layer.merge()
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    get_config(model)
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def remove_adapter(model: nn.Module) -> nn.Module:
    """Put the base layers back, discarding any unmerged adapter (merged deltas stay in the weights)."""
    for name, layer in list(adapter_layers(model)):
        set_submodule(model, name, layer.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapter into the base weights and return the plain transformers model."""
    merge(model)
    return remove_adapter(model)
