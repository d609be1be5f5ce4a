"""Merge operators: N LoRA modules and one weight each -> one LoRA module, written as a PEFT folder.

``how`` picks the operator (PEFT's ``add_weighted_adapter`` names, plus LoraHub's):

- "lorahub": (Σ w_i·A_i, Σ w_i·s_i·B_i), the LoraHub paper's composition (cross terms w_i·w_j·B_i·A_j).
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": PEFT's, on A and B separately, module i
  weighted by sqrt(|w_i·s_i|) on both sides (the sign on A's side).
- "cat": A = [w_i·s_i·A_i], B = [B_i]: exactly Σ w_i·ΔW_i, rank Σ r_i.
- "svd" and the "_svd" forms: the operator on the whole updates ΔW_i, then the top ``svd_rank`` singular
  triplets of the result (exact when svd_rank reaches the rank of the result).

Each module is read as the exact update it makes on the stored base (hub/modules.py): PiSSA/OLoRA modules
as plain LoRA of rank 2r, DoRA modules as whole updates (so only the "_svd" forms and "cat"-free paths that
work on ΔW take them; the others refuse naming ``use_dora``). The scalings (rsLoRA, alpha_pattern) are folded
into the factors and the output has s = 1 (lora_alpha = r per layer); per-layer ranks go into rank_pattern,
lora_bias into the combined bias Σ w_i·s_i·b_i (the operator's own rule for ties/dare/magnitude_prune). That
is where PEFT 0.21 goes wrong: it keeps use_rslora (scaling sqrt(r) on top of factors already scaled), drops
the lora_B biases and DoRA magnitudes, and writes lora_A/lora_B of the per-layer rank under a config without
rank_pattern (a folder it cannot load back).

DARE's random masks come from one ``torch.Generator`` seeded with ``seed``, drawn layer by layer in the base
model's module order (the modules' file order without one), A's then B's: with a base model these are the
masks PEFT draws when torch's global generator holds ``seed`` as its merge loop starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters.base import AdapterError
from ..adapters.lora import LoraConfig
from ..adapters.peft_format import KEY_PREFIX, write_adapter_folder
from .modules import LoraModule, LoraTerm, read_module

FACTOR_OPS = ("lorahub", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_OPS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
HOWS = (*FACTOR_OPS, "cat", *SVD_OPS)
DENSITY_OPS = tuple(h for h in HOWS if h.startswith(("ties", "dare", "magnitude_prune")))
SIGN_METHODS = ("total", "frequency")


@dataclass
class CombineSettings:
    """The operator and its options, checked once here."""

    how: str = "linear"
    density: float | None = None  # fraction of entries kept (ties, dare, magnitude_prune)
    majority_sign_method: str = "total"  # ties / dare_ties: sign elected by the sum ("total") or the count
    svd_rank: int | None = None  # rank of the "_svd" forms' output; None: the largest input rank
    svd_clamp: float | None = None  # "_svd": clamp U·S and Vh to this quantile of their entries
    seed: int = 0  # DARE's random masks

    def __post_init__(self) -> None:
        if self.how not in HOWS:
            raise ValueError(f"how must be one of {', '.join(HOWS)}; got {self.how!r}")
        if self.how in DENSITY_OPS:
            if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
                raise ValueError(f"how={self.how!r} needs density, the fraction of entries kept, in (0, 1]")
            if not 0 < self.density <= 1:
                raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        elif self.density is not None:
            raise ValueError(f"density is used by {', '.join(DENSITY_OPS)}, not how={self.how!r}")
        if self.majority_sign_method not in SIGN_METHODS:
            raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {self.majority_sign_method!r}")
        if self.svd_rank is not None and (
            isinstance(self.svd_rank, bool) or not isinstance(self.svd_rank, int) or self.svd_rank < 1
        ):
            raise ValueError(f"svd_rank must be a positive integer, got {self.svd_rank!r}")
        if self.svd_clamp is not None and not (isinstance(self.svd_clamp, (int, float)) and 0 < self.svd_clamp <= 1):
            raise ValueError(f"svd_clamp must be a quantile in (0, 1], got {self.svd_clamp!r}")
        if (self.svd_rank is not None or self.svd_clamp is not None) and self.how not in SVD_OPS:
            raise ValueError(f"svd_rank / svd_clamp are used by the '_svd' forms, not how={self.how!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class Combined:
    """The combined module: a LoRA config with s = 1 and its PEFT-keyed tensors."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    modules: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write a PEFT folder (swapped in whole) that ``PeftModel.from_pretrained`` and ``load_adapter`` load."""
        return write_adapter_folder(out_dir, self.config, self.tensors)


# ---- the operators on stacks of task tensors (PEFT's merge_utils, with a seeded generator) ---------------


def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return tensors * weights.to(tensors.dtype).view(-1, *([1] * (tensors.ndim - 1)))


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) largest entries by magnitude."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * keep.reshape(t.shape)


def _random_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability density, and rescale by 1/density."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def _majority_sign_agrees(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """TIES's elected sign per entry (by the sum, or by the count of signs): where each tensor agrees with it."""
    sign = stacked.sign()
    magnitude = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def merge_tensors(
    how: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    settings: CombineSettings,
    generator: torch.Generator,
) -> torch.Tensor:
    """One operator ("_svd" suffix dropped) over N same-shaped task tensors and their N weights."""
    op = how.removesuffix("_svd")
    if op.startswith("magnitude_prune") or op == "ties":
        tensors = [_magnitude_prune(t, settings.density) for t in tensors]
    elif op.startswith("dare"):
        tensors = [_random_prune(t, settings.density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    if op in ("ties", "dare_ties"):
        # PEFT elects the sign on the pruned tensors, then averages the weighted entries that agree with it
        agree = _majority_sign_agrees(stacked, settings.majority_sign_method)
        return (_weighted(stacked, weights) * agree).sum(0) / agree.sum(0).clamp(min=1.0)
    return _weighted(stacked, weights).sum(0)  # linear / svd / dare_linear / magnitude_prune


# ---- one layer -----------------------------------------------------------------------------------------


def _check_same_rank(how: str, layer: str, names: list[str], terms: list[LoraTerm]) -> None:
    for name, term in zip(names[1:], terms[1:], strict=True):
        if term.rank != terms[0].rank:
            raise AdapterError(
                f"module {name}: layer {layer!r} has r={term.rank} but module {names[0]} has r={terms[0].rank}; "
                f"how={how!r} adds A's and B's of one rank (use 'cat' or an '_svd' form)"
            )


def _factor_layer(
    how: str, layer: str, names: list[str], terms: list[LoraTerm], w: torch.Tensor, s: CombineSettings, g
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_same_rank(how, layer, names, terms)
    scaling = torch.tensor([t.scaling for t in terms], dtype=torch.float64)
    if how == "lorahub":
        return merge_tensors("linear", [t.A for t in terms], w, s, g), merge_tensors(
            "linear", [t.B for t in terms], w * scaling, s, g
        )
    ws = w * scaling  # PEFT: sqrt(|w·s|) on both sides, the sign on A's
    w_b = ws.abs().sqrt()
    w_a = w_b * torch.where(ws >= 0, 1.0, -1.0)
    a = merge_tensors(how, [t.A for t in terms], w_a, s, g)
    b = merge_tensors(how, [t.B for t in terms], w_b, s, g)
    return a, b


def _svd_layer(
    how: str, terms: list[LoraTerm], w: torch.Tensor, s: CombineSettings, g, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    delta = merge_tensors(how, [t.delta() for t in terms], w, s, g)
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, sv.numel())
    us, vh = u[:, :k] * sv[:k], vh[:k]
    if s.svd_clamp is not None:
        hi = torch.quantile(torch.cat([us.flatten(), vh.flatten()]), s.svd_clamp)
        us, vh = us.clamp(-hi, hi), vh.clamp(-hi, hi)
    return vh, us


def _bias_layer(how: str, terms: list[LoraTerm], w: torch.Tensor, s: CombineSettings, g) -> torch.Tensor | None:
    """The combined bias (s = 1): the operator over s_i·b_i, a module without one counting as zero."""
    if all(t.bias is None for t in terms):
        return None
    d_out = terms[0].B.shape[0]
    deltas = [t.bias_delta() if t.bias is not None else torch.zeros(d_out) for t in terms]
    op = "linear" if how in ("lorahub", "cat", "svd") else how
    return merge_tensors(op, deltas, w, s, g)


def combine_layer(
    layer: str, names: list[str], terms: list[LoraTerm], w: torch.Tensor, s: CombineSettings, g, svd_rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A, B, bias or None) of the combined module on one layer, s = 1."""
    dora = next((n for n, t in zip(names, terms, strict=True) if t.magnitude is not None), None)
    if s.how in SVD_OPS:
        a, b = _svd_layer(s.how, terms, w, s, g, svd_rank)
    elif dora is not None:
        raise AdapterError(
            f"module {dora}: use_dora=True: its update m/||W + s·B·A||·(W + s·B·A) - W is not made of its A and B; "
            f"how={s.how!r} cannot combine it (use an '_svd' form)"
        )
    elif s.how == "cat":
        a = torch.cat([wi * t.scaling * t.A for wi, t in zip(w.tolist(), terms, strict=True)])
        b = torch.cat([t.B for t in terms], dim=1)
    else:
        a, b = _factor_layer(s.how, layer, names, terms, w, s, g)
    return a, b, _bias_layer(s.how, terms, w, s, g)


# ---- the whole module ----------------------------------------------------------------------------------


def _layer_order(modules: list[LoraModule], base_model: nn.Module | None) -> list[str]:
    """Every layer some module adapts: in the base model's module order (PEFT's), else first seen."""
    seen = list(dict.fromkeys(layer for m in modules for layer in m.layers))
    if base_model is None:
        return seen
    position = {name: i for i, (name, _) in enumerate(base_model.named_modules())}
    return sorted(seen, key=lambda layer: position.get(layer, len(position)))


def _check_weights(weights: Sequence[float], n: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64)  # float32 only once multiplied in, as PEFT's Python floats
    if w.ndim != 1 or w.numel() != n:
        raise ValueError(f"weights: expected {n} (one per module), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    return w


def _output_config(first: LoraConfig, ranks: dict[str, int], has_bias: bool) -> LoraConfig:
    """A plain LoRA config with s = 1 on every layer: r = lora_alpha = the most common rank, the others in
    rank_pattern / alpha_pattern under their escaped full path."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(layer): k for layer, k in ranks.items() if k != r}
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=list(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_bias=has_bias,
        task_type=first.task_type,
        base_model_name_or_path=first.base_model_name_or_path,
        revision=first.revision,
        fan_in_fan_out=first.fan_in_fan_out,
    )


def combine_modules(
    modules: Sequence[LoraModule],
    weights: Sequence[float],
    settings: CombineSettings,
    base_model: nn.Module | None = None,
) -> Combined:
    """``combine`` on modules already read (hub/modules.py)."""
    modules = list(modules)
    if not modules:
        raise ValueError("no modules to combine")
    w = _check_weights(weights, len(modules))
    svd_rank = settings.svd_rank or max(t.rank for m in modules for t in m.layers.values())
    generator = torch.Generator().manual_seed(settings.seed)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for layer in _layer_order(modules, base_model):
        present = [i for i, m in enumerate(modules) if layer in m.layers]
        names = [modules[i].name for i in present]
        terms = [modules[i].layers[layer] for i in present]
        a, b, bias = combine_layer(layer, names, terms, w[present], settings, generator, svd_rank)
        tensors[f"{KEY_PREFIX}{layer}.lora_A.weight"] = a.contiguous()
        tensors[f"{KEY_PREFIX}{layer}.lora_B.weight"] = b.contiguous()
        if bias is not None:
            tensors[f"{KEY_PREFIX}{layer}.lora_B.bias"] = bias
        ranks[layer] = a.shape[0]
    has_bias = any(k.endswith(".lora_B.bias") for k in tensors)
    if has_bias:  # PEFT's lora_bias adds a bias to every adapted layer: the others get zeros
        for layer in ranks:
            key = f"{KEY_PREFIX}{layer}.lora_B.bias"
            tensors.setdefault(key, torch.zeros(tensors[f"{KEY_PREFIX}{layer}.lora_B.weight"].shape[0]))
    config = _output_config(modules[0].config, ranks, has_bias)
    return Combined(config, tensors, [m.name for m in modules], w.tolist())


def add_combine_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``loraloom combine``'s options (as ``add_demo_arguments`` for the demo): choices and defaults from here."""
    default = {f.name: f.default for f in dataclasses.fields(CombineSettings)}
    parser.add_argument("modules", nargs="+", metavar="MODULE", help="LoRA module folders or hub ids")
    parser.add_argument("--weights", nargs="+", type=float, required=True, metavar="W", help="one per module")
    parser.add_argument("--how", choices=HOWS, default=default["how"], help="default: %(default)s")
    parser.add_argument("--density", type=float, help=f"the fraction of entries kept by {', '.join(DENSITY_OPS)}")
    parser.add_argument("--seed", type=int, default=default["seed"], help="DARE's masks (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the PEFT folder to write (swapped in whole)")
    return parser


def combine(
    modules: Sequence[str | os.PathLike],
    weights: Sequence[float],
    how: str = "linear",
    out: str | os.PathLike | None = None,
    *,
    base_model: nn.Module | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    seed: int = 0,
) -> Combined:
    """Combine LoRA modules (PEFT folders or hub ids) with one weight each; with ``out``, write a PEFT folder.

    ``base_model`` is needed for PiSSA, OLoRA and DoRA modules (their update depends on the base weight),
    checks every module's shapes, and fixes DARE's draw order to PEFT's. See the module docstring for ``how``.
    """
    settings = CombineSettings(how, density, majority_sign_method, svd_rank, svd_clamp, seed)
    if isinstance(modules, (str, os.PathLike)):
        raise TypeError("modules: expected a list of module folders or hub ids, got a single path")
    names = [str(m) for m in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"module {next(n for n in names if names.count(n) > 1)} is listed twice")
    _check_weights(weights, len(names))  # before reading any file
    combined = combine_modules([read_module(m, base_model) for m in names], weights, settings, base_model)
    if out is not None:
        combined.save(out)
    return combined


__all__ = [
    "DENSITY_OPS",
    "HOWS",
    "SVD_OPS",
    "CombineSettings",
    "Combined",
    "add_combine_arguments",
    "combine",
    "combine_modules",
    "merge_tensors",
]
