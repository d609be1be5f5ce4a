"""The composed layer: y = W0·x + s·B_hat·A_hat·x with A_hat = Σ w_i·A_i and B_hat = Σ w_i·B_i.

LoraHub's COMPOSE step (the update has cross terms w_i·w_j·B_i·A_j; it is not Σ w_i·B_i·A_i). The
layers are installed once in the base model and hold the bank's stacks as read-only buffers; an
evaluation only sets the weights and runs the model.

Population mode: ``w`` is P x N, one row per candidate. The batch is then the few-shot batch repeated P
times, candidate-major, and each layer runs the rows of candidate p through its own (A_hat[p], B_hat[p])
with one batched matmul: P candidates cost one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..adapters.base import AdapterError, AdapterLayer, check_mergeable
from ..adapters.inject import free_layer, install_layers, uninstall_layers
from ..adapters.lora import lora_delta, lora_forward
from .bank import ModuleBank, _weighted_sum


def as_population(weights: torch.Tensor | Sequence[float], n: int) -> torch.Tensor:
    """Weights as a P x N float tensor (a single vector of N becomes P = 1); autograd is kept."""
    w = torch.as_tensor(weights, dtype=torch.float32) if not isinstance(weights, torch.Tensor) else weights.float()
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"expected weights of shape ({n},) or (P, {n}), got {tuple(w.shape)}")
    return w


class ComposedLoraLayer(AdapterLayer):
    """A base layer plus the weighted composition of the bank's modules for this layer."""

    def __init__(self, base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        super().__init__(base_layer)
        # The bank's stacks, shared (not copied) and never written to. Not in the state dict.
        self.register_buffer("bank_A", A, persistent=False)  # N x r x d_in
        self.register_buffer("bank_B", B, persistent=False)  # N x d_out x r
        self.scaling = scaling
        self.A_hat: torch.Tensor | None = None  # P x r x d_in
        self.B_hat: torch.Tensor | None = None  # P x d_out x r

    def set_weights(self, w: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Compose for the P x N weights ``w`` (autograd flows to ``w`` if it requires grad)."""
        dtype = dtype or self.bank_A.dtype
        self.A_hat = _weighted_sum(w, self.bank_A).to(dtype)
        self.B_hat = _weighted_sum(w, self.bank_B).to(dtype)

    def clear(self) -> None:
        self.A_hat = self.B_hat = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.A_hat is None:
            return y
        # P candidates: the batch is candidate-major, the rows of candidate i contiguous.
        return y + lora_forward(x.to(self.A_hat.dtype), self.A_hat, self.B_hat, self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s·B_hat·A_hat (d_out x d_in, fp32) for a single composition, as merge needs."""
        if self.A_hat is None or self.A_hat.shape[0] != 1:
            raise AdapterError("merge needs exactly one composition: set one weight vector first")
        return lora_delta(self.A_hat[0], self.B_hat[0], self.scaling)  # the one LoRA update, as LoraLayer's

    def extra_repr(self) -> str:
        n, r = self.bank_A.shape[:2]
        return f"{super().extra_repr()}, modules={n}, r={r}, scaling={self.scaling:g}"


class Composition:
    """The bank installed in a model: set the weights, run the model, and finally merge or remove.

    Installing swaps each target layer for a ``ComposedLoraLayer`` (in place, once); ``remove`` puts the
    base layers back. Use as a context manager to make sure the model is restored.
    """

    def __init__(self, model: nn.Module, bank: ModuleBank, layer_groups: str | int | None = None) -> None:
        bank.check_base(model)
        self.model, self.bank, self.layer_groups = model, bank, layer_groups
        self.group_names, self.group_of = bank.groups(layer_groups)  # group_of: one index per bank layer
        self.layers: dict[str, ComposedLoraLayer] = {}
        for name in bank.layers:
            base = free_layer(model, name)  # before building on it
            device = base.weight.device
            self.layers[name] = ComposedLoraLayer(
                base, bank.A[name].to(device), bank.B[name].to(device), bank.scaling[name]
            )
        install_layers(model, self.layers)

    @property
    def n_weights(self) -> int:
        """Weights per candidate: one per module, per layer group (group-major)."""
        return len(self.bank) * len(self.group_names)

    def set_weights(self, weights: torch.Tensor | Sequence[float], dtype: torch.dtype | None = None) -> None:
        """Weights of shape W (one composition) or P x W (population), W = ``n_weights``; ``dtype`` is the
        compute dtype."""
        w = as_population(weights, self.n_weights).to(self.device)
        w = w.view(w.shape[0], len(self.group_names), len(self.bank))
        for layer, g in zip(self.layers.values(), self.group_of, strict=True):
            layer.set_weights(w[:, g], dtype)

    def clear(self) -> None:
        """Drop the composed tensors: the model runs as the base model until weights are set again."""
        for layer in self.layers.values():
            layer.clear()

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).bank_A.device

    def merge(self, weights: torch.Tensor | Sequence[float]) -> nn.Module:
        """Merge the composition for ``weights`` into the base weights and remove the layers."""
        w = self.bank.check_weights(weights, layer_groups=self.layer_groups)
        for name, layer in self.layers.items():
            check_mergeable(name, layer.base_layer.weight)
        with torch.no_grad():
            self.set_weights(w)
            for layer in self.layers.values():
                layer.merge()
        return self.remove()

    def remove(self) -> nn.Module:
        """Put the base layers back (merged deltas stay in their weights); returns the model."""
        uninstall_layers(self.model, self.layers)
        for layer in self.layers.values():
            layer.clear()
        return self.model

    def __enter__(self) -> Composition:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


__all__ = ["ComposedLoraLayer", "Composition", "as_population"]
