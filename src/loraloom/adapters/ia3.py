"""(IA)³: learned vectors that rescale a layer's output (keys, values) or its input (feed-forward).

y = l ⊙ (W·x + b) for attention targets, y = W·(l ⊙ x) + b for feed-forward ones. The update is
multiplicative, so merging scales W's rows (and b) or columns instead of adding a delta.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import AdapterConfig, AdapterError, AdapterLayer

# PEFT's defaults per model type: targets, and which of them are feed-forward (scaled on the input).
DEFAULT_IA3_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
}
DEFAULT_IA3_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bart": ["fc2"],
    "opt": ["fc2"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
}


@dataclass
class IA3Config(AdapterConfig):
    peft_type: ClassVar[str] = "IA3"
    default_lr: ClassVar[float] = 3e-3
    # Targets whose input (not output) is scaled; a subset of target_modules. None: the model type's default.
    feedforward_modules: list[str] | str | None = None
    # True: vectors start at 1 (the identity); False: randn, for tests.
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        both_lists = isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list)
        if both_lists and not set(self.feedforward_modules) <= set(self.target_modules):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            raise AdapterError(f"IA3Config.feedforward_modules {extra} are not in target_modules {self.target_modules}")

    def fill_model_defaults(self, model_type: str | None) -> None:
        tables = {"target_modules": DEFAULT_IA3_TARGETS, "feedforward_modules": DEFAULT_IA3_FEEDFORWARD}
        for field_name, table in tables.items():
            if getattr(self, field_name) is None:
                if model_type not in table:
                    raise AdapterError(
                        f"IA3 has no default {field_name} for model type {model_type!r}; pass {field_name}=[...]"
                    )
                setattr(self, field_name, list(table[model_type]))
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            # Default feed-forward names outside the chosen targets would adapt nothing, and would make the
            # saved config one that PEFT refuses to load (it wants a subset).
            self.feedforward_modules = [f for f in self.feedforward_modules if f in self.target_modules]

    def is_feedforward(self, module_name: str) -> bool:
        # PEFT's rule, kept exactly (a plain suffix, no "." boundary): it fixes each saved vector's shape.
        ff = self.feedforward_modules or []
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(f) for f in ff)

    def make_layer(self, name: str, base_layer: nn.Module) -> IA3Layer:
        return IA3Layer(base_layer, self.is_feedforward(name), self.init_ia3_weights)


class IA3Layer(AdapterLayer):
    adapter_param_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, init_ia3_weights: bool = True) -> None:
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward
        # PEFT's shapes: (1, d_in) scales the input, (d_out, 1) the output (nn.Linear layout).
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        scale = torch.ones(shape) if init_ia3_weights else torch.randn(shape)
        w = base_layer.weight
        self.ia3_l = nn.Parameter(scale.to(device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer((x * scale).to(x.dtype))
        y = self.base_layer(x)
        return (y * scale).to(y.dtype)

    @torch.no_grad()
    def _rescale(self, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """W ← op(W, l) on rows (or, feed-forward, columns), and b ← op(b, l) for output scaling; in fp32."""
        scale = self.ia3_l.detach().float()
        w, b = self.base_layer.weight, self.base_layer.bias
        w.data.copy_(op(w.data.float(), scale.T if self.fan_in_fan_out else scale))
        if b is not None and not self.is_feedforward:
            b.data.copy_(op(b.data.float(), scale.flatten()))

    def merge(self) -> None:
        if not self.merged:
            self._rescale(torch.mul)
            self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        if (self.ia3_l == 0).any():
            raise AdapterError("cannot unmerge IA3: a scaling entry is 0, so the merge erased that part of the weight")
        self._rescale(torch.div)
        self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feedforward={self.is_feedforward}"
