"""kill -9 at any moment of a save leaves the old result or the new one, complete, under its own name.

A zygote (kill_saver.py) forks a child that saves two versions in turn into a folder that also holds the
user's own files; the test SIGKILLs it at a random moment and checks: the target is complete and of one
version, the user's files are in place, and at most one temp entry is beside it. 30 kills of an adapter
save (and 10 each of a LoraHub result and a single file) in CI; 200 each with ``-m slow``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from safetensors import safe_open

from loraloom.adapters.peft_format import read_adapter

SAVER = Path(__file__).with_name("kill_saver.py")
NOTES = "my own notes: never moved, never lost\n"


def start_zygote(writer: str, target: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(SAVER), writer, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(300, proc.kill)  # a hung save fails the test instead of hanging CI
    watchdog.daemon = True
    watchdog.start()
    return proc


def user_files(target: Path) -> None:
    target.mkdir()
    (target / "notes.txt").write_text(NOTES)
    (target / "other").mkdir()
    (target / "other" / "adapter_config.json").write_text('{"r": 4}')


def check_folder(target: Path, writer: str) -> int:
    """The version the folder holds; fails on a half-written or mixed folder or a lost user file."""
    adapter = target / "adapter" if writer == "result" else target
    config = json.loads((adapter / "adapter_config.json").read_text())
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        shape = f.get_slice("base_model.model.layers.0.self_attn.q_proj.lora_A.weight").get_shape()
    assert shape[0] == config["r"], "weights of one save beside the config of another"
    read_adapter(adapter)  # loraloom itself accepts it
    version = config["r"] - 2
    if writer == "result":
        assert json.loads((target / "weights.json").read_text())["weights"] == [float(version)]
        assert (target / "trace.csv").is_file()
    assert (target / "notes.txt").read_text() == NOTES
    assert json.loads((target / "other" / "adapter_config.json").read_text()) == {"r": 4}
    return version


def kill_rounds(tmp_path: Path, writer: str, kills: int, seed: int) -> Counter:
    target = tmp_path / ("target.json" if writer == "file" else "target")
    if writer != "file":
        user_files(target)
    proc = start_zygote(writer, target)
    rng, seen = random.Random(seed), Counter()
    try:
        for _ in range(kills):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = proc.stdout.readline().split()
            assert line[:1] == ["ready"], f"the saver died: {line}"
            time.sleep(rng.uniform(0, 0.1))
            os.kill(int(line[1]), signal.SIGKILL)
            assert proc.stdout.readline().strip() == "reaped"
            leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")]
            assert len(leftovers) <= 1, leftovers
            seen["leftover" if leftovers else "clean"] += 1
            if writer == "file":
                seen[f"v{json.loads(target.read_text())['version']}"] += 1
            else:
                seen[f"v{check_folder(target, writer)}"] += 1
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert seen["leftover"] >= 1, f"no kill landed inside a save, so the test proved nothing: {seen}"
    assert seen["v0"] and seen["v1"], seen
    return seen


@pytest.mark.parametrize(("writer", "kills"), [("adapter", 30), ("result", 10), ("file", 20)])
def test_kill_during_save(tmp_path, writer, kills):
    kill_rounds(tmp_path, writer, kills, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["adapter", "result", "file"])
def test_kill_during_save_many(tmp_path, writer):
    print(writer, dict(kill_rounds(tmp_path, writer, 200, seed=1)))
