"""Every adapter type learns a toy task through the one trainer (loraloom.train.train)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_t5, tiny_word_tokenizer
from torch import nn

import loraloom as ll
from loraloom.adapters import ADAPTER_TYPES, adapter_layers
from loraloom.evaluate import evaluate
from loraloom.train import train

# A task the base model cannot know: map each of 8 words to a fixed other word (a permutation).
SOURCES = [f"a{i}" for i in range(8)]
TARGETS = [f"b{i}" for i in range(8)]
MAPPING = [{"input": f"map {SOURCES[i]}", "target": TARGETS[3 * i % 8]} for i in range(8)]
T5_ALL = ["q", "k", "v", "o", "wi", "wo"]

# Per type: a config on every T5 projection, the learning rate and epochs that learn the task. FourierFT
# starts at zero (init_weights=True) with a scaling suited to 32-wide layers; IA3, with 32-64 numbers per
# layer, needs the larger learning rate its paper family uses.
SETUPS = {
    "LORA": (ll.LoraConfig(r=8, lora_alpha=8, target_modules=T5_ALL), 1e-2, 20),
    "FOURIERFT": (
        ll.FourierFTConfig(n_frequency=256, scaling=10.0, init_weights=True, target_modules=T5_ALL),
        5e-2,
        20,
    ),
    "IA3": (ll.IA3Config(target_modules=T5_ALL, feedforward_modules=["wo"]), 1e-1, 40),
}


def test_every_registered_type_has_a_setup():
    assert set(SETUPS) == set(ADAPTER_TYPES)


@pytest.mark.parametrize("peft_type", sorted(SETUPS))
def test_adapter_learns_the_mapping(peft_type):
    config, lr, epochs = SETUPS[peft_type]
    tokenizer = tiny_word_tokenizer([*SOURCES, *TARGETS, "map"], add_eos=True)
    model = tiny_t5()
    for m in model.modules():  # dropout noise would need many more steps on 8 examples
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    assert evaluate(model, tokenizer, MAPPING, progress=False).score <= 0.25
    base = {k: v.clone() for k, v in model.state_dict().items()}

    res = train(model, tokenizer, MAPPING * 4, adapter=config, lr=lr, epochs=epochs, batch_size=8, progress=False)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.35 * first, res.losses
    assert evaluate(model, tokenizer, MAPPING, progress=False).score >= 7 / 8
    for name, layer in adapter_layers(model):  # only the adapter learned
        assert torch.equal(layer.base_layer.weight, base[f"{name}.weight"])
