"""The PEFT folder format: what is written, and every kind of bad input."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import logits, model_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5
from transformers import T5Config, T5ForConditionalGeneration

import loraloom as ll
from loraloom.adapters.peft_format import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME


@pytest.fixture
def llama_adapter(tmp_path):
    return saved_llama_adapter(tmp_path)


def saved_llama_adapter(tmp_path):
    """A saved LoRA adapter (non-zero B) on the tiny Llama; returns (folder, logits it produces)."""
    model = ll.add_adapter(tiny_llama(), ll.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), verbose=False)
    folder = tmp_path / "adapter"
    ll.save_adapter(model, folder)
    return folder, logits(model, model_inputs("llama"))


def edit_config(folder, **changes):
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


def assert_untouched(model, reference):
    """A failed load leaves the base model exactly as it was."""
    assert not hasattr(model, "loraloom_config")
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = model_inputs("llama")
    torch.testing.assert_close(logits(model, x), logits(reference, x), atol=0, rtol=0)
    assert all(p.requires_grad for p in model.parameters())


def test_saved_files_and_keys(llama_adapter):
    folder, _ = llama_adapter
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["task_type"] == "CAUSAL_LM"
    keys = load_file(folder / WEIGHTS_NAME).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * 2


def test_unknown_config_keys_are_ignored(llama_adapter):
    folder, expected = llama_adapter
    edit_config(folder, some_future_field={"x": 1}, peft_version="9.9")
    model = ll.load_adapter(tiny_llama(), folder)
    torch.testing.assert_close(logits(model, model_inputs("llama")), expected, atol=1e-6, rtol=0)


def test_legacy_bin_loads_with_weights_only(llama_adapter):
    folder, expected = llama_adapter
    tensors = load_file(folder / WEIGHTS_NAME)
    (folder / WEIGHTS_NAME).unlink()
    torch.save(tensors, folder / LEGACY_WEIGHTS_NAME)
    model = ll.load_adapter(tiny_llama(), folder)
    torch.testing.assert_close(logits(model, model_inputs("llama")), expected, atol=1e-6, rtol=0)


class Exploit:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_legacy_bin_with_code_is_refused(llama_adapter, capsys):
    folder, _ = llama_adapter
    (folder / WEIGHTS_NAME).unlink()
    with open(folder / LEGACY_WEIGHTS_NAME, "wb") as f:
        pickle.dump({"x": Exploit()}, f)
    with pytest.raises(ll.AdapterError, match="weights_only"):
        ll.load_adapter(tiny_llama(), folder)
    assert "pickle code ran" not in capsys.readouterr().out


def test_truncated_safetensors(llama_adapter):
    folder, _ = llama_adapter
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    base, reference = tiny_llama(), tiny_llama()
    with pytest.raises(ll.AdapterError, match=rf"{WEIGHTS_NAME}.*truncated or corrupted"):
        ll.load_adapter(base, folder)
    assert_untouched(base, reference)


def test_corrupted_safetensors_header(llama_adapter):
    folder, _ = llama_adapter
    (folder / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ll.AdapterError, match=WEIGHTS_NAME):
        ll.load_adapter(tiny_llama(), folder)


def test_non_finite_weights(llama_adapter):
    folder, _ = llama_adapter
    tensors = load_file(folder / WEIGHTS_NAME)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / WEIGHTS_NAME)
    with pytest.raises(ll.AdapterError, match=rf"{key}.*NaN or inf"):
        ll.load_adapter(tiny_llama(), folder)


def test_adapter_for_a_different_base_names_layer_and_shapes(tmp_path):
    model = ll.add_adapter(tiny_t5(), ll.LoraConfig(r=4), verbose=False)
    ll.save_adapter(model, tmp_path)
    # same layer names, different width
    bigger = T5ForConditionalGeneration(
        T5Config(vocab_size=128, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    )
    with pytest.raises(
        ll.AdapterError,
        match=r"layer 'encoder\.block\.0\.layer\.0\.SelfAttention\.q\.lora_A\.weight' has shape \(4, 32\).*expects \(4, 48\)",
    ):
        ll.load_adapter(bigger, tmp_path)
    assert not hasattr(bigger, "loraloom_config")


def test_rank_mismatch_between_config_and_file(llama_adapter):
    folder, _ = llama_adapter
    edit_config(folder, r=8)
    base, reference = tiny_llama(), tiny_llama()
    with pytest.raises(ll.AdapterError, match=r"q_proj.lora_A.weight' has rank 4 but the config's 'r' gives"):
        ll.load_adapter(base, folder)
    assert_untouched(base, reference)


def test_target_module_missing_in_base(llama_adapter):
    folder, _ = llama_adapter
    with pytest.raises(
        ll.AdapterError, match=r"adapter: target_modules .* matched no layer of GPT2LMHeadModel.*c_attn"
    ):
        ll.load_adapter(tiny_gpt2(), folder)


def test_missing_and_unexpected_tensors(llama_adapter):
    folder, _ = llama_adapter
    tensors = load_file(folder / WEIGHTS_NAME)
    key = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != key}, folder / WEIGHTS_NAME)
    with pytest.raises(ll.AdapterError, match="missing tensor for layer"):
        ll.load_adapter(tiny_llama(), folder)
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)}, folder / WEIGHTS_NAME)
    with pytest.raises(ll.AdapterError, match="lm_head.*matches no adapted layer"):
        ll.load_adapter(tiny_llama(), folder)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"peft_type": "PROMPT_TUNING"}', "peft_type 'PROMPT_TUNING' .prompt tuning. is not supported"),
        ('{"r": 8}', "no field 'peft_type'"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"peft_type": "LORA", "r": -1}', "r must be a positive integer"),
    ],
)
def test_bad_config_file(llama_adapter, content, message):
    folder, _ = llama_adapter
    (folder / CONFIG_NAME).write_text(content)
    with pytest.raises(ll.AdapterError, match=rf"{CONFIG_NAME}.*{message}"):
        ll.load_adapter(tiny_llama(), folder)


def test_missing_files(tmp_path):
    with pytest.raises(ll.AdapterError, match="no adapter_config.json"):
        ll.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"peft_type": "LORA"}')
    with pytest.raises(ll.AdapterError, match="no adapter_model.safetensors"):
        ll.load_adapter(tiny_llama(), tmp_path)


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ll.AdapterError, match="'someone/some-adapter' is not a local folder"):
        ll.read_adapter("someone/some-adapter")


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = ll.add_adapter(tiny_bert_cls(), ll.LoraConfig(r=2), verbose=False)
    import loraloom.adapters.peft_format as pf

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pf, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ll.save_adapter(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no folder, no temp folder left beside it


def test_saving_a_merged_adapter_is_refused(tmp_path):
    model = ll.add_adapter(tiny_t5(), ll.LoraConfig(r=2), verbose=False)
    ll.merge(model)
    with pytest.raises(ll.AdapterError, match="unmerge"):
        ll.save_adapter(model, tmp_path)


def test_model_without_adapter_errors(tmp_path):
    with pytest.raises(ll.AdapterError, match="carries no loraloom adapter"):
        ll.save_adapter(tiny_t5(), tmp_path)
