"""Hostile or sloppy input gets one clear error naming the field, before any weight is read (issue 15, part)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_t5, tiny_word_tokenizer

import loraloom as ll
from loraloom.cli import main


@pytest.fixture()
def folder(tmp_path):
    model = ll.add_adapter(tiny_t5(), ll.LoraConfig(r=2, target_modules=["q", "v"]), verbose=False)
    ll.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def edit(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))  # json writes NaN and Infinity, as PEFT files may hold them


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"lora_alpha": "16"}, "lora_alpha"),  # a string where a number goes
        ({"use_rslora": "false"}, "use_rslora"),  # a string boolean would switch the flag on
        ({"lora_alpha": float("nan")}, "lora_alpha"),  # NaN loads, then every output is NaN
        ({"lora_alpha": float("inf")}, "lora_alpha"),
        ({"alpha_pattern": {"q": float("nan")}}, "alpha_pattern"),
        ({"alpha_pattern": ["q"]}, "alpha_pattern"),
        ({"rank_pattern": "q"}, "rank_pattern"),
        ({"r": 2.5}, "'r'"),
    ],
)
def test_a_bad_config_value_is_named_and_the_model_is_left_alone(folder, changes, field):
    edit(folder, **changes)
    model = tiny_t5()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.AdapterError, match=field):
        ll.load_adapter(model, folder)
    assert not hasattr(model, "loraloom_config")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fourierft_scaling_must_be_finite():
    with pytest.raises(ll.AdapterError, match="scaling"):
        ll.FourierFTConfig(scaling=float("nan"))


def test_training_that_diverges_saves_nothing(tmp_path):
    tok = tiny_word_tokenizer(["a b c"], add_eos=True)
    model = tiny_t5()
    with torch.no_grad():
        model.shared.weight[:] = float("nan")  # a base that already went wrong: every loss is NaN
    with pytest.raises(ValueError, match="training diverged: the loss is nan at step 1 of 3"):
        ll.train(model, tok, [("a b", "b a")] * 4, max_steps=3, output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lr", ["0", "-1", "nan", "inf"])
def test_cli_refuses_a_bad_learning_rate_before_loading_anything(tmp_path, lr, capsys):
    code = main(
        ["train", "--base", str(tmp_path / "nowhere"), "--train", "x.jsonl", "--lr", lr, "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "lr must be a positive finite number" in err[0]
    assert not (tmp_path / "o").exists()
