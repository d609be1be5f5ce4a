"""The one registry of adapter types, keyed by PEFT's ``peft_type``."""

from __future__ import annotations

from typing import Any

from .base import AdapterConfig, AdapterError
from .fourierft import FourierFTConfig
from .ia3 import IA3Config
from .lora import LoraConfig

ADAPTER_TYPES: dict[str, type[AdapterConfig]] = {cls.peft_type: cls for cls in (LoraConfig, FourierFTConfig, IA3Config)}

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
