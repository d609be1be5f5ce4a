"""IA3: PEFT parity both ways, PEFT's per-model defaults and shapes, merge/unmerge, bad input."""

from __future__ import annotations

import peft
import pytest
import torch
from peft_parity import adapter_grads, assert_peft_round_trip, features, peft_model
from tiny_models import FACTORIES, model_inputs, tiny_gpt2, tiny_llama, tiny_t5
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraloom as ll
from loraloom.adapters import IA3Layer, adapter_layers

ARCHS = ["t5", "gpt2", "bert"]


def peft_config(arch: str, **kwargs) -> peft.IA3Config:
    # init_ia3_weights=False: random vectors, so the adapter changes the output
    return peft.IA3Config(init_ia3_weights=False, task_type="SEQ_CLS" if arch == "bert" else None, **kwargs)


def test_custom_targets_round_trip(tmp_path):
    config = peft_config("t5", target_modules=["q", "o", "wi"], feedforward_modules=["wi"])
    model = assert_peft_round_trip("t5", config, tmp_path)
    ff = {name.rsplit(".", 1)[-1] for name, layer in adapter_layers(model) if layer.is_feedforward}
    assert ff == {"wi"}


@pytest.mark.parametrize("arch", ARCHS)
def test_loraloom_adapter_loads_in_peft(arch, tmp_path):
    torch.manual_seed(0)
    model = ll.add_adapter(FACTORIES[arch](), ll.IA3Config(init_ia3_weights=False), verbose=False)
    ll.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path)
    torch.testing.assert_close(features(pm, arch), features(model, arch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_match_peft(arch, tmp_path):
    pm = peft_model(arch, peft_config(arch))
    pm.save_pretrained(tmp_path)
    model = ll.load_adapter(FACTORIES[arch](), tmp_path, verbose=False)
    expected, got = adapter_grads(pm, arch, "ia3_l"), adapter_grads(model, arch, "ia3_l")
    assert got.keys() == expected.keys() and len(got) > 0
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "arch, shapes",
    [
        # T5 (d_model 32, 4 heads x 8, d_ff 64): k, v scale outputs; wo (feed-forward) scales its input
        ("t5", {"k": (32, 1), "v": (32, 1), "wo": (1, 64)}),
        # GPT-2's Conv1D: c_attn 32 -> 96 scales outputs, mlp.c_proj 128 -> 32 its input
        ("gpt2", {"c_attn": (96, 1), "c_proj": (1, 128)}),
        # BERT: "output.dense" matches both the attention output (32 -> 32) and the FFN output (64 -> 32)
        ("bert", {"key": (32, 1), "value": (32, 1), "dense": {(1, 32), (1, 64)}}),
    ],
)
def test_peft_default_targets_and_vector_shapes(arch, shapes):
    model = ll.add_adapter(FACTORIES[arch](), ll.IA3Config(), verbose=False)
    found: dict[str, set] = {}
    for name, layer in adapter_layers(model):
        found.setdefault(name.rsplit(".", 1)[-1], set()).add(tuple(layer.ia3_l.shape))
    assert found == {k: v if isinstance(v, set) else {v} for k, v in shapes.items()}
    # init_ia3_weights=True: all ones, the identity
    torch.testing.assert_close(features(model, arch), features(FACTORIES[arch](), arch), atol=0, rtol=0)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("feedforward", [False, True])
def test_layer_math(conv1d, feedforward):
    torch.manual_seed(0)
    base = Conv1D(5, 7) if conv1d else nn.Linear(7, 5)
    nn.init.normal_(base.bias)
    layer = IA3Layer(base, is_feedforward=feedforward, init_ia3_weights=False)
    x = torch.randn(3, 7)
    scale = layer.ia3_l.detach().flatten()
    expected = base(x * scale) if feedforward else base(x) * scale
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_half_precision_model_runs():
    model = ll.add_adapter(tiny_llama().to(torch.bfloat16), ll.IA3Config(init_ia3_weights=False), verbose=False)
    out = model(**model_inputs("llama")).logits
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_target_not_in_model_is_refused():
    with pytest.raises(ll.AdapterError, match=r"target_modules \['query'\] matched no layer"):
        ll.add_adapter(tiny_t5(), ll.IA3Config(target_modules=["query"], feedforward_modules=[]))


def test_model_type_without_defaults_needs_explicit_modules():
    model = tiny_gpt2()
    model.config.model_type = "mystery"
    with pytest.raises(ll.AdapterError, match="no default target_modules for model type 'mystery'"):
        ll.add_adapter(model, ll.IA3Config())
    with pytest.raises(ll.AdapterError, match="no default feedforward_modules"):
        ll.add_adapter(model, ll.IA3Config(target_modules=["c_attn"]))
    ll.add_adapter(model, ll.IA3Config(target_modules=["c_attn"], feedforward_modules=[]), verbose=False)


def test_default_feedforward_keeps_to_the_chosen_targets(tmp_path):
    model = ll.add_adapter(tiny_t5(), ll.IA3Config(target_modules=["q", "v"]), verbose=False)
    assert model.loraloom_config.feedforward_modules == []  # T5's default "wo" is not targeted
    ll.save_adapter(model, tmp_path)
    ll.load_adapter(tiny_t5(), tmp_path, verbose=False)
    peft.PeftModel.from_pretrained(tiny_t5(), tmp_path)


def test_feedforward_outside_targets_is_refused():
    with pytest.raises(ll.AdapterError, match=r"feedforward_modules \['wo'\] are not in target_modules"):
        ll.IA3Config(target_modules=["k", "v"], feedforward_modules=["wo"])


def test_unmerge_after_a_zero_scale_is_refused():
    layer = IA3Layer(nn.Linear(4, 3), is_feedforward=False)
    with torch.no_grad():
        layer.ia3_l[1] = 0.0
    layer.merge()
    with pytest.raises(ll.AdapterError, match="scaling entry is 0"):
        layer.unmerge()
