"""FourierFT's inference cache (W + ΔW) never serves stale weights after an edit a user can make through torch:
in-place ops, optimizer steps, load_state_dict, a replaced Parameter, dtype moves, and writes through ``.data``
(which do not bump the tensor version: the defect this guards, measured at logits off by 2.0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import logits, model_inputs, tiny_llama
from torch import nn

import loraloom as ll
from loraloom.adapters import FourierFTLayer
from loraloom.adapters.fourierft import TrackedParameter


def fourierft_layer() -> FourierFTLayer:
    torch.manual_seed(0)
    return FourierFTLayer(nn.Linear(16, 12).requires_grad_(False), n_frequency=40, scaling=50.0)  # frozen base


def reference(layer: FourierFTLayer, x: torch.Tensor) -> torch.Tensor:
    """What the layer must compute, from scratch: (W + ΔW)·x + b."""
    w = layer.base_layer.weight.detach()
    return F.linear(x, w + layer.delta_weight().detach().to(w.dtype), layer.base_layer.bias)


EDITS = {
    "weight.data +=": lambda layer: layer.base_layer.weight.data.add_(0.5),
    "weight.data.copy_": lambda layer: layer.base_layer.weight.data.copy_(torch.randn(12, 16)),
    "weight.data =": lambda layer: setattr(layer.base_layer.weight, "data", torch.randn(12, 16)),
    "weight.data[row] =": lambda layer: layer.base_layer.weight.data[3].fill_(2.0),
    "weight no_grad add_": lambda layer: torch.no_grad()(layer.base_layer.weight.add_)(1.0),
    "weight.detach().mul_": lambda layer: layer.base_layer.weight.detach().mul_(0.5),
    "new weight Parameter": lambda layer: setattr(layer.base_layer, "weight", nn.Parameter(torch.randn(12, 16))),
    "load_state_dict": lambda layer: layer.base_layer.load_state_dict(
        {"weight": torch.randn(12, 16), "bias": torch.randn(12)}
    ),
    "spectrum.data +=": lambda layer: layer.fourierft_spectrum.data.add_(1.0),
    "spectrum.data =": lambda layer: setattr(layer.fourierft_spectrum, "data", torch.randn(40)),
    "spectrum no_grad copy_": lambda layer: torch.no_grad()(layer.fourierft_spectrum.copy_)(torch.randn(40)),
    "optimizer step": lambda layer: _step(layer, torch.optim.SGD, {}),
    "fused AdamW step (no version bump)": lambda layer: _step(layer, torch.optim.AdamW, {"fused": True}),
    "trained base weight, fused AdamW": lambda layer: _step(layer, torch.optim.AdamW, {"fused": True}, base=True),
}


def _step(layer: FourierFTLayer, optimizer, kwargs, base: bool = False) -> None:
    p = layer.base_layer.weight if base else layer.fourierft_spectrum
    p.requires_grad_(True)
    p.grad = torch.ones_like(p)
    optimizer([p], lr=1.0, **kwargs).step()


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_every_edit_reaches_the_output(edit):
    layer = fourierft_layer()
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)  # builds the cache
        torch.testing.assert_close(before, reference(layer, x))
        EDITS[edit](layer)
        after = layer(x)
    assert (after - before).abs().max() > 1e-3  # the edit matters...
    torch.testing.assert_close(after, reference(layer, x), atol=1e-5, rtol=1e-5)  # ...and is seen


def test_the_cache_is_reused_when_nothing_changed():
    layer = fourierft_layer()
    with torch.no_grad():
        layer(torch.randn(2, 16))
        first = layer._cache[-1]
        layer(torch.randn(2, 16))
        _ = layer.base_layer.weight.dtype, layer.base_layer.weight.shape  # reads that are not .data
        layer(torch.randn(2, 16))
    assert layer._cache[-1] is first


def test_writes_outside_torch_need_clear_cache():
    """Documented limit: a NumPy view writes memory torch does not see; clear_cache() is the way out."""
    layer = fourierft_layer()
    x = torch.randn(2, 16)
    with torch.no_grad():
        layer(x)
        view = layer.base_layer.weight.detach().numpy()  # shares memory, invisible to the version counter
        view[:] += 1.0
        stale = layer(x)
        assert (stale - reference(layer, x)).abs().max() > 1e-3
        layer.clear_cache()
        torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-5, rtol=1e-5)


def test_model_level_data_edit_and_dtype_move(tmp_path):
    """The reported defect on a whole model: a .data edit of a base weight after generation has started."""
    model = ll.add_adapter(
        tiny_llama(),
        ll.FourierFTConfig(n_frequency=64, scaling=100.0, target_modules=["q_proj", "v_proj"]),
        verbose=False,
    )
    x = model_inputs("llama")
    logits(model, x)  # caches W + ΔW in every adapted layer
    q = model.model.layers[0].self_attn.q_proj
    q.base_layer.weight.data += 0.3
    edited = logits(model, x)
    ll.merge(model)  # merged: the plain matmul with the base weight as it is now
    torch.testing.assert_close(edited, logits(model, x), atol=1e-5, rtol=1e-5)
    ll.unmerge(model)
    model.to(torch.float64)
    torch.testing.assert_close(logits(model, {k: v for k, v in x.items()}), edited.double(), atol=1e-4, rtol=1e-4)


def test_removing_the_adapter_gives_back_plain_parameters():
    model = ll.add_adapter(tiny_llama(), ll.FourierFTConfig(n_frequency=64, target_modules=["q_proj"]), verbose=False)
    assert type(model.model.layers[0].self_attn.q_proj.base_layer.weight) is TrackedParameter
    ll.merge_and_unload(model)
    assert all(type(p) is nn.Parameter for p in model.parameters())
