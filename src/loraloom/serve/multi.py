"""Many LoRA adapters in one batch: every row of the batch runs through its own adapter.

An adapter here is a ``LoraWeights``: per target layer its (A: r x d_in, B: d_out x r, scaling). It comes
from the hub's ``ModuleBank`` format: a bank of one module is one adapter, and a weight vector over a bank
of N modules is the composed adapter (Σ w_i·A_i, Σ w_i·B_i) (LoraHub without a merge).

``MultiLora`` installs a ``MultiLoraLayer`` in every layer any adapter targets. Before a forward pass,
``set_rows`` names each row's adapter (``None`` for the base model). For each layer the distinct adapters of
the batch are stacked (A: S x R x d_in, B: S x d_out x R, R the largest rank among them, smaller ranks
zero-padded, the scaling folded into B) and gathered to one stack per row with ``index_select``; that plan
is kept while the batch's rows stay the same (every decode step between a row joining or leaving). Each
forward then runs two batched matmuls per layer:

    y[b] = base(x[b]) + (x[b] @ A[slot[b]]^T) @ B[slot[b]]^T

for prefill (x: rows x T x d_in) and decode (T = 1) alike, with no Python loop over adapters (punica's
BGMV / SGMV in plain torch). Zero padding adds exact zeros, so each row gets what it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.base import AdapterError, AdapterLayer, layer_dims
from ..adapters.inject import free_layer, install_layers, uninstall_layers
from ..adapters.lora import lora_forward
from ..hub.bank import ModuleBank


@dataclass(eq=False)  # compared by identity: the batch plan is rebuilt when the set of objects changes
class LoraWeights:
    """One adapter as the batched layers use it: layer path -> (A r x d_in, B d_out x r, scaling)."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]

    @classmethod
    def from_bank(
        cls, bank: ModuleBank, weights: torch.Tensor | Sequence[float] | None = None, name: str | None = None
    ) -> LoraWeights:
        """The bank's only module (``weights`` None), or the composition Σ w_i·A_i, Σ w_i·B_i of its modules."""
        if weights is None:
            if len(bank) != 1:
                raise ValueError(f"a bank of {len(bank)} modules is one adapter only with weights over its modules")
            layers = {n: (bank.A[n][0], bank.B[n][0], bank.scaling[n]) for n in bank.layers}
        else:
            layers = {n: (a, b, bank.scaling[n]) for n, (a, b) in bank.composed(weights).items()}
        return cls(name=name or bank.names[0], layers=layers)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.layers.values())


class MultiLoraLayer(AdapterLayer):
    """A base layer plus one LoRA adapter per batch row, from stacks that ``MultiLora.set_rows`` sets."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        # Per row (rows x R x d_in, rows x d_out x R, scaling folded into B), or a single 1 x ... stack
        # when every row runs the same adapter. None: no row's adapter targets this layer.
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.A is None:
            return y
        if self.A.shape[0] not in (1, x.shape[0]):  # one adapter for every row, or one per row
            raise AdapterError(f"batch of {x.shape[0]} rows but set_rows named {self.A.shape[0]} adapters")
        return lora_forward(x.to(self.A.dtype), self.A, self.B, add_to=y)

    def delta_weight(self) -> torch.Tensor:
        raise AdapterError("a multi-adapter layer holds one adapter per row; there is no single delta to merge")

    def extra_repr(self) -> str:
        rows = 0 if self.A is None else self.A.shape[0]
        return f"{super().extra_repr()}, rows={rows}"


class MultiLora:
    """Batched multi-adapter LoRA installed in a model; ``set_rows`` before each forward pass.

    Layers are installed on first use by an adapter that targets them (shapes checked against the base),
    so adapters can be added while the model serves; ``remove`` puts the base layers back.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: dict[str, MultiLoraLayer] = {}
        self._plan_key: tuple | None = None
        w = next(model.parameters())
        self.device, self.dtype = w.device, w.dtype

    def check(self, adapter: LoraWeights) -> None:
        """Every layer of ``adapter`` exists in the model as a linear layer of matching shape."""
        for name, (a, b, _) in adapter.layers.items():
            layer = self.layers.get(name)
            if layer is None:
                try:
                    layer = free_layer(self.model, name)
                except AttributeError:
                    raise AdapterError(
                        f"adapter {adapter.name}: layer {name!r} does not exist in {type(self.model).__name__}"
                    ) from None
            d_in, d_out = layer_dims(getattr(layer, "base_layer", layer))
            if a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                raise AdapterError(
                    f"adapter {adapter.name}: layer {name!r} has A {tuple(a.shape)}, B {tuple(b.shape)} but the base "
                    f"layer maps {d_in} -> {d_out} (adapter for a different base model?)"
                )

    def _install(self, names: Sequence[str]) -> None:
        new = {name: MultiLoraLayer(self.model.get_submodule(name)) for name in names if name not in self.layers}
        install_layers(self.model, new)
        self.layers.update(new)

    def set_rows(self, rows: Sequence[LoraWeights | None]) -> None:
        """Row i of the next batches runs through ``rows[i]`` (``None``: the base model alone)."""
        distinct = list({id(r): r for r in rows if r is not None}.values())
        key = tuple(id(r) if r is not None else None for r in rows)
        if key == self._plan_key:
            return
        for adapter in distinct:
            self.check(adapter)
        self._install(sorted({n for adapter in distinct for n in adapter.layers}))
        # Slots: the distinct adapters in order of first appearance, then a zero slot for base rows.
        slots: list[LoraWeights | None] = distinct + ([None] if any(r is None for r in rows) else [])
        slot_of = {id(a): i for i, a in enumerate(slots) if a is not None}
        slot = torch.tensor([slot_of[id(r)] if r is not None else len(slots) - 1 for r in rows], device=self.device)
        for name, layer in self.layers.items():
            parts = [a.layers.get(name) if a is not None else None for a in slots]
            if all(p is None for p in parts):
                layer.A = layer.B = None
                continue
            rank = max(p[0].shape[0] for p in parts if p is not None)
            A = torch.zeros(len(slots), rank, layer.in_features, device=self.device, dtype=self.dtype)
            B = torch.zeros(len(slots), layer.out_features, rank, device=self.device, dtype=self.dtype)
            for i, p in enumerate(parts):
                if p is not None:
                    a, b, scaling = p
                    A[i, : a.shape[0]] = a
                    B[i, :, : b.shape[1]] = b * scaling
            if len(slots) > 1:  # the gather: each row's stack, kept while the batch's rows stay the same
                A, B = A.index_select(0, slot), B.index_select(0, slot)
            layer.A, layer.B = A, B
        self._plan_key = key
        # Keep the adapters alive while the plan refers to them by id.
        self._plan_adapters = distinct

    def clear(self) -> None:
        """Every row runs the base model until ``set_rows`` is called again."""
        for layer in self.layers.values():
            layer.A = layer.B = None
        self._plan_key = None

    def remove(self) -> nn.Module:
        """Put the base layers back; returns the model."""
        uninstall_layers(self.model, self.layers)
        self.layers.clear()
        self._plan_key = None
        return self.model


__all__ = ["LoraWeights", "MultiLora", "MultiLoraLayer"]
