"""One LoRA module read as the exact update it makes on the stored base model, or refused by name.

A module trained from PEFT's default init changes a layer's weight W by s·B·A, and composing such modules
(LoraHub, the merge operators, serving) only needs A, B and s. Other modules do not fit that picture:

- PiSSA and OLoRA start from a piece of W and leave W - s·B0·A0 in the base (PEFT re-derives it from W when
  loading), so their update on the stored W is s·(B·A - B0·A0) = s·[B, -B0]·[A; A0]: a plain LoRA of rank
  2r, PEFT's own conversion (``subtract_mutated_init``). With the base model given, that is what is read.
- DoRA's update m/||W + s·B·A||·(W + s·B·A) - W is no product of two small matrices: it is read with its
  magnitude and the base weight, for the operators that work on whole updates (``LoraTerm.delta``).
- "pissa_niter_N" (a randomised SVD), CorDA, LoftQ and LoRA-GA changed the base with a random draw, data or
  quantization loraloom does not have: such modules are refused, naming the field.

Every refusal names the module and the config field.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters.base import ADAPTABLE_LAYERS, AdapterError, AdapterLayer
from ..adapters.lora import LoraConfig, is_pissa, lora_scaling
from ..adapters.lora_init import factors_from_base
from ..adapters.peft_format import KEY_PREFIX, normalise_key, read_adapter

# <prefix><layer path>.<one of LoRA's tensors>
_LORA_KEY = re.compile(
    rf"^{re.escape(KEY_PREFIX)}(?P<layer>.+)\.(?P<what>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)$"
)
_WHAT = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "bias", "lora_magnitude_vector": "magnitude"}

# init_lora_weights values whose A0, B0 the base model gives back exactly (full SVD, QR).
RESIDUAL_INITS = ("pissa", "olora")
# init_lora_weights values whose base was changed with something loraloom cannot re-derive.
UNDERIVABLE_INITS = {
    "corda": "CorDA changed the base weight with calibration data",
    "loftq": "LoftQ replaced the base weight with a quantized one",
    "lora_ga": "LoRA-GA changed the base weight with gradients of training data",
}


@dataclass
class LoraTerm:
    """One module's LoRA on one layer, as plain LoRA: the update on the stored base is s·B·A (+ s·bias),
    except for DoRA, whose update ``delta`` computes from the magnitude and the base weight."""

    A: torch.Tensor  # r x d_in (fp32)
    B: torch.Tensor  # d_out x r (fp32)
    scaling: float
    bias: torch.Tensor | None = None  # lora_B.bias (lora_bias=True), unscaled
    magnitude: torch.Tensor | None = None  # DoRA's m, one per output channel
    base: torch.Tensor | None = None  # DoRA: the stored base weight, d_out x d_in (fp32)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The exact update on the stored base weight, d_out x d_in (fp32)."""
        lora = self.scaling * (self.B @ self.A)
        if self.magnitude is None:
            return lora
        adapted = self.base + lora
        return (self.magnitude / torch.linalg.norm(adapted, dim=1))[:, None] * adapted - self.base

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.bias is None else self.scaling * self.bias


@dataclass
class LoraModule:
    """A module's terms per adapted layer, in the file's order."""

    name: str
    config: LoraConfig
    layers: dict[str, LoraTerm]

    @property
    def is_dora(self) -> bool:
        return bool(self.config.use_dora)


def _refuse(name: str, field: str, value: object, why: str) -> AdapterError:
    return AdapterError(f"module {name}: {field}={value!r}: {why}")


def check_composable(name: str, config: LoraConfig, base_model: nn.Module | None) -> None:
    """Refuse a module whose update on the stored base cannot be read exactly, naming the field."""
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"module {name}: peft_type {config.peft_type!r}; only LORA modules can be composed")
    init = config.init_lora_weights
    if init in UNDERIVABLE_INITS:
        raise _refuse(name, "init_lora_weights", init, UNDERIVABLE_INITS[init] + " that loraloom does not have")
    if is_pissa(init) and init != "pissa":
        raise _refuse(
            name,
            "init_lora_weights",
            init,
            "a randomised SVD left the residual base, which cannot be re-derived "
            "exactly; convert it to plain LoRA with PEFT's path_initial_model_for_weight_conversion",
        )
    if (init in RESIDUAL_INITS or config.use_dora) and base_model is None:
        field, value = ("use_dora", True) if config.use_dora else ("init_lora_weights", init)
        raise _refuse(name, field, value, "its update depends on the base weight: pass the base model")
    if config.bias != "none":
        raise _refuse(name, "bias", config.bias, "the module trains the base model's biases, which cannot be composed")
    if config.modules_to_save:
        raise _refuse(
            name, "modules_to_save", config.modules_to_save, "whole trained layers cannot be composed with weights"
        )


def split_lora_tensors(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {"A", "B"[, "bias", "magnitude"]: tensor}} from PEFT-keyed tensors; anything else refused."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(normalise_key(key))
        if m is None:
            raise AdapterError(
                f"module {name}: tensor {key!r} is not a LoRA A/B weight of a linear layer; only those can be "
                "composed (no modules_to_save, trained biases, embeddings or convolutions)"
            )
        layers.setdefault(m["layer"], {})[_WHAT[m["what"]]] = t.float()
    for layer, parts in layers.items():
        for need in ("A", "B"):
            if need not in parts:
                raise AdapterError(f"module {name}: layer {layer!r} has no lora_{need} weight")
        if parts["A"].ndim != 2 or parts["B"].ndim != 2:
            raise AdapterError(f"module {name}: layer {layer!r} is not a linear layer (lora_A is {parts['A'].ndim}-D)")
    return layers


def _base_layer(name: str, base_model: nn.Module, layer: str) -> nn.Module:
    try:
        base = base_model.get_submodule(layer)
    except AttributeError:
        raise AdapterError(
            f"module {name}: layer {layer!r} does not exist in {type(base_model).__name__} "
            "(module trained for a different base model?)"
        ) from None
    if isinstance(base, AdapterLayer):
        raise AdapterError(f"layer {layer!r} already carries an adapter; merge_and_unload it first")
    if not isinstance(base, ADAPTABLE_LAYERS):
        raise AdapterError(f"module {name}: layer {layer!r} is a {type(base).__name__}, not a linear layer")
    return base


def base_weight(base: nn.Module) -> torch.Tensor:
    """A Linear's or Conv1D's weight as a d_out x d_in fp32 matrix."""
    w = base.weight.detach().float()
    return w.T if isinstance(base, Conv1D) else w


def module_from_tensors(
    name: str, config: LoraConfig, tensors: dict[str, torch.Tensor], base_model: nn.Module | None = None
) -> LoraModule:
    """A module's exact terms from its config and PEFT-keyed tensors (see the module docstring)."""
    check_composable(name, config, base_model)
    layers = {}
    for layer, parts in split_lora_tensors(name, tensors).items():
        r, alpha = config.rank_and_alpha(layer)
        A, B = parts["A"], parts["B"]
        if A.shape[0] != r or B.shape[1] != r:
            raise AdapterError(
                f"module {name}: layer {layer!r} has rank {A.shape[0]} but its config says r={r} (rank_pattern?)"
            )
        term = LoraTerm(A, B, lora_scaling(r, alpha, config.use_rslora), bias=parts.get("bias"))
        if base_model is not None:
            base = _base_layer(name, base_model, layer)
            w = base_weight(base)
            if w.shape != (B.shape[0], A.shape[1]):
                raise AdapterError(
                    f"module {name}: layer {layer!r} maps {A.shape[1]} -> {B.shape[0]} features but the base "
                    f"model's layer maps {w.shape[1]} -> {w.shape[0]} (module trained for a different base model?)"
                )
            if config.init_lora_weights in RESIDUAL_INITS:
                term.A, term.B = _with_initial_factors(name, config, layer, base, A, B)
            if config.use_dora:
                if "magnitude" not in parts:
                    raise AdapterError(f"module {name}: use_dora=True but layer {layer!r} has no lora_magnitude_vector")
                term.magnitude, term.base = parts["magnitude"].reshape(-1), w
        layers[layer] = term
    if not layers:
        raise AdapterError(f"module {name}: holds no LoRA weights")
    return LoraModule(name, config, layers)


def _with_initial_factors(
    name: str, config: LoraConfig, layer: str, base: nn.Module, A: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """([A; A0], [B, -B0]): the PiSSA/OLoRA module as plain LoRA on the original base (rank 2r)."""
    probe = config.make_empty_layer(layer, base)  # A = B = 0 around the base layer: reads W, changes nothing
    try:
        A0, B0 = factors_from_base(probe, config.init_lora_weights)
    except AdapterError as e:
        raise AdapterError(f"module {name}: layer {layer!r}: {e}") from e
    return torch.cat([A, A0.float()]), torch.cat([B, -B0.float()], dim=1)


def read_module(path_or_id: str | os.PathLike, base_model: nn.Module | None = None) -> LoraModule:
    """Read one PEFT LoRA folder (or hub id) as exact terms; ``base_model`` is needed for PiSSA, OLoRA
    and DoRA modules (and checks the shapes of every module)."""
    config, tensors, _ = read_adapter(path_or_id)
    return module_from_tensors(str(path_or_id), config, tensors, base_model)


__all__ = ["LoraModule", "LoraTerm", "base_weight", "check_composable", "module_from_tensors", "read_module"]
