"""Bad input to the command line is one ``loraloom: error:`` line with exit 2, found before any work and
leaving no output folder, whatever the exception class."""

from __future__ import annotations

import json
import shutil

import pytest

import loraloom.cli as cli
from loraloom.cli import main
from loraloom.harness import ExperimentSettings
from loraloom.zoo.build import ARTIFACTS, MANIFEST
from loraloom.zoo.verify import ZooError, read_manifest

BASE, POOL = str(ARTIFACTS / "base"), str(ARTIFACTS / "modules")
DATA = str(ARTIFACTS / "tasks" / "animal-the.jsonl")


def one_error_line(capsys, argv, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraloom: error: ") and err.count("\n") == 1 and match in err, err


def test_any_exception_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    def crash(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "cmd_inspect", crash)
    one_error_line(capsys, ["inspect", "x"], "RuntimeError: something broke")
    monkeypatch.setenv("LORALOOM_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["inspect", "x"])


@pytest.mark.parametrize(
    ("mode", "match"), [("gradient", "mode 'gradient' runs Adam"), ("nevergrad", "did you mean CMA")]
)
def test_an_unknown_optimizer_in_every_mode_fails_before_the_search(tmp_path, capsys, mode, match):
    out = tmp_path / "out"
    argv = ["compose", "--base", BASE, "--pool", POOL, "--examples", DATA, "--out", str(out), "--mode", mode]
    one_error_line(capsys, [*argv, "--optimizer", "CMAA"], match)
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--threads", "--lora-steps", "--pretrain-steps"])
def test_demo_counts_must_be_positive(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        main(["demo", "lora", "--out", str(tmp_path / "d"), flag, "0"])
    assert e.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_an_adapter_option_that_cannot_build_fails_before_the_sweep():
    with pytest.raises(ValueError, match=r"adapter_options\['lora'\]: LoraConfig.r must be a positive integer"):
        ExperimentSettings(adapter_options={"lora": {"r": 0}})
    with pytest.raises(ValueError, match=r"adapter_options\['lora'\]: .*unexpected keyword argument 'rank'"):
        ExperimentSettings(adapter_options={"lora": {"rank": 4}})


def test_an_unwritable_out_fails_before_the_work(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    one_error_line(
        capsys,
        ["zoo", "build", "--out", str(tmp_path / "file" / "zoo"), "--work", str(tmp_path / "w")],
        "is a file, not a folder",
    )
    assert not (tmp_path / "w").exists()
    out = str(tmp_path / "file" / "adapter")
    one_error_line(
        capsys, ["train", "--base", BASE, "--train", DATA, "--out", out, "--max-steps", "1"], "cannot be written"
    )


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("demo"), "missing field 'demo'"),
        (lambda m: m["demo"].update(pool=["no-such-task"]), "the demo pool names 'no-such-task'"),
        (lambda m: m["demo"].update(tasks="animal"), "field 'demo' needs 'tasks'"),
    ],
)
def test_a_zoo_manifest_without_a_usable_demo_is_named(tmp_path, capsys, edit, match):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    shutil.copy(ARTIFACTS / MANIFEST, zoo / MANIFEST)
    manifest = json.loads((zoo / MANIFEST).read_text())
    edit(manifest)
    (zoo / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ZooError, match=match):
        read_manifest(zoo)
    one_error_line(capsys, ["demo", "--zoo", str(zoo), "--out", str(tmp_path / "d")], match)
    assert not (tmp_path / "d").exists()
