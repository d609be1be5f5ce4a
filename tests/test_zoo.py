"""The zoo: the generator is deterministic, held-out tasks never train anything, no example is a BBH
input, the shipped artifacts verify and load, and an interrupted build resumes to the same result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraloom.zoo import tasks as world
from loraloom.zoo.build import ARTIFACTS, BuildSettings, build
from loraloom.zoo.verify import ZooError, read_manifest, verify

BBH_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbh"
SHIPPED = BuildSettings()


def training_examples(steps: int = 200) -> set[tuple[str, str]]:
    """What the shipped build trains on: the base's batches (a sample of steps) and every module's data."""
    pairs = {
        (e["input"], e["target"])
        for step in range(0, SHIPPED.base_steps, max(SHIPPED.base_steps // steps, 1))
        for e in world.base_training_batch(step, SHIPPED.base_batch_size, SHIPPED.seed)
    }
    for asking in SHIPPED.module_askings:
        for spec in world.upstream_tasks(asking):
            pairs |= {
                (e["input"], e["target"])
                for e in world.make_examples(spec, SHIPPED.module_train_examples, SHIPPED.seed)
            }
    return pairs


def test_generator_is_deterministic_per_seed():
    for name in ("color-the", "animal-the-bare", "drink-say-bare"):
        assert world.make_examples(name, 50, 3) == world.make_examples(name, 50, 3)
        assert world.make_examples(name, 50, 3) != world.make_examples(name, 50, 4)
    assert world.base_training_batch(7, 64, 0) == world.base_training_batch(7, 64, 0)
    assert world.base_training_batch(7, 64, 0) != world.base_training_batch(8, 64, 0)


def test_examples_have_the_answer_of_their_category_and_format():
    for spec in [*world.upstream_tasks("instructed"), *world.held_out_tasks("bare")]:
        for e in world.make_examples(spec, 20, 0):
            prefix, words = e["input"].split(" : ")
            answer = e["target"].split()[-1]
            assert answer in world.CATEGORIES[spec.category] and answer in words.split()
            assert e["target"] == world.FORMATS[spec.format].format(answer)
            assert prefix == (world.BARE_PREFIX if spec.asking == "bare" else f"{spec.category} {spec.format}")


def test_held_out_tasks_recombine_trained_skills_and_formats():
    held, upstream = set(world.held_out_pairs()), set(world.upstream_pairs())
    assert len(held) >= 6 and not held & upstream
    for category, fmt in held:  # a known skill in a known format, never together
        assert any(c == category for c, _ in upstream) and any(f == fmt for _, f in upstream)


def test_held_out_tasks_never_train_the_base_or_a_module():
    trained = training_examples()
    trained_inputs_with_instruction = {i for i, _ in trained if not i.startswith(world.BARE_PREFIX + " ")}
    for asking in world.ASKINGS:
        for spec in world.held_out_tasks(asking):
            examples = world.make_examples(spec, 300, SHIPPED.seed + 2000)
            assert not {(e["input"], e["target"]) for e in examples} & trained, spec.name
            if asking == "instructed":  # not even the input: its instruction names a never-trained pair
                assert not {e["input"] for e in examples} & trained_inputs_with_instruction, spec.name
    names = {s.name for s in world.held_out_tasks("bare") + world.held_out_tasks("instructed")}
    assert not names & {s.name for a in world.ASKINGS for s in world.upstream_tasks(a)}


@pytest.mark.skipif(
    not BBH_DIR.is_dir(), reason=f"BBH files not present at {BBH_DIR} (the project does not vendor them)"
)
def test_no_generated_example_is_a_bbh_input():
    bbh_inputs = set()
    for f in BBH_DIR.glob("*.json"):
        bbh_inputs |= {e["input"].strip() for e in json.loads(f.read_text())["examples"]}
    assert len(bbh_inputs) > 1000
    generated = {i for i, _ in training_examples()}
    for asking in world.ASKINGS:
        for spec in world.held_out_tasks(asking):
            generated |= {e["input"] for e in world.make_examples(spec, SHIPPED.held_out_examples, SHIPPED.seed + 2000)}
    assert not generated & bbh_inputs


def test_shipped_zoo_verifies_and_loads():
    report = verify(ARTIFACTS, load=True)
    manifest = read_manifest(ARTIFACTS)
    assert report.modules == 2 * len(world.upstream_pairs()) and report.bytes < 25e6
    assert all(score >= 0.8 for score in manifest["base_scores"].values()), manifest["base_scores"]
    assert all(u["module_accuracy"] >= 0.8 for u in manifest["upstream"].values() if u["module"])
    assert set(manifest["demo"]["tasks"]) <= set(manifest["held_out"]) and len(manifest["demo"]["tasks"]) >= 6
    assert not set(manifest["demo"]["pool"]) & set(manifest["held_out"])
    # the shipped task files are what the generator makes
    for name in manifest["held_out"]:
        shipped = [json.loads(line) for line in (ARTIFACTS / "tasks" / f"{name}.jsonl").read_text().splitlines()]
        assert shipped == world.make_examples(name, SHIPPED.held_out_examples, SHIPPED.seed + 2000)


def test_verify_names_a_changed_or_unlisted_file(tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(ARTIFACTS, zoo)
    module = read_manifest(zoo)["upstream"][read_manifest(zoo)["demo"]["pool"][0]]["module"]
    weights = zoo / module / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ZooError, match="adapter_model.safetensors: SHA-256 differs"):
        verify(zoo, load=False)
    shutil.copytree(ARTIFACTS, zoo, dirs_exist_ok=True)
    (zoo / "modules" / "stray.txt").write_text("x")
    with pytest.raises(ZooError, match="stray.txt: not listed"):
        verify(zoo, load=False)


def test_interrupted_build_resumes_to_the_same_zoo(tmp_path, monkeypatch):
    settings = BuildSettings(
        d_model=32,
        d_ff=64,
        base_steps=30,
        chunk_steps=10,
        module_steps=3,
        module_train_examples=40,
        eval_examples=8,
        held_out_examples=10,
        module_askings=("bare",),
    )
    straight = build(tmp_path / "a", tmp_path / "work_a", settings, progress=False, log=lambda *a: None)

    real_batch = world.base_training_batch

    def crash_at_25(step, batch_size, seed):
        if step == 25:
            raise KeyboardInterrupt("the session ended")
        return real_batch(step, batch_size, seed)

    monkeypatch.setattr(world, "base_training_batch", crash_at_25)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "b", tmp_path / "work_b", settings, progress=False, log=lambda *a: None)
    assert torch.load(tmp_path / "work_b" / "base_checkpoint.pt", weights_only=True)["step"] == 20
    assert not (tmp_path / "b").exists()  # nothing half-shipped
    monkeypatch.setattr(world, "base_training_batch", real_batch)
    resumed = build(tmp_path / "b", tmp_path / "work_b", settings, progress=False, log=lambda *a: None)

    a, b = (
        load_file(tmp_path / "a" / "base" / "model.safetensors"),
        load_file(tmp_path / "b" / "base" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.module_scores == straight.module_scores
    verify(tmp_path / "b", load=True)
    with pytest.raises(ValueError, match="other settings"):
        build(tmp_path / "c", tmp_path / "work_b", BuildSettings(base_steps=31), progress=False)


def test_cli_zoo_verify(tmp_path, capsys):
    from loraloom.cli import main

    assert main(["zoo", "verify"]) == 0
    assert "zoo ok" in capsys.readouterr().out
    zoo = tmp_path / "zoo"
    shutil.copytree(ARTIFACTS, zoo)
    (zoo / "base" / "config.json").write_text("{}")
    assert main(["zoo", "verify", str(zoo)]) == 2
    assert "config.json: SHA-256 differs" in capsys.readouterr().err
