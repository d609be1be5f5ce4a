"""What every adapter type shares: the config fields PEFT writes for all types, and the layer protocol.

An adapter layer wraps one frozen base layer (``nn.Linear`` or transformers' ``Conv1D``) and keeps it
as ``base_layer``, so state-dict keys look like PEFT's and ``merge_and_unload`` can put it back.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import AdapterError
from .schema import check_fields

ADAPTABLE_LAYERS = (nn.Linear, Conv1D)


# PeftConfig fields every adapter_config.json may carry that change nothing loraloom computes. They are
# read and dropped on purpose (each with the reason), so that no field is ever dropped silently.
PEFT_METADATA_FIELDS: dict[str, str] = {
    "peft_version": "the PEFT version that wrote the file",
    "inference_mode": "PEFT's trainable flag; loraloom's train() decides what trains",
    "runtime_config": "PEFT runtime options, never saved by PEFT",
}


def is_unset(value: Any) -> bool:
    """True for the values PEFT writes for a feature that is off: None, False, "" and empty containers."""
    return value is None or value is False or (isinstance(value, (str, list, tuple, dict, set)) and len(value) == 0)


@dataclass
class AdapterConfig:
    """Fields common to every adapter type, named as in PEFT's ``adapter_config.json``.

    A config is a value: ``add_adapter`` never changes the one it is given; the model keeps its own
    resolved copy (targets, task type, base name filled in), and that copy is what ``save_adapter`` writes.
    """

    peft_type: ClassVar[str] = ""
    # The base layer types this adapter type can wrap (target_modules naming another type is an error).
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = ADAPTABLE_LAYERS
    # PEFT fields of this type that loraloom cannot honour, with the reason: a file that sets one (to
    # anything but PEFT's "off" value) is refused by name before any weight is touched.
    refused_fields: ClassVar[dict[str, str]] = {}
    # PEFT fields of this type that have no effect on what loraloom computes (besides PEFT_METADATA_FIELDS).
    ignored_fields: ClassVar[dict[str, str]] = {}
    # The trainer's learning rate for this type when none is given.
    default_lr: ClassVar[float] = 1e-4
    # ``loraloom train`` options that set a field of this type: option name -> config field.
    cli_options: ClassVar[dict[str, str]] = {}

    # Matched against each module's dotted path: a list matches a whole path or its suffix after a ".", a
    # string is a regex that must match the whole path (PEFT's rule). None picks the model type's default.
    target_modules: list[str] | str | None = None
    # Same rule; a module matched here is never adapted, even when target_modules matches it.
    exclude_modules: list[str] | str | None = None
    # Modules trained fully and saved beside the adapter (e.g. a classifier head).
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None  # of the base model; kept and saved as given
    # PEFT writes {"base_model_class": ..., "parent_library": ...} when task_type is None: it names the
    # model class the adapter was trained on (loraloom reads the task from it).
    auto_mapping: dict[str, Any] | None = None
    # Conv1D layers (GPT-2) store their weight transposed; add_adapter sets this from the layers it adapts.
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        if isinstance(self.modules_to_save, list):  # PEFT writes [classifier, score, classifier, score] at times
            self.modules_to_save = list(dict.fromkeys(self.modules_to_save))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
        """Build from a PEFT config dict; ``source`` (the file) is named in every error.

        Every key is accounted for: a field of this type is kept; a PEFT field loraloom cannot honour is
        refused by name if set; metadata and fields without effect are dropped on purpose; any other key
        (a newer PEFT's, a hand-written one) is dropped with a warning if it holds a value.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        names = set(fields)
        # An explicit null for a field whose default is not None (hand-written files) means the default.
        kwargs = {k: v for k, v in d.items() if k in names and not (v is None and fields[k].default is not None)}
        for key, value in d.items():
            if key in names or key == "peft_type" or key in PEFT_METADATA_FIELDS or key in cls.ignored_fields:
                continue
            if key in cls.refused_fields:
                if not is_unset(value):
                    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                    raise AdapterError(
                        f"{source}: field {key!r} = {shown} is not supported by loraloom ({cls.refused_fields[key]})"
                    )
                continue
            if not is_unset(value):
                warnings.warn(
                    f"{source}: field {key!r} is not a field of PEFT's {cls.__name__} that loraloom knows; ignored",
                    stacklevel=2,
                )
        for key, value in kwargs.items():
            check_json_type(fields[key], value, source)

        check_fields(kwargs, source)
        try:
            config = cls(**kwargs)
        except AdapterError as e:
            raise AdapterError(f"{source}: {e}") from e
        except (TypeError, ValueError) as e:
            raise AdapterError(f"{source}: {e}") from e
        return config

    def fill_model_defaults(self, model_type: str | None) -> None:
        """Fill fields left unset whose PEFT default depends on the model type (each type's own table).

        ``add_adapter`` calls it on its private copy of the config, never on the caller's.
        """

    def make_layer(self, name: str, base_layer: nn.Module) -> AdapterLayer:
        raise NotImplementedError

    def make_empty_layer(self, name: str, base_layer: nn.Module) -> AdapterLayer:
        """A layer whose weights are loaded right after: no initialisation that reads or changes the base."""
        return self.make_layer(name, base_layer)

    def init_layer(self, name: str, layer: AdapterLayer) -> None:
        """Initialisation that reads or rewrites the base weight (LoRA's PiSSA / OLoRA), run by ``add_adapter``
        once every layer is built, so that a layer refused on the way leaves no base weight changed."""

    def check_file_shapes(self, shapes: dict[str, tuple[int, ...]], source: str) -> None:
        """Check the sizes this config declares (a rank, a number of frequencies) against the weights file's
        tensor shapes (PEFT keys, from the header) before any layer is allocated: a config of r=1e6 beside a
        rank-8 file would otherwise allocate gigabytes before the shape check. Nothing to check by default."""

    def prepare_loaded(self, layer: AdapterLayer) -> None:
        """Called for each layer after saved weights are loaded into it: what PEFT does to the base at load
        time for this config (LoRA's PiSSA/OLoRA re-derive the residual base weight). Nothing by default."""


def check_json_type(spec: dataclasses.Field, value: Any, source: str) -> None:
    """A config field read from JSON has its declared type: "16" is not a number and "false" is not a boolean
    (a non-empty string would switch a flag on); numbers are finite. The error names the field."""
    kinds = {part.strip() for part in str(spec.type).split("|")}
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if value is None and "None" in kinds:
        return
    if kinds == {"bool"}:
        if not isinstance(value, bool):
            raise AdapterError(f"{source}: field {spec.name!r} must be true or false, got {shown}")
    elif kinds - {"None"} and kinds - {"None"} <= {"int", "float"}:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AdapterError(f"{source}: field {spec.name!r} must be a number, got {shown}")
        if not math.isfinite(value):
            raise AdapterError(f"{source}: field {spec.name!r} must be finite, got {shown}")
        if "float" not in kinds and not float(value).is_integer():
            raise AdapterError(f"{source}: field {spec.name!r} must be an integer, got {shown}")


def layer_dims(base_layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or a Conv1D (whose weight is stored d_in x d_out); for a Conv2d its
    channels, for an Embedding (vocabulary, embedding size), as PEFT counts them."""
    if isinstance(base_layer, Conv1D):
        d_in, d_out = base_layer.weight.shape
        return d_in, d_out
    if isinstance(base_layer, nn.Conv2d):
        return base_layer.in_channels, base_layer.out_channels
    if isinstance(base_layer, nn.Embedding):
        return base_layer.num_embeddings, base_layer.embedding_dim
    return base_layer.in_features, base_layer.out_features


def is_quantized(weight: torch.Tensor) -> bool:
    """A weight held in a quantized tensor subclass (torchao's Int8Tensor, ...), not plain floats."""
    return type(weight.data) is not torch.Tensor


def check_mergeable(name: str, weight: torch.Tensor) -> None:
    """Merging adds a delta to the base weight in place, which a quantized weight cannot take exactly."""
    if is_quantized(weight):
        raise AdapterError(
            f"layer {name!r}: the base weight is quantized ({type(weight.data).__name__}), so the adapter cannot be "
            "merged into it; load the base without quantization to merge (the adapter folder is the same)"
        )


def check_dense(name: str, base_layer: nn.Module, needs: str) -> None:
    """An adapter whose forward reads the base weight's values (DoRA's norm, FourierFT's W + ΔW) needs them
    as plain floats; on a quantized base it is refused by name (PEFT refuses the same)."""
    weight = getattr(base_layer, "weight", None)
    if weight is not None and is_quantized(weight):
        raise AdapterError(
            f"layer {name!r}: {needs} needs the base weight in full precision, but it is quantized "
            f"({type(weight.data).__name__}); use plain LoRA or IA3 on a quantized base"
        )


class AdapterLayer(nn.Module):
    """Base of every adapter layer: holds the frozen base layer and the merge bookkeeping.

    Subclasses define ``forward`` and ``delta_weight`` (the update in the d_out x d_in layout of
    ``nn.Linear``); merge and unmerge are the same for every type that adds a delta.
    """

    # Names of this type's own parameters, as they appear in PEFT's saved keys.
    adapter_param_names: ClassVar[tuple[str, ...]] = ()
    # The base layer types this layer class can wrap (LoRA adds nn.Conv2d and nn.Embedding).
    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = ADAPTABLE_LAYERS

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, self.supported_layers):
            names = " and ".join(t.__name__ for t in self.supported_layers)
            raise AdapterError(f"cannot adapt {type(base_layer).__name__} with {type(self).__name__}: only {names}")
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

    def release(self) -> None:
        """Undo whatever the layer did to its base layer beyond wrapping it; called when it is uninstalled."""

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
