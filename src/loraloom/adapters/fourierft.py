"""FourierFT: ΔW = scaling · Re(IDFT2(S)), S zero but for n learned real coefficients at fixed random positions.

Same numbers as PEFT (positions, scaling, 1/(d_out·d_in) normalisation), less work:
- ΔW comes from the Hermitian half of the spectrum through ``irfft2`` (real output, half the transform);
- W + ΔW is built only when the coefficients (or W) change and reused otherwise, so a forward without
  gradient (eval, generation) is the base model's single matmul, and so is each micro-batch of a step;
- training: one matmul with W + ΔW each way instead of PEFT's two, and the coefficient gradient read off
  the spectra of x and of the output gradient at the n positions, instead of the dense matmul gyᵀ·x.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterConfig, AdapterError, AdapterLayer, check_dense, pattern_value
from .lora import DEFAULT_LORA_TARGETS

# Elements of one gathered spectrum plane in the coefficient gradient (see spectrum_grad).
GRAD_CHUNK_ELEMENTS = 1 << 18

# PEFT's FourierFT targets are LoRA's, but for GPT-2 (whose attention is one fused c_attn).
DEFAULT_FOURIERFT_TARGETS = {**DEFAULT_LORA_TARGETS, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}


@dataclass
class FourierFTConfig(AdapterConfig):
    peft_type: ClassVar[str] = "FOURIERFT"
    default_lr: ClassVar[float] = 5e-2
    cli_options: ClassVar[dict[str, str]] = {"n_frequency": "n_frequency", "scaling": "scaling"}
    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    # False (PEFT's default): coefficients start as randn(n), so the adapter is not the identity at step 0.
    init_weights: bool = False
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    # "none", "all" (every bias of the model trains and is saved) or "fourier_only" (the adapted layers').
    bias: str = "none"
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            isinstance(self.scaling, bool)
            or not isinstance(self.scaling, (int, float))
            or not math.isfinite(self.scaling)
        ):
            raise AdapterError(f"FourierFTConfig.scaling must be a finite number, got {self.scaling!r}")
        for name, n in [("n_frequency", self.n_frequency), *self.n_frequency_pattern.items()]:
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise AdapterError(f"FourierFTConfig: n_frequency for {name!r} must be a positive integer, got {n!r}")
        if not isinstance(self.random_loc_seed, int):
            raise AdapterError(f"FourierFTConfig.random_loc_seed must be an integer, got {self.random_loc_seed!r}")
        if self.bias not in ("none", "all", "fourier_only"):
            raise AdapterError(f"FourierFTConfig.bias must be 'none', 'all' or 'fourier_only', got {self.bias!r}")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise AdapterError("FourierFTConfig.layers_to_transform / layers_pattern need a list target_modules")

    def fill_model_defaults(self, model_type: str | None) -> None:
        if not self.target_modules and model_type in DEFAULT_FOURIERFT_TARGETS:
            self.target_modules = list(DEFAULT_FOURIERFT_TARGETS[model_type])

    def check_file_shapes(self, shapes: dict[str, tuple[int, ...]], source: str) -> None:
        suffix = ".fourierft_spectrum"
        for key, shape in shapes.items():
            if key.endswith(suffix):
                name = key[len("base_model.model.") : -len(suffix)]
                n = pattern_value(self.n_frequency_pattern, name, self.n_frequency)
                if tuple(shape) != (n,):
                    field = "n_frequency_pattern" if n != self.n_frequency else "n_frequency"
                    raise AdapterError(
                        f"{source}: tensor {key!r} has shape {tuple(shape)} but the config's {field!r} gives "
                        f"layer {name!r} {n} frequencies"
                    )

    def make_layer(self, name: str, base_layer: nn.Module) -> FourierFTLayer:
        check_dense(name, base_layer, "FourierFT")
        n = pattern_value(self.n_frequency_pattern, name, self.n_frequency)
        return FourierFTLayer(base_layer, n, self.scaling, self.random_loc_seed, self.init_weights, name=name)


class TrackedParameter(nn.Parameter):
    """An ``nn.Parameter`` that counts reads and writes of ``.data``.

    In-place writes through ``p.data`` (``p.data += x``, ``p.data.copy_(y)``, ``p.data = t``) do not bump
    ``p._version``, so a cache keyed on the version alone would go stale; any access to ``.data`` bumps
    this counter instead (a read only costs a rebuild of the cache). A FourierFT layer puts its base
    weight in this class while installed and gives it back as a plain ``nn.Parameter`` when removed.
    """

    @property
    def data(self) -> torch.Tensor:
        self.__dict__[DATA_EPOCH] = self.__dict__.get(DATA_EPOCH, 0) + 1
        return nn.Parameter.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        self.__dict__[DATA_EPOCH] = self.__dict__.get(DATA_EPOCH, 0) + 1
        nn.Parameter.data.__set__(self, value)


DATA_EPOCH = "_loraloom_data_epoch"


def track_data_writes(p: torch.Tensor) -> bool:
    """Make ``p`` a TrackedParameter in place; False if it cannot be (not a plain nn.Parameter)."""
    if type(p) is nn.Parameter:
        p.__class__ = TrackedParameter
    return type(p) is TrackedParameter


def change_key(p: torch.Tensor) -> tuple:
    """Changes whenever ``p``'s values can have changed: object, storage, version counter, .data accesses."""
    return (id(p), p.data_ptr(), p._version, p.__dict__.get(DATA_EPOCH, 0), p.dtype, p.device)


@functools.lru_cache(maxsize=32)
def fourierft_positions(d_out: int, d_in: int, n_frequency: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the n spectral coefficients: PEFT's rule, so PEFT's saved spectra land where they belong.

    Every layer of one shape draws the same positions, so they are drawn once per (shape, n, seed).
    """
    idx = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n_frequency]
    return idx // d_in, idx % d_in


def _half_bins(k: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequency k of a real signal of length ``size`` as (bin in the one-sided rfft spectrum, mirrored?)."""
    mirrored = k > size // 2
    return torch.where(mirrored, size - k, k), mirrored


def _fold_weight(bins: torch.Tensor, size: int) -> torch.Tensor:
    """irfft counts every one-sided bin twice (itself and its mirror) but the DC and Nyquist bins once."""
    edge = (bins == 0) | ((size % 2 == 0) & (bins == size // 2))
    return torch.where(edge, 1.0, 0.5)


def _spectrum_fm(x: torch.Tensor) -> torch.Tensor:
    """rfft along the features of (T, d) as (2, d//2+1, T): real and imaginary planes, one row per frequency."""
    return torch.view_as_real(torch.fft.rfft(x.float(), dim=-1)).permute(2, 1, 0).contiguous()


class _FourierFTLinear(torch.autograd.Function):
    """y = x·(W + ΔW)ᵀ + b with W, b frozen: one matmul each way, and ∂L/∂c without forming gyᵀ·x.

    ∂L/∂c_p = scaling/(d_out·d_in) · Σ_t Re(fft(gy)[t, row_p] · fft(x)[t, col_p]), since ΔW is a sum of
    cosines; with rfft the mirrored half of each spectrum is the conjugate of the stored half.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, spectrum: torch.Tensor, layer: FourierFTLayer) -> torch.Tensor:
        # `spectrum` is the layer's own parameter, passed in so that autograd routes its gradient here.
        weight = layer.cached_weight()
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        return F.linear(x, weight, layer.base_layer.bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        grad_x = grad_y @ weight.to(grad_y.dtype) if ctx.needs_input_grad[0] else None  # autocast: bf16 grad_y
        grad_c = layer.spectrum_grad(x, grad_y) if ctx.needs_input_grad[1] else None
        return grad_x, grad_c, None


class FourierFTLayer(AdapterLayer):
    adapter_param_names = ("fourierft_spectrum",)

    def __init__(
        self,
        base_layer: nn.Module,
        n_frequency: int,
        scaling: float,
        random_loc_seed: int = 777,
        init_weights: bool = False,
        name: str = "",
    ) -> None:
        super().__init__(base_layer)
        d_out, d_in = self.out_features, self.in_features
        if n_frequency > d_out * d_in:
            raise AdapterError(
                f"FourierFT layer {name!r}: n_frequency={n_frequency} exceeds the {d_out}x{d_in}={d_out * d_in} "
                "entries of its weight; lower n_frequency (or set n_frequency_pattern for this layer)"
            )
        self.n_frequency = n_frequency
        self.scaling = scaling
        self.random_loc_seed = random_loc_seed
        w = base_layer.weight
        coef = torch.zeros(n_frequency) if init_weights else torch.randn(n_frequency)
        self.fourierft_spectrum = nn.Parameter(coef.to(device=w.device, dtype=w.dtype))

        rows, cols = fourierft_positions(d_out, d_in, n_frequency, random_loc_seed)
        row_bin, row_mirrored = _half_bins(rows, d_out)
        col_bin, col_mirrored = _half_bins(cols, d_in)
        # S's Hermitian half (d_out x d_in//2+1) gets c_p at (row, col), or at the mirror (-row, -col) when
        # col is in the dropped half; irfft2 then restores Re(ifft2(S)).
        half_row = torch.where(col_mirrored, (d_out - rows) % d_out, rows)
        buffers = {
            "half_index": half_row * (d_in // 2 + 1) + col_bin,
            "half_weight": _fold_weight(col_bin, d_in),
            # For the gradient: bins of the one-sided spectra of gy (rows) and x (cols), and the sign of the
            # imaginary product: -1 when exactly one of the two frequencies is a conjugated mirror.
            "row_bin": row_bin,
            "col_bin": col_bin,
            "bin_sign": torch.where(row_mirrored == col_mirrored, 1.0, -1.0),
        }
        for key, t in buffers.items():
            self.register_buffer(key, t.to(w.device), persistent=False)
        track_data_writes(base_layer.weight)
        self._cache: tuple | None = None  # (key of W, spectrum copy, W + ΔW)

    def delta_weight(self) -> torch.Tensor:
        """scaling · Re(ifft2(S)) in the nn.Linear layout (d_out x d_in), fp32, differentiable."""
        d_out, d_in = self.out_features, self.in_features
        coef = (self.fourierft_spectrum.float() * (self.half_weight.float() * self.scaling)).to(torch.complex64)
        half = coef.new_zeros(d_out * (d_in // 2 + 1)).index_add_(0, self.half_index, coef)
        return torch.fft.irfft2(half.view(d_out, -1), s=(d_out, d_in))

    @torch.no_grad()
    def spectrum_grad(self, x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
        """∂L/∂c from the layer input x and output gradient: fft(gy)ᵀ·fft(x) sampled at the n positions."""
        x, grad_y = x.reshape(-1, self.in_features), grad_y.reshape(-1, self.out_features)
        dots = x.new_zeros(2, self.n_frequency, dtype=torch.float32)  # Σ_t re·re and Σ_t im·im per position
        # Token chunks keep the gathered (2, n, chunk) planes cache-sized instead of n/d times x's size.
        chunk = max(1, GRAD_CHUNK_ELEMENTS // self.n_frequency)
        for t in range(0, x.shape[0], chunk):
            xs, gs = _spectrum_fm(x[t : t + chunk]), _spectrum_fm(grad_y[t : t + chunk])
            dots += torch.linalg.vecdot(xs.index_select(1, self.col_bin), gs.index_select(1, self.row_bin))
        grad = (dots[0] - self.bin_sign * dots[1]) * (self.scaling / (self.in_features * self.out_features))
        return grad.to(self.fourierft_spectrum.dtype)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight in the nn.Linear layout (a view for Conv1D)."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def cached_weight(self) -> torch.Tensor:
        """W + ΔW (nn.Linear layout, W's dtype, summed in fp32), rebuilt only when the spectrum or W changed.

        No autograd graph: _FourierFTLinear supplies the gradient. The n coefficients are compared by
        value, which sees every write (fused optimizers, for one, do not bump the version counter). The
        frozen base weight, too large to compare, is keyed on what changes with every edit made through
        torch: the object, its storage, its version counter (in-place ops, load_state_dict) and, through
        TrackedParameter, any use of ``.data``. A base weight that trains is never cached (``forward``).
        Not seen: writes into the base weight's memory from outside torch (a NumPy view from ``.numpy()``,
        a ctypes pointer), or by a tensor subclass other than nn.Parameter put in its place after the layer
        was built; call ``clear_cache()`` after such writes.
        """
        w, spectrum = self.base_layer.weight, self.fourierft_spectrum
        if type(w) is nn.Parameter:  # the weight was replaced by a new Parameter: track that one
            track_data_writes(w)
        key = change_key(w) + (spectrum.dtype, spectrum.device)
        cache = self._cache
        if cache is None or cache[0] != key or not torch.equal(cache[1], spectrum):
            with torch.no_grad():
                weight = (self.base_weight().float() + self.delta_weight()).to(w.dtype)
                self._cache = cache = (key, spectrum.detach().clone(), weight)
        return cache[2]

    def clear_cache(self) -> None:
        """Drop W + ΔW; the next no-grad forward rebuilds it (for writes the cache cannot see)."""
        self._cache = None

    def release(self) -> None:
        self._cache = None
        w = self.base_layer.weight
        if type(w) is TrackedParameter:
            w.__class__ = nn.Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if weight.requires_grad:  # rare: the base trains too (a fused optimizer step bumps no version): no cache
            return F.linear(x, self.base_weight() + self.delta_weight().to(weight.dtype), bias)
        if torch.is_grad_enabled():
            if bias is not None and bias.requires_grad:
                return F.linear(x, self.base_weight() + self.delta_weight().to(weight.dtype), bias)
            if self.fourierft_spectrum.requires_grad:
                return _FourierFTLinear.apply(x, self.fourierft_spectrum, self)
        return F.linear(x, self.cached_weight(), bias)

    def merge(self) -> None:
        self._cache = None
        super().merge()

    def unmerge(self) -> None:
        self._cache = None
        super().unmerge()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_frequency={self.n_frequency}, scaling={self.scaling:g}"
