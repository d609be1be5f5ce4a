"""A new adapter type in one file, for tests/test_adapter_contract.py: a rank-one update s·u·vᵀ.

It is what a contributor writes to add a type: a config (its defaults, learning rate and CLI options) and a
layer (forward, and the update that merge adds). Registering it is one line: ``register(OuterConfig)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from loraloom.adapters.base import AdapterConfig, AdapterError, AdapterLayer


@dataclass
class OuterConfig(AdapterConfig):
    peft_type: ClassVar[str] = "OUTER"
    default_lr: ClassVar[float] = 1e-3
    cli_options: ClassVar[dict[str, str]] = {"outer_scale": "scale"}
    scale: float = 1.0
    # True: u starts at 0 (the identity); False: random, for tests.
    init_zero: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise AdapterError(f"OuterConfig.scale must be a finite number, got {self.scale!r}")

    def fill_model_defaults(self, model_type: str | None) -> None:
        if self.target_modules is None:
            self.target_modules = ["q", "v"] if model_type == "t5" else ["q_proj", "v_proj"]

    def make_layer(self, name: str, base_layer: nn.Module) -> OuterLayer:
        return OuterLayer(base_layer, self.scale, self.init_zero)


class OuterLayer(AdapterLayer):
    adapter_param_names = ("outer_u", "outer_v")
    supported_layers = (nn.Linear,)

    def __init__(self, base_layer: nn.Module, scale: float, init_zero: bool = True) -> None:
        super().__init__(base_layer)
        self.scale = scale
        w = base_layer.weight
        u = torch.zeros(self.out_features) if init_zero else torch.randn(self.out_features)
        self.outer_u = nn.Parameter(u.to(device=w.device, dtype=w.dtype))
        self.outer_v = nn.Parameter(torch.randn(self.in_features).to(device=w.device, dtype=w.dtype) / 4)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * torch.outer(self.outer_u, self.outer_v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + (self.scale * (x @ self.outer_v))[..., None] * self.outer_u
