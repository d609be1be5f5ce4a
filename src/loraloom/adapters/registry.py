"""The one registry of adapter types, keyed by PEFT's ``peft_type``."""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import AdapterConfig, AdapterError
from .fourierft import FourierFTConfig
from .ia3 import IA3Config
from .lora import LoraConfig

ADAPTER_TYPES: dict[str, type[AdapterConfig]] = {}


def register(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Add an adapter type: its config class (with its layer, defaults, ``default_lr`` and ``cli_options``).

    Everything per type (PEFT files, the trainer's learning rate, ``loraloom train``'s options, the harness's
    gradient method) is read from this table, so a new type is one file and one line here.
    """
    if not cls.peft_type or not cls.peft_type.isupper():
        raise ValueError(f"{cls.__name__}.peft_type must be PEFT's upper-case name, got {cls.peft_type!r}")
    ADAPTER_TYPES[cls.peft_type] = cls
    return cls


register(LoraConfig)
register(FourierFTConfig)
register(IA3Config)


def adapter_names() -> list[str]:
    """The registered types as users name them: "fourierft", "ia3", "lora"."""
    return sorted(name.lower() for name in ADAPTER_TYPES)


def config_for(name: str) -> AdapterConfig:
    """A default config of the adapter type named ``name`` ("lora", "fourierft", "ia3"; any case)."""
    cls = ADAPTER_TYPES.get(str(name).upper())
    if cls is None:
        raise AdapterError(f"unknown adapter {name!r}; available: {', '.join(adapter_names())}")
    return cls()


# PEFT's other methods, named in the refusal so that the user knows what the file holds.
OTHER_PEFT_TYPES = {
    "ADALORA": "AdaLoRA",
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "PREFIX_TUNING": "prefix tuning",
    "PROMPT_TUNING": "prompt tuning",
    "P_TUNING": "P-tuning",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning",
    "ADAPTION_PROMPT": "adaption prompt (LLaMA-Adapter)",
    "OFT": "OFT",
    "BOFT": "BOFT",
    "VERA": "VeRA",
    "LN_TUNING": "LayerNorm tuning",
    "POLY": "Poly",
    "XLORA": "X-LoRA",
    "HRA": "HRA",
    "VBLORA": "VB-LoRA",
    "BONE": "Bone",
    "RANDLORA": "RandLoRA",
    "TRAINABLE_TOKENS": "trainable tokens",
}


def what_it_is(d: dict[str, Any]) -> str:
    """A guess at what a JSON object without ``peft_type`` is, for the refusal message."""
    if "fine_tune_type" in d or "lora_parameters" in d:
        return "an mlx-lm LoRA training config (MLX adapters are not PEFT folders)"
    if "model_class" in d and isinstance(d.get("config"), dict):
        return "an AdapterHub (adapters / adapter-transformers) adapter config"
    if "model_type" in d or "architectures" in d:
        return f"a transformers model config (config.json of a {d.get('model_type', 'model')!r} model)"
    return "not a PEFT adapter config"


def cli_option_fields() -> dict[str, dict[str, str]]:
    """``loraloom train``'s adapter options: option -> {peft_type: config field}, over every registered type."""
    options: dict[str, dict[str, str]] = {}
    for peft_type, cls in ADAPTER_TYPES.items():
        for option, field_name in cls.cli_options.items():
            options.setdefault(option, {})[peft_type] = field_name
    return options


def config_from_options(name: str, options: dict[str, Any], targets: list[str] | str | None = None) -> AdapterConfig:
    """A config of the type ``name`` with CLI option values set; an option the type lacks is an error naming it."""
    config = config_for(name)
    fields: dict[str, Any] = {"target_modules": targets}
    for option, value in options.items():
        field_name = cli_option_fields().get(option, {}).get(config.peft_type)
        if field_name is None:
            raise AdapterError(f"--{option.replace('_', '-')}: not an option of --adapter {name}")
        fields[field_name] = value
    return dataclasses.replace(config, **fields)  # re-runs the config's own validation


def config_from_dict(d: dict, source: str = "adapter config") -> AdapterConfig:
    """An adapter config from a PEFT config dict; ``source`` names the file in errors.

    Every field is honoured or refused by name before any model is touched (see ``AdapterConfig.from_dict``).
    """
    peft_type = d.get("peft_type")
    if peft_type is None:
        raise AdapterError(f"{source}: no field 'peft_type': {what_it_is(d)}")
    name = str(peft_type).upper()
    cls = ADAPTER_TYPES.get(name)
    if cls is None:
        kind = f" ({OTHER_PEFT_TYPES[name]})" if name in OTHER_PEFT_TYPES else ""
        raise AdapterError(
            f"{source}: peft_type {peft_type!r}{kind} is not supported; loraloom reads {sorted(ADAPTER_TYPES)}"
        )
    return cls.from_dict(d, source)
