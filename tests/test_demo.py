"""The demo end to end in a smaller setting: a base from scratch, LoRA teaches it a new task."""

from __future__ import annotations

import json

import pytest

from loraloom.adapters.inspect import inspect_folder
from loraloom.demo import DEMO_METHODS, WORDS, make_examples, run_hub_demo, run_lora_demo
from loraloom.seeds import parse_seeds
from loraloom.zoo.base import train_tokenizer


def test_toy_tasks():
    words = WORDS[:4]
    examples = make_examples("shift", 50, seed=3, words=words)
    assert examples == make_examples("shift", 50, seed=3, words=words)  # seeded
    assert examples != make_examples("shift", 50, seed=4, words=words)
    for e in examples:
        task, *sentence = e["input"].split()
        assert task == "shift:" and 2 <= len(sentence) <= 5
        assert e["target"].split() == [words[(words.index(w) + 1) % 4] for w in sentence]
    for e in make_examples("reverse", 5, seed=0):
        assert e["target"].split() == e["input"].split()[1:][::-1]


def test_train_tokenizer_round_trips():
    tok = train_tokenizer(["copy: ant bee", "reverse: cat dog"], vocab_size=150)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("copy: ant bee")["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "copy: ant bee"
    # an unseen word is spelled from known pieces, or is <unk>
    assert tok.decode(tok("bat cat")["input_ids"], skip_special_tokens=True) == "bat cat"
    assert tok("Zebra")["input_ids"] == [tok.unk_token_id, tok.eos_token_id]
    assert tok("copy: ant", add_special_tokens=False)["input_ids"][-1] != tok.eos_token_id
    assert train_tokenizer(["ant"], add_eos=False)("ant")["input_ids"][-1] != 1


def test_demo_lora_learns_the_new_task(tmp_path):
    out = tmp_path / "demo"
    # (seen: base copy 66%, reverse 64%; shift 0% -> 51% in ~20 s on a busy 2-core machine)
    result = run_lora_demo(out, pretrain_steps=500, lora_steps=120, n_train=600, n_test=100, n_words=6, progress=False)
    assert result.base_scores["copy"] > 0.3, "the pre-trained base should have learned to copy"
    assert result.before == result.base_scores["shift"] < 0.05  # the base cannot know the new task
    assert result.after >= result.before + 0.3, f"LoRA did not learn: {result.before:.2f} -> {result.after:.2f}"
    assert result.reload_identical and result.merge_max_diff < 1e-4 and result.merged_after == result.after
    assert result.adapter_params < result.total_params / 5

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and sum(r["correct"] for r in rows) / 100 == pytest.approx(result.after)
    info = inspect_folder(out / "adapter")
    assert info["peft_type"] == "LORA" and info["trainable_params"] == result.adapter_params
    assert (out / "base" / "model.safetensors").is_file() and (out / "base" / "tokenizer.json").is_file()


def test_parse_seeds():
    assert parse_seeds("1-5") == [1, 2, 3, 4, 5]
    assert parse_seeds("1,3") == [1, 3]
    assert parse_seeds("2-3,7") == [2, 3, 7]
    with pytest.raises(ValueError, match="--seeds 'x'"):
        parse_seeds("x")
    for bad in ("5-1", "-1", "1,", "1-1000000"):  # descending, negative, empty, absurd
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_hub_demo_slice_runs_every_method_through_the_harness(tmp_path):
    """One held-out task, one seed, every demo method, on the zoo shipped in the package (CI: ~10 s)."""
    results = run_hub_demo(tmp_path / "hub", tasks=["body-the-bare"], seeds=[1], progress=False)
    rows = [r for r in results.rows if r["status"] == "done"]
    scores = {r["method"]: r["score"] for r in rows}
    assert set(scores) == set(DEMO_METHODS)
    # The task is known only from its 5 examples: the base alone and every single module fail it; the
    # composition finds it (measured: zero-shot 0.00, retrieval-best 0.00, lorahub 0.98 on this seed).
    assert scores["lorahub"] > max(scores["zero-shot"], scores["retrieval-best"]) + 0.3, scores
    recorded = next(r for r in rows if r["method"] == "lorahub")
    details = recorded["details"] if isinstance(recorded["details"], dict) else json.loads(recorded["details"])
    assert details["lorahub_settings"]["population"] == 1  # the demo's search, recorded per cell
    assert (tmp_path / "hub" / "report.md").is_file()
    assert list((tmp_path / "hub" / "plots").glob("*.png"))
    with pytest.raises(ValueError, match="not held-out zoo tasks"):
        run_hub_demo(tmp_path / "x", tasks=["color-the-bare"], seeds=[1], progress=False)
