"""LoRA: y = W0·x + s·B·A·dropout(x), with s = alpha/r (or alpha/sqrt(r) for rsLoRA).

The whole method is ``LoraLayer``: init, forward, and the delta that merge/unmerge add and remove.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .base import AdapterConfig, AdapterError, AdapterLayer, check_dense, kaiming_uniform_, pattern_value
from .lora_init import check_base_init, init_from_base_, orthogonal_init_, residual_base_

# Default LoRA targets per `model.config.model_type`, as in PEFT.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "umt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}

# init_lora_weights values a new adapter can start from: PEFT's True (kaiming-uniform A, B = 0),
# "gaussian" (A ~ N(0, 1/r)), False (A and B both random: not the identity, for tests), "pissa" and
# "pissa_niter_N" (W's top singular vectors; the base keeps the residual), "olora" (W's QR factors, idem),
# "orthogonal"; and loraloom's "zeros" (A = B = 0, for weights loaded or composed right after; saved as True).
INIT_CHOICES = (True, False, "gaussian", "zeros", "pissa", "pissa_niter_N", "olora", "orthogonal")
# Every other value PEFT writes is accepted when loading (the saved A and B are what count).
INIT_LOAD_ONLY = ("eva", "corda", "loftq", "lora_ga", "mica")
# Inits for which PEFT changes the base weight with data or quantization loraloom does not have: a loaded
# adapter of this kind is applied to the base as given (PEFT's converted format, or the saved residual model).
INIT_BASE_CHANGED_ELSEWHERE = ("corda", "loftq")


def is_pissa(init: Any) -> bool:
    return init == "pissa" or (
        isinstance(init, str) and init.startswith("pissa_niter_") and init.removeprefix("pissa_niter_").isdigit()
    )


@dataclass
class LoraConfig(AdapterConfig):
    """PEFT's LoraConfig: every field PEFT 0.21 writes is a field here, in ``refused_fields`` or in
    ``ignored_fields`` (tests/test_peft_configs.py checks that against the installed PEFT)."""

    peft_type: ClassVar[str] = "LORA"
    default_lr: ClassVar[float] = 2e-4
    cli_options: ClassVar[dict[str, str]] = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding)
    refused_fields: ClassVar[dict[str, str]] = {
        "megatron_config": "Megatron tensor-parallel layers are not supported",
        "trainable_token_indices": "trainable token rows (PEFT's TrainableTokens) are not implemented",
        "use_qalora": "QALoRA is for GPTQ-quantized base models",
        "alora_invocation_tokens": "Activated LoRA turns the adapter on per token",
        "monteclora_config": "MonteCLoRA samples the adapter weights",
        "layer_replication": "layer replication rebuilds the model's layer stack",
        "target_parameters": "LoRA on bare parameters (MoE experts) is not implemented",
        "use_bdlora": "block-diagonal LoRA is not implemented",
        "arrow_config": "Arrow routing over several adapters is not implemented",
        "kasa_config": "KaSA truncates the base weight and adds lora_diag",
        "ensure_weight_tying": "tied adapters on tied embedding / output layers are not implemented",
        "enable_lora": "old PEFT's MergedLinear (LoRA on parts of a fused layer): re-save it with a current PEFT",
    }
    ignored_fields: ClassVar[dict[str, str]] = {
        "megatron_core": "module path used only with megatron_config (refused when set)",
        "qalora_group_size": "used only with use_qalora (refused when set)",
        "loftq_config": "used only to create an adapter with init_lora_weights='loftq'",
        "eva_config": "used only to create an adapter with init_lora_weights='eva'",
        "corda_config": "used only to create an adapter with init_lora_weights='corda'",
        "lora_ga_config": "used only to create an adapter with init_lora_weights='lora_ga'",
        "velora_config": "VeLoRA changes only what the training backward stores; the outputs are LoRA's",
        "merge_weights": "old PEFT's merge-on-eval switch; loraloom merges when asked",
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    # "none", or train and save biases too: "all" (every bias of the model) or "lora_only" (the adapted layers').
    bias: str = "none"
    use_rslora: bool = False
    # DoRA: a learned magnitude per output channel on top of LoRA's direction (PEFT's use_dora).
    use_dora: bool = False
    init_lora_weights: bool | str = True
    # Adapt only these layer indices (the number after ``layers_pattern``, or after the first "<name>.").
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # A trainable bias in lora_B (added, scaled by s, to the base bias on merge).
    lora_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise AdapterError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
                raise AdapterError(f"LoraConfig.{name} must map module patterns to numbers, got {pattern!r:.60}")
        alphas = {"lora_alpha": self.lora_alpha, **{f"alpha_pattern[{k!r}]": v for k, v in self.alpha_pattern.items()}}
        for name, value in alphas.items():  # a NaN or inf alpha loads, then makes every output NaN
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AdapterError(f"LoraConfig.{name} must be a finite number, got {value!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise AdapterError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        if not (init in INIT_CHOICES or init in INIT_LOAD_ONLY or is_pissa(init)) or init == "pissa_niter_N":
            raise AdapterError(
                f"LoraConfig.init_lora_weights must be one of {INIT_CHOICES + INIT_LOAD_ONLY} (N a number "
                f"in 'pissa_niter_N'), got {init!r}"
            )
        if isinstance(self.layers_to_transform, bool) or not (
            self.layers_to_transform is None
            or isinstance(self.layers_to_transform, int)
            or all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers_to_transform)
        ):
            raise AdapterError(
                f"LoraConfig.layers_to_transform must be an int or a list of ints, got {self.layers_to_transform!r}"
            )
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise AdapterError(
                "LoraConfig.layers_to_transform / layers_pattern cannot be used with a regex target_modules"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterError("LoraConfig.layers_pattern needs layers_to_transform")
        if self.lora_bias and init not in (True, False, "zeros"):
            raise AdapterError(f"LoraConfig.lora_bias=True needs init_lora_weights True or False, got {init!r}")
        if self.lora_bias and self.use_dora:
            raise AdapterError("LoraConfig.lora_bias=True is not supported with use_dora=True (PEFT's rule)")

    def fill_model_defaults(self, model_type: str | None) -> None:
        if not self.target_modules and model_type in DEFAULT_LORA_TARGETS:
            self.target_modules = list(DEFAULT_LORA_TARGETS[model_type])

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        return (
            pattern_value(self.rank_pattern, module_name, self.r),
            pattern_value(self.alpha_pattern, module_name, self.lora_alpha),
        )

    def check_file_shapes(self, shapes: dict[str, tuple[int, ...]], source: str) -> None:
        for key, shape in shapes.items():
            for suffix in (".lora_A.weight", ".lora_embedding_A"):
                if key.endswith(suffix) and shape:
                    name = key[len("base_model.model.") : -len(suffix)]
                    rank = self.rank_and_alpha(name)[0]
                    if shape[0] != rank:
                        field = "rank_pattern" if rank != self.r else "r"
                        raise AdapterError(
                            f"{source}: tensor {key!r} has rank {shape[0]} but the config's {field!r} gives "
                            f"layer {name!r} rank {rank}"
                        )

    def make_layer(self, name: str, base_layer: nn.Module) -> LoraLayer:
        """A new layer; inits that read the base weight (PiSSA, OLoRA, orthogonal) follow in ``init_layer``."""
        init = self.init_lora_weights
        if init in INIT_LOAD_ONLY:
            raise AdapterError(
                f"init_lora_weights={init!r} needs PEFT's data-driven set-up: loraloom accepts it when loading a "
                f"saved adapter; a new adapter starts from one of {INIT_CHOICES}"
            )
        return self.make_empty_layer(name, base_layer)

    def init_layer(self, name: str, layer: AdapterLayer) -> None:
        # PiSSA / OLoRA also leave W - s·B·A in the base layer.
        init = self.init_lora_weights
        try:
            if is_pissa(init) or init == "olora":
                init_from_base_(layer, init)
            elif init == "orthogonal":
                orthogonal_init_(layer)
        except AdapterError as e:
            raise AdapterError(f"layer {name!r}: {e}") from e

    def make_empty_layer(self, name: str, base_layer: nn.Module) -> LoraLayer:
        """A layer of the right shapes whose weights are about to be loaded (A = B = 0; the base untouched)."""
        r, alpha = self.rank_and_alpha(name)
        if self.use_dora or is_pissa(self.init_lora_weights) or self.init_lora_weights == "olora":
            check_dense(
                name, base_layer, "use_dora" if self.use_dora else f"init_lora_weights={self.init_lora_weights!r}"
            )
        init = self.init_lora_weights if self.init_lora_weights in (True, False, "gaussian") else "zeros"
        layer_cls = next((c for c in LORA_LAYER_CLASSES if isinstance(base_layer, c.supported_layers)), LoraLayer)
        try:
            layer = layer_cls(base_layer, r, alpha, self.lora_dropout, self.use_rslora, init, self.use_dora)
        except AdapterError as e:
            raise AdapterError(f"layer {name!r}: {e}") from e
        if self.lora_bias:
            layer.add_lora_bias()
        if is_pissa(self.init_lora_weights) or self.init_lora_weights == "olora":
            try:  # a load re-derives the residual base later: refuse a layer it cannot, before any change
                check_base_init(layer, self.init_lora_weights)
            except AdapterError as e:
                raise AdapterError(f"layer {name!r}: {e}") from e
        return layer

    def prepare_loaded(self, layer: AdapterLayer) -> None:
        # PEFT re-runs PiSSA/OLoRA on the base it loads into: on the original base this re-derives the residual.
        init = self.init_lora_weights
        if is_pissa(init) or init == "olora":
            residual_base_(layer, init)
        elif init in INIT_BASE_CHANGED_ELSEWHERE:
            warnings.warn(
                f"init_lora_weights={init!r}: PEFT changed the base weight with data loraloom does not have; the "
                "saved adapter is applied to the base model as given (right for the residual model saved with it)",
                stacklevel=2,
            )

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["init_lora_weights"] = self.init_lora_weights if self.init_lora_weights != "zeros" else True
        return d


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s·B·A in fp32: the update LoRA adds to a weight, as a d_out x k matrix.

    One module: A is r x k and B is d_out x r. A stack of P modules (LoraHub's compositions, batched
    serving): A is P x r x k and B is P x d_out x r, giving P x d_out x k. k is d_in for a linear layer,
    d_in·kh·kw for a convolution (its kernel flattened) and the vocabulary size for an embedding.
    """
    return (lora_B.float() @ lora_A.float()) * scaling


def lora_forward(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float = 1.0,
    add_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """s·B·A·x (plus ``add_to``): the one LoRA forward, for the layer, LoraHub's composition and the server.

    One module: A is r x d_in, B d_out x r, x any ... x d_in. A stack of G modules (G x r x d_in, G x d_out x r):
    x's rows split into G contiguous shares, share g through module g, in two batched matmuls whatever G is
    (LoraHub's P candidates; a server's adapter per row). The scaling multiplies the r-wide intermediate, not
    the d_out-wide output: same result, less work.
    """
    if lora_A.dim() == 3 and lora_A.shape[0] == 1:
        lora_A, lora_B = lora_A[0], lora_B[0]
    if lora_A.dim() == 2:
        delta = F.linear(F.linear(x, lora_A) * scaling, lora_B)
        return delta if add_to is None else add_to + delta.to(add_to.dtype)
    g = lora_A.shape[0]
    if x.shape[0] % g:
        raise AdapterError(f"batch of {x.shape[0]} rows cannot be split among {g} adapters")
    rows = x.reshape(g, -1, x.shape[-1])  # share i: rows i·n/g .. (i+1)·n/g - 1
    h = torch.bmm(rows, lora_A.transpose(1, 2))
    if scaling != 1.0:
        h = h * scaling
    if add_to is None or add_to.dtype != h.dtype:
        delta = torch.bmm(h, lora_B.transpose(1, 2)).reshape(*x.shape[:-1], lora_B.shape[1])
        return delta if add_to is None else add_to + delta.to(add_to.dtype)
    out = torch.baddbmm(add_to.reshape(g, -1, lora_B.shape[1]), h, lora_B.transpose(1, 2))  # the add fused in
    return out.reshape(*x.shape[:-1], lora_B.shape[1])


class LoraLayer(AdapterLayer):
    """LoRA on an ``nn.Linear`` or a ``Conv1D``; ``LoraConv2d`` and ``LoraEmbedding`` change only how A and
    B are held and applied.

    With ``use_dora`` (DoRA, Liu et al. 2024, as PEFT computes it) the adapted weight is
    m ⊙ (W + s·B·A) / ||W + s·B·A||, the norm taken per output channel and treated as a constant in the
    backward pass; m (``lora_magnitude_vector``) starts at that norm, so a new DoRA layer computes what
    LoRA would.
    """

    supported_layers = (nn.Linear, Conv1D)
    lora_names: ClassVar[tuple[str, str]] = ("lora_A", "lora_B")

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        use_dora: bool = False,
    ) -> None:
        super().__init__(base_layer)
        self.r = r
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        w = base_layer.weight
        self.make_lora_weights(r, device=w.device, dtype=w.dtype)
        self.reset_parameters(init_lora_weights)
        self.use_dora = use_dora
        self.adapter_param_names = self.lora_names + (("lora_magnitude_vector",) if use_dora else ())
        if use_dora:
            magnitude = self.weight_norm().reshape(self.magnitude_shape())
            self.lora_magnitude_vector = nn.Parameter(magnitude.to(w.dtype))
        # DoRA's norm of the unmerged weight, kept from merge for unmerge (the merged weight no longer has it)
        self._merged_norm: torch.Tensor | None = None
        # The base weight as it was before PiSSA / OLoRA left W - s·B·A in it (lora_init.residual_from): a
        # plain attribute, not a buffer, so it is in no state dict; put back by ``release``.
        self.original_base_weight: torch.Tensor | None = None

    # ---- the parts that differ per base layer type ----------------------------------------------

    def make_lora_weights(self, r: int, **factory: Any) -> None:
        # nn.Linear sub-modules so the state-dict keys are PEFT's: <path>.lora_A.weight, <path>.lora_B.weight
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)

    @torch.no_grad()
    def reset_parameters(self, init_lora_weights: bool | str = True) -> None:
        a, b = self.lora_A.weight, self.lora_B.weight
        if init_lora_weights is False:  # nn.Linear's own random init for both: a non-identity adapter
            kaiming_uniform_(a)
            kaiming_uniform_(b)
            return
        if init_lora_weights is True:
            kaiming_uniform_(a)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1 / self.r)
        else:
            nn.init.zeros_(a)
        nn.init.zeros_(b)

    def lora_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A as r x k, B as d_out x r)."""
        return self.lora_A.weight, self.lora_B.weight

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """s·B·A·x, x already through dropout (+ s·b with ``lora_bias``)."""
        delta = lora_forward(x, self.lora_A.weight, self.lora_B.weight, self.scaling)
        if self.lora_B.bias is None:
            return delta
        return delta + self.lora_B.bias * self.scaling  # PEFT scales b with B·A

    def add_lora_bias(self) -> None:
        """PEFT's ``lora_bias``: a trainable bias in lora_B (saved as ``lora_B.bias``), zero at the start."""
        w = self.lora_B.weight
        self.lora_B.bias = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=w.dtype))

    def delta_bias(self) -> torch.Tensor | None:
        b = getattr(self.lora_B, "bias", None)
        return None if b is None else b.float() * self.scaling

    def base_matrix(self) -> torch.Tensor:
        """The base weight as a d_out x k fp32 matrix (a view where possible)."""
        w = self.base_layer.weight.float()
        return w.T if self.fan_in_fan_out else w

    def to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of ``base_matrix``: a d_out x k matrix in the base weight's own layout."""
        return matrix.T if self.fan_in_fan_out else matrix

    def per_channel(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast over this layer's output."""
        return v.reshape(-1)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    # ---- shared: forward, DoRA, merge -----------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        x = x.to(self.lora_matrices()[0].dtype)
        dropped = self.lora_dropout(x)
        lora_out = self.lora_forward(dropped)
        if not self.use_dora:
            return y + lora_out.to(y.dtype)
        scale = self.per_channel(self.dora_scale()).to(lora_out.dtype)
        # W·x without the bias, on the input the LoRA branch saw (PEFT: W·dropout(x) while dropout is active).
        dropout_active = self.training and not isinstance(self.lora_dropout, nn.Identity)
        base_out = self.base_layer(dropped) if dropout_active else y
        if self.bias is not None:
            base_out = base_out - self.per_channel(self.bias)
        return y + ((scale - 1) * base_out + scale * lora_out).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A as a d_out x k fp32 matrix (for a linear layer the d_out x d_in layout of ``nn.Linear``)."""
        return lora_delta(*self.lora_matrices(), self.scaling)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s·B·A|| per output channel (fp32, no gradient: DoRA treats it as a constant)."""
        return torch.linalg.norm(self.base_matrix() + self.delta_weight(), dim=1)

    def dora_scale(self) -> torch.Tensor:
        """m / ||W + s·B·A||, one factor per output channel; the gradient reaches m only."""
        return self.lora_magnitude_vector.reshape(-1) / self.weight_norm().to(self.lora_magnitude_vector.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        adapted = self.base_matrix() + self.delta_weight()
        if self.use_dora:
            self._merged_norm = torch.linalg.norm(adapted, dim=1)
            adapted = (self.lora_magnitude_vector.float().reshape(-1) / self._merged_norm)[:, None] * adapted
        self._add_bias_delta(+1.0)  # first: it refuses a base without a bias before anything changes
        self._write_base(adapted)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        merged = self.base_matrix()
        if self.use_dora:
            merged = merged / (self.lora_magnitude_vector.float().reshape(-1) / self._merged_norm)[:, None]
            self._merged_norm = None
        self._write_base(merged - self.delta_weight())
        self._add_bias_delta(-1.0)
        self.merged = False

    def _add_bias_delta(self, sign: float) -> None:
        delta = self.delta_bias()
        if delta is None:
            return
        bias = self.base_layer.bias
        if bias is None:  # PEFT warns at creation that such an adapter cannot merge
            raise AdapterError(f"cannot merge lora_bias into a {type(self.base_layer).__name__} without a bias")
        bias.data += sign * delta.to(bias.dtype)

    @torch.no_grad()
    def release(self) -> None:
        # Unmerged, the adapter leaves: the base gets its own weight back. Merged, the weight is the adapted
        # model (W - s·B0·A0 + s·B·A) that merge_and_unload must keep.
        if self.original_base_weight is not None and not self.merged:
            self.base_layer.weight.data.copy_(self.original_base_weight)
        self.original_base_weight = None

    def _write_base(self, matrix: torch.Tensor) -> None:
        w = self.base_layer.weight
        w.data.copy_(self.to_base_layout(matrix).reshape(w.shape).to(w.dtype))

    def extra_repr(self) -> str:
        dora = ", dora=True" if self.use_dora else ""
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}{dora}"


class LoraConv2d(LoraLayer):
    """LoRA on an ``nn.Conv2d``, PEFT's layout: A is a conv with the base kernel, stride and padding
    (in -> r channels), B a 1x1 conv (r -> out); the delta is B·A with the kernel flattened."""

    supported_layers = (nn.Conv2d,)

    def make_lora_weights(self, r: int, **factory: Any) -> None:
        base = self.base_layer
        # PEFT's lora_A takes no dilation or groups and pads with zeros: other convs would not merge exactly.
        if base.groups != 1 or tuple(base.dilation) != (1, 1) or base.padding_mode != "zeros":
            raise AdapterError(
                f"LoRA on Conv2d needs groups=1, dilation=1 and padding_mode='zeros'; this layer has "
                f"groups={base.groups}, dilation={base.dilation}, padding_mode={base.padding_mode!r}"
            )
        self.lora_A = nn.Conv2d(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False, **factory)
        self.lora_B = nn.Conv2d(r, self.out_features, 1, bias=False, **factory)

    def lora_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight.flatten(1), self.lora_B.weight.flatten(1)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scaling  # PEFT's order: a lora_bias is scaled too

    def base_matrix(self) -> torch.Tensor:
        return self.base_layer.weight.float().flatten(1)

    def to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.base_layer.weight.shape)

    def per_channel(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, 1, 1)  # channels first: (N, C, H, W) or (C, H, W)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_features, 1, 1)


class LoraEmbedding(LoraLayer):
    """LoRA on an ``nn.Embedding``, PEFT's layout: ``lora_embedding_A`` (r x vocab) and ``lora_embedding_B``
    (dim x r) as plain parameters; the delta B·A is dim x vocab, the transpose of the embedding table.

    As in PEFT, no dropout (the input is token ids) and A starts at zero, B normal.
    """

    supported_layers = (nn.Embedding,)
    lora_names = ("lora_embedding_A", "lora_embedding_B")

    def make_lora_weights(self, r: int, **factory: Any) -> None:
        if self.base_layer.max_norm is not None:  # F.embedding would renormalise lora_embedding_A in place
            raise AdapterError("LoRA on an nn.Embedding with max_norm set is not supported")
        self.lora_dropout = nn.Identity()
        self.lora_embedding_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.out_features, r, **factory))

    @torch.no_grad()
    def reset_parameters(self, init_lora_weights: bool | str = True) -> None:
        a, b = self.lora_embedding_A, self.lora_embedding_B
        if init_lora_weights is False:  # PEFT's randn for both: a non-identity adapter
            nn.init.normal_(a)
            nn.init.normal_(b)
            return
        nn.init.zeros_(a)
        if init_lora_weights == "zeros":
            nn.init.zeros_(b)
        else:  # True and "gaussian" alike, as in PEFT
            nn.init.normal_(b)

    def lora_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def add_lora_bias(self) -> None:
        raise AdapterError("lora_bias is not supported on an nn.Embedding (nor in PEFT)")

    def delta_bias(self) -> None:
        return None

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        rows = F.embedding(
            x,
            self.lora_embedding_A.T,
            padding_idx=base.padding_idx,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        out = (rows @ self.lora_embedding_B.T) * self.scaling
        # Scaled embeddings (e.g. Gemma3's) multiply their output by embed_scale: the LoRA part gets it too.
        embed_scale = getattr(base, "embed_scale", None)
        return out if embed_scale is None else out * torch.as_tensor(embed_scale).to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Token ids stay integers: only the LoRA parameters' dtype matters here.
        y = self.base_layer(x)
        if self.merged:
            return y
        lora_out = self.lora_forward(x)
        if not self.use_dora:
            return y + lora_out.to(y.dtype)
        scale = self.dora_scale().to(lora_out.dtype)
        return (scale * y + scale * lora_out).to(y.dtype)

    def base_matrix(self) -> torch.Tensor:
        return self.base_layer.weight.float().T  # vocab x dim -> dim x vocab

    def to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T


# The layer class for each kind of base layer, most specific first.
LORA_LAYER_CLASSES: tuple[type[LoraLayer], ...] = (LoraConv2d, LoraEmbedding, LoraLayer)
