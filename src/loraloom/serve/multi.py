"""Many adapters in one batch: every row of the batch runs through its own adapter, of any type loraloom has.

An adapter here is an ``AdapterWeights``: per target layer one term of its type (W, b0: the frozen base layer):

- ``LoraTerm`` (A: r x d_in, B: d_out x r, scaling s; b: PEFT's ``lora_bias``; m: DoRA's magnitude)
      LoRA       y = W·x + b0 + s·B·A·x (+ s·b)
      DoRA       y = m / ||W + s·B·A|| ⊙ (W·x + s·B·A·x) + b0      (the norm per output channel, a constant)
- ``IA3Term`` (a vector l)
      output     y = l ⊙ (W·x + b0)
      feed-fwd   y = W·(l ⊙ x) + b0
- ``FourierTerm`` (n coefficients c_p at fixed random positions (r_p, k_p), scaling α)
      y = W·x + b0 + ΔW·x,   ΔW = α·Re(ifft2(S)),  S zero but c_p at (r_p, k_p)

rsLoRA, rank_pattern and alpha_pattern only change each layer's r and s, so they are LoRA terms like any other.

``MultiLora`` installs a ``MultiLoraLayer`` in every layer any adapter targets. Before a forward pass
``set_rows`` names each row's adapter (``None`` for the base model) and plans each layer once per batch
(kept while the batch's rows stay the same: every decode step between a row joining or leaving). Rows are
grouped by type, so that each type pays only for its own rows, with no Python loop over adapters:

- LoRA and DoRA rows: the distinct adapters' A and B are stacked (R the largest rank, smaller ranks
  zero-padded, s folded into B) and gathered to one stack per row; other rows get a zero slot. Two batched
  matmuls per layer, y[b] += (x[b] @ A[b]^T) @ B[b]^T (punica's BGMV / SGMV in plain torch);
- DoRA rows: then y = scale ⊙ (y - b0) + b0 on those rows, scale = m / ||W + s·B·A|| computed once per
  adapter and layer from the base weight;
- IA3 rows: their input is scaled before the layer's one base matmul (feed-forward), or their output after;
- FourierFT rows: ΔW·x without ever forming ΔW (d_out x d_in): an FFT of x, the n coefficients, an inverse
  FFT (``fourierft_forward``).

Zero padding adds exact zeros, so each row gets what it would alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters.base import ADAPTABLE_LAYERS, AdapterConfig, AdapterError, AdapterLayer, layer_dims
from ..adapters.fourierft import fourierft_positions
from ..adapters.ia3 import IA3Config
from ..adapters.inject import free_layer, install_layers, uninstall_layers
from ..adapters.lora import INIT_BASE_CHANGED_ELSEWHERE, LoraConfig, is_pissa, lora_forward, lora_scaling
from ..adapters.peft_format import KEY_PREFIX, normalise_keys, read_adapter
from ..hub.bank import ModuleBank


class UnservableAdapter(AdapterError):
    """A valid adapter that the batched layers cannot serve; the message names the config field (a 400)."""


# ---- one adapter: a term per layer -------------------------------------------------------------


class LoraTerm(NamedTuple):
    """LoRA (DoRA when ``magnitude`` is set) on one layer."""

    A: torch.Tensor  # r x d_in
    B: torch.Tensor  # d_out x r
    scaling: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    bias: torch.Tensor | None = None  # lora_B.bias (PEFT's lora_bias), unscaled: d_out
    magnitude: torch.Tensor | None = None  # DoRA's m: d_out


class IA3Term(NamedTuple):
    """(IA)³ on one layer: ``scale`` multiplies the input (feed-forward) or the output."""

    scale: torch.Tensor  # d_in (feed-forward) or d_out
    feedforward: bool


class FourierTerm(NamedTuple):
    """FourierFT on one layer: n coefficients; the layer's shape and ``seed`` fix their positions."""

    spectrum: torch.Tensor  # n
    scaling: float
    seed: int  # random_loc_seed


Term = LoraTerm | IA3Term | FourierTerm

# What each type saves per adapted layer: PEFT's names after "<prefix><layer path>.".
PARAMS = {
    "LORA": ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector"),
    "IA3": ("ia3_l",),
    "FOURIERFT": ("fourierft_spectrum",),
}


@dataclass(eq=False)  # compared by identity: the batch plan is rebuilt when the set of objects changes
class AdapterWeights:
    """One adapter as the batched layers use it: layer path -> its term (one type per adapter)."""

    name: str
    layers: dict[str, Term]

    @classmethod
    def from_bank(
        cls, bank: ModuleBank, weights: torch.Tensor | Sequence[float] | None = None, name: str | None = None
    ) -> AdapterWeights:
        """The bank's only module (``weights`` None), or the composition Σ w_i·A_i, Σ w_i·B_i of its modules."""
        if weights is None:
            if len(bank) != 1:
                raise ValueError(f"a bank of {len(bank)} modules is one adapter only with weights over its modules")
            layers = {n: LoraTerm(bank.A[n][0], bank.B[n][0], bank.scaling[n]) for n in bank.layers}
        else:
            layers = {n: LoraTerm(a, b, bank.scaling[n]) for n, (a, b) in bank.composed(weights).items()}
        return cls(name=name or bank.names[0], layers=layers)

    @classmethod
    def from_folder(cls, source: str, name: str, dtype: torch.dtype = torch.float32) -> AdapterWeights:
        """A PEFT folder (or hub id) of any registered type; ``UnservableAdapter`` names a field it cannot serve."""
        config, tensors, _ = read_adapter(source)
        check_servable(config, name)
        parts = _split_by_layer(config, normalise_keys(tensors), name)
        layers = {}
        for layer, found in parts.items():
            found = {k: t.to(dtype) for k, t in found.items()}
            if isinstance(config, LoraConfig):
                layers[layer] = _lora_term(config, layer, found, name)
            elif isinstance(config, IA3Config):
                layers[layer] = _ia3_term(config, layer, found, name)
            else:
                layers[layer] = FourierTerm(found["fourierft_spectrum"], config.scaling, config.random_loc_seed)
        if not layers:
            raise AdapterError(f"adapter {name}: holds no adapter weights")
        return cls(name=name, layers=layers)

    @property
    def kind(self) -> str:
        """The type: lora, dora, ia3 or fourierft."""
        term = next(iter(self.layers.values()), None)
        if isinstance(term, IA3Term):
            return "ia3"
        if isinstance(term, FourierTerm):
            return "fourierft"
        return "dora" if term is not None and term.magnitude is not None else "lora"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for term in self.layers.values() for t in term if isinstance(t, torch.Tensor))


LoraWeights = AdapterWeights  # the name the engine and older code use


def check_servable(config: AdapterConfig, name: str) -> None:
    """Refuse, naming the field, what one row of a shared base cannot carry."""

    def refuse(field: str, value: object, why: str) -> UnservableAdapter:
        return UnservableAdapter(f"adapter {name}: field {field!r} = {value!r} cannot be served: {why}")

    if config.peft_type not in PARAMS:
        raise refuse("peft_type", config.peft_type, f"the server runs {sorted(PARAMS)} adapters")
    if config.modules_to_save:
        raise refuse(
            "modules_to_save", config.modules_to_save, "whole trained layers would replace the base's for every row"
        )
    bias = getattr(config, "bias", "none")
    if bias != "none":
        raise refuse("bias", bias, "the adapter trained the base model's own biases, shared by every row")
    if isinstance(config, LoraConfig):
        init = config.init_lora_weights
        if is_pissa(init) or init == "olora" or init in INIT_BASE_CHANGED_ELSEWHERE:
            raise refuse("init_lora_weights", init, "the adapter was trained on a residual base, not the served one")


def _split_by_layer(config: AdapterConfig, tensors: dict[str, torch.Tensor], name: str) -> dict[str, dict]:
    """{layer path: {param: tensor}} from PEFT keys; a tensor of any other kind is refused by name."""
    params = PARAMS[config.peft_type]
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        param = next((p for p in params if key.startswith(KEY_PREFIX) and key.endswith("." + p)), None)
        if param is None:
            raise UnservableAdapter(
                f"adapter {name}: tensor {key!r} cannot be served: rows carry {config.peft_type} weights of linear "
                "layers only (no embeddings, convolutions, trained biases or whole layers; see 'target_modules')"
            )
        layers.setdefault(key[len(KEY_PREFIX) : -len(param) - 1], {})[param] = t
    return layers


def _lora_term(config: LoraConfig, layer: str, parts: dict[str, torch.Tensor], name: str) -> LoraTerm:
    A, B = parts.get("lora_A.weight"), parts.get("lora_B.weight")
    if A is None or B is None:
        raise AdapterError(f"adapter {name}: layer {layer!r} lacks lora_A or lora_B")
    if A.ndim != 2 or B.ndim != 2:
        raise UnservableAdapter(
            f"adapter {name}: layer {layer!r} is a convolution; see 'target_modules' (rows carry linear layers only)"
        )
    r, alpha = config.rank_and_alpha(layer)
    if A.shape[0] != r or B.shape[1] != r:
        raise AdapterError(f"adapter {name}: layer {layer!r} has rank {A.shape[0]} but its config gives r={r}")
    bias, magnitude = parts.get("lora_B.bias"), parts.get("lora_magnitude_vector")
    for field, tensor, value in (("lora_bias", "lora_B.bias", bias), ("use_dora", "lora_magnitude_vector", magnitude)):
        if (value is not None) != bool(getattr(config, field)):
            has = "has" if value is not None else "lacks"
            raise AdapterError(
                f"adapter {name}: layer {layer!r} {has} {tensor} but the config says {field}={getattr(config, field)}"
            )
    scaling = lora_scaling(r, alpha, config.use_rslora)
    return LoraTerm(A, B, scaling, bias, None if magnitude is None else magnitude.reshape(-1))


def _ia3_term(config: IA3Config, layer: str, parts: dict[str, torch.Tensor], name: str) -> IA3Term:
    l = parts["ia3_l"]  # noqa: E741 (the paper's name)
    feedforward = config.is_feedforward(layer)
    # PEFT's shapes: (1, d_in) scales the input, (d_out, 1) the output.
    if l.ndim != 2 or l.shape[0 if feedforward else 1] != 1:
        kind = "feed-forward (1 x d_in)" if feedforward else "output (d_out x 1)"
        raise AdapterError(f"adapter {name}: layer {layer!r} is {kind} in the config but ia3_l is {tuple(l.shape)}")
    return IA3Term(l.reshape(-1), feedforward)


# ---- the batched math --------------------------------------------------------------------------


def fourierft_forward(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, coef: torch.Tensor, d_out: int):
    """ΔW·x for each batch row b from its own coefficients, without forming ΔW = α·Re(ifft2(S)) (d_out x d_in).

    (ΔW·x)_i = α/(d_out·d_in) · Σ_p c_p·Re(e^{2πi·i·r_p/d_out} · Σ_j x_j·e^{2πi·j·k_p/d_in}); the inner sum is
    conj(fft(x))[k_p], and the sum over p is d_out·ifft over the values scattered to their rows r_p.
    x: rows x ... x d_in; rows, cols: rows x n positions (r_p, k_p); coef: rows x n, c_p·α/d_in (zero padding).
    """
    k, d_in = x.shape[0], x.shape[-1]
    flat = x.reshape(k, -1, d_in).float()  # k x T x d_in
    t = flat.shape[1]
    at_cols = torch.fft.fft(flat, dim=-1).conj().gather(-1, cols[:, None, :].expand(k, t, -1))
    spread = at_cols.new_zeros(k, t, d_out).scatter_add_(-1, rows[:, None, :].expand(k, t, -1), at_cols * coef[:, None])
    return torch.fft.ifft(spread, dim=-1).real.reshape(*x.shape[:-1], d_out)


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A rows x d tensor shaped to broadcast over ``like`` (rows x ... x d)."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 2)), v.shape[-1])


def _scale_rows(t: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t`` with rows ``index`` multiplied by their own vector (IA3)."""
    return t.index_copy(0, index, (t.index_select(0, index) * _per_row(scale, t)).to(t.dtype))


class MultiLoraLayer(AdapterLayer):
    """A base layer plus one adapter per batch row, from the plan that ``MultiLora.set_rows`` sets."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.reset()

    def reset(self) -> None:
        """No row's adapter targets this layer: the base layer alone."""
        self.rows: int | None = None  # the batch size the plan is for (None: any, one stack for every row)
        # LoRA and DoRA rows: per row (rows x R x d_in, rows x d_out x R, scaling folded into B), or a single
        # 1 x ... stack when every row runs the same adapter; with lora_bias, s·b per row (rows x d_out).
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self.lora_bias: torch.Tensor | None = None
        self.dora: tuple[torch.Tensor, torch.Tensor] | None = None  # (row index, m/||W + s·B·A|| per row)
        self.ia3_in: tuple[torch.Tensor, torch.Tensor] | None = None  # (row index, l per row): feed-forward
        self.ia3_out: tuple[torch.Tensor, torch.Tensor] | None = None  # (row index, l per row)
        self.fourier: tuple[torch.Tensor, ...] | None = None  # (row index, rows, cols, coef) per row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None and x.shape[0] != self.rows:
            raise AdapterError(f"batch of {x.shape[0]} rows but set_rows named {self.rows} adapters")
        y = self.base_layer(x if self.ia3_in is None else _scale_rows(x, *self.ia3_in))
        if self.A is not None:
            y = lora_forward(x.to(self.A.dtype), self.A, self.B, add_to=y)
            if self.lora_bias is not None:
                y = y + _per_row(self.lora_bias, y).to(y.dtype)
        if self.dora is not None:  # y = scale ⊙ (W·x + s·B·A·x) + b0 on the DoRA rows
            index, scale = self.dora
            b0 = self.base_layer.bias if self.base_layer.bias is not None else 0.0
            rows = _per_row(scale, y) * (y.index_select(0, index) - b0) + b0
            y = y.index_copy(0, index, rows.to(y.dtype))
        if self.ia3_out is not None:
            y = _scale_rows(y, *self.ia3_out)
        if self.fourier is not None:
            index, rows, cols, coef = self.fourier
            delta = fourierft_forward(x.index_select(0, index), rows, cols, coef, self.out_features)
            y = y.index_add(0, index, delta.to(y.dtype))
        return y

    def delta_weight(self) -> torch.Tensor:
        raise AdapterError("a multi-adapter layer holds one adapter per row; there is no single delta to merge")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows={self.rows}"


class MultiLora:
    """Batched multi-adapter layers installed in a model; ``set_rows`` before each forward pass.

    Layers are installed on first use by an adapter that targets them (shapes checked against the base),
    so adapters can be added while the model serves; ``remove`` puts the base layers back.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: dict[str, MultiLoraLayer] = {}
        self._plan_key: tuple | None = None
        # What an adapter's terms give on this base (DoRA's scale, FourierFT's positions), per layer: computed
        # once per adapter, dropped with it.
        self._derived: weakref.WeakKeyDictionary[AdapterWeights, dict[str, object]] = weakref.WeakKeyDictionary()
        w = next(model.parameters())
        self.device, self.dtype = w.device, w.dtype

    def check(self, adapter: AdapterWeights) -> None:
        """Every layer of ``adapter`` exists in the model as a linear layer its term fits."""
        for name, term in adapter.layers.items():
            base = self._base(adapter, name)
            d_in, d_out = layer_dims(base)
            if isinstance(term, LoraTerm):
                a, b = term.A, term.B
                fits = a.shape[1] == d_in and b.shape[0] == d_out and a.shape[0] == b.shape[1]
                fits &= all(v is None or v.numel() == d_out for v in (term.bias, term.magnitude))
                shapes = f"A {tuple(a.shape)}, B {tuple(b.shape)}"
            elif isinstance(term, IA3Term):
                fits = term.scale.numel() == (d_in if term.feedforward else d_out)
                shapes = f"ia3_l of {term.scale.numel()}"
            else:
                fits = term.spectrum.numel() <= d_in * d_out
                shapes = f"{term.spectrum.numel()} frequencies"
            if not fits:
                raise AdapterError(
                    f"adapter {adapter.name}: layer {name!r} has {shapes} but the base layer maps {d_in} -> {d_out} "
                    "(adapter for a different base model?)"
                )

    def _base(self, adapter: AdapterWeights, name: str) -> nn.Module:
        layer = self.layers.get(name)
        if layer is not None:
            return layer.base_layer
        try:
            base = free_layer(self.model, name)
        except AttributeError:
            raise AdapterError(
                f"adapter {adapter.name}: layer {name!r} does not exist in {type(self.model).__name__}"
            ) from None
        if not isinstance(base, ADAPTABLE_LAYERS):
            raise AdapterError(f"adapter {adapter.name}: layer {name!r} is a {type(base).__name__}, not a linear layer")
        return base

    def _install(self, names: Sequence[str]) -> None:
        new = {name: MultiLoraLayer(self.model.get_submodule(name)) for name in names if name not in self.layers}
        install_layers(self.model, new)
        self.layers.update(new)

    def set_rows(self, rows: Sequence[AdapterWeights | None]) -> None:
        """Row i of the next batches runs through ``rows[i]`` (``None``: the base model alone)."""
        distinct = list({id(r): r for r in rows if r is not None}.values())
        key = tuple(id(r) if r is not None else None for r in rows)
        if key == self._plan_key:
            return
        for adapter in distinct:
            self.check(adapter)
        self._install(sorted({n for adapter in distinct for n in adapter.layers}))
        for name, layer in self.layers.items():
            layer.reset()
            terms = [r.layers.get(name) if r is not None else None for r in rows]
            self._plan_lora(layer, name, rows, terms)
            self._plan_ia3(layer, terms)
            self._plan_fourier(layer, name, rows, terms)
            grouped = any(g is not None for g in (layer.dora, layer.ia3_in, layer.ia3_out, layer.fourier))
            if grouped or (layer.A is not None and layer.A.shape[0] > 1):
                layer.rows = len(rows)
        self._plan_key = key
        # Keep the adapters alive while the plan refers to them by id.
        self._plan_adapters = distinct

    def _plan_lora(self, layer: MultiLoraLayer, name: str, rows: Sequence, terms: list) -> None:
        """LoRA and DoRA rows: per-slot stacks gathered to one per row; DoRA's per-channel scale on its rows."""
        lora = [t if isinstance(t, LoraTerm) else None for t in terms]
        distinct = list({id(t): t for t in lora if t is not None}.values())
        if not distinct:
            return
        # Slots: the distinct terms in order of first appearance, then a zero slot for every other row.
        slots = distinct + ([None] if any(t is None for t in lora) else [])
        slot_of = {id(t): i for i, t in enumerate(distinct)}
        slot = torch.tensor([slot_of[id(t)] if t is not None else len(slots) - 1 for t in lora], device=self.device)
        rank = max(t.A.shape[0] for t in distinct)
        factory = {"device": self.device, "dtype": self.dtype}
        A = torch.zeros(len(slots), rank, layer.in_features, **factory)
        B = torch.zeros(len(slots), layer.out_features, rank, **factory)
        bias = (
            torch.zeros(len(slots), layer.out_features, **factory)
            if any(t.bias is not None for t in distinct)
            else None
        )
        for i, t in enumerate(distinct):
            A[i, : t.A.shape[0]] = t.A
            B[i, :, : t.B.shape[1]] = t.B * t.scaling
            if t.bias is not None:
                bias[i] = t.bias * t.scaling  # PEFT scales b with B·A
        if len(slots) > 1:  # the gather: each row's stack, kept while the batch's rows stay the same
            A, B = A.index_select(0, slot), B.index_select(0, slot)
            bias = None if bias is None else bias.index_select(0, slot)
        layer.A, layer.B, layer.lora_bias = A, B, bias
        dora = [i for i, t in enumerate(lora) if t is not None and t.magnitude is not None]
        if dora:
            scales = [self._derive(rows[i], name, layer, lora[i]) for i in dora]
            layer.dora = (torch.tensor(dora, device=self.device), torch.stack(scales))

    def _plan_ia3(self, layer: MultiLoraLayer, terms: list) -> None:
        for feedforward in (True, False):
            mine = [i for i, t in enumerate(terms) if isinstance(t, IA3Term) and t.feedforward == feedforward]
            if not mine:
                continue
            plan = (
                torch.tensor(mine, device=self.device),
                torch.stack([terms[i].scale for i in mine]).to(self.device, self.dtype),
            )
            if feedforward:
                layer.ia3_in = plan
            else:
                layer.ia3_out = plan

    def _plan_fourier(self, layer: MultiLoraLayer, name: str, rows: Sequence, terms: list) -> None:
        """FourierFT rows: each row's positions and α/d_in-scaled coefficients, zero-padded to the largest n."""
        mine = [i for i, t in enumerate(terms) if isinstance(t, FourierTerm)]
        if not mine:
            return
        n = max(terms[i].spectrum.numel() for i in mine)
        pos_rows = torch.zeros(len(mine), n, dtype=torch.long, device=self.device)
        pos_cols = torch.zeros_like(pos_rows)
        coef = torch.zeros(len(mine), n, device=self.device)
        for j, i in enumerate(mine):
            term = terms[i]
            r, c = self._derive(rows[i], name, layer, term)
            m = term.spectrum.numel()
            pos_rows[j, :m], pos_cols[j, :m] = r, c
            coef[j, :m] = term.spectrum.float() * (term.scaling / layer.in_features)
        layer.fourier = (torch.tensor(mine, device=self.device), pos_rows, pos_cols, coef)

    def _derive(self, adapter: AdapterWeights, name: str, layer: MultiLoraLayer, term: Term):
        """DoRA's m / ||W + s·B·A|| or FourierFT's positions for ``adapter`` on layer ``name``, computed once."""
        memo = self._derived.setdefault(adapter, {})
        if name not in memo:
            if isinstance(term, LoraTerm):
                memo[name] = dora_scale(term, layer.base_layer).to(self.device, self.dtype)
            else:
                r, c = fourierft_positions(layer.out_features, layer.in_features, term.spectrum.numel(), term.seed)
                memo[name] = (r.to(self.device), c.to(self.device))
        return memo[name]

    def clear(self) -> None:
        """Every row runs the base model until ``set_rows`` is called again."""
        for layer in self.layers.values():
            layer.reset()
        self._plan_key = None

    def remove(self) -> nn.Module:
        """Put the base layers back; returns the model."""
        uninstall_layers(self.model, self.layers)
        self.layers.clear()
        self._plan_key = None
        return self.model


@torch.no_grad()
def dora_scale(term: LoraTerm, base: nn.Module) -> torch.Tensor:
    """m / ||W + s·B·A|| per output channel, in fp32 (as ``LoraLayer.dora_scale`` computes it)."""
    w = base.weight.float()
    w = w.T if isinstance(base, Conv1D) else w  # d_out x d_in
    adapted = w + (term.B.float().to(w.device) @ term.A.float().to(w.device)) * term.scaling
    return term.magnitude.float().to(w.device) / torch.linalg.norm(adapted, dim=1)


__all__ = [
    "AdapterWeights",
    "FourierTerm",
    "IA3Term",
    "LoraTerm",
    "LoraWeights",
    "MultiLora",
    "MultiLoraLayer",
    "UnservableAdapter",
    "check_servable",
    "fourierft_forward",
]
