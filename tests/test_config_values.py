"""Configs are values: add_adapter never changes the caller's config; each model keeps (and saves) its own
resolved copy. The defect this guards: one LoraConfig reused on a causal LM, then on a BERT classifier,
targeted the first model's layer names and left the classifier head frozen and unsaved."""

from __future__ import annotations

import copy
import json

import torch
from safetensors.torch import load_file
from tiny_models import tiny_bert_cls, tiny_llama

import loraloom as ll
from loraloom.adapters import get_config
from loraloom.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME


def test_one_config_on_a_causal_lm_then_a_classifier(tmp_path):
    config = ll.LoraConfig(r=2, lora_alpha=4)
    pristine = copy.deepcopy(config)

    llama = ll.add_adapter(tiny_llama(), config, verbose=False)
    assert config == pristine  # nothing written into the caller's object
    assert get_config(llama) is not config
    assert get_config(llama).target_modules == ["q_proj", "v_proj"]
    assert get_config(llama).task_type == "CAUSAL_LM"

    bert = ll.add_adapter(tiny_bert_cls(), config, verbose=False)
    assert config == pristine
    resolved = get_config(bert)
    assert resolved.target_modules == ["query", "value"] and resolved.task_type == "SEQ_CLS"
    assert "classifier" in resolved.modules_to_save
    assert all(p.requires_grad for p in bert.classifier.parameters())  # the head trains...
    folder = ll.save_adapter(bert, tmp_path / "bert")
    saved = json.loads((folder / CONFIG_NAME).read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["target_modules"] == ["query", "value"]
    assert {"classifier", "score"} <= set(saved["modules_to_save"])
    keys = load_file(folder / WEIGHTS_NAME).keys()
    assert "base_model.model.classifier.weight" in keys  # ...and is saved
    # and the first model's copy did not move either
    assert get_config(llama).target_modules == ["q_proj", "v_proj"]
    assert get_config(llama).task_type == "CAUSAL_LM"


def test_the_saved_config_is_the_models_copy(tmp_path):
    """Changing the caller's config after add_adapter changes neither the model nor what is saved."""
    config = ll.LoraConfig(r=2, target_modules=["q_proj"])
    model = ll.add_adapter(tiny_llama(), config, verbose=False)
    config.r, config.target_modules = 16, ["k_proj"]
    saved = json.loads((ll.save_adapter(model, tmp_path / "a") / CONFIG_NAME).read_text())
    assert (saved["r"], saved["target_modules"]) == (2, ["q_proj"])
    # the model's copy is complete: fan_in_fan_out and base name are filled in there, not in the caller's
    assert config.base_model_name_or_path is None and config.task_type is None


def test_load_does_not_share_state_between_models(tmp_path):
    model = ll.add_adapter(tiny_llama(), ll.LoraConfig(r=2, init_lora_weights=False), verbose=False)
    folder = ll.save_adapter(model, tmp_path / "a")
    first = ll.load_adapter(tiny_llama(), folder, verbose=False)
    second = ll.load_adapter(tiny_llama(), folder, verbose=False)
    assert get_config(first) is not get_config(second)
    get_config(first).target_modules.append("k_proj")
    assert get_config(second).target_modules == ["q_proj", "v_proj"]
    x = {"input_ids": torch.randint(3, 100, (1, 5))}
    with torch.no_grad():
        torch.testing.assert_close(first(**x).logits, second(**x).logits)
