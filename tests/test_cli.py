"""The loraloom command, run in-process through cli.main: train -> inspect -> eval -> merge, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

import loraloom as ll
from loraloom.adapters.inspect import inspect_folder
from loraloom.cli import main
from loraloom.demo import make_examples, write_jsonl
from loraloom.evaluate import evaluate
from loraloom.zoo.base import build_demo_t5, train_tokenizer


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny T5 + tokenizer saved as a transformers folder, and train / test files of a toy task."""
    root = tmp_path_factory.mktemp("cli")
    train, test = make_examples("copy", 64, seed=0), make_examples("copy", 12, seed=1)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "test.jsonl", test)
    tokenizer = train_tokenizer([e["input"] for e in train], vocab_size=200)
    model = build_demo_t5(tokenizer, d_model=32, d_ff=64)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def load_base(work):
    return AutoModelForSeq2SeqLM.from_pretrained(work / "base").eval(), AutoTokenizer.from_pretrained(work / "base")


def test_train_inspect_eval_merge(work, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    code, out, err = run(
        capsys,
        "train", "--base", work / "base", "--train", work / "train.jsonl", "--eval", work / "test.jsonl",
        "--eval-every", 4, "--adapter", "lora", "--r", 4, "--alpha", 8, "--targets", "q,v",
        "--max-steps", 8, "--batch-size", 16, "--lr", 1e-2, "--out", adapter,
    )  # fmt: skip
    assert code == 0, err
    assert "8 steps" in out and "eval at step 4" in out and "eval at step 8" in out
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)

    # inspect: the numbers come from the file, checked here against the adapter loaded into a model
    code, out, err = run(capsys, "inspect", adapter, "--json")
    assert code == 0, err
    info = json.loads(out)
    model, tokenizer = load_base(work)
    ll.load_adapter(model, adapter, verbose=False)
    trainable, _ = ll.count_parameters(model)
    # q and v: in 2 encoder self-attentions, 2 decoder self- and 2 cross-attentions
    assert (info["peft_type"], info["targets"], info["adapted_layers"]) == ("LORA", ["q", "v"], 12)
    assert (
        info["trainable_params"]
        == trainable
        == sum(t.numel() for t in load_file(adapter / "adapter_model.safetensors").values())
    )
    assert info["settings"]["r"] == 4 and info["settings"]["lora_alpha"] == 8
    code, out, _ = run(capsys, "inspect", adapter)
    assert code == 0 and "peft type:              LORA" in out and f"trainable params:       {trainable:,}" in out

    # eval: the same score and predictions as the library call
    predictions = tmp_path / "predictions.jsonl"
    code, out, err = run(
        capsys, "eval", "--base", work / "base", "--adapter", adapter, "--data", work / "test.jsonl",
        "--out", predictions, "--max-new-tokens", 8,
    )  # fmt: skip
    assert code == 0, err
    expected = evaluate(model, tokenizer, work / "test.jsonl", max_new_tokens=8, progress=False)
    assert f"exact_match: {expected.score:.4f}" in out
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert rows == expected.predictions and len(rows) == 12

    # merge: a plain transformers folder whose outputs are the adapted model's
    merged_dir = tmp_path / "merged"
    code, out, err = run(capsys, "merge", "--base", work / "base", "--adapter", adapter, "--out", merged_dir)
    assert code == 0, err
    merged = AutoModelForSeq2SeqLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    inputs = tokenizer(["copy: ant bee", "copy: cat dog eel fox"], padding=True, return_tensors="pt")
    inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6], [0, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(merged_dir)("copy: ant")["input_ids"] == tokenizer("copy: ant")["input_ids"]


def test_train_fourierft_and_full(work, tmp_path, capsys):
    common = ["--base", work / "base", "--train", work / "train.jsonl", "--max-steps", 2, "--batch-size", 16]
    code, _, err = run(capsys, "train", *common, "--adapter", "fourierft", "--n-frequency", 32, "--scaling", 100,
                       "--targets", "q,k,v,o", "--out", tmp_path / "fft")  # fmt: skip
    assert code == 0, err
    info = inspect_folder(tmp_path / "fft")
    assert info["peft_type"] == "FOURIERFT" and info["adapted_layers"] == 24
    assert info["trainable_params"] == 24 * 32
    assert (info["settings"]["n_frequency"], info["settings"]["scaling"]) == (32, 100)

    code, _, err = run(capsys, "train", *common, "--adapter", "full", "--lr", 1e-3, "--out", tmp_path / "full")
    assert code == 0, err
    info = inspect_folder(tmp_path / "full")
    base, _ = load_base(work)
    # every stored tensor: T5 stores the shared embedding once (tied to encoder/decoder embed_tokens)
    stored = sum(t.numel() for t in load_file(tmp_path / "full" / "model.safetensors").values())
    assert info["peft_type"] == "FULL" and info["model_type"] == "t5" and info["tokenizer"]
    assert info["trainable_params"] == stored >= sum(p.numel() for p in base.parameters())


def test_causal_and_classification_bases(tmp_path, capsys):
    texts = [e["input"] for e in make_examples("copy", 40, seed=0)]
    tokenizer = train_tokenizer(texts, vocab_size=120, add_eos=False)  # GPT-2 / Llama / BERT: no eos added
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    )  # fmt: skip
    # A classifier base with two labels, trained on data with three: the head is rebuilt for three.
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, num_labels=2)
    )  # fmt: skip
    for name, model in (("llama", llama), ("bert", bert)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    copy = tmp_path / "copy.jsonl"
    write_jsonl(copy, make_examples("copy", 16, seed=0))
    labelled = tmp_path / "labels.jsonl"
    write_jsonl(labelled, [{"input": t, "target": ["neg", "neu", "pos"][len(t.split()) % 3]} for t in texts])

    code, out, err = run(capsys, "train", "--base", tmp_path / "llama", "--train", copy, "--max-steps", 2,
                         "--batch-size", 8, "--out", tmp_path / "llama-lora")  # fmt: skip
    assert code == 0, err
    assert inspect_folder(tmp_path / "llama-lora")["adapted_layers"] == 4  # q_proj, v_proj in 2 layers
    code, out, err = run(capsys, "eval", "--base", tmp_path / "llama", "--adapter", tmp_path / "llama-lora",
                         "--data", copy, "--max-new-tokens", 4)  # fmt: skip
    assert code == 0 and "exact_match:" in out, err

    code, out, err = run(capsys, "train", "--base", tmp_path / "bert", "--train", labelled, "--eval", labelled,
                         "--max-steps", 6, "--batch-size", 8, "--lr", 1e-2, "--out", tmp_path / "bert-lora")  # fmt: skip
    assert code == 0, err
    final = float(out.split("eval at step 6: ")[1].split()[0])
    info = inspect_folder(tmp_path / "bert-lora")
    assert info["task_type"] == "SEQ_CLS" and info["modules_to_save_params"] == 32 * 3 + 3  # the 3-label head
    predictions = tmp_path / "bert.jsonl"
    code, out, err = run(capsys, "eval", "--base", tmp_path / "bert", "--adapter", tmp_path / "bert-lora",
                         "--data", labelled, "--out", predictions)  # fmt: skip
    assert code == 0, err
    assert f"accuracy: {final:.4f}" in out  # the trained model's own final score, from the saved adapter
    assert {json.loads(line)["prediction"] for line in predictions.read_text().splitlines()} <= {"neg", "neu", "pos"}


def test_inspect_peft_made_adapter(work, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = load_base(work)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k", "o", "wi"], task_type="SEQ_2_SEQ_LM")
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "peft")
    info = inspect_folder(tmp_path / "peft")
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    # k and o in 6 attentions, wi in 4 feed-forward blocks
    assert (info["peft_type"], sorted(info["targets"]), info["adapted_layers"]) == ("LORA", ["k", "o", "wi"], 16)
    assert info["trainable_params"] == sum(t.numel() for t in tensors.values())
    assert info["settings"]["r"] == 2 and info["task_type"] == "SEQ_2_SEQ_LM"


def test_errors_are_one_line_and_exit_2(work, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    code, _, err = run(capsys, "train", "--base", work / "base", "--train", missing, "--out", tmp_path / "a")
    assert code == 2
    assert err == f"loraloom: error: {missing}: no such file\n"  # checked before the model loads

    code, _, err = run(capsys, "train", "--base", work / "base", "--train", work / "train.jsonl",
                       "--adapter", "fourierft", "--r", 4, "--out", tmp_path / "b")  # fmt: skip
    assert code == 2 and "--r: not an option of --adapter fourierft" in err
    assert not (tmp_path / "b").exists()

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "target_modules": ["q"]}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00not a safetensors file")
    for argv in (
        ["inspect", broken],
        ["eval", "--base", work / "base", "--adapter", broken, "--data", work / "test.jsonl"],
    ):
        code, _, err = run(capsys, *argv)
        last = err.strip().splitlines()[-1]  # (after the base model's loading bar, for eval)
        assert code == 2 and last.startswith("loraloom: error: ") and "adapter_model.safetensors" in last
        assert "Traceback" not in err

    code, _, err = run(capsys, "inspect", tmp_path / "nothing-here")
    assert code == 2 and "nothing-here" in err

    # a mistyped base path fails at once, without asking the hub for it
    code, _, err = run(capsys, "eval", "--base", tmp_path / "no-model", "--data", work / "test.jsonl")
    assert (code, err) == (2, f"loraloom: error: {tmp_path / 'no-model'}: not a model folder\n")


def test_python_m_loraloom_help():
    result = subprocess.run([sys.executable, "-m", "loraloom", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("train", "eval", "merge", "inspect"):
        assert command in result.stdout
