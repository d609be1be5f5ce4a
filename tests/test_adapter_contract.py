"""One contract, every adapter type: merge equals the unmerged model, unmerge restores the base, a save loads
back to the same outputs, a bad field is named, and PEFT agrees both ways where PEFT has the type.

Each type's own math (LoRA's patterns, IA3's shapes, FourierFT's spectrum, DoRA's magnitude) stays in its own
test file. A new type joins by one file plus one registry line: ``test_a_new_type_is_one_file_and_one_line``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peft
import pytest
import torch
from outer_adapter import OuterConfig
from peft_parity import assert_peft_round_trip, features
from tiny_models import FACTORIES, tiny_t5, tiny_word_tokenizer

import loraloom as ll
from loraloom.adapters import ADAPTER_TYPES, adapter_layers, register
from loraloom.adapters.registry import cli_option_fields
from loraloom.cli import build_parser


def peft_task(arch: str) -> str | None:
    return "SEQ_CLS" if arch == "bert" else None


@dataclass
class Case:
    """One adapter type in the contract: how to make a non-identity adapter of it, and how PEFT makes one."""

    make: Callable[[str], ll.adapters.AdapterConfig]
    peft: Callable[[str], peft.PeftConfig] | None
    bad: list[tuple[dict[str, Any], str]]
    archs: list[str] = field(default_factory=lambda: list(FACTORIES))


def gpt2_targets(arch: str, targets: list[str]) -> list[str] | None:
    return targets if arch == "gpt2" else None


CASES = {
    "lora": Case(
        make=lambda arch: ll.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
        peft=lambda arch: peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type=peft_task(arch)),
        bad=[
            ({"r": 0}, "r"),
            ({"lora_dropout": 1.5}, "lora_dropout"),
            ({"bias": "everything"}, "bias"),
            ({"init_lora_weights": "pissa_niter_x"}, "init_lora_weights"),
        ],
    ),  # fmt: skip
    "dora": Case(
        make=lambda arch: ll.LoraConfig(r=4, lora_alpha=6, use_dora=True, init_lora_weights=False),
        peft=lambda arch: peft.LoraConfig(
            r=4, lora_alpha=6, use_dora=True, init_lora_weights=False, task_type=peft_task(arch)
        ),
        bad=[({"use_dora": True, "r": -1}, "r")],
    ),
    "ia3": Case(
        make=lambda arch: ll.IA3Config(init_ia3_weights=False),
        peft=lambda arch: peft.IA3Config(init_ia3_weights=False, task_type=peft_task(arch)),
        bad=[({"target_modules": ["q"], "feedforward_modules": ["wo"]}, "feedforward_modules")],
        archs=["t5", "gpt2", "bert"],
    ),
    "fourierft": Case(
        make=lambda arch: ll.FourierFTConfig(
            n_frequency=300, scaling=10.0, target_modules=gpt2_targets(arch, ["c_attn", "mlp.c_proj"])
        ),
        peft=lambda arch: peft.FourierFTConfig(
            n_frequency=300,
            scaling=10.0,
            target_modules=gpt2_targets(arch, ["c_attn", "mlp.c_proj"]),
            task_type=peft_task(arch),
        ),  # fmt: skip
        bad=[
            ({"n_frequency": 0}, "n_frequency"),
            ({"n_frequency_pattern": {"q": -1}}, "'q'"),
            ({"bias": "everything"}, "bias"),
        ],
    ),  # fmt: skip
    "outer": Case(  # not a PEFT type: the one-file type of tests/outer_adapter.py
        make=lambda arch: OuterConfig(scale=0.5, init_zero=False),
        peft=None,
        bad=[({"scale": float("nan")}, "scale")],
        archs=["t5", "llama"],
    ),
}
ARCH_CASES = [(name, arch) for name, case in CASES.items() for arch in case.archs]


@pytest.fixture(autouse=True)
def outer_registered():
    """The one registry line, undone after each test so other test files see only the built-in types."""
    register(OuterConfig)
    yield
    ADAPTER_TYPES.pop(OuterConfig.peft_type, None)


def adapted(name: str, arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ll.add_adapter(FACTORIES[arch](), CASES[name].make(arch), verbose=False)


@pytest.mark.parametrize("name, arch", ARCH_CASES)
def test_merge_equals_unmerged_and_unmerge_restores_the_base(name, arch):
    base_state = {k: v.clone() for k, v in FACTORIES[arch]().state_dict().items()}
    model = adapted(name, arch)
    unmerged = features(model, arch)
    assert (unmerged - features(FACTORIES[arch](), arch)).abs().max() > 1e-3  # the adapter matters
    ll.merge(model)
    torch.testing.assert_close(features(model, arch), unmerged, atol=1e-5, rtol=0)
    ll.merge(model)  # idempotent
    torch.testing.assert_close(features(model, arch), unmerged, atol=1e-5, rtol=0)
    ll.unmerge(model)
    torch.testing.assert_close(features(model, arch), unmerged, atol=1e-5, rtol=0)
    for layer_name, layer in adapter_layers(model):
        for key, t in layer.base_layer.state_dict().items():
            torch.testing.assert_close(t, base_state[f"{layer_name}.{key}"], atol=1e-6, rtol=1e-5)
    plain = ll.merge_and_unload(model)
    assert set(plain.state_dict()) == set(base_state) and not hasattr(plain, "loraloom_config")
    torch.testing.assert_close(features(plain, arch), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, arch", ARCH_CASES)
def test_save_and_load_give_the_same_outputs(name, arch, tmp_path):
    model = adapted(name, arch)
    ll.save_adapter(model, tmp_path)
    again = ll.load_adapter(FACTORIES[arch](), tmp_path, verbose=False)
    assert ll.read_adapter(tmp_path)[0].peft_type == CASES[name].make(arch).peft_type
    torch.testing.assert_close(features(again, arch), features(model, arch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, kwargs, field_name", [(n, k, f) for n, c in CASES.items() for k, f in c.bad])
def test_a_bad_field_is_named(name, kwargs, field_name):
    cls = type(CASES[name].make("t5"))
    with pytest.raises(ll.AdapterError, match=field_name):
        cls(**kwargs)


@pytest.mark.parametrize("name, arch", [(n, a) for n, a in ARCH_CASES if CASES[n].peft is not None])
def test_peft_loads_ours_and_we_load_peft_s(name, arch, tmp_path):
    assert_peft_round_trip(arch, CASES[name].peft(arch), tmp_path)


def test_a_new_type_is_one_file_and_one_line(tmp_path):
    """OuterConfig (tests/outer_adapter.py) plus ``register(OuterConfig)``: the contract above runs over it, and
    the trainer's learning rate and the CLI's options come from the registry without another edit."""
    assert "outer" in ll.adapters.adapter_names() and cli_option_fields()["outer_scale"] == {"OUTER": "scale"}
    train = build_parser().parse_args(["train", "--base", "b", "--train", "t", "--out", "o", "--adapter", "outer",
                                       "--outer-scale", "2"])  # fmt: skip
    assert train.outer_scale == 2.0
    result = ll.train(
        tiny_t5(),
        tiny_word_tokenizer(["a b"], add_eos=True),
        [("a b", "b a")] * 4,
        adapter="outer",
        max_steps=2,
        progress=False,
    )
    assert len(result.losses) == 2 and result.trainable_params > 0
