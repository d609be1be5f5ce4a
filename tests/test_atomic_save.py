"""Multi-file saves are all-or-nothing: an interrupted save leaves the old folder exactly as it was.

write_adapter_folder (save_adapter), save_full_model and LoraHubResult.save write into a temp folder beside
the target and swap it in whole (files.py: atomic_folder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama, tiny_word_tokenizer

import loraloom as ll
import loraloom.adapters.peft_format as peft_format
from loraloom import files
from loraloom.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, write_adapter_folder
from loraloom.files import atomic_folder, remove_stale
from loraloom.hub.result import LoraHubResult
from loraloom.hub.select import Selection
from loraloom.train import save_full_model


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_only(parent: Path, name: str) -> None:
    """Nothing but the target folder beside it: no temp or old folder left over."""
    assert [p.name for p in parent.iterdir()] == [name]


def adapter_model(seed: int):
    model = tiny_llama()
    torch.manual_seed(seed)  # the adapter's random init
    return ll.add_adapter(model, ll.LoraConfig(r=2, init_lora_weights=False), verbose=False)


class Crash(Exception):
    pass


def test_interrupted_adapter_save_between_weights_and_config(tmp_path, monkeypatch):
    folder = ll.save_adapter(adapter_model(0), tmp_path / "adapter")
    before = snapshot(folder)
    real_write_text = Path.write_text

    def crash_on_config(self, *args, **kwargs):  # the weights are already written when the config fails
        if self.name == CONFIG_NAME:
            assert (self.parent / WEIGHTS_NAME).is_file()
            raise Crash("power cut")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", crash_on_config)
    with pytest.raises(Crash):
        ll.save_adapter(adapter_model(1), folder)
    assert snapshot(folder) == before  # old weights beside the old config, untouched
    assert_only(tmp_path, "adapter")


def test_interrupted_adapter_save_mid_weights(tmp_path, monkeypatch):
    folder = ll.save_adapter(adapter_model(0), tmp_path / "adapter")
    before = snapshot(folder)

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise Crash("disk full")

    monkeypatch.setattr(peft_format, "save_file", half_written)
    with pytest.raises(Crash):
        ll.save_adapter(adapter_model(1), folder)
    assert snapshot(folder) == before
    assert_only(tmp_path, "adapter")


def test_a_completed_save_replaces_the_files_and_keeps_others(tmp_path):
    folder = ll.save_adapter(adapter_model(0), tmp_path / "adapter")
    (folder / "README.md").write_text("mine")
    first = snapshot(folder)
    ll.save_adapter(adapter_model(1), folder)
    second = snapshot(folder)
    assert second[WEIGHTS_NAME] != first[WEIGHTS_NAME] and second["README.md"] == b"mine"
    assert_only(tmp_path, "adapter")


def test_interrupted_full_model_save(tmp_path):
    tokenizer = tiny_word_tokenizer(["a b c"])
    folder = save_full_model(tiny_llama(0), tokenizer, tmp_path / "full")
    before = snapshot(folder)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{")
            raise Crash("killed")

    with pytest.raises(Crash):
        save_full_model(tiny_llama(1), BrokenTokenizer(), folder)  # the new model.safetensors is written first
    assert snapshot(folder) == before
    assert_only(tmp_path, "full")


def test_interrupted_lorahub_result_save(tmp_path, monkeypatch):
    result = LoraHubResult(
        weights=[0.5], objective=1.0, trace=[], modules=["m0"], selection=Selection("given", ["m0"], 1)
    )
    config = ll.LoraConfig(r=2, target_modules=["q_proj"])
    result.save_adapter = lambda out: write_adapter_folder(out, config, {"w": torch.ones(2)})
    folder = result.save(tmp_path / "run", plot=False)
    before = snapshot(folder)
    assert {"adapter/adapter_config.json", "weights.json", "trace.csv"} <= set(before)

    def crash(*args, **kwargs):
        raise Crash("matplotlib died")

    monkeypatch.setattr("loraloom.hub.result.plot_trace", crash)
    result.weights = [0.9]
    with pytest.raises(Crash):
        result.save(folder)  # adapter/, weights.json and trace.csv are new by then
    assert snapshot(folder) == before
    assert_only(tmp_path, "run")


def test_atomic_folder_refuses_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="current folder"):
        with atomic_folder("."):
            pass


DEAD_PID = 2**22 + 12345  # above Linux's pid_max default range: never a live process


def test_a_save_removes_what_dead_writers_left_and_keeps_a_live_ones(tmp_path):
    (tmp_path / f".adapter.tmp-{DEAD_PID}-abc").mkdir()
    (tmp_path / f".adapter.old-{DEAD_PID}-abc").mkdir()
    live = tmp_path / f".adapter.tmp-{os.getppid()}-abc"  # a live writer's (our parent is alive)
    live.mkdir()
    ll.save_adapter(adapter_model(0), tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", live.name])


def test_an_old_folder_left_aside_by_a_killed_swap_is_put_back(tmp_path):
    folder = ll.save_adapter(adapter_model(0), tmp_path / "adapter")
    before = snapshot(folder)
    aside = tmp_path / f".adapter.old-{DEAD_PID}-abc"
    aside.mkdir()
    folder.rename(aside / "adapter")  # killed between "old aside" and "new in"
    remove_stale(folder)
    assert snapshot(folder) == before
    assert_only(tmp_path, "adapter")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_user_files_stay_the_same_files(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    folder = tmp_path / "adapter"
    (folder / "mine").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "mine" / "data.txt").write_text("mine too")
    (folder / "link").symlink_to("notes.txt")
    inode = (folder / "notes.txt").stat().st_ino
    ll.save_adapter(adapter_model(0), folder)
    ll.save_adapter(adapter_model(1), folder)
    assert (folder / "notes.txt").stat().st_ino == inode  # linked, never moved or rewritten
    assert (folder / "mine" / "data.txt").read_text() == "mine too"
    assert os.readlink(folder / "link") == "notes.txt"
    assert_only(tmp_path, "adapter")


def test_a_symlinked_target_is_written_through(tmp_path):
    real = tmp_path / "real"
    ll.save_adapter(adapter_model(0), real)
    (tmp_path / "link").symlink_to(real)
    ll.save_adapter(adapter_model(1), tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(real)
    assert snapshot(real) == snapshot(tmp_path / "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_files_of_an_earlier_result_do_not_survive_a_new_one(tmp_path):
    result = LoraHubResult(
        weights=[0.5], objective=1.0, trace=[], modules=["m0"], selection=Selection("given", ["m0"], 1)
    )
    config = ll.LoraConfig(r=2, target_modules=["q_proj"])
    result.save_adapter = lambda out: write_adapter_folder(out, config, {"w": torch.ones(2)})
    folder = result.save(tmp_path / "run", plot=True)
    (folder / "merged").mkdir()  # what `compose --merge` wrote after the first save
    (folder / "merged" / "config.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    result.save(folder, plot=False)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "notes.txt", "trace.csv", "weights.json"]
