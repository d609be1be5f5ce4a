"""``loraloom compose``: the LoraHub command line."""

from __future__ import annotations

import csv
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
from hub_modules import EXAMPLES, make_modules, tokenizer
from tiny_models import logits, model_inputs, tiny_t5
from transformers import AutoModelForSeq2SeqLM

import loraloom as ll
from loraloom.adapters import load_adapter
from loraloom.cli import build_parser, main

PROCESS_TIMEOUT = 120  # seconds: a compose run here takes ~10 with its imports; a hang never ends


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
    # the default gradient mode: budget 6 buys 1 Adam step (3) and the evaluation of where it led (1)
    assert "after 2 evaluations (1 Adam steps, 4 of 6 forward-pass equivalents; gradient:Adam" in printed.out
    weights = json.loads((out / "weights.json").read_text())
    assert len(weights["weights"]) == 3 and weights["selection"]["method"] == "random"
    assert weights["selection"]["pool_size"] == 5 and weights["settings"]["budget"] == 6
    assert (weights["evaluations"], weights["adam_steps"], weights["cost"]) == (2, 1, 4)
    assert len(list(csv.DictReader((out / "trace.csv").open()))) == 2
    assert (out / "trace.png").stat().st_size > 0
    inputs = model_inputs("t5")
    adapted = load_adapter(tiny_t5(), out / "adapter", verbose=False)
    merged = AutoModelForSeq2SeqLM.from_pretrained(out / "merged")
    assert torch.allclose(logits(adapted, inputs), logits(merged, inputs), atol=1e-5)


def test_compose_given_modules_with_retrieval_options(setting, tmp_path):
    modules = sorted(str(p) for p in (setting / "pool").iterdir())[:2]
    out = tmp_path / "out"
    args = ["compose", "--base", str(setting / "base"), "--modules", *modules, "--examples", str(setting / "few.jsonl")]
    args += ["--budget", "3", "--mode", "nevergrad", "--optimizer", "TwoPointsDE", "--population", "2", "--bf16"]
    args += ["--out", str(out)]
    assert main(args) == 0
    weights = json.loads((out / "weights.json").read_text())
    assert weights["modules"] == modules and weights["settings"]["dtype"] == "bf16"
    assert weights["settings"]["low_memory"] is False  # a float32 base: batched gradients unless asked
    assert not (out / "merged").exists()

    args = ["compose", "--base", str(setting / "base"), "--pool", str(setting / "pool"), "--num", "2"]
    args += ["--select", "retrieval", "--examples", str(setting / "few.jsonl"), "--budget", "7", "--out", str(out)]
    assert main([*args, "--low-memory", "--no-bf16"]) == 0
    saved = json.loads((out / "weights.json").read_text())
    assert saved["settings"]["low_memory"] is True and saved["settings"]["dtype"] == "fp32"
    selection = saved["selection"]
    assert selection["method"] == "retrieval" and len(selection["scores"]) == 5


def test_compose_errors_are_one_line(setting, tmp_path, capsys):
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
    assert not (tmp_path / "y").exists()
    args = ["compose", "--base", str(setting / "base"), "--pool", str(setting / "pool"), "--num", "2"]
    args += ["--examples", str(setting / "few.jsonl"), "--mode", "nevergrad", "--optimizer", "Cobylla"]
    args += ["--out", str(tmp_path / "z")]
    assert main(args) == 2
    assert "loraloom: error: unknown nevergrad optimizer 'Cobylla'; did you mean Cobyla" in capsys.readouterr().err


def test_compose_num_beyond_the_pool_uses_all(setting, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compose", "--base", str(setting / "base"), "--pool", str(setting / "pool"), "--num", "9"]
    args += ["--examples", str(setting / "few.jsonl"), "--budget", "2", "--out", str(out)]
    assert main(args) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loraloom:")]
    assert notes == ["loraloom: note: --num 9, but the pool holds 5 modules: using all"]
    assert len(json.loads((out / "weights.json").read_text())["modules"]) == 5
    assert "all of them, with a note, if the pool holds fewer" in " ".join(compose_help().split())


def compose_help() -> str:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return subparsers.choices["compose"].format_help()


# ---- robustness: the issue's original failure, Ctrl-C, exit codes (each a real process) -------------


@pytest.fixture(scope="module")
def trained_pool(setting):
    """The issue's setting: four LoRA modules trained quickly on the tiny base, one task each."""
    words = "ant bee cat dog eel fox gnu hen jay kiwi lark mole newt owl pig rat".split()
    tasks = {
        "copy": lambda ws: " ".join(ws),
        "reverse": lambda ws: " ".join(ws[::-1]),
        "first": lambda ws: ws[0],
        "last": lambda ws: ws[-1],
    }
    pool = setting / "trained"
    for i, (name, answer) in enumerate(tasks.items()):
        rows = [words[j : j + 2 + (i + j) % 3] for j in range(12)]
        rows = [{"input": f"{name}: {' '.join(ws)}", "target": answer(ws)} for ws in rows]
        ll.train(tiny_t5(), tokenizer(), rows, max_steps=5, lr=1e-2, progress=False, output_dir=pool / name)
    return pool


def compose_process(setting, pool, out, *extra) -> subprocess.Popen:
    args = [sys.executable, "-m", "loraloom", "compose", "--base", str(setting / "base"), "--pool", str(pool)]
    args += ["--num", "4", "--examples", str(setting / "few.jsonl"), "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_the_issues_run_ends_with_a_saved_marked_result(setting, trained_pool, tmp_path):
    """NGOpt with 4 workers on 4 modules picks MetaModel, which raised a TypeError after 24 of 40
    evaluations: it printed a traceback, lost the work and never exited. Now: one line, saved, exit 1."""
    out = tmp_path / "out1"
    extra = ["--budget", "40", "--mode", "nevergrad", "--optimizer", "NGOpt", "--population", "4"]
    process = compose_process(setting, trained_pool, out, *extra)
    stdout, stderr = (text.decode() for text in process.communicate(timeout=PROCESS_TIMEOUT))  # raises on a hang
    assert "Traceback" not in stderr
    saved = json.loads((out / "weights.json").read_text())
    rows = list(csv.DictReader((out / "trace.csv").open()))
    assert saved["evaluations"] == len(rows) and (out / "trace.png").exists() and (out / "adapter").is_dir()
    if process.returncode == 0:  # a nevergrad that fixed its bug
        assert saved["complete"] is True and len(rows) == 40
        return
    assert process.returncode == 1 and saved["complete"] is False and saved["interrupted"] is False
    lines = [line for line in stderr.splitlines() if line.startswith("loraloom:")]
    assert lines == [f"loraloom: warning: {saved['stopped']}"]
    assert saved["stopped"].startswith("NGOpt>MetaModel failed (TypeError: only 0-dimensional arrays")
    assert f"after {len(rows)} evaluations" in stdout and "search cut short" in stdout


def test_the_issues_run_with_the_defaults(setting, trained_pool, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compose", "--base", str(setting / "base"), "--pool", str(trained_pool), "--num", "4"]
    args += ["--examples", str(setting / "few.jsonl"), "--budget", "40", "--out", str(out)]
    code = main(args)
    saved = json.loads((out / "weights.json").read_text())
    assert (code, saved["complete"]) in ((0, True), (1, False))
    rows = list(csv.DictReader((out / "trace.csv").open()))
    assert saved["evaluations"] == len(rows) and saved["cost"] == sum(int(row["cost"]) for row in rows)
    if saved["complete"]:  # the default gradient mode: 13 Adam steps and the last w scored, 40 forward passes
        assert (saved["evaluations"], saved["adam_steps"], saved["cost"]) == (14, 13, 40)
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_saves_the_best_so_far_and_exits_130(setting, trained_pool, tmp_path):
    out = tmp_path / "out"
    # NGOpt alone is the sequential Cobyla: a scipy thread waits for each tell when Ctrl-C comes.
    extra = ["--budget", "100000", "--mode", "nevergrad", "--optimizer", "NGOpt", "--population", "1"]
    process = compose_process(setting, trained_pool, out, *extra)
    seen, deadline = b"", time.monotonic() + PROCESS_TIMEOUT
    while not re.search(rb"\b([3-9]|\d\d+)/100000\b", seen):  # a few evaluations done
        assert process.poll() is None and time.monotonic() < deadline, seen
        if select.select([process.stderr], [], [], 0.1)[0]:
            seen += os.read(process.stderr.fileno(), 1 << 16)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=PROCESS_TIMEOUT)
    stderr = (seen + stderr).decode()
    assert process.returncode == 130 and "Traceback" not in stderr
    saved = json.loads((out / "weights.json").read_text())
    assert saved["interrupted"] is True and saved["complete"] is False and saved["evaluations"] >= 3
    assert f"loraloom: warning: {saved['stopped']}" in stderr.splitlines()
    assert saved["stopped"].startswith(f"interrupted after {saved['evaluations']} of 100000 evaluations")
    assert len(list(csv.DictReader((out / "trace.csv").open()))) == saved["evaluations"]
    assert (out / "trace.png").stat().st_size > 0 and (out / "adapter" / "adapter_model.safetensors").exists()
