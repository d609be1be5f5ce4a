"""Helpers for the LoraHub tests: random LoRA module folders, a tiny tokenizer, few-shot examples."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

from loraloom.adapters import LoraConfig, write_adapter_folder
from loraloom.adapters.base import layer_dims
from loraloom.adapters.inject import find_targets
from loraloom.adapters.peft_format import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from loraloom.zoo.base import train_tokenizer

WORDS = "ant bee cat dog eel fox gnu hen jay kiwi lark mole newt owl pig rat seal toad vole yak".split()

# Inputs of different lengths, so that length bucketing and padding matter.
EXAMPLES = [
    {"input": "copy: ant bee", "target": "ant bee"},
    {"input": "copy: cat dog eel fox gnu hen jay kiwi", "target": "cat dog"},
    {"input": "reverse: lark mole newt", "target": "newt mole lark"},
    {"input": "copy: owl pig rat seal toad vole yak ant bee cat dog eel fox", "target": "owl"},
    {"input": "reverse: gnu hen", "target": "hen gnu"},
]


@functools.cache
def tokenizer(add_eos: bool = True):
    """A WordPiece tokenizer whose ids fit the tiny models' vocabulary of 128."""
    texts = [" ".join(WORDS) + " copy: reverse:"] * 4
    tok = train_tokenizer(texts, vocab_size=120, add_eos=add_eos)
    assert len(tok) <= 128
    return tok


def make_modules(
    model: nn.Module,
    root: Path,
    n: int,
    *,
    r: int = 4,
    alpha: float = 8,
    targets: list[str] | None = None,
    seed: int = 0,
    scale: float = 0.2,
    legacy: bool = False,
    prefix: str = "m",
) -> list[str]:
    """``n`` LoRA module folders with random A and B (B != 0, so every module changes the model)."""
    targets = targets or ["q", "v"]
    names = find_targets(model, targets)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        tensors = {}
        for name in names:
            layer = model.get_submodule(name)
            d_in, d_out = layer_dims(layer)
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, d_in, generator=g) * scale
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * scale
        conv1d = type(model.get_submodule(names[0])).__name__ == "Conv1D"  # GPT-2: PEFT wants fan_in_fan_out
        config = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=conv1d, base_model_name_or_path="tiny"
        )
        folder = root / f"{prefix}{i:02d}"
        write_adapter_folder(folder, config, tensors)
        if legacy:  # the old pickle format, read with torch.load(weights_only=True)
            torch.save(tensors, folder / LEGACY_WEIGHTS_NAME)
            (folder / WEIGHTS_NAME).unlink()
        paths.append(str(folder))
    return paths


def edit_config(folder: str | Path, **changes) -> None:
    """Rewrite fields of a module's adapter_config.json."""
    path = Path(folder) / CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
