"""Adapter types (one file each), their injection into a model, and the PEFT file format."""

from .base import AdapterConfig, AdapterError, AdapterLayer
from .fourierft import FourierFTConfig, FourierFTLayer
from .ia3 import IA3Config, IA3Layer
from .inject import (
    adapter_layers,
    add_adapter,
    count_parameters,
    get_config,
    merge,
    merge_and_unload,
    remove_adapter,
    unmerge,
)
from .lora import LoraConfig, LoraLayer
from .peft_format import load_adapter, read_adapter, save_adapter, write_adapter_folder
from .registry import ADAPTER_TYPES, adapter_names, config_for, config_from_dict, register

__all__ = [
    "ADAPTER_TYPES",
    "AdapterConfig",
    "AdapterError",
    "AdapterLayer",
    "FourierFTConfig",
    "FourierFTLayer",
    "IA3Config",
    "IA3Layer",
    "LoraConfig",
    "LoraLayer",
    "adapter_layers",
    "add_adapter",
    "adapter_names",
    "config_for",
    "config_from_dict",
    "count_parameters",
    "get_config",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "read_adapter",
    "register",
    "remove_adapter",
    "save_adapter",
    "unmerge",
    "write_adapter_folder",
]
