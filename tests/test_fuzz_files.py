"""Fuzz whole adapter folders and kohya files as a hostile hub would serve them.

Every mutated folder either loads, giving finite outputs equal to PEFT's wherever PEFT loads it too, or is
refused with one AdapterError naming the folder; a mutated kohya file is refused, or converts to folders
that load. Anything else (a raw exception, a silent difference from PEFT, NaN outputs, a folder convert
wrote that loraloom then refuses) fails. ~100 cases each in CI; ``-m slow`` runs 1,500 each.
``python tests/test_fuzz_files.py N`` prints the outcome counts per class.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import shutil
import sys
import tempfile
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_fuzz_config import FIELDS, JSON_VALUES
from tiny_models import logits, model_inputs, tiny_clip_text, tiny_llama, tiny_unet

import loraloom as ll
from loraloom.adapters.base import AdapterError
from loraloom.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from loraloom.convert import kohya_to_peft

FAST = settings(max_examples=100, deadline=10_000, suppress_health_check=list(HealthCheck), database=None)
SLOW = settings(max_examples=1500, deadline=10_000, suppress_health_check=list(HealthCheck), database=None)
NUMBERS = [float("nan"), float("inf"), -float("inf"), 1e300, -1e-300, 0.0, 1e6, 0.5, -3.0]
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.float8_e4m3fn, torch.bool]
SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


@cache
def seed_folder() -> Path:
    """A valid LoRA folder on the tiny Llama (rank 4, non-zero B, rsLoRA, a rank pattern): the fuzz's seed."""
    folder = Path(tempfile.mkdtemp(prefix="loraloom-fuzz-")) / "adapter"
    config = ll.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"v_proj": 2}, use_rslora=True)
    ll.save_adapter(ll.add_adapter(tiny_llama(), config, verbose=False), folder)
    return folder


# ---- mutations: each takes (folder, draw) and edits the folder's files in place ----------------------


def edit_config(folder: Path, changes: dict) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def edit_tensor(folder: Path, index: int, op: str, arg) -> None:
    tensors = load_file(folder / WEIGHTS_NAME)
    key = sorted(tensors)[index % len(tensors)]
    t = tensors.pop(key)
    if op == "drop":
        pass
    elif op == "rename":
        tensors[arg] = t
    elif op == "shape":
        tensors[key] = torch.ones(arg)
    elif op == "dtype":
        tensors[key] = t.to(arg)
    elif op == "value":
        t = t.double()
        t.view(-1)[0] = arg
        tensors[key] = t
    elif op == "extra":
        tensors[key] = t
        tensors[f"{key}.extra"] = torch.ones(arg)
    save_file(tensors, folder / WEIGHTS_NAME)


def edit_bytes(folder: Path, name: str, at: int, data: bytes, truncate: bool) -> None:
    file = folder / name
    raw = bytearray(file.read_bytes())
    at %= max(len(raw), 1)
    raw = raw[:at] if truncate else raw[:at] + data + raw[at + len(data) :]
    file.write_bytes(bytes(raw))


# Values a real config holds: most mutations then load, so outputs get compared with PEFT's, not only refused.
PLAUSIBLE = {
    "r": st.sampled_from([1, 2, 4, 8]),
    "lora_alpha": st.sampled_from([1, 4, 8.5, 16]),
    "use_rslora": st.booleans(),
    "use_dora": st.booleans(),
    "rank_pattern": st.dictionaries(
        st.sampled_from(["q_proj", "v_proj", r"layers\.1\.self_attn\.q_proj"]), st.sampled_from([2, 4]), max_size=2
    ),
    "alpha_pattern": st.dictionaries(
        st.sampled_from(["q_proj", "v_proj", "model.layers.0.self_attn.v_proj"]), st.sampled_from([3, 8.0]), max_size=2
    ),
    "target_modules": st.sampled_from(
        [["q_proj"], ["v_proj"], ["q_proj", "v_proj"], "q_proj", r".*\.v_proj", ["k_proj"]]
    ),
    "layers_to_transform": st.sampled_from([None, 0, [0], [1], [0, 1]]),
    "layers_pattern": st.sampled_from([None, "layers", ["layers"]]),
    "lora_dropout": st.sampled_from([0.0, 0.1]),
    "fan_in_fan_out": st.booleans(),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "olora"]),
    "modules_to_save": st.sampled_from([None, ["lm_head"]]),
    "bias": st.sampled_from(["none", "all", "lora_only"]),
}
CONFIG_EDITS = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, min_size=1, max_size=3),
    st.fixed_dictionaries({}, optional=PLAUSIBLE).filter(bool),
)
TENSOR_EDITS = st.one_of(
    st.tuples(st.just("drop"), st.none()),
    st.tuples(st.just("rename"), st.text(max_size=30)),
    st.tuples(st.just("shape"), SHAPES),
    st.tuples(st.just("dtype"), st.sampled_from(DTYPES)),
    st.tuples(st.just("value"), st.sampled_from(NUMBERS)),
    st.tuples(st.just("extra"), SHAPES),
)
FOLDER_MUTATIONS = st.lists(
    st.one_of(
        st.builds(
            lambda c: ("config", c), st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, min_size=1, max_size=3)
        ),
        st.builds(lambda i, e: ("tensor", (i, *e)), st.integers(0, 100), TENSOR_EDITS),
        st.builds(
            lambda n, at, data, cut: ("bytes", (n, at, data, cut)),
            st.sampled_from([CONFIG_NAME, WEIGHTS_NAME]),
            st.integers(0, 10**6),
            st.binary(min_size=1, max_size=8),
            st.booleans(),
        ),  # fmt: skip
    ),
    min_size=0,
    max_size=3,
)


# Edits a real folder may carry (other settings, another float dtype, other finite values): mostly loadable,
# so the outputs are compared with PEFT's.
PLAUSIBLE_MUTATIONS = st.lists(
    st.one_of(
        st.builds(lambda c: ("config", c), st.fixed_dictionaries({}, optional=PLAUSIBLE).filter(bool)),
        st.builds(
            lambda i, e: ("tensor", (i, *e)),
            st.integers(0, 100),
            st.one_of(
                st.tuples(st.just("dtype"), st.sampled_from([torch.float16, torch.bfloat16, torch.float64])),
                st.tuples(st.just("value"), st.sampled_from([0.0, 0.5, -3.0, 1e3])),
            ),
        ),
    ),
    min_size=1,
    max_size=3,
)


def apply(folder: Path, mutations) -> None:
    for kind, arg in mutations:
        if kind == "config":
            try:
                edit_config(folder, arg)
            except (ValueError, UnicodeDecodeError):  # an earlier byte edit broke the JSON: keep it broken
                pass
        elif kind == "tensor":
            try:
                edit_tensor(folder, *arg)
            except Exception:  # noqa: BLE001  (an earlier edit left nothing safetensors can read or write)
                pass
        else:
            edit_bytes(folder, *arg)


def peft_logits(folder: Path) -> torch.Tensor | None:
    """PEFT's outputs for the folder, or None where PEFT cannot load it."""
    from peft import PeftModel

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = PeftModel.from_pretrained(tiny_llama(), str(folder))
            with torch.no_grad():
                return logits(model, model_inputs("llama"))
    except Exception:  # noqa: BLE001  (PEFT refusing is not our concern)
        return None


def folder_outcome(mutations) -> str:
    """'loaded', 'refused' or a defect class: 'raw:<Exception>', 'refused-unnamed', 'nonfinite', 'differs-from-peft'."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = Path(tmp) / "adapter"
        shutil.copytree(seed_folder(), folder)
        apply(folder, mutations)
        try:
            model = ll.load_adapter(tiny_llama(), folder, verbose=False)
        except AdapterError as e:
            return "refused" if str(folder) in str(e) else "refused-unnamed"
        except Exception as e:  # noqa: BLE001  (the fuzz counts what escapes)
            return f"raw:{type(e).__name__}"
        with torch.no_grad():
            ours = logits(model, model_inputs("llama"))
        if not torch.isfinite(ours).all():
            return "nonfinite"
        theirs = peft_logits(folder)
        if theirs is not None and not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
            return "differs-from-peft"
        return "loaded"


def check_folder(mutations) -> None:
    assert folder_outcome(mutations) in ("loaded", "refused"), mutations


@FAST
@given(FOLDER_MUTATIONS)
def test_fuzz_adapter_folders(mutations):
    check_folder(mutations)


@FAST
@given(PLAUSIBLE_MUTATIONS)
def test_fuzz_plausible_adapter_folders(mutations):
    check_folder(mutations)


@pytest.mark.slow
@SLOW
@given(st.one_of(FOLDER_MUTATIONS, PLAUSIBLE_MUTATIONS))
def test_fuzz_adapter_folders_slow(mutations):
    check_folder(mutations)


# ---- kohya files ---------------------------------------------------------------------------------

TE = "lora_te_text_model_encoder_layers_0_self_attn_"
UNET = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"
SGM = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_"


def seed_kohya() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name in (f"{TE}q_proj", f"{TE}v_proj", f"{UNET}to_q", f"{UNET}to_k"):
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, 32, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(32, 2, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    return tensors


KOHYA_EDITS = st.lists(
    st.tuples(
        st.integers(0, 100),
        st.one_of(
            st.tuples(st.just("drop"), st.none()),
            st.tuples(st.just("rename"), st.sampled_from(["lora_te1_", "lora_te2_", SGM, "lora_unet_", "x_", ""])),
            st.tuples(st.just("shape"), SHAPES),
            st.tuples(st.just("dtype"), st.sampled_from(DTYPES)),
            st.tuples(st.just("value"), st.sampled_from(NUMBERS)),
        ),
    ),
    min_size=1,
    max_size=3,
)


def renamed(key: str, prefix: str) -> str:
    """The key under another prefix: te1/te2 for the first text encoder, the SGM name of the same UNet block
    (both name one layer twice when the original stays), a UNet prefix on a text-encoder layer, or junk."""
    if prefix == SGM and key.startswith(UNET):
        return SGM + key[len(UNET) :]
    for old in ("lora_te_", "lora_unet_"):
        if key.startswith(old) and prefix not in ("x_", ""):
            return prefix + key[len(old) :]
    return prefix + key.split("_", 2)[-1]


def kohya_outcome(edits) -> str:
    """'converted' (every folder written loads, finite), 'refused' or a defect class."""
    tensors = seed_kohya()
    for index, (op, arg) in edits:
        key = sorted(tensors)[index % len(tensors)]
        t = tensors.pop(key)
        if op == "rename":
            tensors[renamed(key, arg)] = t
        elif op == "shape":
            tensors[key] = torch.ones(arg)
        elif op == "dtype":
            tensors[key] = t.to(arg)
        elif op == "value":
            t = t.double().clone()
            if t.numel():
                t.view(-1)[0] = arg
            tensors[key] = t
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        file, out = Path(tmp) / "k.safetensors", Path(tmp) / "out"
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, file)
        except Exception:  # noqa: BLE001  (safetensors cannot write this mutation: nothing to test)
            return "unwritable"
        models = {"unet": tiny_unet(), "text_encoder": tiny_clip_text()}
        try:
            written = kohya_to_peft(file, models, out)
        except AdapterError as e:
            if out.exists():
                return "refused-left-output"
            return "refused" if str(file) in str(e) else "refused-unnamed"
        except Exception as e:  # noqa: BLE001
            return f"raw:{type(e).__name__}"
        for component, folder in written.items():
            try:
                model = ll.load_adapter(
                    {"unet": tiny_unet, "text_encoder": tiny_clip_text}[component](), folder, verbose=False
                )
            except Exception as e:  # noqa: BLE001
                return f"wrote-unloadable:{type(e).__name__}"
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                return "nonfinite"
        return "converted"


def check_kohya(edits) -> None:
    assert kohya_outcome(edits) in ("converted", "refused", "unwritable"), edits


@FAST
@given(KOHYA_EDITS)
def test_fuzz_kohya_files(edits):
    check_kohya(edits)


@pytest.mark.slow
@SLOW
@given(KOHYA_EDITS)
def test_fuzz_kohya_files_slow(edits):
    check_kohya(edits)


def count(n: int) -> dict[str, collections.Counter]:
    """Outcome counts per class over ``n`` derandomized cases of each fuzzer (for the issue's numbers)."""
    counts = {"folders": collections.Counter(), "plausible": collections.Counter(), "kohya": collections.Counter()}
    once = settings(
        max_examples=n, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )

    @once
    @given(FOLDER_MUTATIONS)
    def folders(mutations):
        counts["folders"][folder_outcome(mutations)] += 1

    @once
    @given(PLAUSIBLE_MUTATIONS)
    def plausible(mutations):
        counts["plausible"][folder_outcome(mutations)] += 1

    @once
    @given(KOHYA_EDITS)
    def kohya(edits):
        counts["kohya"][kohya_outcome(edits)] += 1

    folders()
    plausible()
    kohya()
    return counts


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, counter in count(int(sys.argv[1]) if len(sys.argv) > 1 else 300).items():
        print(name, dict(counter.most_common()))
