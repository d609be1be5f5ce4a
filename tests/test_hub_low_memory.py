"""``low_memory``: Adam's gradient accumulated one example at a time equals the batched one (w, objective)."""

from __future__ import annotations

import math

import pytest
import torch
from hub_modules import EXAMPLES, make_modules, tokenizer
from test_hub_objective import setup
from tiny_models import tiny_t5

import loraloom as ll
from loraloom.hub.engine import is_quantized
from loraloom.hub.objective import Objective
from loraloom.quantize import quantize_model

W = [[0.4, -1.0, 1.3], [1.5, 0.2, -0.7]]


def gradient(objective: Objective, low_memory: bool) -> tuple[torch.Tensor, torch.Tensor]:
    objective.low_memory = low_memory
    w = torch.tensor(W, requires_grad=True)
    with torch.enable_grad():
        scores = objective.gradient(w)
    return scores.values, w.grad


@pytest.mark.parametrize("arch", ["t5", "llama"])
@pytest.mark.parametrize("formula, batch_size", [("mean", None), ("reference", None), ("reference", 2)])
def test_accumulated_gradient_equals_the_batched_one(tmp_path, arch, formula, batch_size):
    # mean: Σ_i sums_i / Σ tokens; reference: per-batch token means / n. Both linear in each example's sum.
    *_, objective = setup(tmp_path, arch, formula=formula, batch_size=batch_size)
    values, grad = gradient(objective, low_memory=False)
    values_lm, grad_lm = gradient(objective, low_memory=True)
    assert torch.allclose(values_lm, values, rtol=1e-6, atol=0)
    assert torch.allclose(grad_lm, grad, rtol=1e-4, atol=1e-6)
    assert grad.abs().sum() > 0


def test_lorahub_low_memory_finds_the_same_weights(tmp_path):
    model = tiny_t5()
    modules = make_modules(model, tmp_path, 3)
    runs = [
        ll.lorahub(
            model, modules, EXAMPLES, tokenizer=tokenizer(), budget=16, lr=0.1, low_memory=low_memory, dtype="fp32"
        )
        for low_memory in (False, True)
    ]
    batched, accumulated = runs
    assert batched.settings["method"] == "gradient:Adam" and len(batched.trace) == 6  # 5 Adam steps + 1
    assert torch.allclose(torch.tensor(accumulated.weights), torch.tensor(batched.weights), rtol=0, atol=1e-5)
    assert accumulated.objective == pytest.approx(batched.objective, rel=1e-6)
    for a, b in zip(accumulated.trace, batched.trace, strict=True):
        assert a.objective == pytest.approx(b.objective, rel=1e-6) and a.gradient == b.gradient


def test_low_memory_runs_in_bf16_too(tmp_path):
    """One example at a time under bf16 parameters: the same search as batched bf16, up to bf16 rounding."""
    model = tiny_t5()
    modules = make_modules(model, tmp_path, 3)
    batched, accumulated = (
        ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), budget=10, lr=0.1, low_memory=lm, dtype="bf16")
        for lm in (False, True)
    )
    assert accumulated.settings["low_memory"] and accumulated.settings["dtype"] == "bf16"
    assert accumulated.objective == pytest.approx(batched.objective, rel=1e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_non_finite_loss_skips_the_step_as_batched(tmp_path):
    *_, objective = setup(tmp_path)
    for layer in objective.composition.layers.values():  # module 0 overflows the model
        layer.bank_A[0].fill_(1e30)
        layer.bank_B[0].fill_(1e30)
    objective.low_memory = True
    w = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    with torch.enable_grad():
        scores = objective.gradient(w)
    assert not math.isfinite(scores.values.item())


def test_on_by_default_with_a_quantized_base(tmp_path, monkeypatch):
    model = tiny_t5()
    modules = make_modules(model, tmp_path, 2)
    assert not is_quantized(model)
    seen = []
    real = Objective.gradient

    def spy(self, w):
        seen.append(self.low_memory)
        return real(self, w)

    monkeypatch.setattr(Objective, "gradient", spy)
    ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), budget=4)
    quantized = quantize_model(tiny_t5())
    assert is_quantized(quantized)
    ll.lorahub(quantized, modules, EXAMPLES, tokenizer=tokenizer(), budget=4)
    ll.lorahub(quantized, modules, EXAMPLES, tokenizer=tokenizer(), budget=4, low_memory=False)
    assert seen == [False, True, False]
