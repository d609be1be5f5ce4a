"""Serving without HTTP: the batched multi-adapter layers, the engine's continuous batching, the adapter cache.

The oracle for every row is the same row run alone through a model carrying only its adapter
(``load_adapter``, or the hub's ``Composition`` for a LoraHub composition).
"""

from __future__ import annotations

import pytest
import torch
from hub_modules import make_modules
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, tiny_t5

from loraloom.adapters import AdapterError, load_adapter
from loraloom.hub import Composition, load_bank
from loraloom.serve import AdapterCache, Engine, LoraWeights, MultiLora, Request, SamplingParams, UnknownAdapter
from loraloom.serve.multi import MultiLoraLayer

ARCHS = {
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn"]),  # Conv1D
    "t5": (tiny_t5, ["q", "v"]),  # encoder-decoder: the layer is the same in both stacks
}


def _adapters(model, root, targets):
    """m00, m01 (r=4), w00 (r=8: mixed ranks), and q00 (r=2, only the first target: layers differ)."""
    paths = make_modules(model, root, 2, r=4, targets=targets, seed=1, scale=0.3)
    paths += make_modules(model, root, 1, r=8, alpha=4, targets=targets, seed=2, scale=0.3, prefix="w")
    paths += make_modules(model, root, 1, r=2, targets=targets[:1], seed=3, scale=0.3, prefix="q")
    return paths


def _alone(factory, path_or_bank, inputs, weights=None):
    """Logits of ``inputs`` through a fresh base model carrying only this adapter (None: the base)."""
    model = factory()
    if weights is not None:
        Composition(model, path_or_bank).set_weights(weights)
    elif path_or_bank is not None:
        model = load_adapter(model, path_or_bank)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_mixed_batch_rows_match_each_adapter_alone(tmp_path, arch):
    factory, targets = ARCHS[arch]
    model = factory()
    paths = _adapters(model, tmp_path, targets)
    cache = AdapterCache(tmp_path)
    bank = load_bank(paths[:2])
    w = [0.8, -0.5]
    composed = LoraWeights.from_bank(bank, w, name="composed")
    # Rows: base, each adapter (mixed ranks, different layers), a repeat, and a composition.
    plan = [None, "m00", "m01", "w00", "q00", "m00", composed]
    rows = [cache.get(p) if isinstance(p, str) else p for p in plan]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (len(rows), 6), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (len(rows), 4), generator=g)

    multi = MultiLora(model)
    multi.set_rows(rows)
    assert len(multi.layers) == len([m for m in model.modules() if isinstance(m, MultiLoraLayer)]) > 0
    with torch.no_grad():
        got = model(**inputs).logits
    for i, p in enumerate(plan):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if p is composed:
            want = _alone(factory, bank, row, weights=w)
        else:
            want = _alone(factory, str(tmp_path / p) if p else None, row)
        assert torch.allclose(got[i : i + 1], want, atol=1e-5, rtol=1e-5), f"row {i} ({p})"
    base = _alone(factory, None, inputs)
    assert not torch.allclose(got[1], base[1], atol=1e-3)  # the adapters do change the rows

    # One adapter for every row takes the plain path and gives the same numbers.
    multi.set_rows([rows[1]] * len(rows))
    with torch.no_grad():
        same = model(**inputs).logits
    assert torch.allclose(same[5], got[5], atol=1e-5, rtol=1e-5)
    multi.remove()
    assert not any(isinstance(m, MultiLoraLayer) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, base, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_decode_step_matches_each_adapter_alone(tmp_path, arch):
    """One decode token after a KV cache, every row through its own adapter: logits as each row alone."""
    factory, targets = ARCHS[arch]
    model = factory()
    _adapters(model, tmp_path, targets)
    cache = AdapterCache(tmp_path)
    plan = [None, "m00", "w00", "q00", "m01", "m00"]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (len(plan), 7), generator=g)
    step = torch.randint(3, VOCAB, (len(plan), 1), generator=g)
    MultiLora(model).set_rows([cache.get(p) if p else None for p in plan])
    with torch.no_grad():
        past = model(input_ids=ids, use_cache=True).past_key_values
        got = model(input_ids=step, past_key_values=past, use_cache=True).logits[:, -1]
    for i, p in enumerate(plan):
        alone = load_adapter(factory(), tmp_path / p) if p else factory()
        with torch.no_grad():
            past = alone(input_ids=ids[i : i + 1], use_cache=True).past_key_values
            want = alone(input_ids=step[i : i + 1], past_key_values=past, use_cache=True).logits[:, -1]
        assert torch.allclose(got[i : i + 1], want, atol=1e-5, rtol=1e-5), f"row {i} ({p})"


def test_batch_must_match_the_rows_named(tmp_path):
    model = tiny_llama()
    make_modules(model, tmp_path, 2, targets=["q_proj"])
    cache = AdapterCache(tmp_path)
    multi = MultiLora(model)
    multi.set_rows([cache.get("m00"), cache.get("m01")])
    ids = torch.randint(3, VOCAB, (3, 4))
    with pytest.raises(AdapterError, match="3 rows"):
        model(input_ids=ids)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(2, 14, (n,), generator=g)]


class _Tok:
    """Decodes ids as numbers (the engine only needs decode and the special ids)."""

    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_continuous_batching_matches_generate_alone(tmp_path, arch):
    """Rows join at token boundaries (max_batch < requests), finish at different times, mixed adapters."""
    factory, targets = ARCHS[arch]
    _adapters(factory(), tmp_path, targets)
    cache = AdapterCache(tmp_path)
    engine = Engine(factory(), _Tok(), max_batch=4)
    names = [None, "m00", "w00", "q00", "m01"]
    prompts = _prompts(11)
    requests = [
        Request(
            p, cache.get(names[i % 5]) if names[i % 5] else None, SamplingParams(max_tokens=3 + i % 6, temperature=0)
        )
        for i, p in enumerate(prompts)
    ]
    engine.generate(requests)
    assert engine.rows == [] and engine.cache is None
    for i, r in enumerate(requests):
        ref = factory()
        if names[i % 5]:
            ref = load_adapter(ref, tmp_path / names[i % 5])
        out = ref.generate(
            torch.tensor([prompts[i]]),
            max_new_tokens=r.params.max_tokens,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )[0, len(prompts[i]) :].tolist()
        want = out[: out.index(2)] if 2 in out else out
        assert r.output_ids == want, f"request {i}"
        assert r.finish_reason == ("stop" if 2 in out else "length")
        assert r.text == " ".join(map(str, want))


def test_seeded_sampling_does_not_depend_on_the_batch(tmp_path):
    engine = Engine(tiny_llama(), _Tok(), max_batch=8)
    params = dict(max_tokens=6, temperature=1.5, top_p=0.9)
    prompts = _prompts(5, seed=1)
    together = engine.generate([Request(p, None, SamplingParams(seed=i, **params)) for i, p in enumerate(prompts)])
    alone = [engine.generate([Request(p, None, SamplingParams(seed=i, **params))])[0] for i, p in enumerate(prompts)]
    assert [r.output_ids for r in together] == [r.output_ids for r in alone]
    other = engine.generate([Request(prompts[0], None, SamplingParams(seed=99, **params))])[0]
    greedy = engine.generate([Request(prompts[0], None, SamplingParams(max_tokens=6, temperature=0))])[0]
    assert together[0].output_ids != other.output_ids or together[0].output_ids != greedy.output_ids


def test_cancelled_row_leaves_and_others_go_on():
    engine = Engine(tiny_llama(), _Tok(), max_batch=4)
    a, b = (Request(p, None, SamplingParams(max_tokens=20, temperature=0)) for p in _prompts(2, seed=3))
    engine.step([a, b])
    a.cancelled = True
    engine.step()
    assert engine.rows == [b] and a.finish_reason == "cancelled"
    while engine.rows:
        engine.step()
    alone = engine.generate([Request(b.prompt_ids, None, SamplingParams(max_tokens=20, temperature=0))])[0]
    assert b.output_ids == alone.output_ids


def test_stop_strings_and_length_checks():
    engine = Engine(tiny_llama(), _Tok(), max_batch=2)
    prompt = _prompts(1, seed=4)[0]
    full = engine.generate([Request(prompt, None, SamplingParams(max_tokens=8, temperature=0))])[0]
    assert len(full.output_ids) >= 3, "the tiny model ended too early for this test"
    stop = str(full.output_ids[2])
    cut = engine.generate([Request(prompt, None, SamplingParams(max_tokens=8, temperature=0, stop=[stop]))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    with pytest.raises(ValueError, match="maximum context length is 128"):
        engine.check_length(120, 16)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="encoder-decoder"):
        Engine(tiny_t5(), _Tok())


def test_cache_loads_once_evicts_lru_and_adds_removes(tmp_path):
    model = tiny_llama()
    make_modules(model, tmp_path / "pool", 3, targets=["q_proj", "v_proj"])
    one = AdapterCache(tmp_path / "pool").get("m00").nbytes
    cache = AdapterCache(tmp_path / "pool", limit_mib=2.5 * one / 2**20)  # room for two adapters
    assert cache.names() == ["m00", "m01", "m02"]
    first = cache.get("m00")
    assert cache.get("m00") is first and cache.loads == 1
    cache.get("m01")
    cache.get("m00")  # m00 is now the most recently used
    cache.get("m02")  # evicts m01
    assert cache.cached() == ["m00", "m02"] and cache.nbytes <= cache.limit_bytes
    cache.get("m01")
    assert cache.loads == 4

    make_modules(model, tmp_path / "elsewhere", 1, targets=["q_proj"], prefix="x", seed=5)
    cache.add("extra", tmp_path / "elsewhere" / "x00")
    assert "extra" in cache.names() and "extra" in cache.cached()
    cache.remove("extra")
    with pytest.raises(UnknownAdapter):
        cache.get("extra")
    for bad in ["nope", "../pool/m00", "/etc", ".."]:
        with pytest.raises(UnknownAdapter):
            cache.get(bad)
    with pytest.raises(AdapterError, match="cache limit"):
        AdapterCache(tmp_path / "pool", limit_mib=one / 4 / 2**20).get("m00")


def test_cache_reports_a_broken_folder_and_retries(tmp_path):
    model = tiny_llama()
    (folder,) = make_modules(model, tmp_path, 1, targets=["q_proj"])
    weights = tmp_path / "m00" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    cache = AdapterCache(tmp_path)
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        cache.get("m00")
    assert cache.cached() == []
    weights.write_bytes(good)  # fixed while serving: the next use loads it
    assert cache.get("m00").name == "m00"


def test_compose_over_the_cache_matches_the_hub(tmp_path):
    model = tiny_llama()
    paths = make_modules(model, tmp_path, 3, targets=["q_proj", "v_proj"], scale=0.3)
    make_modules(model, tmp_path, 1, r=8, targets=["q_proj", "v_proj"], prefix="w")
    cache = AdapterCache(tmp_path)
    composed = cache.compose({"m02": 0.5, "m00": -1.0})
    bank = load_bank([paths[0], paths[2]])
    for name, (a, b) in bank.composed([-1.0, 0.5]).items():
        assert torch.allclose(composed.layers[name][0], a) and torch.allclose(composed.layers[name][1], b)
    with pytest.raises(AdapterError, match="r=8"):
        cache.compose({"m00": 1.0, "w00": 1.0})  # LoraHub composes modules of one rank
    with pytest.raises(ValueError, match="finite"):
        cache.compose({"m00": float("nan")})
