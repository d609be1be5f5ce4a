"""COMPOSE: loraloom's composed model against the reference's formula run through PEFT.

The reference (lorahub/algorithm.py) sums the modules' PEFT state dicts with weights w
(``get_final_weights``), loads the sum with ``set_peft_model_state_dict`` and calls ``merge_and_unload``.
That is re-done here with PEFT itself (the reference package needs ``datasets``, not a dependency).
"""

from __future__ import annotations

import pytest
import torch
from hub_modules import make_modules
from safetensors.torch import load_file
from tiny_models import logits, model_inputs, tiny_gpt2, tiny_llama, tiny_t5

from loraloom.adapters import AdapterError, LoraLayer, load_adapter
from loraloom.adapters.peft_format import WEIGHTS_NAME
from loraloom.hub import Composition, load_bank
from loraloom.hub.compose import ComposedLoraLayer

peft = pytest.importorskip("peft")

ARCHS = {
    "t5": (tiny_t5, ["q", "v"]),
    "gpt2": (tiny_gpt2, ["c_attn"]),  # Conv1D: fan_in_fan_out
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
}
W = [0.7, -1.2, 0.0, 1.5]


def reference_composition(base, paths, weights):
    """get_final_weights + set_peft_model_state_dict + merge_and_unload, as the reference does it."""
    cache = {p: load_file(f"{p}/{WEIGHTS_NAME}") for p in paths}
    final = {}
    for i, p in enumerate(paths):
        for key, t in cache[p].items():
            final[key] = weights[i] * t if i == 0 else final[key] + weights[i] * t
    peft_model = peft.PeftModel.from_pretrained(base, paths[0])
    peft.set_peft_model_state_dict(peft_model, final)
    return peft_model.merge_and_unload()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_composed_model_matches_reference_formula(tmp_path, arch):
    factory, targets = ARCHS[arch]
    model = factory()
    paths = make_modules(model, tmp_path, len(W), targets=targets, scale=0.1)
    inputs = model_inputs(arch)
    expected = logits(reference_composition(factory(), paths, W), inputs)
    assert not torch.allclose(expected, logits(model, inputs), atol=1e-3)  # the modules do change the model

    composition = Composition(model, load_bank(paths))
    composition.set_weights(W)
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5, rtol=1e-5)  # unmerged: x·A_hat then B_hat

    merged = composition.merge(W)
    assert not any(isinstance(m, ComposedLoraLayer) for m in merged.modules())
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-5, rtol=0)


def test_cross_terms_are_kept(tmp_path):
    """s·(Σ w_i B_i)(Σ w_i A_i), not Σ w_i s·B_i A_i (SPEC 3)."""
    model = tiny_t5()
    paths = make_modules(model, tmp_path, 2)
    bank = load_bank(paths)
    composition = Composition(model, bank)
    w = torch.tensor([0.5, 2.0])
    composition.set_weights(w)
    name = bank.layers[0]
    layer = model.get_submodule(name)
    A, B, s = bank.A[name], bank.B[name], bank.scaling[name]
    with_cross = s * (w[0] * B[0] + w[1] * B[1]) @ (w[0] * A[0] + w[1] * A[1])
    without = s * (w[0] * B[0] @ A[0] + w[1] * B[1] @ A[1])
    assert torch.allclose(layer.delta_weight(), with_cross, atol=1e-6)
    assert not torch.allclose(layer.delta_weight(), without, atol=1e-3)


def test_population_rows_each_use_their_own_composition(tmp_path):
    model = tiny_llama()
    paths = make_modules(model, tmp_path, 3, targets=["q_proj", "v_proj"])
    composition = Composition(model, load_bank(paths))
    rows = torch.tensor([[1.0, 0.0, -0.5], [0.0, 0.0, 0.0], [0.3, 1.1, 0.2]])
    inputs = model_inputs("llama")  # batch of 2
    singles = []
    for w in rows:
        composition.set_weights(w)
        singles.append(logits(model, inputs))
    composition.set_weights(rows)
    together = logits(model, {k: v.repeat(3, 1) for k, v in inputs.items()})
    assert torch.allclose(together, torch.cat(singles), atol=1e-5)
    composition.remove()
    assert torch.allclose(singles[1], logits(model, inputs), atol=1e-6)  # w = 0 is the base model


def test_bank_is_never_written(tmp_path):
    model = tiny_t5()
    bank = load_bank(make_modules(model, tmp_path, 3))
    before = {k: (a.clone(), bank.B[k].clone()) for k, a in bank.A.items()}
    composition = Composition(model, bank)
    composition.set_weights([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    logits(model, {k: v.repeat(2, 1) for k, v in model_inputs("t5").items()})
    composition.merge([1.0, -1.0, 0.5])
    for k, (a, b) in before.items():
        assert torch.equal(bank.A[k], a) and torch.equal(bank.B[k], b)


def test_exported_folder_loads_in_peft_and_loraloom(tmp_path):
    from loraloom.hub import LoraHubResult, Selection

    model = tiny_t5()
    paths = make_modules(model, tmp_path, 4, scale=0.1)
    bank = load_bank(paths)
    result = LoraHubResult(W, 0.0, [], paths, Selection("given", paths, 4), bank=bank, model=model)
    out = result.save_adapter(tmp_path / "composed")
    inputs = model_inputs("t5")
    expected = logits(reference_composition(tiny_t5(), paths, W), inputs)

    peft_loaded = peft.PeftModel.from_pretrained(tiny_t5(), out)
    assert torch.allclose(logits(peft_loaded, inputs), expected, atol=1e-5, rtol=1e-5)
    ours = load_adapter(tiny_t5(), out, verbose=False)
    assert isinstance(ours.get_submodule(bank.layers[0]), LoraLayer)
    assert torch.allclose(logits(ours, inputs), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(logits(result.merge(), inputs), expected, atol=1e-5, rtol=0)


def test_install_refuses_adapted_layers_and_bad_weights(tmp_path):
    model = tiny_t5()
    bank = load_bank(make_modules(model, tmp_path, 2))
    composition = Composition(model, bank)
    with pytest.raises(AdapterError, match="already carries an adapter"):
        Composition(model, bank)
    with pytest.raises(ValueError, match=r"expected weights of shape \(2,\) or \(P, 2\)"):
        composition.set_weights([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="expected 2 weights"):
        composition.merge([1.0])
    composition.set_weights([[1.0, 0.0], [0.0, 1.0]])
    three_rows = {k: v[[0, 1, 1]] for k, v in model_inputs("t5").items()}
    with pytest.raises(AdapterError, match="3 rows cannot be split among 2 adapters"):
        logits(model, three_rows)
    composition.remove()
    assert not any(isinstance(m, ComposedLoraLayer) for m in model.modules())
