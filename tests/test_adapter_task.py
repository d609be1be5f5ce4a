"""The adapter's task_type picks the model class in `loraloom eval` / `loraloom merge` when --task is not given
(the defect: a classification adapter on a base saved as BertForMaskedLM / BertForPreTraining failed,
blaming the base), and an
explicit --task that contradicts the adapter is an error naming both."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, tiny_word_tokenizer
from transformers import AutoModelForSequenceClassification, BertConfig, BertForPreTraining

import loraloom as ll
from loraloom.cli import main

WORDS = "good great fine bad awful poor meh so so ok".split()
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny BERT saved as a pre-training model (not a classifier), a 3-label classification adapter for it,
    and test data. (BertForPreTraining rather than BertForMaskedLM: the latter saves no pooler, so every
    classifier built from it would start from a different random pooler.)"""
    root = tmp_path_factory.mktemp("task")
    tokenizer = tiny_word_tokenizer(WORDS)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    BertForPreTraining(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")

    classifier = AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=3).eval()
    torch.manual_seed(1)
    classifier = ll.add_adapter(classifier, ll.LoraConfig(r=2, init_lora_weights=False), verbose=False)
    with torch.no_grad():
        classifier.classifier.weight.normal_()  # a trained head
    ll.save_adapter(classifier, root / "adapter")
    rows = [{"input": " ".join(WORDS[i : i + 3]), "target": LABELS[i % 3]} for i in range(6)]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    inputs = tokenizer([r["input"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = classifier(**inputs).logits
    return root, inputs, expected


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_merge_a_classifier_adapter_without_task(work, tmp_path, capsys):
    root, inputs, expected = work
    assert json.loads((root / "base" / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    code, _, err = run(capsys, "merge", "--base", root / "base", "--adapter", root / "adapter", "--out", tmp_path / "m")
    assert code == 0, err
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_eval_a_classifier_adapter_without_task(work, capsys):
    root, _, _ = work
    code, out, err = run(
        capsys, "eval", "--base", root / "base", "--adapter", root / "adapter", "--data", root / "test.jsonl"
    )
    assert code == 0, err
    assert "test.jsonl" in out and "accuracy" in out.lower()


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_contradicting_task_names_both(work, tmp_path, capsys, command):
    root, _, _ = work
    extra = ["--out", tmp_path / "m"] if command == "merge" else ["--data", root / "test.jsonl"]
    code, _, err = run(
        capsys, command, "--base", root / "base", "--adapter", root / "adapter", "--task", "causal", *extra
    )
    assert code == 2
    assert "--task causal" in err and "classification" in err and "SEQ_CLS" in err
    assert not (tmp_path / "m").exists()
