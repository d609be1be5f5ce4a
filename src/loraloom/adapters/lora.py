"""LoRA: y = W0·x + s·B·A·dropout(x), with s = alpha/r (or alpha/sqrt(r) for rsLoRA).

The whole method is ``LoraLayer``: init, forward, and the delta that merge/unmerge add and remove.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .base import AdapterConfig, AdapterError, AdapterLayer, kaiming_uniform_, pattern_value

# init_lora_weights values: PEFT's True (kaiming-uniform A), "gaussian" (A ~ N(0, 1/r)), False (A and B
# both random: not the identity, for tests), and "zeros" (A = B = 0: nothing random, for weights that
# will be loaded or composed right after).
INIT_CHOICES = (True, False, "gaussian", "zeros")


@dataclass
class LoraConfig(AdapterConfig):
    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise AdapterError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise AdapterError(f"LoraConfig.bias={self.bias!r} is not supported; only 'none'")
        if self.init_lora_weights not in INIT_CHOICES:
            raise AdapterError(
                f"LoraConfig.init_lora_weights must be one of {INIT_CHOICES}, got {self.init_lora_weights!r}"
            )

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        return (
            pattern_value(self.rank_pattern, module_name, self.r),
            pattern_value(self.alpha_pattern, module_name, self.lora_alpha),
        )

    def make_layer(self, name: str, base_layer: nn.Module) -> LoraLayer:
        r, alpha = self.rank_and_alpha(name)
        return LoraLayer(base_layer, r, alpha, self.lora_dropout, self.use_rslora, self.init_lora_weights)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["init_lora_weights"] = self.init_lora_weights if self.init_lora_weights != "zeros" else True
        return d


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


class LoraLayer(AdapterLayer):
    adapter_param_names = ("lora_A", "lora_B")

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        super().__init__(base_layer)
        self.r = r
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        w = base_layer.weight
        # nn.Linear sub-modules so the state-dict keys are PEFT's: <path>.lora_A.weight, <path>.lora_B.weight
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_parameters(self, init_lora_weights: bool | str = True) -> None:
        if init_lora_weights is False:  # nn.Linear's own random init for both: a non-identity adapter
            kaiming_uniform_(self.lora_A.weight)
            kaiming_uniform_(self.lora_B.weight)
            return
        if init_lora_weights is True:
            kaiming_uniform_(self.lora_A.weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.zeros_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        # Scale the r-wide intermediate rather than the d_out-wide output: same result, less work.
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))) * self.scaling
        return y + self.lora_B(h).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in the nn.Linear layout (d_out x d_in), computed in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"
