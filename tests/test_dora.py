"""DoRA (use_dora=True): PEFT parity both ways, exact merge/unmerge, gradients, training.

DoRA's magnitude starts at ||W + s·B·A||, where DoRA equals plain LoRA; every parity test perturbs it
first, so a loader that ignored ``lora_magnitude_vector`` would fail.
"""

from __future__ import annotations

import peft
import pytest
import torch
from peft_parity import features
from safetensors.torch import load_file, save_file
from tiny_models import FACTORIES, model_inputs, tiny_llama, tiny_t5, tiny_word_tokenizer
from torch import nn

import loraloom as ll
from loraloom.adapters import adapter_layers
from loraloom.adapters.lora import LoraLayer, lora_delta

ARCHS = list(FACTORIES)


def peft_dora(arch: str, seed: int = 123) -> peft.PeftModel:
    """A PEFT DoRA model with random B and a magnitude moved off its initial norm."""
    config = peft.LoraConfig(
        r=4, lora_alpha=6, use_dora=True, init_lora_weights=False, task_type="SEQ_CLS" if arch == "bert" else None
    )
    torch.manual_seed(seed)
    pm = peft.get_peft_model(FACTORIES[arch](), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return pm


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_dora_folder_round_trips_with_identical_outputs(arch, tmp_path):
    pm = peft_dora(arch)
    pm.save_pretrained(tmp_path / "peft")
    expected = features(pm, arch)

    model = ll.load_adapter(FACTORIES[arch](), tmp_path / "peft", verbose=False)
    assert ll.adapters.get_config(model).use_dora
    peft_to_ll = (features(model, arch) - expected).abs().max().item()
    ll.save_adapter(model, tmp_path / "loraloom")
    back = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "loraloom")
    ll_to_peft = (features(back, arch) - expected).abs().max().item()
    print(f"DoRA parity {arch}: PEFT->loraloom {peft_to_ll:.2e}, loraloom->PEFT {ll_to_peft:.2e}")
    assert peft_to_ll <= 1e-5 and ll_to_peft <= 1e-5

    # The magnitude matters: the same A and B as plain LoRA compute something else.
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert any(k.endswith(".lora_magnitude_vector") for k in tensors)
    plain = {k: v for k, v in tensors.items() if not k.endswith(".lora_magnitude_vector")}
    save_file(plain, tmp_path / "peft" / "adapter_model.safetensors")
    cfg = (tmp_path / "peft" / "adapter_config.json").read_text().replace('"use_dora": true', '"use_dora": false')
    (tmp_path / "peft" / "adapter_config.json").write_text(cfg)
    lora = ll.load_adapter(FACTORIES[arch](), tmp_path / "peft", verbose=False)
    assert (features(lora, arch) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_loraloom_dora_loads_in_peft(arch, tmp_path):
    model = FACTORIES[arch]()
    torch.manual_seed(0)
    ll.add_adapter(model, ll.LoraConfig(r=4, lora_alpha=6, use_dora=True, init_lora_weights=False), verbose=False)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_magnitude_vector.mul_(1.5)
    ll.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == len(list(adapter_layers(model)))
    pm = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path)
    diff = (features(pm, arch) - features(model, arch)).abs().max().item()
    print(f"DoRA parity {arch}: loraloom-made -> PEFT {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_dora_merged_weights_are_peft_s(arch, tmp_path):
    """DoRA's own merge (m · (W + s·B·A) / ||W + s·B·A||): the same numbers as PEFT's. Merge = unmerged output and
    unmerge restoring the base are the shared contract (tests/test_adapter_contract.py)."""
    pm = peft_dora(arch)
    pm.save_pretrained(tmp_path)
    model = ll.load_adapter(FACTORIES[arch](), tmp_path, verbose=False)
    unmerged = features(model, arch)
    ll.merge(model)
    pm.merge_adapter()
    for name, layer in adapter_layers(model):
        theirs = pm.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(layer.base_layer.weight, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(features(ll.merge_and_unload(model), arch), unmerged, atol=1e-5, rtol=0)


def lora_grads(model, arch: str) -> dict[str, torch.Tensor]:
    """Gradients of every LoRA / DoRA parameter under loraloom's names (PEFT's prefix and adapter name dropped)."""
    model.eval().zero_grad()
    model(**model_inputs(arch)).logits.pow(2).mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            name = name.removeprefix("base_model.model.").replace(".default", "")
            grads[name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = p.grad
    return grads


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dora_gradients_match_peft(arch, tmp_path):
    pm = peft_dora(arch)
    pm.save_pretrained(tmp_path)
    model = ll.load_adapter(FACTORIES[arch](), tmp_path, verbose=False)
    theirs, ours = lora_grads(pm, arch), lora_grads(model, arch)
    assert set(ours) == set(theirs)
    assert any(k.endswith("lora_magnitude_vector") for k in ours)
    for name, g in theirs.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(ours[name], g, atol=1e-6, rtol=1e-4)


def test_dora_with_dropout_in_training_matches_peft():
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True, init_lora_weights=False)
    torch.manual_seed(123)
    pm = peft.get_peft_model(tiny_llama(), config)
    model = ll.add_adapter(tiny_llama(), ll.LoraConfig(r=4, lora_dropout=0.3, use_dora=True), verbose=False)
    ll.adapters.peft_format.load_state_into(model, peft.get_peft_model_state_dict(pm), "peft")
    x = model_inputs("llama")
    pm.train()
    model.train()
    torch.manual_seed(7)
    theirs = pm(**x).logits
    torch.manual_seed(7)
    ours = model(**x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_new_dora_layer_is_the_identity_and_trains_its_magnitude():
    expected = features(tiny_t5(), "t5")
    model = ll.add_adapter(tiny_t5(), ll.LoraConfig(r=4, use_dora=True), verbose=False)
    torch.testing.assert_close(features(model, "t5"), expected, atol=1e-5, rtol=0)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert "lora_magnitude_vector" in trainable

    words = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)]
    data = [{"input": f"a{i}", "target": f"b{(i + 2) % 6}"} for i in range(6)]
    tokenizer = tiny_word_tokenizer(words, add_eos=True)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    base = {n: layer.base_layer.weight.clone() for n, layer in adapter_layers(model)}
    magnitude = {n: layer.lora_magnitude_vector.detach().clone() for n, layer in adapter_layers(model)}
    res = ll.train(model, tokenizer, data * 4, adapter=None, lr=1e-2, epochs=6, batch_size=8, progress=False)
    assert sum(res.losses[-3:]) < 0.75 * sum(res.losses[:3]), res.losses  # it learns (measured: 0.6x)
    for n, layer in adapter_layers(model):
        assert torch.equal(layer.base_layer.weight, base[n])
        assert not torch.equal(layer.lora_magnitude_vector.detach(), magnitude[n])


def test_dora_layer_math_matches_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraLayer(base, r=2, lora_alpha=4, use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_magnitude_vector.copy_(torch.rand(5) + 0.5)
    x = torch.randn(3, 6)
    adapted = base.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    w = layer.lora_magnitude_vector[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ w.T + base.bias, atol=1e-5, rtol=0)


def test_lora_delta_takes_one_module_or_a_stack():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 6, generator=g), torch.randn(3, 5, 4, generator=g)
    stacked = lora_delta(a, b, 0.5)
    assert stacked.shape == (3, 5, 6)
    for p in range(3):
        torch.testing.assert_close(stacked[p], lora_delta(a[p], b[p], 0.5))
        torch.testing.assert_close(stacked[p], 0.5 * b[p] @ a[p])


def test_bf16_dora_model_runs_merges_and_unmerges():
    model = tiny_llama().to(torch.bfloat16)
    ll.add_adapter(model, ll.LoraConfig(r=4, use_dora=True, init_lora_weights=False), verbose=False)
    x = model_inputs("llama")
    with torch.no_grad():
        out = model(**x).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        ll.merge(model)
        torch.testing.assert_close(model(**x).logits.float(), out.float(), atol=0.1, rtol=0.05)
        ll.unmerge(model)
        torch.testing.assert_close(model(**x).logits.float(), out.float(), atol=0.1, rtol=0.05)
