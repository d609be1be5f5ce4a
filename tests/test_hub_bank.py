"""The module bank: stacking, the legacy format, and clear errors for modules that cannot be composed."""

from __future__ import annotations

import pytest
import torch
from hub_modules import edit_config, make_modules
from safetensors.torch import load_file
from tiny_models import tiny_gpt2, tiny_llama, tiny_t5

from loraloom.adapters import AdapterError, LoraConfig, add_adapter, save_adapter
from loraloom.adapters.peft_format import WEIGHTS_NAME
from loraloom.hub import list_pool, load_bank


def test_bank_stacks_each_layer_in_module_order(tmp_path):
    model = tiny_t5()
    paths = make_modules(model, tmp_path, 3, r=4, alpha=8)
    bank = load_bank(paths, base_model=model)
    assert len(bank) == 3 and bank.names == paths
    files = [load_file(f"{p}/{WEIGHTS_NAME}") for p in paths]
    layer = "encoder.block.1.layer.0.SelfAttention.v"
    assert bank.A[layer].shape == (3, 4, 32) and bank.B[layer].shape == (3, 32, 4)
    for i, tensors in enumerate(files):
        assert torch.equal(bank.A[layer][i], tensors[f"base_model.model.{layer}.lora_A.weight"])
        assert torch.equal(bank.B[layer][i], tensors[f"base_model.model.{layer}.lora_B.weight"])
    assert set(bank.layers) == {k[len("base_model.model.") : -len(".lora_A.weight")] for k in files[0] if "lora_A" in k}
    assert bank.scaling[layer] == 2.0


def test_legacy_bin_modules_load_like_safetensors(tmp_path):
    model = tiny_t5()
    new = load_bank(make_modules(model, tmp_path / "st", 2, seed=3))
    old = load_bank(make_modules(model, tmp_path / "bin", 2, seed=3, legacy=True))
    for layer in new.layers:
        assert torch.equal(new.A[layer], old.A[layer]) and torch.equal(new.B[layer], old.B[layer])


def test_peft_made_module_loads(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "peft")
    bank = load_bank([tmp_path / "peft"], base_model=tiny_llama())
    assert bank.A["model.layers.0.self_attn.q_proj"].shape == (1, 4, 32)
    assert bank.scaling["model.layers.0.self_attn.q_proj"] == 4.0


def test_loraloom_saved_module_and_gpt2_conv1d(tmp_path):
    model = tiny_gpt2()
    add_adapter(model, LoraConfig(r=2, init_lora_weights=False), verbose=False)
    save_adapter(model, tmp_path / "m")
    bank = load_bank([tmp_path / "m"], base_model=tiny_gpt2())
    # c_attn is a Conv1D (32 -> 96); LoRA keeps A as r x d_in and B as d_out x r
    assert bank.A["transformer.h.0.attn.c_attn"].shape == (1, 2, 32)
    assert bank.B["transformer.h.0.attn.c_attn"].shape == (1, 96, 2)


def test_pool_lists_module_folders(tmp_path):
    paths = make_modules(tiny_t5(), tmp_path, 3)
    (tmp_path / "not_a_module").mkdir()
    assert list_pool(tmp_path) == sorted(paths)
    with pytest.raises(AdapterError, match="no module folders"):
        list_pool(tmp_path / "not_a_module")


def test_no_modules_and_duplicates():
    with pytest.raises(ValueError, match="no LoRA modules"):
        load_bank([])
    with pytest.raises(ValueError, match="listed twice"):
        load_bank(["a", "a"])


def test_different_rank_names_module(tmp_path):
    model = tiny_t5()
    good = make_modules(model, tmp_path, 2, r=4)
    other = make_modules(model, tmp_path, 1, r=8, prefix="r8_")
    with pytest.raises(AdapterError, match=r"module .*r8_00: r=8 but module .*m00 has r=4"):
        load_bank(good + other)


def test_different_alpha_names_module(tmp_path):
    model = tiny_t5()
    paths = make_modules(model, tmp_path, 2)
    edit_config(paths[1], lora_alpha=32)
    with pytest.raises(AdapterError, match=r"m01: lora_alpha=32"):
        load_bank(paths)


def test_different_targets_name_module_and_layer(tmp_path):
    model = tiny_t5()
    qv = make_modules(model, tmp_path, 1, targets=["q", "v"])
    qkv = make_modules(model, tmp_path, 1, targets=["q", "k", "v"], prefix="qkv")
    with pytest.raises(AdapterError, match=r"qkv00: adapts layer '.*\.k'"):
        load_bank(qv + qkv)


def test_shape_mismatch_with_base_names_layer(tmp_path):
    paths = make_modules(tiny_t5(), tmp_path, 2)
    bigger = tiny_llama()  # no layer named like T5's
    with pytest.raises(AdapterError, match=r"layer 'decoder.block.0.layer.0.SelfAttention.q' does not exist"):
        load_bank(paths, base_model=bigger)
    other = make_modules(tiny_llama(), tmp_path / "llama", 1, targets=["q_proj"])
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(AdapterError, match=r"layer 'model.layers.0.self_attn.q_proj' maps 32 -> 32 .* 48 -> 48"):
        load_bank(other, base_model=wide)


def test_non_lora_tensor_is_refused(tmp_path):
    model = tiny_t5()
    add_adapter(model, LoraConfig(r=2, modules_to_save=["lm_head"], init_lora_weights=False), verbose=False)
    save_adapter(model, tmp_path / "m")
    with pytest.raises(AdapterError, match=r"lm_head.weight' is not a LoRA A/B weight"):
        load_bank([tmp_path / "m"])


def test_not_lora_and_missing_folder(tmp_path):
    with pytest.raises(AdapterError, match="not a local folder"):
        load_bank([tmp_path / "missing"])


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
        ({"use_dora": True}, "use_dora"),
        ({"lora_bias": True}, "lora_bias"),
    ],
)
def test_modules_whose_update_is_not_s_b_a_on_the_stored_base_are_refused_by_name(tmp_path, config, field):
    """Issue 17: a PiSSA module composed as if it were plain LoRA was 0.11 off; now one error names it."""
    import loraloom as ll
    from loraloom.serve import AdapterCache

    model = tiny_t5()
    plain = make_modules(model, tmp_path / "pool", 1)[0]
    odd = ll.add_adapter(
        tiny_t5(), ll.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], **config), verbose=False
    )
    ll.save_adapter(odd, tmp_path / "pool" / "odd")
    with pytest.raises(ll.AdapterError, match=rf"module .*odd: {field}"):
        load_bank([plain, tmp_path / "pool" / "odd"])
    init = config.get("init_lora_weights")
    if init:  # the server refuses a residual-base module too, by field
        with pytest.raises(ll.AdapterError, match=f"'init_lora_weights' = '{init}' cannot be served"):
            AdapterCache(tmp_path / "pool").get("odd")
    else:  # its per-row layers serve DoRA and lora_bias exactly (tests/test_serve_rows.py)
        AdapterCache(tmp_path / "pool").get("odd")
