"""Hostile weights files: every tensor's key, dtype and shape is checked from the header before a byte of
data is read or a layer allocated; on any error the model is exactly as before and the next load works."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_peft_format import assert_untouched, edit_config, saved_llama_adapter
from tiny_models import logits, model_inputs, tiny_llama

import loraloom as ll
import loraloom.adapters.peft_format as peft_format
from loraloom.adapters.peft_format import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME


@pytest.fixture
def adapter(tmp_path):
    return saved_llama_adapter(tmp_path)


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def as_bin(folder, tensors) -> None:
    (folder / WEIGHTS_NAME).unlink()
    torch.save(tensors, folder / LEGACY_WEIGHTS_NAME)


def refused(folder, match: str) -> None:
    base, reference = tiny_llama(), tiny_llama()
    with pytest.raises(ll.AdapterError, match=match):
        ll.load_adapter(base, folder, verbose=False)
    assert_untouched(base, reference)
    with pytest.raises(ll.AdapterError, match=match):
        ll.read_adapter(folder)  # the hub's and convert's path too


def test_bin_with_non_string_keys(adapter):
    folder, _ = adapter
    tensors = load_file(folder / WEIGHTS_NAME)
    as_bin(folder, {**tensors, 7: torch.zeros(2)})
    refused(folder, r"adapter_model.bin: expected string keys, found int key 7")


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda t: t.to_sparse(), "sparse"),
        (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), "quantized"),
        (lambda t: t.to(torch.complex64), "torch.complex64"),
        (lambda t: t.to(torch.int32), "torch.int32"),
    ],
)
def test_bin_with_tensors_that_are_not_dense_floats(adapter, make, kind):
    folder, _ = adapter
    tensors = load_file(folder / WEIGHTS_NAME)
    as_bin(folder, {**tensors, Q_A: make(tensors[Q_A])})
    refused(folder, rf"tensor '{Q_A}' is {kind}")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, torch.complex64], ids=str)
def test_safetensors_with_tensors_that_are_not_floats(adapter, dtype):
    folder, _ = adapter
    tensors = load_file(folder / WEIGHTS_NAME)
    save_file({**tensors, Q_A: tensors[Q_A].to(dtype)}, folder / WEIGHTS_NAME)
    refused(folder, rf"tensor '{Q_A}' has dtype \w+; adapter weights must be one of")


def test_an_unexpected_tensor_is_refused_before_it_is_read(adapter, monkeypatch):
    folder, _ = adapter
    tensors = load_file(folder / WEIGHTS_NAME)
    save_file({**tensors, "base_model.model.payload": torch.zeros(1 << 22)}, folder / WEIGHTS_NAME)

    def no_reading(*args, **kwargs):
        raise AssertionError("tensors were read before the keys were checked")

    monkeypatch.setattr(peft_format, "read_tensors", no_reading)
    base, reference = tiny_llama(), tiny_llama()
    with pytest.raises(ll.AdapterError, match=r"tensor 'base_model.model.payload' matches no adapted layer"):
        ll.load_adapter(base, folder, verbose=False)
    assert_untouched(base, reference)


@pytest.mark.parametrize(
    ("changes", "field"), [({"r": 10**6}, "r"), ({"rank_pattern": {"q_proj": 10**6}}, "rank_pattern")]
)
def test_a_huge_rank_is_refused_before_any_layer_is_allocated(adapter, monkeypatch, changes, field):
    folder, _ = adapter
    edit_config(folder, **changes)

    def no_allocation(*args, **kwargs):
        raise AssertionError("layers were allocated before the rank was checked against the file")

    monkeypatch.setattr(peft_format, "add_adapter", no_allocation)
    with pytest.raises(ll.AdapterError, match=rf"has rank 4 but the config's '{field}' gives .* rank 1000000"):
        ll.load_adapter(tiny_llama(), folder, verbose=False)


def test_finite_in_float64_but_inf_in_the_models_dtype(adapter):
    folder, _ = adapter
    tensors = load_file(folder / WEIGHTS_NAME)
    big = tensors[Q_A].double()
    big[0, 0] = 1e300
    save_file({**tensors, Q_A: big}, folder / WEIGHTS_NAME)
    base, reference = tiny_llama(), tiny_llama()
    with pytest.raises(ll.AdapterError, match=rf"tensor '{Q_A}' \(as torch.float32\) holds NaN or inf"):
        ll.load_adapter(base, folder, verbose=False)
    assert_untouched(base, reference)


def test_any_error_leaves_the_model_as_before_and_the_next_load_works(adapter, monkeypatch):
    folder, expected = adapter
    base, reference = tiny_llama(), tiny_llama()

    def crash(self, layer):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ll.LoraConfig, "prepare_loaded", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        ll.load_adapter(base, folder, verbose=False)
    assert_untouched(base, reference)
    monkeypatch.undo()
    ll.load_adapter(base, folder, verbose=False)
    torch.testing.assert_close(logits(base, model_inputs("llama")), expected)


def test_a_legacy_bin_still_loads(adapter):
    folder, expected = adapter
    as_bin(folder, load_file(folder / WEIGHTS_NAME))
    model = ll.load_adapter(tiny_llama(), folder, verbose=False)
    torch.testing.assert_close(logits(model, model_inputs("llama")), expected)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
