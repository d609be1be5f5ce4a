"""PiSSA / OLoRA rewrite the base weight (W - s·B·A): removing the adapter puts the original back, bit for bit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import logits, model_inputs, tiny_gpt2, tiny_llama

import loraloom as ll
from loraloom.adapters import remove_adapter

INITS = ["pissa", "pissa_niter_4", "olora"]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    changed = [name for name, p in after.items() if not torch.equal(p, before[name])]
    assert not changed, f"changed after remove_adapter: {changed[:3]}"


@pytest.mark.parametrize("init", INITS)
def test_remove_adapter_restores_the_base_after_an_init_that_rewrites_it(init):
    model = tiny_llama()
    before = _params(model)
    ll.add_adapter(model, ll.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init), verbose=False)
    w = model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight
    assert not torch.equal(w, before["model.layers.0.self_attn.q_proj.weight"])  # the residual is in the base
    remove_adapter(model)
    _assert_same(model, before)


def test_remove_after_training_steps_and_after_loading_a_saved_pissa_adapter(tmp_path):
    model = tiny_gpt2()  # Conv1D layers: the transposed layout
    before = _params(model)
    ll.add_adapter(model, ll.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa"), verbose=False)
    with torch.no_grad():  # as if trained: the adapter moved away from its init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01)
    ll.save_adapter(model, tmp_path / "pissa")
    remove_adapter(model)
    _assert_same(model, before)
    ll.load_adapter(model, tmp_path / "pissa", verbose=False)  # re-derives the residual on this base
    remove_adapter(model)
    _assert_same(model, before)


def test_merge_and_unload_keeps_the_merged_update():
    model = tiny_llama()
    x = model_inputs("llama")
    ll.add_adapter(model, ll.LoraConfig(r=4, lora_alpha=8, init_lora_weights="olora"), verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    adapted = logits(model, x)
    merged = ll.merge_and_unload(model)
    assert torch.allclose(logits(merged, x), adapted, atol=1e-4)  # the merge stays: no original put back
