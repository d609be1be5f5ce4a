"""LoRA initialisations that read the base weight, as PEFT defines them (``init_lora_weights``).

PiSSA and OLoRA start the adapter from a rank-r piece of W and leave W - s·B·A in the base layer, so
the model computes what it did before training. PEFT saves such an adapter with its ``init_lora_weights``
unchanged and, when loading it, runs the same initialisation on the base it is given before copying the
saved A and B: on the original base that re-derives the residual weight. ``residual_base_`` does that
step for loading. All of them work on a linear layer's d_out x d_in matrix (a Conv1D's transposed).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterError


def _base_matrix(layer: nn.Module) -> torch.Tensor:
    w = layer.base_layer.weight
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise AdapterError(f"PiSSA/OLoRA need a float base weight, got {w.dtype}")
    m = w.detach().float()
    return m.T if layer.fan_in_fan_out else m


def _write_base(layer: nn.Module, matrix: torch.Tensor) -> None:
    w = layer.base_layer.weight
    w.data.copy_((matrix.T if layer.fan_in_fan_out else matrix).to(w.dtype))


def pissa_factors(layer: nn.Module, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of PiSSA: W's top-r singular triplets split as sqrt(S/s) on each side (PEFT's pissa_init).

    ``"pissa_niter_N"`` uses torch's randomised ``svd_lowrank`` with N subspace iterations (PEFT does the
    same, drawing from torch's global generator: seed it for a repeatable result).
    """
    w, r, s = _base_matrix(layer), layer.r, layer.scaling
    if init == "pissa":
        v, sv, uh = torch.linalg.svd(w, full_matrices=False)
        vr, sr, uhr = v[:, :r], sv[:r] / s, uh[:r]
    else:
        niter = int(init.removeprefix("pissa_niter_"))
        vr, sr, ur = torch.svd_lowrank(w, r, niter=niter)
        sr, uhr = sr / s, ur.t()
    return torch.diag(torch.sqrt(sr)) @ uhr, vr @ torch.diag(torch.sqrt(sr))


def olora_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of OLoRA: R's first r rows and Q's first r columns of W = QR (PEFT's olora_init)."""
    q, r_mat = torch.linalg.qr(_base_matrix(layer))
    return r_mat[: layer.r].contiguous(), q[:, : layer.r].contiguous()


def check_base_init(layer: nn.Module, init: str) -> None:
    """Refuse, before anything changes, a layer that PiSSA / OLoRA cannot start from."""
    if not isinstance(getattr(layer, "lora_A", None), nn.Linear):
        raise AdapterError(f"init_lora_weights={init!r} is supported on linear layers only")
    if init == "olora" and layer.fan_in_fan_out:  # PEFT factors the stored (d_in x d_out) matrix: no match
        raise AdapterError("init_lora_weights='olora' is not supported on Conv1D (fan_in_fan_out) layers")


def factors_from_base(layer: nn.Module, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_base_init(layer, init)
    return olora_factors(layer) if init == "olora" else pissa_factors(layer, init)


@torch.no_grad()
def init_from_base_(layer: nn.Module, init: str) -> None:
    """Set A and B from the base weight and leave W - s·B·A in the base layer (a new PiSSA/OLoRA adapter)."""
    a, b = factors_from_base(layer, init)
    layer.lora_A.weight.data.copy_(a)
    layer.lora_B.weight.data.copy_(b)
    residual_from(layer, a, b)


@torch.no_grad()
def residual_base_(layer: nn.Module, init: str) -> None:
    """W ← W - s·B0·A0 with (A0, B0) derived from W as a new adapter would be: PEFT's load-time step."""
    a, b = factors_from_base(layer, init)
    residual_from(layer, a, b)


def residual_from(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """W ← W - s·B·A, the original W kept aside (once) so that removing the adapter puts it back bit for bit:
    W - s·B·A + s·B·A is W only up to rounding."""
    if getattr(layer, "original_base_weight", None) is None:
        layer.original_base_weight = layer.base_layer.weight.detach().clone()
    _write_base(layer, _base_matrix(layer) - layer.scaling * b @ a)


@torch.no_grad()
def orthogonal_init_(layer: nn.Module) -> None:
    """PEFT's "orthogonal": A and B from the odd and even rows of a random orthogonal r x r matrix, /10."""
    r = layer.r
    if r % 2:
        raise AdapterError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(layer.in_features, r // 2).mm(q[0::2, :]).T / 10.0
    b = torch.randn(r // 2, layer.out_features).T.mm(q[1::2, :]) / 10.0
    layer.lora_A.weight.data.copy_(a)
    layer.lora_B.weight.data.copy_(b)
