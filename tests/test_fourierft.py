"""FourierFT: PEFT parity both ways (outputs and gradients), exact merge, the cached inference weight,
bf16/fp16, and bad input."""

from __future__ import annotations

import peft
import pytest
import torch
from peft_parity import adapter_grads, assert_peft_round_trip, features, peft_model
from safetensors.torch import load_file, save_file
from tiny_models import FACTORIES, logits, model_inputs, tiny_gpt2, tiny_t5
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraloom as ll
from loraloom.adapters import FourierFTLayer, adapter_layers
from loraloom.adapters.fourierft import fourierft_positions
from loraloom.adapters.peft_format import WEIGHTS_NAME

ARCHS = ["t5", "gpt2", "bert"]
# The tiny layers are 32 wide: ifft2's 1/(d_out·d_in) is ~500x larger than for 768-wide layers, so PEFT's
# scaling of 150 would swamp W; 10 keeps the update the size it has in a real model.
SCALING = 10.0


def peft_config(arch: str, **kwargs) -> peft.FourierFTConfig:
    kwargs.setdefault("n_frequency", 300)
    kwargs.setdefault("scaling", SCALING)
    if arch == "gpt2":  # Conv1D layers, one widening (32 -> 96), one narrowing (128 -> 32)
        kwargs.setdefault("target_modules", ["c_attn", "mlp.c_proj"])
    return peft.FourierFTConfig(task_type="SEQ_CLS" if arch == "bert" else None, **kwargs)


def dense_delta(layer: FourierFTLayer) -> torch.Tensor:
    """The definition, written out: scaling · Re(ifft2(S)), S zero but for the coefficients."""
    rows, cols = fourierft_positions(layer.out_features, layer.in_features, layer.n_frequency, layer.random_loc_seed)
    spectrum = torch.zeros(layer.out_features, layer.in_features)
    spectrum[rows, cols] = layer.fourierft_spectrum.detach().float()
    return torch.fft.ifft2(spectrum).real * layer.scaling


def test_n_frequency_pattern_and_another_seed_round_trip(tmp_path):
    model = assert_peft_round_trip(
        "t5", peft_config("t5", n_frequency_pattern={"v": 50}, random_loc_seed=3, init_weights=False), tmp_path
    )
    sizes = {name.rsplit(".", 1)[-1]: layer.n_frequency for name, layer in adapter_layers(model)}
    assert sizes == {"q": 300, "v": 50}


@pytest.mark.parametrize("arch", ARCHS)
def test_loraloom_adapter_loads_in_peft(arch, tmp_path):
    model = FACTORIES[arch]()
    targets = ["c_attn"] if arch == "gpt2" else None
    torch.manual_seed(0)
    ll.add_adapter(model, ll.FourierFTConfig(n_frequency=100, scaling=SCALING, target_modules=targets), verbose=False)
    ll.save_adapter(model, tmp_path)
    expected = features(model, arch)
    pm = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path)
    torch.testing.assert_close(features(pm, arch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_match_peft(arch, tmp_path):
    pm = peft_model(arch, peft_config(arch))
    pm.save_pretrained(tmp_path)
    model = ll.load_adapter(FACTORIES[arch](), tmp_path, verbose=False)
    expected = adapter_grads(pm, arch, "fourierft_spectrum")
    got = adapter_grads(model, arch, "fourierft_spectrum")
    assert got.keys() == expected.keys() and len(got) > 0
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5 * grad.abs().max().item(), rtol=0, msg=name)


@pytest.mark.parametrize("d_out, d_in", [(6, 8), (7, 5), (8, 7), (5, 5), (1, 9), (9, 1)])
@pytest.mark.parametrize("conv1d", [False, True])
def test_layer_matches_definition_on_odd_and_even_shapes(d_out, d_in, conv1d):
    """Every position (n = d_out·d_in) exercises the DC, Nyquist and mirrored bins of the half spectrum."""
    torch.manual_seed(0)
    base = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
    nn.init.normal_(base.weight)
    layer = FourierFTLayer(base.requires_grad_(False), n_frequency=d_out * d_in, scaling=3.0).eval()
    delta = dense_delta(layer)
    torch.testing.assert_close(layer.delta_weight(), delta, atol=1e-6, rtol=0)

    x = torch.randn(4, 3, d_in, requires_grad=True)
    w = base.weight.T if conv1d else base.weight
    expected = x @ (w + delta).T + base.bias
    y = layer(x)  # training path: grad wanted
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    g = torch.randn_like(y)
    gx, gc = torch.autograd.grad((y * g).sum(), (x, layer.fourierft_spectrum))

    # reference gradients through the dense definition
    c = layer.fourierft_spectrum.detach().clone().requires_grad_(True)
    rows, cols = fourierft_positions(d_out, d_in, d_out * d_in, 777)
    spectrum = torch.zeros(d_out, d_in).index_put((rows, cols), c)
    y_ref = x @ (w + torch.fft.ifft2(spectrum).real * 3.0).T + base.bias
    gx_ref, gc_ref = torch.autograd.grad((y_ref * g).sum(), (x, c))
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gc, gc_ref, atol=1e-5, rtol=0)

    with torch.no_grad():  # cached inference weight
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_cached_inference_weight_equals_recomputed_and_follows_every_change():
    model = ll.add_adapter(tiny_t5(), ll.FourierFTConfig(n_frequency=200, scaling=SCALING), verbose=False)
    layer = next(layer for _, layer in adapter_layers(model))
    x = model_inputs("t5")
    cached = logits(model, x)  # W + ΔW built on the first call...
    assert layer._cache is not None
    torch.testing.assert_close(logits(model, x), cached, atol=0, rtol=0)  # ...and reused
    for _, each in adapter_layers(model):
        each._cache = None
    torch.testing.assert_close(logits(model, x), cached, atol=1e-6, rtol=0)  # rebuilt from scratch
    torch.testing.assert_close(model(**x).logits.detach(), cached, atol=1e-6, rtol=0)  # the training path
    recomputed = features(model, "t5")

    # Every way the coefficients can change shows in the next no-grad forward.
    with torch.no_grad():
        layer.fourierft_spectrum.mul_(-1.0)
    flipped = features(model, "t5")
    assert (flipped - recomputed).abs().max() > 1e-3
    layer.fourierft_spectrum.data[0] += 1.0  # bypasses the version counter
    assert (features(model, "t5") - flipped).abs().max() > 1e-4
    before = features(model, "t5")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**model_inputs("t5")).logits.sum().backward()
    opt.step()
    assert (features(model, "t5") - before).abs().max() > 1e-4

    # ...and the cached result still equals a model built fresh from the same coefficients.
    fresh = ll.add_adapter(tiny_t5(), ll.FourierFTConfig(n_frequency=200, scaling=SCALING), verbose=False)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(features(fresh, "t5"), features(model, "t5"), atol=1e-5, rtol=0)


def test_generation_uses_the_cache_and_never_rebuilds_it(monkeypatch):
    model = ll.add_adapter(tiny_t5(), ll.FourierFTConfig(n_frequency=200, scaling=SCALING), verbose=False)
    calls = []
    original = FourierFTLayer.delta_weight
    monkeypatch.setattr(FourierFTLayer, "delta_weight", lambda self: calls.append(1) or original(self))
    ids = model_inputs("t5")["input_ids"]
    model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    n_layers = len(list(adapter_layers(model)))
    assert len(calls) == n_layers  # once per layer, not once per layer per token
    model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert len(calls) == n_layers


def test_training_rebuilds_the_weight_once_per_optimizer_step(monkeypatch):
    model = ll.add_adapter(tiny_t5(), ll.FourierFTConfig(n_frequency=200, scaling=SCALING), verbose=False)
    calls = []
    original = FourierFTLayer.delta_weight
    monkeypatch.setattr(FourierFTLayer, "delta_weight", lambda self: calls.append(1) or original(self))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    n_layers = len(list(adapter_layers(model)))
    for step in range(2):
        for _ in range(3):  # gradient accumulation: three micro-batches, one set of coefficients
            model(**model_inputs("t5")).logits.pow(2).mean().backward()
        assert len(calls) == (step + 1) * n_layers
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_runs_forward_backward_and_merge(dtype):
    reference = ll.add_adapter(tiny_gpt2(), ll.FourierFTConfig(n_frequency=200, scaling=SCALING), verbose=False)
    model = ll.add_adapter(tiny_gpt2(), ll.FourierFTConfig(n_frequency=200, scaling=SCALING), verbose=False)
    model.load_state_dict(reference.state_dict())
    model.to(dtype)
    x = model_inputs("gpt2")
    expected = reference(**x).logits
    with torch.no_grad():
        cached = model(**x).logits
    assert cached.dtype == dtype
    torch.testing.assert_close(cached.float(), expected.detach(), atol=0.05, rtol=0.05)
    out = model(**x).logits
    torch.testing.assert_close(out.detach().float(), expected.detach(), atol=0.05, rtol=0.05)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    ll.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits.float(), expected.detach(), atol=0.05, rtol=0.05)


def test_defaults_positions_and_parameter_count():
    c = ll.FourierFTConfig()
    assert (c.n_frequency, c.scaling, c.random_loc_seed, c.init_weights, c.n_frequency_pattern) == (
        1000,
        150.0,
        777,
        False,
        {},
    )
    rows, cols = fourierft_positions(96, 32, 100, 777)
    idx = torch.randperm(96 * 32, generator=torch.Generator().manual_seed(777))[:100]
    assert torch.equal(rows, idx // 32) and torch.equal(cols, idx % 32)
    assert fourierft_positions(96, 32, 100, 777) is fourierft_positions(96, 32, 100, 777)  # drawn once per shape

    model = ll.add_adapter(tiny_gpt2(), ll.FourierFTConfig(n_frequency=64), verbose=False)
    names = [name for name, _ in adapter_layers(model)]
    assert names == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]  # PEFT's GPT-2 default
    assert ll.count_parameters(model)[0] == 2 * 64
    zero = ll.add_adapter(tiny_t5(), ll.FourierFTConfig(n_frequency=64, init_weights=True), verbose=False)
    torch.testing.assert_close(features(zero, "t5"), features(tiny_t5(), "t5"), atol=0, rtol=0)


def test_n_frequency_larger_than_the_layer_is_refused():
    with pytest.raises(ll.AdapterError, match=r"SelfAttention\.q.*n_frequency=2000 exceeds the 32x32=1024"):
        ll.add_adapter(tiny_t5(), ll.FourierFTConfig(n_frequency=2000))


def test_spectrum_of_wrong_length_is_refused_and_model_left_alone(tmp_path):
    model = ll.add_adapter(tiny_t5(), ll.FourierFTConfig(n_frequency=100), verbose=False)
    ll.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = next(iter(tensors))
    tensors[key] = tensors[key][:90]
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    base = tiny_t5()
    with pytest.raises(ll.AdapterError, match=r"has shape \(90,\) but the config.s .n_frequency. gives"):
        ll.load_adapter(base, tmp_path)
    assert not any(isinstance(m, FourierFTLayer) for m in base.modules())


def test_autocast_bf16_training_step():
    model = ll.add_adapter(tiny_t5(), ll.FourierFTConfig(n_frequency=100, scaling=SCALING), verbose=False)
    x = model_inputs("t5")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**x, labels=x["decoder_input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)
