"""The one registry of adapter types, keyed by PEFT's ``peft_type``."""

from __future__ import annotations

from .base import AdapterConfig, AdapterError
from .fourierft import FourierFTConfig
from .ia3 import IA3Config
from .lora import LoraConfig

ADAPTER_TYPES: dict[str, type[AdapterConfig]] = {cls.peft_type: cls for cls in (LoraConfig, FourierFTConfig, IA3Config)}


def config_from_dict(d: dict, source: str = "adapter config") -> AdapterConfig:
    """An adapter config from a PEFT config dict; ``source`` names the file in errors."""
    peft_type = d.get("peft_type")
    if peft_type is None:
        raise AdapterError(f"{source}: missing field 'peft_type'")
    cls = ADAPTER_TYPES.get(str(peft_type).upper())
    if cls is None:
        raise AdapterError(f"{source}: unsupported peft_type {peft_type!r}; loraloom reads {sorted(ADAPTER_TYPES)}")
    try:
        return cls.from_dict(d)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{source}: {e}") from e
