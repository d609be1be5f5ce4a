"""Fuzz adapter configs: any JSON in any field gives a config or one AdapterError naming the file, never a raw
exception. Fast profile ~300 cases in CI; `-m slow` runs 3,000. `python tests/test_fuzz_config.py N` prints the
outcome counts per class (used for the issue-15 before/after numbers)."""

from __future__ import annotations

import collections
import sys
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraloom.adapters.base import AdapterError
from loraloom.adapters.registry import config_from_dict

SOURCE = "fuzz/adapter_config.json"
VALID = {
    "LORA": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "IA3": {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "FOURIERFT": {"peft_type": "FOURIERFT", "n_frequency": 16, "scaling": 100.0, "target_modules": ["q_proj"]},
}
FIELDS = [
    "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "exclude_modules", "modules_to_save",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "n_frequency", "scaling",
    "n_frequency_pattern", "feedforward_modules", "lora_dropout", "init_lora_weights", "fan_in_fan_out",
]  # fmt: skip
REGEXES = st.sampled_from(["([", "*", "a{2,1}", "(?P<x>", "\\", "q_proj", ".*proj", "(?<=a+)b"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**7), 10**7), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), REGEXES,
)  # fmt: skip
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=6), REGEXES), inner, max_size=4)
    ),
    max_leaves=12,
)
MUTATIONS = st.tuples(
    st.sampled_from(sorted(VALID)), st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, min_size=1, max_size=3)
)


def outcome(peft_type: str, changes: dict) -> str:
    """'loaded', 'refused' (one AdapterError naming the file) or 'raw:<ExceptionType>'."""
    d = {**VALID[peft_type], **changes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config_from_dict(d, SOURCE)
        except AdapterError as e:
            return "refused" if SOURCE in str(e) else "refused-unnamed"
        except Exception as e:  # noqa: BLE001  (the fuzz counts what escapes)
            return f"raw:{type(e).__name__}"
    return "loaded"


def check(case: tuple[str, dict]) -> None:
    result = outcome(*case)
    assert result in ("loaded", "refused"), f"{case!r} -> {result}"


@settings(max_examples=300, deadline=10_000, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(MUTATIONS)
def test_fuzz_config_fast(case):
    check(case)


@pytest.mark.slow
@settings(max_examples=3000, deadline=10_000, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(MUTATIONS)
def test_fuzz_config_slow(case):
    check(case)


def count(n: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()

    @settings(max_examples=n, deadline=None, database=None, derandomize=True)
    @given(MUTATIONS)
    def run(case):
        counts[outcome(*case)] += 1

    run()
    return counts


if __name__ == "__main__":
    print(dict(count(int(sys.argv[1]) if len(sys.argv) > 1 else 1000).most_common()))
