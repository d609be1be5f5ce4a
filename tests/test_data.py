"""loraloom.data: loading examples, their tokenisation, batching and answer normalisation."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5, tiny_word_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraloom.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    batches,
    collate,
    default_label2id,
    encode_causal,
    encode_classification,
    encode_seq2seq,
    few_shot_split,
    load_examples,
    normalise_answer,
    resolve_label2id,
)
from loraloom.tasks import task_of

BBH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bbh"
WORDS = "the cat sat on a mat dog ran far away yes no".split()
PAIRS = [("the cat sat", "yes"), ("a dog ran far", "no"), ("the mat", "yes no")]


@pytest.fixture
def tok():
    return tiny_word_tokenizer(WORDS)


@pytest.fixture
def bos_tok():
    return tiny_word_tokenizer(WORDS, add_bos=True)


def byte_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer, where a leading space is part of a word's token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def expected() -> list[Example]:
    return [Example(i, t) for i, t in PAIRS]


# ---- loading ---------------------------------------------------------------------------------


def test_load_jsonl_skips_blank_lines(tmp_path):
    f = tmp_path / "few.jsonl"
    f.write_text("\n".join(json.dumps({"input": i, "target": t, "extra": 1}) for i, t in PAIRS) + "\n\n")
    assert load_examples(f) == expected()
    assert load_examples(str(f)) == expected()


def test_load_json_list_and_bbh_layout(tmp_path):
    records = [{"input": i, "target": t} for i, t in PAIRS]
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "bbh.json").write_text(json.dumps({"canary": "x", "examples": records}))
    assert load_examples(tmp_path / "list.json") == expected()
    assert load_examples(tmp_path / "bbh.json") == expected()


def test_load_csv(tmp_path):
    f = tmp_path / "few.csv"
    f.write_text('input,target\nthe cat sat,yes\n"a dog ran far",no\nthe mat,yes no\n')
    assert load_examples(f) == expected()


def test_load_python_lists_and_custom_fields():
    assert load_examples(PAIRS) == expected()
    assert load_examples(expected()) == expected()
    records = [{"question": i, "answer": t} for i, t in PAIRS]
    assert load_examples(records, input_field="question", target_field="answer") == expected()
    # integer class labels become strings
    assert load_examples([{"input": "x", "target": 2}]) == [Example("x", "2")]


def test_load_real_bbh_task():
    f = BBH / "boolean_expressions.json"
    if not f.is_file():
        pytest.skip(f"BBH data not found at {BBH} (the shared data folder is absent)")
    examples = load_examples(f)
    assert len(examples) == 250
    assert {e.target for e in examples} == {"True", "False"}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("few.jsonl", '{"input": "a", "target": "b"}\n\n{"input": "a", "target": }\n', r"few\.jsonl:3: not valid JSON"),
        (
            "few.jsonl",
            '{"input": "a", "target": "b"}\n{"input": "a"}\n',
            r"few\.jsonl:2: missing field 'target' \(fields: input\)",
        ),
        ("few.jsonl", '{"input": ["a"], "target": "b"}\n', r"few\.jsonl:1: field 'input' must be a string, got list"),
        ("few.jsonl", '{"input": "a", "target": 1.5}\n', r"few\.jsonl:1: field 'target' must be a string, got float"),
        ("few.jsonl", '{"input": "a", "target": null}\n', r"few\.jsonl:1: missing field 'target'"),
        ("few.jsonl", "[1, 2]\n", r"few\.jsonl:1: expected a JSON object, got list"),
        ("few.jsonl", "\n\n", r"few\.jsonl: no examples"),
        ("few.json", '[{"input": "a", "target": "b"},\n {"input": "a",\n "target": }]', r"few\.json:3: not valid JSON"),
        (
            "few.json",
            '[{"input": "a", "target": "b"}, {"target": "b"}]',
            r"few\.json: example 2: missing field 'input'",
        ),
        ("few.json", '{"rows": []}', r"few\.json: expected a list of objects"),
        ("few.json", "[]", r"few\.json: no examples"),
        ("few.csv", "input,label\na,b\n", r"few\.csv:1: missing column 'target' \(columns: input, label\)"),
        ("few.csv", "input,target\na,b\nc,d,e\n", r"few\.csv:3: more cells than the header"),
        ("few.csv", "input,target\na,b\nc\n", r"few\.csv:3: missing field 'target'"),
        ("few.csv", "input,target\n", r"few\.csv: no examples"),
        ("few.txt", "a b\n", r"few\.txt: unknown file type '\.txt'"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(DataError, match=message):
        load_examples(f)


def test_bad_python_inputs(tmp_path):
    with pytest.raises(DataError, match="examples: no examples"):
        load_examples([])
    with pytest.raises(DataError, match=r"examples: example 2: expected an \(input, target\) pair, got 3 items"):
        load_examples([("a", "b"), ("a", "b", "c")])
    with pytest.raises(DataError, match="examples: example 1: expected an object"):
        load_examples([42])
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="not UTF-8"):
        (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
        load_examples(tmp_path / "bin.jsonl")
    assert issubclass(DataError, ValueError)


def test_few_shot_split_is_seeded_and_disjoint():
    examples = [Example(str(i), "t") for i in range(20)]
    shots, rest = few_shot_split(examples, 5, seed=1)
    assert len(shots) == 5 and len(rest) == 15
    assert set(shots).isdisjoint(rest) and set(shots) | set(rest) == set(examples)
    assert few_shot_split(examples, 5, seed=1) == (shots, rest)
    assert few_shot_split(examples, 5, seed=2)[0] != shots
    with pytest.raises(DataError, match="cannot draw 20"):
        few_shot_split(examples, 20, seed=1)


# ---- tokenisation ----------------------------------------------------------------------------


def test_task_of_tiny_models():
    assert task_of(tiny_t5()) == "seq2seq"
    assert task_of(tiny_gpt2()) == "causal"
    assert task_of(tiny_llama()) == "causal"
    assert task_of(tiny_bert_cls()) == "classification"


def test_encode_seq2seq_targets_end_in_one_eos(tok):
    features = encode_seq2seq(tok, expected())
    assert features[0] == {"input_ids": tok("the cat sat")["input_ids"], "labels": tok("yes")["input_ids"] + [1]}
    assert [f["labels"][-1] for f in features] == [tok.eos_token_id] * 3
    # a tokenizer that already appends eos (T5's convention) does not get a second one
    t5_like = tiny_word_tokenizer(WORDS, add_eos=True)
    features = encode_seq2seq(t5_like, expected())
    assert features[2]["labels"] == tok("yes no")["input_ids"] + [1]
    assert features[0]["input_ids"][-1] == 1


def test_encode_seq2seq_truncation_warns_once_with_counts(tok):
    with pytest.warns(UserWarning) as record:
        features = encode_seq2seq(tok, expected(), max_source_length=3, max_target_length=2)
    assert len(record) == 1
    message = str(record[0].message)
    assert "1 of 3 inputs to max_source_length=3" in message and "1 of 3 targets to max_target_length=2" in message
    assert max(len(f["input_ids"]) for f in features) == 3
    assert features[2]["labels"] == tok("yes")["input_ids"] + [tok.eos_token_id]  # eos survives the cut
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_seq2seq(tok, expected())  # nothing cut, nothing said


@pytest.mark.parametrize("add_bos", [False, True])
def test_encode_causal_masks_the_prompt(add_bos):
    tok = tiny_word_tokenizer(WORDS, add_bos=add_bos)
    features = encode_causal(tok, expected())
    for (source, target), f in zip(PAIRS, features, strict=True):
        prompt = tok(source)["input_ids"]  # what generation sees, with bos if the tokenizer adds it
        target_ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert f["input_ids"] == prompt + target_ids
        assert f["labels"] == [IGNORE_INDEX] * len(prompt) + target_ids
        assert (f["input_ids"][0] == tok.bos_token_id) == add_bos


def test_encode_causal_separator_is_one_space_owned_by_the_target():
    tok = byte_bpe_tokenizer()
    [f] = encode_causal(tok, [Example("the cat sat", "yes no")])
    target_ids = [t for t, label in zip(f["input_ids"], f["labels"], strict=True) if label != IGNORE_INDEX]
    assert tok.decode(f["input_ids"]) == "the cat sat yes no<|endoftext|>"
    assert tok.decode(target_ids[:-1]) == " yes no"  # generation from the bare prompt continues with " yes"
    assert f["input_ids"][: len(f["input_ids"]) - len(target_ids)] == tok("the cat sat")["input_ids"]


def test_encode_causal_truncates_prompt_from_the_left(bos_tok):
    examples = [Example("the cat sat on a mat", "yes no"), Example("the", "no")]
    with pytest.warns(UserWarning, match=r"encode_causal: truncated 1 of 2 examples to max_length=6") as record:
        features = encode_causal(bos_tok, examples, max_length=6)
    assert len(record) == 1
    long = features[0]
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    # bos kept, then the end of the prompt (2 of its 6 words fit), the whole target and eos
    assert long["input_ids"] == [bos] + bos_tok("a mat yes no", add_special_tokens=False)["input_ids"] + [eos]
    assert long["labels"][:3] == [IGNORE_INDEX] * 3 and long["labels"][3:] == long["input_ids"][3:]
    assert features[1]["input_ids"] == bos_tok("the no")["input_ids"] + [eos]


def test_encode_classification_and_label_maps(tok):
    examples = [Example("the cat", "pos"), Example("a dog", "neg"), Example("the mat", "pos")]
    label2id = default_label2id(examples)
    assert label2id == {"neg": 0, "pos": 1}
    features = encode_classification(tok, examples, label2id)
    assert [f["labels"] for f in features] == [1, 0, 1]
    assert features[0]["input_ids"] == tok("the cat")["input_ids"]
    with pytest.raises(DataError, match=r"labels \['pos'\] are not in label2id \(known labels: neg\)"):
        encode_classification(tok, examples, {"neg": 0})
    # integer labels keep their number ("10" is not sorted before "2")
    assert default_label2id([Example("x", "10"), Example("y", "2")]) == {"10": 10, "2": 2}
    model = tiny_bert_cls(num_labels=2)
    assert resolve_label2id(model, examples, None) == {"neg": 0, "pos": 1}
    model.config.label2id = {"pos": 0, "neg": 1}
    assert resolve_label2id(model, examples, None) == {"pos": 0, "neg": 1}  # the model's own map wins
    with pytest.raises(DataError, match="do not fit the model's 2 labels"):
        resolve_label2id(model, examples, {"neg": 0, "pos": 2})


# ---- batching --------------------------------------------------------------------------------


def test_collate_right_padding_seq2seq():
    features = [{"input_ids": [5, 6, 7], "labels": [8, 1]}, {"input_ids": [5], "labels": [8, 9, 10, 1]}]
    batch = collate(features, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 1, -100, -100], [8, 9, 10, 1]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_left_padding_causal_and_classification():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5, 9], "labels": [-100, 9]}]
    batch = collate(features, pad_token_id=0, padding_side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 5, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 9]]
    with pytest.raises(ValueError, match="left padding needs labels aligned"):
        collate([{"input_ids": [5, 6], "labels": [1]}], pad_token_id=0, padding_side="left")
    cls = collate([{"input_ids": [5, 6], "labels": 2}, {"input_ids": [5], "labels": 0}], pad_token_id=3)
    assert cls["input_ids"].tolist() == [[5, 6], [5, 3]] and cls["labels"].tolist() == [2, 0]
    assert set(collate([{"input_ids": [4]}], 0)) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="padding_side"):
        collate(features, 0, padding_side="middle")


def test_batches_cover_everything_and_shuffle_by_seed():
    items = list(range(10))
    assert list(batches(items, 4, shuffle=False, seed=0)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    a = list(batches(items, 4, shuffle=True, seed=3))
    assert a == list(batches(items, 4, shuffle=True, seed=3))
    assert a != list(batches(items, 4, shuffle=True, seed=4))
    assert sorted(x for b in a for x in b) == items and [len(b) for b in a] == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(items, 0, shuffle=False, seed=0))


@pytest.mark.parametrize(
    ("raw", "normal"),
    # The reference's order (strip, lower, drop "."): "Yes ." keeps the space before its "."; "No.\n" loses both.
    [("  True ", "true"), ("(A).", "(a)"), ("No.\n", "no"), ("3.14", "314"), ("Yes .", "yes "), (" . ", ""), ("", "")],
)
def test_normalise_answer(raw, normal):
    assert normalise_answer(raw) == normal


def test_batches_by_length_cut_little_padding_and_keep_every_example_once():
    from loraloom.data import batches, feature_length

    rng = random.Random(0)
    features = [{"input_ids": [1] * rng.randint(1, 500), "labels": [1] * 3} for _ in range(400)]
    grouped = list(batches(features, 8, shuffle=True, seed=1, by_length=True))
    plain = list(batches(features, 8, shuffle=True, seed=1))

    def padding(bs):
        return sum(max(map(feature_length, b)) * len(b) - sum(map(feature_length, b)) for b in bs)

    assert sorted(id(f) for b in grouped for f in b) == sorted(id(f) for f in features)
    assert padding(grouped) < padding(plain) / 5
    assert grouped == list(batches(features, 8, shuffle=True, seed=1, by_length=True))  # same seed, same batches
    assert grouped != list(batches(features, 8, shuffle=True, seed=2, by_length=True))
    lengths = [feature_length(b[0]) for b in grouped[:10]]
    assert lengths != sorted(lengths, reverse=True)  # the batches themselves come in random order
