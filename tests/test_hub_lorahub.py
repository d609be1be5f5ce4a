"""``lorahub``: search, trace, selection, save / reload, and clear errors on bad input."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
from hub_modules import EXAMPLES, make_modules, tokenizer
from tiny_models import logits, model_inputs, tiny_llama, tiny_t5

import loraloom as ll
from loraloom.adapters import load_adapter
from loraloom.data import collate, load_examples
from loraloom.devices import fast_bf16
from loraloom.hub import (
    Composition,
    Objective,
    encode_few_shot,
    layer_groups_of,
    load_bank,
    merge_composition,
    read_weights,
)
from loraloom.hub import search as search_module
from loraloom.hub.result import read_layer_groups
from loraloom.hub.select import select_random
from loraloom.quantize import quantize_model


@pytest.fixture
def t5_setup(tmp_path):
    model = tiny_t5()
    return model, make_modules(model, tmp_path / "modules", 4)


def rescore(model, modules, weights, tok, layer_groups=None, **kwargs):
    """The objective of ``weights`` computed afresh, in a new composition."""
    with Composition(model, load_bank(modules), layer_groups) as composition:
        features = encode_few_shot(model, tok, load_examples(EXAMPLES))
        return Objective(composition, features, pad_token_id=0, **kwargs)(weights).values.item()


@pytest.mark.parametrize("population", [1, 4])
def test_lorahub_finds_better_weights_and_traces_every_evaluation(t5_setup, population):
    model, modules = t5_setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = ll.lorahub(
        model,
        modules,
        EXAMPLES,
        tokenizer=tokenizer(),
        budget=12,
        seed=1,
        population=population,
        mode="nevergrad",
        dtype="fp32",  # compared with an fp32 rescoring below
    )
    assert len(result.trace) == 12 and len(result.weights) == 4
    assert [e.index for e in result.trace] == list(range(12))
    assert result.trace[0].weights == [0.0] * 4  # nevergrad starts at w = 0
    assert result.objective == min(e.objective for e in result.trace)
    assert result.objective < result.trace[0].objective - 1e-4  # it found weights better than the start
    assert result.weights == result.best.weights and len({tuple(e.weights) for e in result.trace}) > 6
    assert all(abs(w) <= 1.5 for e in result.trace for w in e.weights)
    assert all(e.objective == pytest.approx(e.loss + e.penalty) and e.seconds > 0 for e in result.trace)
    assert result.objective == pytest.approx(rescore(model, modules, result.weights, tokenizer()), abs=1e-5)
    assert result.settings["population"] == population and result.selection.method == "given"
    after = model.state_dict()  # the base model is left as it was
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_same_seed_same_search(t5_setup):
    model, modules = t5_setup
    runs = [ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), budget=8, seed=3) for _ in range(2)]
    assert runs[0].weights == runs[1].weights and runs[0].objective == runs[1].objective


def test_causal_lm_and_bf16(tmp_path):
    model = tiny_llama()
    modules = make_modules(model, tmp_path, 3, targets=["q_proj", "v_proj"])
    tok = tokenizer(add_eos=False)
    settings = {"budget": 8, "dtype": "bf16", "mode": "nevergrad", "optimizer": "TwoPointsDE"}
    result = ll.lorahub(model, modules, EXAMPLES, tokenizer=tok, **settings)
    assert result.settings["dtype"] == "bf16" and next(model.parameters()).dtype == torch.float32
    assert result.objective == pytest.approx(rescore(model, modules, result.weights, tok), rel=2e-2)


def test_gradient_mode_descends(t5_setup):
    model, modules = t5_setup
    result = ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), budget=31, mode="gradient", lr=0.1)
    values = [e.objective for e in result.trace]
    # 31 forward-pass equivalents: 10 Adam steps (3 each), then the w the last step moved to, scored (1)
    assert result.settings["mode"] == "gradient" and len(values) == 11 and result.cost == 31
    assert [e.gradient for e in result.trace] == [True] * 10 + [False]
    assert min(values) < values[0]
    assert all(p.grad is None for p in model.parameters())


def test_reference_objective_option(t5_setup):
    model, modules = t5_setup
    result = ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), budget=5, formula="reference", dtype="fp32")
    expected = rescore(model, modules, result.weights, tokenizer(), formula="reference")
    assert result.objective == pytest.approx(expected, abs=1e-6)


def test_save_writes_adapter_weights_trace_and_plot(t5_setup, tmp_path):
    model, modules = t5_setup
    result = ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), budget=6)  # gradient: 1 Adam step + 1
    out = result.save(tmp_path / "out")
    saved = json.loads((out / "weights.json").read_text())
    assert saved["weights"] == result.weights and saved["modules"] == modules
    assert saved["objective"] == result.objective and saved["selection"]["method"] == "given"
    assert (saved["evaluations"], saved["adam_steps"], saved["cost"]) == (2, 1, 4)
    rows = list(csv.DictReader((out / "trace.csv").open()))
    assert len(rows) == 2 and float(rows[0]["objective"]) == result.trace[0].objective
    assert [int(row["cost"]) for row in rows] == [3, 1]
    assert (out / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    inputs = model_inputs("t5")
    merged = merge_composition(tiny_t5(), *read_weights(out))
    assert torch.allclose(
        logits(load_adapter(tiny_t5(), out / "adapter", verbose=False), inputs), logits(merged, inputs), atol=1e-5
    )

    with pytest.raises(ValueError, match="holds 4 weights but 3 modules were given"):
        read_weights(out / "weights.json", modules[:3])
    saved["weights"] = saved["weights"][:3]
    (out / "weights.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="'modules' must list one module per weight"):
        read_weights(out)
    with pytest.raises(ValueError, match="expected 4 weights"):
        merge_composition(tiny_t5(), modules, [0.1, 0.2, 0.3])


def test_random_selection_from_a_pool(tmp_path):
    model = tiny_t5()
    pool = make_modules(model, tmp_path / "pool", 6)
    result = ll.lorahub(
        model, pool=tmp_path / "pool", num=3, examples=EXAMPLES, tokenizer=tokenizer(), budget=3, seed=5
    )
    assert result.selection.method == "random" and result.selection.pool_size == 6
    assert result.modules == result.selection.modules == select_random(sorted(pool), 3, 5).modules
    assert len({tuple(select_random(sorted(pool), 3, seed).modules) for seed in range(5)}) > 1


def test_retrieval_keeps_the_modules_with_the_lowest_own_loss(tmp_path):
    model = tiny_t5()
    pool = make_modules(model, tmp_path / "pool", 5, scale=0.3)
    tok = tokenizer()
    options = {"budget": 3, "dtype": "fp32"}  # scores compared with the fp32 model's own loss below
    result = ll.lorahub(model, pool=pool, num=2, select="retrieval", examples=EXAMPLES, tokenizer=tok, **options)
    scores = result.selection.scores
    own = {}
    for m in pool:  # each module alone, loaded the ordinary way, scored by the model's own loss
        loaded = load_adapter(tiny_t5(), m, verbose=False)
        features = encode_few_shot(loaded, tok, load_examples(EXAMPLES))
        with torch.no_grad():
            own[m] = loaded(**collate(features, 0)).loss.item()
    assert scores == pytest.approx(own, abs=1e-5)
    assert result.selection.method == "retrieval"
    assert result.modules == sorted(pool, key=own.get)[:2]


def test_bad_input_is_reported_clearly(t5_setup, tmp_path):
    model, modules = t5_setup
    tok = tokenizer()
    with pytest.raises(ValueError, match="budget must be a positive number"):
        ll.lorahub(model, modules, EXAMPLES, tokenizer=tok, budget=0)
    with pytest.raises(ValueError, match="no LoRA modules"):
        ll.lorahub(model, [], EXAMPLES, tokenizer=tok)
    with pytest.raises(ValueError, match="no examples"):
        ll.lorahub(model, modules, [], tokenizer=tok)
    with pytest.raises(ValueError, match="either modules"):
        ll.lorahub(model, modules, EXAMPLES, tokenizer=tok, pool=tmp_path)
    with pytest.raises(ValueError, match="cannot select 9 modules from a pool of 4"):
        ll.lorahub(model, pool=modules, num=9, examples=EXAMPLES, tokenizer=tok)
    with pytest.raises(ValueError, match="unknown nevergrad optimizer 'CMAES'; did you mean"):
        ll.lorahub(model, modules, EXAMPLES, tokenizer=tok, optimizer="CMAES", mode="nevergrad")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ll.lorahub(model, modules, EXAMPLES, tokenizer=tok, dtype="fp16")
    with pytest.raises(ValueError, match="pass tokenizer"):
        ll.lorahub(model, modules, EXAMPLES)
    other_rank = make_modules(model, tmp_path / "r8", 1, r=8)
    with pytest.raises(ll.AdapterError, match="r=8 but module"):
        ll.lorahub(model, modules + other_rank, EXAMPLES, tokenizer=tok)
    assert not any(type(m).__name__ == "ComposedLoraLayer" for m in model.modules())


def test_nan_losses_do_not_crash_the_search(t5_setup):
    model, modules = t5_setup
    bank = load_bank(modules)
    for name in bank.layers:  # module 0 makes the model produce inf / NaN
        bank.A[name][0].fill_(1e30)
        bank.B[name][0].fill_(1e30)
    result = ll.lorahub(
        model, bank, EXAMPLES, tokenizer=tokenizer(), budget=10, optimizer="TwoPointsDE", population=2, mode="nevergrad"
    )
    values = [e.objective for e in result.trace]
    assert float("inf") in values and result.objective < float("inf")


def test_settings_are_one_validated_object_saved_as_is(t5_setup, tmp_path):
    model, modules = t5_setup
    settings = ll.SearchSettings(mode="nevergrad", budget=5, population=2, optimizer="TwoPointsDE", seed=4)
    result = ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), settings=settings, alpha=0.1)
    expected = dataclasses.replace(settings, alpha=0.1).for_model(model)  # saved with dtype "auto" resolved
    assert expected.dtype == ("bf16" if fast_bf16(torch.device("cpu")) else "fp32")
    saved = json.loads((result.save(tmp_path / "out", plot=False) / "weights.json").read_text())["settings"]
    fields = {f.name for f in dataclasses.fields(ll.SearchSettings)}
    assert ll.SearchSettings(**{k: saved[k] for k in fields}) == expected  # reads back to the same object
    assert saved["method"].startswith("nevergrad:TwoPointsDE") and saved["examples"] == len(EXAMPLES)
    with pytest.raises(TypeError, match="unknown search option.*budgt"):
        ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), budgt=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        ll.SearchSettings(mode="bayes")
    with pytest.raises(ValueError, match="gradient_steps must lie in 1..1 in hybrid mode with budget 5"):
        ll.SearchSettings(mode="hybrid", budget=5, gradient_steps=2)  # 2 Adam steps + 1 = 7 > 5
    with pytest.raises(ValueError, match="layer_groups must be None, 'stack' or a positive number"):
        ll.SearchSettings(layer_groups="encoder")


def test_timings_break_the_run_into_phases(t5_setup):
    model, modules = t5_setup
    result = ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), budget=9, mode="hybrid", gradient_steps=2)
    t = result.timings
    phases = ("base_load", "tokenisation", "module_load", "imports", "composition", "forward", "backward", "optimizer")
    assert all(t[k] >= 0 for k in phases) and t["forward"] > 0 and t["backward"] > 0 and t["composition"] > 0
    inner = t["imports"] + t["composition"] + t["forward"] + t["backward"] + t["optimizer"]
    assert inner == pytest.approx(t["search"], rel=0.05, abs=0.05)  # the phases account for the search
    assert "merge" not in t
    result.merge(tiny_t5())
    assert t["merge"] > 0


def test_hybrid_ends_with_gradient_steps_from_the_best_gradient_free_point(t5_setup):
    model, modules = t5_setup
    result = ll.lorahub(
        model, modules, EXAMPLES, tokenizer=tokenizer(), mode="hybrid", budget=16, gradient_steps=3, population=1
    )
    # 16 = 6 gradient-free evaluations + 3 Adam steps (3 each) + the last w scored (1)
    assert len(result.trace) == 10 and result.cost == 16 and result.settings["method"].endswith("+gradient:Adam")
    assert [e.gradient for e in result.trace] == [False] * 6 + [True] * 3 + [False]
    first = result.trace[:6]
    assert result.trace[6].weights == min(first, key=lambda e: e.objective).weights  # Adam starts at that best
    assert result.objective <= min(e.objective for e in first)


@pytest.mark.parametrize("mode", ["nevergrad", "gradient"])
def test_per_layer_group_weights_are_searched_saved_and_merged(t5_setup, tmp_path, mode):
    model, modules = t5_setup
    result = ll.lorahub(
        model, modules, EXAMPLES, tokenizer=tokenizer(), budget=6, mode=mode, layer_groups="stack", lr=0.2, dtype="fp32"
    )
    assert len(result.weights) == 8 and result.settings["layer_groups"] == "stack"  # encoder, decoder x 4
    assert result.objective == pytest.approx(
        rescore(model, modules, result.weights, tokenizer(), layer_groups="stack"), abs=1e-5
    )
    out = result.save(tmp_path / "out", plot=False)
    inputs = model_inputs("t5")
    merged = merge_composition(tiny_t5(), *read_weights(out), layer_groups=read_layer_groups(out))
    loaded = load_adapter(tiny_t5(), out / "adapter", verbose=False)
    assert torch.allclose(logits(loaded, inputs), logits(merged, inputs), atol=1e-5)
    assert torch.allclose(logits(result.merge(tiny_t5()), inputs), logits(merged, inputs), atol=1e-5)
    # the decoder's weights only reach decoder layers
    w = [0.0] * 4 + [0.7, -0.3, 0.2, 1.1]
    enc_only = merge_composition(tiny_t5(), modules, w, layer_groups="stack")
    base = tiny_t5()
    assert all(
        torch.equal(enc_only.get_submodule(n).weight, base.get_submodule(n).weight)
        for n in load_bank(modules).layers
        if n.startswith("encoder")
    )
    assert not all(
        torch.equal(enc_only.get_submodule(n).weight, base.get_submodule(n).weight)
        for n in load_bank(modules).layers
        if n.startswith("decoder")
    )


def test_layer_groups_of_every_k_blocks():
    layers = [
        f"{s}.block.{i}.layer.0.SelfAttention.{m}" for s in ("encoder", "decoder") for i in range(3) for m in "qv"
    ]
    names, index = layer_groups_of(layers, 2)
    assert names == ["encoder[0:2]", "encoder[2:4]", "decoder[0:2]", "decoder[2:4]"]
    assert index == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]
    assert layer_groups_of(["model.layers.0.q_proj", "model.layers.1.q_proj"], "stack") == (["layers"], [0, 0])


def test_save_leaves_matplotlib_global_state_alone(t5_setup, tmp_path):
    import matplotlib

    model, modules = t5_setup
    result = ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), budget=3, mode="gradient")
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        result.save(tmp_path / "out")
        assert matplotlib.get_backend() == "svg"  # not switched to Agg behind the user's back
    finally:
        matplotlib.use(previous)
    assert (tmp_path / "out" / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dtype_auto_is_bf16_where_native_and_recorded_as_resolved(t5_setup, monkeypatch):
    """ "auto" (the default) evaluates in bf16 where the device computes it natively, as training does; the
    result records what ran, the base comes back float32, and bf16 finds about what fp32 finds."""
    model, modules = t5_setup
    with pytest.raises(ValueError, match="resolve it with for_model"):
        _ = ll.SearchSettings().torch_dtype
    runs = {}
    for native in (True, False):
        monkeypatch.setattr(search_module, "fast_bf16", lambda device, native=native: native)
        runs[native] = ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), budget=7, lr=0.1)
        assert runs[native].settings["dtype"] == ("bf16" if native else "fp32")
        assert all(p.dtype == torch.float32 for p in model.parameters())
    bf16, fp32 = runs[True], runs[False]
    assert rescore(model, modules, bf16.weights, tokenizer()) == pytest.approx(fp32.objective, rel=0.01)
    assert ll.SearchSettings(dtype="fp32").for_model(model).dtype == "fp32"  # asked for: kept
    # a half-precision model is not cast to bf16 behind the user's back; loraloom's int8 base computes in bf16
    monkeypatch.setattr(search_module, "fast_bf16", lambda device: True)
    assert ll.SearchSettings().for_model(tiny_t5().half()).dtype == "fp32"
    quantized = quantize_model(tiny_t5())
    assert ll.SearchSettings().for_model(quantized).dtype == "bf16"
    result = ll.lorahub(quantized, modules, EXAMPLES, tokenizer=tokenizer(), budget=4, lr=0.1)
    assert result.settings["dtype"] == "bf16" and result.settings["low_memory"]
    assert {p.dtype for p in quantized.parameters()} == {torch.float32}  # the int8 weights report float32 again
    assert ll.SearchSettings().for_model(tiny_t5()).dtype == "bf16"
