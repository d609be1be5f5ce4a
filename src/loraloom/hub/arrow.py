"""Arrow: route each token through the LoRA modules whose prototype it aligns with (Ostapenko et al., 2024).

A module's prototype on a layer is the top right-singular vector of its update ΔW = B·A: the input
direction the module changes most. For each token x reaching an adapted layer, every module scores
|<x, prototype>| (sign-free: a singular vector has no sign), the top k scores are softmaxed (with a
temperature) and the layer adds Σ_i softmax_i · s · B_i·A_i·x over those k. No training and no search:
the modules' own weights decide, token by token.

This is PEFT's ``create_arrow_model`` (``ArrowConfig``: top_k=3, router_temperature=1.0, GenKnowSub off
unless general modules are given), with one difference on purpose: the prototype is the exact singular
vector (an SVD of an r x r problem), where PEFT runs 15 power iterations from a random start and so
differs when a module's top two singular values are close.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from ..adapters.base import AdapterError, AdapterLayer
from ..adapters.inject import free_layer, install_layers
from ..devices import model_device
from ..tasks import task_of
from .bank import ModuleBank, load_bank

DEFAULT_TOP_K = 3  # PEFT's ArrowConfig.top_k
DEFAULT_TEMPERATURE = 1.0  # PEFT's ArrowConfig.router_temperature


def prototypes(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The unit top right-singular vector of each B_i·A_i (A: N x r x d_in, B: N x d_out x r) -> N x d_in.

    ΔW is never formed: with Aᵀ = Q·R (Q: d_in x r, orthonormal columns), B·A = (B·Rᵀ)·Qᵀ, so the right
    singular vectors of B·A are Q times those of the small d_out x r matrix B·Rᵀ. Computed in float64,
    so near-equal singular values still pick the same vector every run.
    """
    Q, R = torch.linalg.qr(A.double().transpose(1, 2))  # N x d_in x k, N x k x r (k = min(d_in, r))
    _, _, Vh = torch.linalg.svd(B.double() @ R.transpose(1, 2), full_matrices=False)
    return (Q @ Vh[:, 0, :, None]).squeeze(-1).to(A.dtype)


def check_routing(top_k: int, temperature: float, n_modules: int) -> None:
    """A clear error for a top_k or temperature Arrow cannot route with."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_modules:
        raise ValueError(f"top_k must be a number of modules from 1 to {n_modules}, got {top_k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


class ArrowLayer(AdapterLayer):
    """A base layer plus the Arrow mixture of N LoRA modules, chosen per token."""

    def __init__(
        self,
        base_layer: nn.Module,
        A: torch.Tensor,
        B: torch.Tensor,
        scaling: float,
        top_k: int = DEFAULT_TOP_K,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        super().__init__(base_layer)
        check_routing(top_k, temperature, A.shape[0])
        n, r, _ = A.shape
        # Flattened so that all N modules run in two matmuls: x -> (N·r) -> d_out.
        self.register_buffer("A_all", A.reshape(n * r, -1), persistent=False)  # (N·r) x d_in
        self.register_buffer("B_all", B.transpose(0, 1).reshape(B.shape[1], n * r), persistent=False)  # d_out x (N·r)
        protos = prototypes(A.cpu(), B.cpu())  # float64 on the CPU: MPS has none
        self.register_buffer("prototypes", protos.to(A.device), persistent=False)  # N x d_in
        self.n_modules, self.rank, self.scaling = n, r, scaling
        self.top_k, self.temperature = top_k, temperature

    def coefficients(self, tokens: torch.Tensor) -> torch.Tensor:
        """t x N routing weights: softmax over each token's top-k |<x, prototype>|, zero elsewhere."""
        similarity = (tokens @ self.prototypes.T).abs()
        top, index = similarity.topk(self.top_k, dim=1)
        weights = torch.softmax(top / self.temperature, dim=1)
        return torch.zeros_like(similarity).scatter_(1, index, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        tokens = x.reshape(-1, self.in_features).to(self.A_all.dtype)
        c = self.coefficients(tokens) * self.scaling  # t x N
        z = (tokens @ self.A_all.T).view(-1, self.n_modules, self.rank) * c[:, :, None]  # t x N x r
        delta = z.flatten(1) @ self.B_all.T  # t x d_out: Σ_i c_i·s·B_i·A_i·x
        return y + delta.view(*x.shape[:-1], -1).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        raise AdapterError("Arrow picks modules per token: there is no single update to merge into the base weights")

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, modules={self.n_modules}, r={self.rank}, scaling={self.scaling:g}, "
            f"top_k={self.top_k}, temperature={self.temperature:g}"
        )


def arrow(
    model: nn.Module,
    modules: Sequence[str | os.PathLike],
    *,
    top_k: int = DEFAULT_TOP_K,
    temperature: float = DEFAULT_TEMPERATURE,
    general: Sequence[str | os.PathLike] | None = None,
) -> nn.Module:
    """Install Arrow routing over ``modules`` (LoRA folders or hub ids) in ``model``, in place; returns it.

    Each adapted layer adds, per token, the softmax-weighted sum of the ``top_k`` modules whose prototype
    the token aligns with most (``temperature`` divides the scores before the softmax). ``general``:
    GenKnowSub (Belofsky et al., 2025): the mean A and mean B of these general-knowledge modules are
    subtracted from every module's A and B before routing, as PEFT's ``use_gks`` does, so that what the
    task modules share with general text does not decide the routing.

    The modules must share rank, alpha and target layers (as for ``lorahub``). The model keeps its own
    weights; ``loraloom.adapters.remove_adapter(model)`` takes the routing out again. Arrow cannot be
    merged: the update differs token by token.
    """
    names = [str(m) for m in modules] if not isinstance(modules, (str, os.PathLike)) else [str(modules)]
    general_names = [str(m) for m in general or []]
    check_routing(top_k, temperature, len(names))
    bank = load_bank(names + general_names, base_model=model)
    layers = {}
    for name in bank.layers:
        A, B = bank.A[name][: len(names)], bank.B[name][: len(names)]
        if general_names:
            A = A - bank.A[name][len(names) :].mean(0)
            B = B - bank.B[name][len(names) :].mean(0)
        base = free_layer(model, name)
        device = base.weight.device
        layers[name] = ArrowLayer(base, A.to(device), B.to(device), bank.scaling[name], top_k, temperature)
    install_layers(model, layers)
    return model


@torch.no_grad()
def alignment(model: nn.Module, bank: ModuleBank, features: Sequence[dict[str, list[int]]]) -> torch.Tensor:
    """How strongly the examples' tokens point along each bank module's prototypes: N scores, higher is closer.

    Every example runs through the base model on its own (no padding, so every token counted is real:
    the whole sequence, prompt and target, as Arrow routes both at generation). At each adapted layer the
    input x of every token scores |cos(x, prototype_i)|: the cosine, not Arrow's raw |<x, p>|, so that a few
    tokens of huge norm (attention sinks) do not outweigh the rest; per token both rank modules the same.
    A module's score is the mean over the tokens, then over the layers. Float64, so a module scores the
    same whichever modules it is scored with.
    """
    protos = {name: prototypes(bank.A[name].double(), bank.B[name].double()) for name in bank.layers}
    sums = {name: torch.zeros(len(bank), dtype=torch.float64) for name in bank.layers}
    counts = dict.fromkeys(bank.layers, 0)

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).detach().cpu().double()
            cos = (x @ protos[name].T).abs() / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
            sums[name] += cos.sum(0)
            counts[name] += x.shape[0]

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in bank.layers]
    was_training, device, seq2seq = model.training, model_device(model), task_of(model) == "seq2seq"
    try:
        model.eval()
        for f in features:
            batch = {"input_ids": torch.tensor([f["input_ids"]], device=device)}
            if seq2seq:
                labels = torch.tensor([f["labels"]], device=device)
                batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return torch.stack([sums[name] / max(counts[name], 1) for name in bank.layers]).mean(0)


__all__ = [
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_K",
    "ArrowLayer",
    "alignment",
    "arrow",
    "check_routing",
    "prototypes",
]
