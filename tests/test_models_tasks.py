"""The one base loader (models.py) and the one task detector (tasks.py)."""

from __future__ import annotations

import pytest
from tiny_models import tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5, tiny_word_tokenizer

from loraloom.models import load_base, model_source
from loraloom.tasks import task_of, task_of_adapter, task_of_config


def test_a_missing_folder_is_one_clear_error_not_a_hub_request(tmp_path):
    for missing in (str(tmp_path / "nowhere"), "./typo", "a/b/c"):
        with pytest.raises(ValueError, match="not a model folder"):
            load_base(missing)
    assert model_source("google/flan-t5-small") == "google/flan-t5-small"  # a hub id is left to transformers


def test_the_task_comes_from_the_adapter_else_the_config(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    tiny_word_tokenizer(["a b"]).save_pretrained(tmp_path / "gpt2")
    model, _ = load_base(tmp_path / "gpt2")
    assert task_of(model) == "causal" and not model.training
    with pytest.raises(ValueError, match="task must be one of"):
        load_base(tmp_path / "gpt2", "translation")


def test_one_detector_for_models_configs_and_adapters():
    assert [task_of(m) for m in (tiny_t5(), tiny_gpt2(), tiny_llama(), tiny_bert_cls())] == [
        "seq2seq",
        "causal",
        "causal",
        "classification",
    ]
    config = tiny_bert_cls().config
    config.architectures = ["BertForSequenceClassification"]  # as a saved classifier's config.json says
    assert task_of_config(config) == "classification" and task_of_config(tiny_t5().config) == "seq2seq"
    assert task_of_adapter("SEQ_2_SEQ_LM") == "seq2seq"
    assert task_of_adapter(None, {"base_model_class": "LlamaForCausalLM"}) == "causal"
    assert task_of_adapter(None, None) is None
