"""LoRA: parity with PEFT both ways, exact merge/unmerge, init, injection rules."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from tiny_models import FACTORIES, logits, model_inputs, tiny_gpt2, tiny_llama, tiny_t5
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraloom as ll
from loraloom.adapters import LoraLayer, adapter_layers

ARCHS = list(FACTORIES)


def peft_lora(arch: str, **kwargs) -> peft.PeftModel:
    """A PEFT LoRA model with non-zero B (init_lora_weights=False), so the adapter changes the output."""
    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8)
    task = "SEQ_CLS" if arch == "bert" else None
    config = peft.LoraConfig(init_lora_weights=False, task_type=task, **kwargs)
    torch.manual_seed(123)
    return peft.get_peft_model(FACTORIES[arch](), config)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_folder_loads_with_identical_logits(arch, tmp_path):
    pm = peft_lora(arch)
    if arch == "bert":  # make the saved classifier head differ from the fresh base's
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    pm.save_pretrained(tmp_path)
    x = model_inputs(arch)
    expected = logits(pm, x)
    assert (expected - logits(FACTORIES[arch](), x)).abs().max() > 1e-3  # the adapter matters

    model = ll.load_adapter(FACTORIES[arch](), tmp_path)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_loraloom_folder_loads_in_peft_with_identical_logits(arch, tmp_path):
    model = FACTORIES[arch]()
    targets = ["c_attn"] if arch == "gpt2" else None
    ll.add_adapter(model, ll.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    if arch == "bert":
        with torch.no_grad():
            model.classifier.weight.add_(0.5)
    ll.save_adapter(model, tmp_path)
    x = model_inputs(arch)
    expected = logits(model, x)

    pm = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path)
    torch.testing.assert_close(logits(pm, x), expected, atol=1e-5, rtol=0)


def test_rank_and_alpha_patterns_and_rslora_match_peft(tmp_path):
    pm = peft_lora(
        "llama",
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
    )
    pm.save_pretrained(tmp_path)
    model = ll.load_adapter(tiny_llama(), tmp_path)
    layers = dict(adapter_layers(model))
    assert layers["model.layers.0.self_attn.v_proj"].r == 2
    assert layers["model.layers.0.self_attn.q_proj"].r == 4
    assert layers["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(3 / math.sqrt(4))
    x = model_inputs("llama")
    torch.testing.assert_close(logits(model, x), logits(pm, x), atol=1e-5, rtol=0)


def test_add_adapter_freezes_base_and_reports(capsys):
    model = tiny_t5()
    ll.add_adapter(model, ll.LoraConfig(r=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # default T5 targets q and v: 2 layers x (enc self + dec self + dec cross) attention x 2 projections
    assert len(trainable) == 2 * 3 * 2 * 2
    n_trainable, n_total = ll.count_parameters(model)
    assert f"trainable params: {n_trainable:,}" in capsys.readouterr().out
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_classifier_head_is_trained_and_saved(tmp_path):
    model = FACTORIES["bert"]()
    ll.add_adapter(model, ll.LoraConfig(r=2), verbose=False)
    assert model.classifier.weight.requires_grad
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    ll.save_adapter(model, tmp_path)
    keys = ll.read_adapter(tmp_path)[1].keys()
    assert "base_model.model.classifier.weight" in keys


def test_new_adapter_is_identity_and_inits():
    x = model_inputs("gpt2")
    expected = logits(tiny_gpt2(), x)
    for init in (True, "gaussian", "zeros"):
        model = ll.add_adapter(tiny_gpt2(), ll.LoraConfig(r=4, init_lora_weights=init), verbose=False)
        torch.testing.assert_close(logits(model, x), expected, atol=0, rtol=0)
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(256, 512), r=64, lora_alpha=8, init_lora_weights="gaussian")
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 64, rel=0.05)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in 256
    layer = LoraLayer(nn.Linear(256, 512), r=64, lora_alpha=8)
    assert layer.lora_A.weight.abs().max().item() <= bound
    assert layer.lora_A.weight.abs().max().item() > 0.9 * bound


def test_conv1d_layer_math_matches_dense_formula():
    torch.manual_seed(0)
    conv = Conv1D(12, 6)  # GPT-2 style: d_in 6, d_out 12, weight stored 6 x 12
    nn.init.normal_(conv.weight)
    layer = LoraLayer(conv, r=3, lora_alpha=6, init_lora_weights=False)
    x = torch.randn(2, 5, 6)
    delta = 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    expected = x @ (conv.weight + delta.T) + conv.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_regex_targets_and_suffix_matching():
    model = ll.add_adapter(
        tiny_llama(), ll.LoraConfig(r=2, target_modules=r".*layers\.0\.mlp\.(up|down)_proj"), verbose=False
    )
    assert sorted(n for n, _ in adapter_layers(model)) == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    # suffix match is on whole path components: "proj" must not match "q_proj"
    with pytest.raises(ll.AdapterError, match="matched no layer"):
        ll.add_adapter(tiny_llama(), ll.LoraConfig(target_modules=["proj"]))


def test_default_targets_per_model_type():
    expected = {"t5": {"q", "v"}, "gpt2": {"c_attn"}, "llama": {"q_proj", "v_proj"}, "bert": {"query", "value"}}
    for arch, names in expected.items():
        model = ll.add_adapter(FACTORIES[arch](), ll.LoraConfig(r=2), verbose=False)
        assert {n.rsplit(".", 1)[-1] for n, _ in adapter_layers(model)} == names


def test_target_missing_lists_linear_layers():
    with pytest.raises(ll.AdapterError, match=r"matched no layer.*q_proj") as e:
        ll.add_adapter(tiny_llama(), ll.LoraConfig(target_modules=["query"]))
    assert "layers.N.self_attn.q_proj" in str(e.value)


def test_non_linear_target_is_refused():
    with pytest.raises(ll.AdapterError, match="only Linear, Conv1D"):
        ll.add_adapter(tiny_t5(), ll.LoraConfig(target_modules=["SelfAttention"]))


def test_adding_twice_is_refused():
    model = ll.add_adapter(tiny_t5(), ll.LoraConfig(r=2), verbose=False)
    with pytest.raises(ll.AdapterError, match="already carries"):
        ll.add_adapter(model, ll.LoraConfig(r=2))


def test_bf16_model_runs_and_merges():
    model = tiny_llama().to(torch.bfloat16)
    ll.add_adapter(model, ll.LoraConfig(r=4, init_lora_weights=False), verbose=False)
    x = model_inputs("llama")
    out = logits(model, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ll.merge(model)
    torch.testing.assert_close(logits(model, x).float(), out.float(), atol=0.1, rtol=0.05)
