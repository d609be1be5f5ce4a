"""What every adapter type shares: the config fields PEFT writes for all types, and the layer protocol.

An adapter layer wraps one frozen base layer (``nn.Linear`` or transformers' ``Conv1D``) and keeps it
as ``base_layer``, so state-dict keys look like PEFT's and ``merge_and_unload`` can put it back.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

ADAPTABLE_LAYERS = (nn.Linear, Conv1D)


class AdapterError(ValueError):
    """Bad adapter input: a config field, a file, a layer or a shape that does not fit."""


@dataclass
class AdapterConfig:
    """Fields common to every adapter type, named as in PEFT's ``adapter_config.json``."""

    peft_type: ClassVar[str] = ""
    # Matched against each module's dotted path: a list matches on the path's suffix, a string is a
    # regex that must match the whole path (PEFT's rule). None picks the model type's default.
    target_modules: list[str] | str | None = None
    # Modules trained fully and saved beside the adapter (e.g. a classifier head).
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    fan_in_fan_out: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        if isinstance(d.get("target_modules"), set):
            d["target_modules"] = sorted(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """Build from a PEFT config dict; keys this type does not know are ignored (newer PEFT)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if isinstance(kwargs.get("target_modules"), (set, tuple)):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        return cls(**kwargs)

    def fill_model_defaults(self, model_type: str | None) -> None:
        """Fill fields left unset whose PEFT default depends on the model type (PEFT's per-type tables).

        Called by ``add_adapter`` before LoRA's default targets apply; types with other defaults override it.
        """

    def make_layer(self, name: str, base_layer: nn.Module) -> AdapterLayer:
        raise NotImplementedError


def layer_dims(base_layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or a Conv1D (whose weight is stored d_in x d_out)."""
    if isinstance(base_layer, Conv1D):
        d_in, d_out = base_layer.weight.shape
        return d_in, d_out
    return base_layer.in_features, base_layer.out_features


class AdapterLayer(nn.Module):
    """Base of every adapter layer: holds the frozen base layer and the merge bookkeeping.

    Subclasses define ``forward`` and ``delta_weight`` (the update in the d_out x d_in layout of
    ``nn.Linear``); merge and unmerge are the same for every type that adds a delta.
    """

    # Names of this type's own parameters, as they appear in PEFT's saved keys.
    adapter_param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, ADAPTABLE_LAYERS):
            raise AdapterError(f"cannot adapt {type(base_layer).__name__}: only nn.Linear and Conv1D are supported")
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_dims(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:  # some model code reads `.weight` of its projections
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _apply_delta(self, sign: float) -> None:
        delta = self.delta_weight().detach()
        if self.fan_in_fan_out:
            delta = delta.T
        w = self.base_layer.weight
        w.data += sign * delta.to(w.dtype)

    def merge(self) -> None:
        if not self.merged:
            self._apply_delta(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._apply_delta(-1.0)
            self.merged = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


def kaiming_uniform_(t: torch.Tensor) -> None:
    """nn.Linear's default init, which PEFT uses for lora_A."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """Value for ``module_name`` from a PEFT ``*_pattern`` dict (key = regex on the path's suffix)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


__all__ = [
    "ADAPTABLE_LAYERS",
    "AdapterConfig",
    "AdapterError",
    "AdapterLayer",
    "kaiming_uniform_",
    "pattern_value",
]
