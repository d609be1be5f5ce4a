"""loraloom.evaluate: batched greedy generation, exact match, accuracy, the predictions file."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from tiny_models import tiny_bert_cls
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from loraloom.data import DataError
from loraloom.evaluate import evaluate, generate
from loraloom.zoo.base import build_demo_t5, train_tokenizer

ev = importlib.import_module("loraloom.evaluate")  # the module; `loraloom.evaluate` is the function

WORDS = "ant bee cat dog eel fox gnu hen ibis jay kiwi lark mole newt owl pig".split()
# Inputs of different lengths, so batches need padding and the length sort reorders them.
INPUTS = ["ant", "bee cat dog eel fox gnu", "hen ibis", "jay kiwi lark mole", "newt owl pig ant bee", "cat dog eel"]


def tiny_llama(vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1, pad_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


@torch.no_grad()
def reference_greedy(model, tokenizer, text: str, max_new_tokens: int) -> str:
    """One example, no padding, no cache, no generate(): argmax token by token until eos."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    seq2seq = model.config.is_encoder_decoder
    new = [model.config.decoder_start_token_id] if seq2seq else []
    for _ in range(max_new_tokens):
        if seq2seq:
            logits = model(input_ids=ids, decoder_input_ids=torch.tensor([new])).logits
        else:
            logits = model(input_ids=torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)).logits
        token = int(logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new[1:] if seq2seq else new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("arch", ["t5", "llama", "gpt2"])
def test_generate_matches_unbatched_greedy(arch):
    # T5's tokenizer ends every input with eos; the causal ones do not, as GPT-2's and Llama's.
    tokenizer = train_tokenizer([" ".join(WORDS)] * 4, vocab_size=200, add_eos=arch == "t5")
    vocab = len(tokenizer)
    make = {
        "t5": lambda seed: build_demo_t5(tokenizer, d_model=32, d_ff=64, seed=seed),
        "llama": lambda seed: tiny_llama(vocab, seed),
        "gpt2": lambda seed: tiny_gpt2(vocab, seed),
    }[arch]
    # Random models often answer eos at once or repeat one token for every input; such outputs would
    # prove little, so take the first seed whose outputs are mostly non-empty and differ.
    for seed in range(20):
        model = make(seed)
        expected = [reference_greedy(model, tokenizer, text, max_new_tokens=6) for text in INPUTS]
        if sum(map(bool, expected)) >= 4 and len(set(expected)) >= 4:
            break
    else:
        pytest.fail("no seed gave a random model with informative outputs")
    got = generate(model, tokenizer, INPUTS, max_new_tokens=6, batch_size=4)
    assert got == expected
    assert generate(model, tokenizer, INPUTS, max_new_tokens=6, batch_size=1) == expected
    assert not model.training


def test_exact_match_normalises_and_writes_predictions(tmp_path, monkeypatch):
    data = [
        {"input": "q1", "target": "Dog."},
        {"input": "q2", "target": "cat"},
        {"input": "q3", "target": "(A)"},
        {"input": "q4", "target": "eel"},
    ]
    answers = {"q1": "  dog", "q2": "Cat.", "q3": "(a).", "q4": "eels"}
    # Scoring only: the model's answers are fixed so each normalisation rule is tested on its own.
    monkeypatch.setattr(ev, "generate", lambda model, tok, inputs, *a, **k: [answers[x] for x in inputs])
    out = tmp_path / "sub" / "predictions.jsonl"
    result = evaluate(torch.nn.Linear(1, 1), None, data, task="seq2seq", predictions_file=out, progress=False)
    assert (result.metric, result.n, result.score) == ("exact_match", 4, 0.75)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"input": d["input"], "target": d["target"], "prediction": answers[d["input"]], "correct": d["input"] != "q4"}
        for d in data
    ]
    assert [p.name for p in out.parent.iterdir()] == ["predictions.jsonl"]  # no temp file left behind


def test_seq2seq_evaluate_end_to_end(tmp_path):
    tokenizer = train_tokenizer([" ".join(WORDS)] * 4, vocab_size=200)
    model = build_demo_t5(tokenizer, d_model=32, d_ff=64)
    predicted = generate(model, tokenizer, INPUTS, max_new_tokens=4)
    # Targets: the model's own outputs for half the inputs, something else for the others.
    data = [
        {"question": x, "answer": p if i % 2 == 0 else "zzz"}
        for i, (x, p) in enumerate(zip(INPUTS, predicted, strict=True))
    ]
    result = evaluate(
        model,
        tokenizer,
        data,
        max_new_tokens=4,
        batch_size=4,
        input_field="question",
        target_field="answer",
        progress=False,
    )
    assert result.score == pytest.approx(0.5)
    assert [p["prediction"] for p in result.predictions] == predicted
    assert [p["correct"] for p in result.predictions] == [True, False] * 3


@torch.no_grad()
def test_classification_accuracy():
    tokenizer = train_tokenizer([" ".join(WORDS)], vocab_size=128, add_eos=False)  # tiny BERT: 128 ids
    model = tiny_bert_cls(num_labels=3)
    label2id = {"neg": 0, "neu": 1, "pos": 2}
    id2label = {i: label for label, i in label2id.items()}
    # The expected labels: each input alone (no padding) through the model.
    argmax = [id2label[int(model(torch.tensor([tokenizer(x)["input_ids"]])).logits.argmax())] for x in INPUTS]
    targets = [a if i < 4 else next(lbl for lbl in label2id if lbl != a) for i, a in enumerate(argmax)]
    data = [{"input": x, "target": t} for x, t in zip(INPUTS, targets, strict=True)]
    result = evaluate(model, tokenizer, data, label2id=label2id, batch_size=4, progress=False)
    assert (result.metric, result.n) == ("accuracy", 6)
    assert result.score == pytest.approx(4 / 6)
    assert [p["prediction"] for p in result.predictions] == argmax


def test_bad_data_names_the_file(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "a"}\n')
    tokenizer = train_tokenizer(WORDS, vocab_size=200)
    with pytest.raises(DataError, match=r"eval\.jsonl:2: missing field 'target'"):
        evaluate(build_demo_t5(tokenizer, d_model=32, d_ff=64), tokenizer, bad, progress=False)
