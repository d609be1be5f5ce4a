"""``loraloom compose``: the LoraHub command line."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from hub_modules import EXAMPLES, make_modules, tokenizer
from tiny_models import logits, model_inputs, tiny_t5
from transformers import AutoModelForSeq2SeqLM

from loraloom.adapters import load_adapter
from loraloom.cli import main


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_t5()
    model.save_pretrained(root / "base")
    tokenizer().save_pretrained(root / "base")
    make_modules(model, root / "pool", 5)
    (root / "few.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return root


def test_compose_from_a_pool_writes_everything(setting, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compose", "--base", str(setting / "base"), "--pool", str(setting / "pool"), "--num", "3"]
    args += ["--examples", str(setting / "few.jsonl"), "--budget", "6", "--seed", "2", "--out", str(out), "--merge"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "best objective" in printed.out and "lorahub" in printed.err  # summary, and the progress bar
    weights = json.loads((out / "weights.json").read_text())
    assert len(weights["weights"]) == 3 and weights["selection"]["method"] == "random"
    assert weights["selection"]["pool_size"] == 5 and weights["settings"]["budget"] == 6
    assert len(list(csv.DictReader((out / "trace.csv").open()))) == 6
    assert (out / "trace.png").stat().st_size > 0
    inputs = model_inputs("t5")
    adapted = load_adapter(tiny_t5(), out / "adapter", verbose=False)
    merged = AutoModelForSeq2SeqLM.from_pretrained(out / "merged")
    assert torch.allclose(logits(adapted, inputs), logits(merged, inputs), atol=1e-5)


def test_compose_given_modules_with_retrieval_options(setting, tmp_path):
    modules = sorted(str(p) for p in (setting / "pool").iterdir())[:2]
    out = tmp_path / "out"
    args = ["compose", "--base", str(setting / "base"), "--modules", *modules, "--examples", str(setting / "few.jsonl")]
    args += ["--budget", "3", "--optimizer", "TwoPointsDE", "--population", "2", "--bf16", "--out", str(out)]
    assert main(args) == 0
    weights = json.loads((out / "weights.json").read_text())
    assert weights["modules"] == modules and weights["settings"]["dtype"] == "bf16"
    assert not (out / "merged").exists()

    args = ["compose", "--base", str(setting / "base"), "--pool", str(setting / "pool"), "--num", "2"]
    args += ["--select", "retrieval", "--examples", str(setting / "few.jsonl"), "--budget", "2", "--out", str(out)]
    assert main(args) == 0
    selection = json.loads((out / "weights.json").read_text())["selection"]
    assert selection["method"] == "retrieval" and len(selection["scores"]) == 5


def test_compose_errors_are_one_line(setting, tmp_path, capsys):
    args = ["compose", "--base", str(setting / "base"), "--pool", str(setting / "pool"), "--num", "9"]
    args += ["--examples", str(setting / "few.jsonl"), "--out", str(tmp_path / "x")]
    assert main(args) == 2
    assert "loraloom: error: cannot select 9 modules from a pool of 5" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = ["compose", "--base", str(setting / "base"), "--pool", str(setting / "pool"), "--num", "2"]
    args += ["--examples", str(empty), "--out", str(tmp_path / "y")]
    assert main(args) == 2
    assert f"loraloom: error: {empty}: no examples" in capsys.readouterr().err
    args = ["compose", "--base", str(setting / "base"), "--pool", str(setting / "pool"), "--num", "2"]
    args += ["--examples", str(setting / "few.jsonl"), "--budget", "0", "--out", str(tmp_path / "y")]
    assert main(args) == 2
    assert "loraloom: error: budget must be a positive" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
