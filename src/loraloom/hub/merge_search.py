"""LoraHub's search over a merge operator: weights w for N modules, every candidate merged with one operator
of hub/combine.py ("ties", "dare_ties", "cat", ...) and scored by LoraHub's few-shot objective.

LoraHub's own composition is linear in w, so compose.py scores P candidates in one pass. A TIES or DARE
merge is not (magnitude pruning, sign election, sqrt(|w|) on each factor), so here every candidate is
merged whole (``combine_modules``) and copied into one plain LoRA adapter installed once on the model,
then scored alone. On LoRA-sized modules a merge costs less than the forward pass that scores it. The
modules are read once; DARE's masks are drawn from the combine seed on every merge, so a candidate w
always scores the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..adapters.inject import add_adapter, remove_adapter
from ..adapters.peft_format import load_state_into
from .combine import Combined, CombineSettings, combine_modules
from .compose import as_population
from .modules import LoraModule, read_module
from .objective import Objective, Scores
from .search import SearchResult, SearchSettings, nevergrad_search


def load_combined(model: nn.Module, combined: Combined) -> nn.Module:
    """Install ``combined`` (a merge's output) in ``model`` as a plain LoRA adapter, in place."""
    add_adapter(model, combined.config, verbose=False, init=False)
    load_state_into(model, combined.tensors, "the merged module")
    return model


class MergeObjective:
    """Scores P x N weights: each row merged with the operator, loaded, scored by the few-shot objective.

    It is its own ``Composition`` for ``Objective`` (``model``, ``n_weights``, ``set_weights``, ``clear``),
    one candidate at a time. A context manager: the adapter it installs is removed on exit and every
    parameter's requires_grad put back.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[LoraModule],
        combine: CombineSettings,
        features: Sequence[dict[str, list[int]]],
        *,
        pad_token_id: int,
        search: SearchSettings,
    ) -> None:
        if search.layer_groups is not None:
            raise ValueError("a merge operator takes one weight per module: layer_groups must be None")
        self.model, self.modules, self.combine = model, list(modules), combine
        self.n_weights = len(self.modules)
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        template = combine_modules(self.modules, [1.0] * self.n_weights, combine, model)
        load_combined(model, template)  # shapes are fixed by the operator and the modules, not by w
        # A merge is scored in the model's own precision (set_weights loads float tensors as they are).
        own_precision = dataclasses.replace(search, dtype="fp32")
        self.objective = Objective.from_settings(self, features, pad_token_id, own_precision)

    def set_weights(self, w: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        if w.shape[0] != 1:
            raise ValueError("a merge is scored one candidate at a time")
        merged = combine_modules(self.modules, w[0].tolist(), self.combine, self.model)
        load_state_into(self.model, merged.tensors, "the merged module")

    def clear(self) -> None:
        """Nothing to undo between candidates: the next one overwrites the adapter's tensors."""

    def __call__(self, weights: torch.Tensor | Sequence[float]) -> Scores:
        rows = [self.objective(row[None]) for row in as_population(weights, self.n_weights)]
        return Scores(*(torch.cat([getattr(s, f) for s in rows]) for f in ("values", "losses", "penalties")))

    def __enter__(self) -> MergeObjective:
        return self

    def __exit__(self, *exc: Any) -> None:
        remove_adapter(self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad[name])


def merge_search(
    model: nn.Module,
    modules: Sequence[str],
    features: Sequence[dict[str, list[int]]],
    *,
    pad_token_id: int,
    combine: CombineSettings,
    search: SearchSettings,
    progress: bool = False,
) -> tuple[SearchResult, Combined]:
    """LoraHub's gradient-free search (``search``: optimizer, budget, seed, penalty) over the weights of
    ``modules`` merged with ``combine``; returns the search and the merge of its best weights. The model
    comes back as it was."""
    read = [read_module(m, model) for m in modules]
    with MergeObjective(model, read, combine, features, pad_token_id=pad_token_id, search=search) as objective:
        found = nevergrad_search(objective, search, progress=progress)
    return found, combine_modules(read, found.weights, combine, model)


__all__ = ["MergeObjective", "load_combined", "merge_search"]
