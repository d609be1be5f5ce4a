"""The module bank: N LoRA modules read straight from their files and stacked per target layer.

For each adapted layer the bank holds ``A`` (N x r x d_in) and ``B`` (N x d_out x r), row i being module
i. Every file is read once (safetensors, or a legacy ``.bin`` through ``torch.load(weights_only=True)``);
no model is built and nothing is deep-copied. The bank is read-only: composition makes new tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.base import ADAPTABLE_LAYERS, AdapterError, layer_dims
from ..adapters.lora import INIT_BASE_CHANGED_ELSEWHERE, LoraConfig, is_pissa, lora_scaling
from ..adapters.peft_format import KEY_PREFIX, read_adapter
from .modules import split_lora_tensors

# <prefix><layer path>.lora_A.weight / .lora_B.weight
# Config fields that must agree across modules for a weighted sum of their A and B to mean anything.
_SHARED_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


@dataclass
class ModuleBank:
    """N LoRA modules of one architecture, stacked per layer."""

    names: list[str]
    config: LoraConfig  # the first module's config; the shared fields agree across the bank
    A: dict[str, torch.Tensor]  # layer path -> N x r x d_in
    B: dict[str, torch.Tensor]  # layer path -> N x d_out x r
    scaling: dict[str, float] = field(default_factory=dict)  # layer path -> alpha / r (or rsLoRA's)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def layers(self) -> list[str]:
        return list(self.A)

    def groups(self, layer_groups: str | int | None = None) -> tuple[list[str], list[int]]:
        """(group names, group index of each layer in ``layers``): see ``layer_groups``."""
        return layer_groups_of(self.layers, layer_groups)

    def n_weights(self, layer_groups: str | int | None = None) -> int:
        """How many weights a composition takes: N, or N per layer group (group-major)."""
        return len(self) * len(self.groups(layer_groups)[0])

    def composed(
        self, weights: torch.Tensor | Sequence[float], layer_groups: str | int | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (A_hat, B_hat) = (Σ w_i·A_i, Σ w_i·B_i), w being the weights of the layer's group."""
        w = self.check_weights(weights, layer_groups=layer_groups).view(-1, len(self))
        _, index = self.groups(layer_groups)
        return {
            name: (_weighted_sum(w[g], self.A[name]), _weighted_sum(w[g], self.B[name]))
            for name, g in zip(self.layers, index, strict=True)
        }

    def peft_tensors(
        self, weights: torch.Tensor | Sequence[float], layer_groups: str | int | None = None
    ) -> dict[str, torch.Tensor]:
        """The composed module under PEFT's saved key names."""
        out = {}
        for name, (a, b) in self.composed(weights, layer_groups).items():
            out[f"{KEY_PREFIX}{name}.lora_A.weight"] = a
            out[f"{KEY_PREFIX}{name}.lora_B.weight"] = b
        return out

    def check_weights(
        self, weights: torch.Tensor | Sequence[float], source: str = "weights", layer_groups: str | int | None = None
    ) -> torch.Tensor:
        """One weight per module (per layer group), finite, as a float32 tensor; a clear error otherwise."""
        w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
        n = self.n_weights(layer_groups)
        if w.ndim != 1 or w.numel() != n:
            per = (
                "one per module"
                if n == len(self)
                else f"one per module per layer group: {n // len(self)} x {len(self)}"
            )
            raise ValueError(f"{source}: expected {n} weights ({per}), got shape {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError(f"{source}: weights must be finite, got {w.tolist()}")
        return w

    def check_base(self, model: nn.Module) -> None:
        """Every bank layer exists in ``model`` as a Linear/Conv1D whose shape fits the modules."""
        modules = dict(model.named_modules())
        for name in self.A:
            layer = modules.get(name)
            if layer is None:
                raise AdapterError(
                    f"module {self.names[0]}: layer {name!r} does not exist in {type(model).__name__} "
                    "(modules trained for a different base model?)"
                )
            base = getattr(layer, "base_layer", layer)  # an already adapted layer is reported by the installer
            if not isinstance(base, ADAPTABLE_LAYERS):
                raise AdapterError(
                    f"module {self.names[0]}: layer {name!r} is a {type(base).__name__}, not a linear layer"
                )
            d_in, d_out = layer_dims(base)
            k, d = self.A[name].shape[2], self.B[name].shape[1]
            if (k, d) != (d_in, d_out):
                raise AdapterError(
                    f"module {self.names[0]}: layer {name!r} maps {k} -> {d} features but the base model's layer "
                    f"maps {d_in} -> {d_out} (modules trained for a different base model?)"
                )


def check_layer_groups(spec: str | int | None) -> None:
    """None, "stack" or a positive int k (see ``layer_groups``); a clear error otherwise."""
    if spec is None or spec == "stack":
        return
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
        raise ValueError(f"layer_groups must be None, 'stack' or a positive number of layers, got {spec!r}")


def layer_groups_of(layers: Sequence[str], spec: str | int | None) -> tuple[list[str], list[int]]:
    """(group names, the group index of each layer) for per-layer-group weights.

    None: one group ("all"). "stack": one per stack (``encoder`` / ``decoder`` in a layer's path, else
    one, "layers"). k: one per k consecutive blocks of each stack, a block being the first number in the
    path (``encoder.block.3....`` is block 3 of the encoder). Groups are ordered encoder first, then by
    block, whatever the order of the layers.
    """
    check_layer_groups(spec)
    keys: list[tuple[int, int, str]] = []  # per layer: (stack rank, first block of the group, group name)
    for layer in layers:
        parts = layer.split(".")
        stack = next((p for p in parts if p in ("encoder", "decoder")), "layers")
        block = next((int(p) for p in parts if p.isdigit()), 0)
        if spec is None:
            keys.append((0, 0, "all"))
        elif spec == "stack":
            keys.append((stack == "decoder", 0, stack))
        else:
            first = block // spec * spec
            keys.append((stack == "decoder", first, f"{stack}[{first}:{first + spec}]"))
    ordered = sorted(set(keys))
    names = [name for _, _, name in ordered]
    return names, [ordered.index(key) for key in keys]


def _weighted_sum(w: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i · stacked[i] as one matmul over the flattened rows (w: N, or P x N)."""
    n = stacked.shape[0]
    flat = stacked.reshape(n, -1)
    out = w.to(flat.dtype) @ flat
    return out.reshape(*w.shape[:-1], *stacked.shape[1:])


def _split_keys(tensors: dict[str, torch.Tensor], name: str) -> dict[str, dict[str, torch.Tensor]]:
    """{layer path: {"A": tensor, "B": tensor}} from a module's PEFT-keyed tensors; plain LoRA only."""
    layers = split_lora_tensors(name, tensors)
    for layer, parts in layers.items():
        extra = sorted(set(parts) - {"A", "B"})
        if extra:  # a bias or DoRA magnitude whose config did not say so: not part of B·A either
            raise AdapterError(f"module {name}: layer {layer!r} also holds {extra}; LoraHub composes plain LoRA")
    return layers


def list_pool(pool: str | os.PathLike) -> list[str]:
    """The module folders (those holding an adapter_config.json) directly inside ``pool``, sorted."""
    root = Path(pool)
    if not root.is_dir():
        raise AdapterError(f"module pool {root}: not a directory")
    folders = sorted(str(p.parent) for p in root.glob("*/adapter_config.json"))
    if not folders:
        raise AdapterError(f"module pool {root}: no module folders (subfolders with adapter_config.json)")
    return folders


def check_composable(name: str | os.PathLike, config: LoraConfig) -> None:
    """One error naming the module and the field when its update is not (alpha/r)·B·A on the stored base:
    Σw·A, Σw·B of such modules would be composed against the wrong base (PiSSA, OLoRA, LoftQ, CorDA leave a
    residual base of their own) or without their magnitude (DoRA) or bias (lora_bias)."""
    init = config.init_lora_weights
    if is_pissa(init) or init == "olora" or init in INIT_BASE_CHANGED_ELSEWHERE:
        why = f"init_lora_weights={init!r}: it was trained on a residual base, not the stored one"
    elif config.use_dora:
        why = "use_dora=true: DoRA rescales each output channel, which a sum of A and B cannot carry"
    elif config.lora_bias:
        why = "lora_bias=true: its bias in lora_B is not part of B·A"
    else:
        return
    raise AdapterError(f"module {name}: {why}; LoraHub composes plain LoRA modules (merge this one into a base first)")


def load_bank(
    modules: Sequence[str | os.PathLike],
    *,
    base_model: nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> ModuleBank:
    """Read N LoRA modules (PEFT folders or hub ids) into a bank, checking they can be composed.

    All modules must be LoRA with the same target layers, rank and alpha, and (if ``base_model`` is
    given) shapes that fit it. Errors name the module and the layer.
    """
    if isinstance(modules, (str, os.PathLike)):
        raise TypeError("modules: expected a list of module folders or hub ids, got a single path")
    names = [str(m) for m in modules]
    if not names:
        raise ValueError("no LoRA modules given: LoraHub needs at least one module to compose")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"module {dup} is listed twice")

    first_config: LoraConfig | None = None
    first_layers: dict[str, dict[str, torch.Tensor]] = {}
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for i, name in enumerate(tqdm(names, desc="loading modules", unit="module", disable=not progress)):
        config, tensors, _ = read_adapter(name)
        if not isinstance(config, LoraConfig):
            raise AdapterError(f"module {name}: peft_type {config.peft_type!r}; LoraHub composes LORA modules")
        check_composable(name, config)
        layers = _split_keys(tensors, name)
        if first_config is None:
            first_config, first_layers = config, layers
            # Preallocate the stacks; each module's tensors are copied into its row once.
            for layer, ab in layers.items():
                A[layer] = torch.empty((len(names), *ab["A"].shape), dtype=dtype)
                B[layer] = torch.empty((len(names), *ab["B"].shape), dtype=dtype)
        else:
            _check_same_architecture(name, config, layers, names[0], first_config, first_layers)
        for layer, ab in layers.items():
            A[layer][i].copy_(ab["A"])
            B[layer][i].copy_(ab["B"])

    assert first_config is not None
    scaling = {}
    for layer in A:
        r, alpha = first_config.rank_and_alpha(layer)
        if A[layer].shape[1] != r:
            raise AdapterError(
                f"module {names[0]}: layer {layer!r} has rank {A[layer].shape[1]} but its config says r={r}"
            )
        scaling[layer] = lora_scaling(r, alpha, first_config.use_rslora)
    bank = ModuleBank(names=names, config=first_config, A=A, B=B, scaling=scaling)
    if base_model is not None:
        bank.check_base(base_model)
    return bank


def _check_same_architecture(
    name: str,
    config: LoraConfig,
    layers: dict[str, dict[str, torch.Tensor]],
    first_name: str,
    first_config: LoraConfig,
    first_layers: dict[str, dict[str, torch.Tensor]],
) -> None:
    for f in _SHARED_FIELDS:
        if getattr(config, f) != getattr(first_config, f):
            raise AdapterError(
                f"module {name}: {f}={getattr(config, f)!r} but module {first_name} has {f}={getattr(first_config, f)!r}; "
                "LoraHub composes modules of one rank and alpha"
            )
    missing = sorted(set(first_layers) - set(layers))
    extra = sorted(set(layers) - set(first_layers))
    if missing or extra:
        which = f"lacks layer {missing[0]!r}" if missing else f"adapts layer {extra[0]!r}"
        raise AdapterError(
            f"module {name}: {which} that module {first_name} {'adapts' if missing else 'does not'} "
            f"({len(missing)} missing, {len(extra)} extra); LoraHub composes modules with the same target layers"
        )
    for layer, ab in layers.items():
        for which in ("A", "B"):
            got, want = ab[which].shape, first_layers[layer][which].shape
            if got != want:
                raise AdapterError(
                    f"module {name}: layer {layer!r} lora_{which} has shape {tuple(got)} but module {first_name} "
                    f"has {tuple(want)} (different rank or base model)"
                )


__all__ = ["ModuleBank", "check_layer_groups", "layer_groups_of", "list_pool", "load_bank"]
