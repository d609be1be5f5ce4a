"""Issue 15 item 1: each hostile config value found failing gets one AdapterError naming the file and field."""

from __future__ import annotations

import json

import pytest

from loraloom.adapters.base import AdapterError
from loraloom.adapters.peft_format import read_json_object
from loraloom.adapters.registry import config_from_dict

LORA = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"target_modules": "(["}, "target_modules"),
        ({"exclude_modules": "(["}, "exclude_modules"),
        ({"target_modules": ["q_proj", 3]}, "target_modules"),
        ({"target_modules": ["m"] * 1_000_001}, "target_modules"),
        ({"layers_to_transform": ""}, "layers_to_transform"),
        ({"layers_to_transform": [0, "1"]}, "layers_to_transform"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"rank_pattern": {"q_proj": -2}}, "rank_pattern"),
        ({"rank_pattern": {"([": 4}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern"),
    ],
)
def test_bad_field_is_refused_by_name(changes, field):
    with pytest.raises(AdapterError, match=rf"cfg\.json: .*{field}"):
        config_from_dict({**LORA, **changes}, "cfg.json")


def test_valid_patterns_still_load():
    c = config_from_dict(
        {**LORA, "rank_pattern": {"q_.*": 2}, "layers_to_transform": [0, 1], "layers_pattern": "layers"}, "cfg.json"
    )
    assert c.rank_pattern == {"q_.*": 2}


def test_deeply_nested_json_is_one_error(tmp_path):
    file = tmp_path / "adapter_config.json"
    file.write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(AdapterError, match="nested too deeply"):
        read_json_object(file)
    json.loads('{"ok": [[1]]}')
