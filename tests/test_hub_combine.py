"""Merge operators (hub/combine.py): PEFT's add_weighted_adapter parity where PEFT is right, the exact answer
where it is not (rsLoRA, lora_bias, DoRA, rank_pattern), and the bank cases (PiSSA/OLoRA, refusals)."""

from __future__ import annotations

import json
from unittest import mock

import peft
import pytest
import torch
from peft_parity import features
from tiny_models import FACTORIES

import loraloom as ll
from loraloom.adapters.base import AdapterError
from loraloom.hub.bank import load_bank
from loraloom.hub.combine import HOWS, SVD_OPS, CombineSettings, combine
from loraloom.hub.compose import Composition

TARGETS = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
WEIGHTS = [0.7, -0.4, 1.3]


def make_modules(tmp_path, arch: str, n: int = 3, seed: int = 0, **config) -> list:
    """``n`` PEFT LoRA folders with random A and B (init_lora_weights=False) unless ``config`` says otherwise."""
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[arch], "init_lora_weights": False, **config}
    paths = []
    for i in range(n):
        torch.manual_seed(seed + i)
        model = peft.get_peft_model(FACTORIES[arch](), peft.LoraConfig(**kwargs))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:  # DoRA: a magnitude away from ||W + s·B·A||
                    p.mul_(1 + 0.5 * torch.rand_like(p))
                elif "lora_B.default.bias" in name:
                    p.normal_(0, 0.5)
                elif "lora_" in name and kwargs["init_lora_weights"] != False:  # noqa: E712 (PEFT's False)
                    p.add_(0.3 * torch.randn_like(p))  # a trained PiSSA/OLoRA module moved away from its init
        path = tmp_path / f"{arch}-m{seed + i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def peft_merged(arch: str, paths, weights, how: str, seed: int = 0, **kwargs) -> peft.PeftModel:
    """PEFT's add_weighted_adapter over the folders, the merged adapter active; torch's generator is seeded
    with ``seed`` where its merge loop starts (after the new adapter's random init), for DARE's masks."""
    model = peft.PeftModel.from_pretrained(FACTORIES[arch](), paths[0], adapter_name="m0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(p, adapter_name=f"m{i}")
    names = [f"m{i}" for i in range(len(paths))]
    freeze = peft.tuners.lora.model._freeze_adapter

    def freeze_then_seed(*args):
        freeze(*args)
        torch.manual_seed(seed)

    with mock.patch.object(peft.tuners.lora.model, "_freeze_adapter", freeze_then_seed):
        model.add_weighted_adapter(names, list(weights), "merged", combination_type=how, **kwargs)
    model.set_adapter("merged")
    return model.eval()


@torch.no_grad()
def exact_reference(arch: str, paths, weights) -> torch.nn.Module:
    """W0 + Σ w_i·ΔW_i (and the biases' too), each ΔW_i from PEFT merging that module alone (right for every kind)."""
    base = FACTORIES[arch]().state_dict()
    out = {k: v.clone() for k, v in base.items()}
    for p, w in zip(paths, weights, strict=True):
        merged = peft.PeftModel.from_pretrained(FACTORIES[arch](), p).merge_and_unload().state_dict()
        for k in out:
            out[k] += w * (merged[k] - base[k])
    model = FACTORIES[arch]()
    model.load_state_dict(out)
    return model.eval()


def ours(tmp_path, arch: str, paths, weights, how: str, **kwargs) -> torch.nn.Module:
    out = tmp_path / f"ours-{how}"
    combine(paths, weights, how, out, base_model=FACTORIES[arch](), **kwargs)
    return ll.load_adapter(FACTORIES[arch](), out, verbose=False)


OPTIONS = {
    "ties": {"density": 0.5},
    "ties_svd": {"density": 0.5, "majority_sign_method": "frequency"},
    "dare_linear": {"density": 0.6},
    "dare_ties": {"density": 0.6},
    "dare_linear_svd": {"density": 0.6},
    "dare_ties_svd": {"density": 0.6},
    "magnitude_prune": {"density": 0.5},
    "magnitude_prune_svd": {"density": 0.5},
    "svd": {"svd_rank": 3},
}


@pytest.mark.parametrize("arch", ["t5", "llama"])
@pytest.mark.parametrize("how", [h for h in HOWS if h != "lorahub"])
def test_parity_with_peft_add_weighted_adapter(tmp_path, arch, how):
    paths = make_modules(tmp_path, arch)
    options = OPTIONS.get(how, {})
    expected = features(peft_merged(arch, paths, WEIGHTS, how, seed=7, **options), arch)
    assert (expected - features(FACTORIES[arch](), arch)).abs().max() > 1e-2  # the merge changes the model
    got = features(ours(tmp_path, arch, paths, WEIGHTS, how, seed=7, **options), arch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_dare_is_seeded(tmp_path):
    paths = make_modules(tmp_path, "t5")
    first = combine(paths, WEIGHTS, "dare_ties", density=0.5, seed=3).tensors
    again = combine(paths, WEIGHTS, "dare_ties", density=0.5, seed=3).tensors
    other = combine(paths, WEIGHTS, "dare_ties", density=0.5, seed=4).tensors
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_lorahub_is_the_bank_composition(tmp_path, arch):
    """how="lorahub" writes what LoraHub's composed layer computes: s·(Σ w_i·B_i)(Σ w_i·A_i)."""
    paths = make_modules(tmp_path, arch)
    model = FACTORIES[arch]()
    with Composition(model, load_bank([str(p) for p in paths], base_model=model)) as composition:
        composition.set_weights(WEIGHTS)
        expected = features(model, arch)
    got = features(ours(tmp_path, arch, paths, WEIGHTS, "lorahub"), arch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---- where PEFT 0.21 is wrong: each test shows PEFT's error, then ours right -----------------------------


def test_rslora_peft_scales_twice_ours_exact(tmp_path):
    paths = make_modules(tmp_path, "t5", use_rslora=True)
    reference = features(exact_reference("t5", paths, WEIGHTS), "t5")
    theirs = features(peft_merged("t5", paths, WEIGHTS, "cat"), "t5")
    assert (theirs - reference).abs().max() > 1e-2  # PEFT: use_rslora kept, sqrt(12) on top of scaled factors
    got = features(ours(tmp_path, "t5", paths, WEIGHTS, "cat"), "t5")
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "ours-cat" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["r"] == config["lora_alpha"] == 12


def test_lora_bias_peft_drops_it_ours_exact(tmp_path):
    paths = make_modules(tmp_path, "gpt2", lora_bias=True, init_lora_weights=True)  # GPT-2: Conv1D with biases
    for p in paths:  # B = 0 from the init: give the module a B too
        _randomise_B(p)
    reference = features(exact_reference("gpt2", paths, WEIGHTS), "gpt2")
    theirs = features(peft_merged("gpt2", paths, WEIGHTS, "cat"), "gpt2")
    assert (theirs - reference).abs().max() > 1e-2  # PEFT: the merged lora_B.bias stays zero
    got = features(ours(tmp_path, "gpt2", paths, WEIGHTS, "cat"), "gpt2")
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)
    back = peft.PeftModel.from_pretrained(FACTORIES["gpt2"](), tmp_path / "ours-cat")  # PEFT reads ours the same
    torch.testing.assert_close(features(back, "gpt2"), reference, atol=1e-5, rtol=0)


def _randomise_B(path) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    g = torch.Generator().manual_seed(len(str(path)))
    for k, t in tensors.items():
        if k.endswith("lora_B.weight"):
            tensors[k] = torch.randn(t.shape, generator=g) * 0.3
    save_file(tensors, file)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_dora_peft_ignores_magnitude_ours_exact(tmp_path, arch):
    paths = make_modules(tmp_path, arch, use_dora=True)
    reference = features(exact_reference(arch, paths, WEIGHTS), arch)
    theirs = features(peft_merged(arch, paths, WEIGHTS, "svd", svd_rank=16), arch)
    assert (theirs - reference).abs().max() > 1e-2  # PEFT: s·B·A without m, and a fresh magnitude on top
    # The DoRA update is full rank: an svd_rank covering the layer is exact (each layer gets min(rank, dims)).
    got = features(ours(tmp_path, arch, paths, WEIGHTS, "svd", svd_rank=32), arch)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def test_dora_refused_where_not_exact(tmp_path):
    paths = make_modules(tmp_path, "t5", n=2, use_dora=True)
    with pytest.raises(AdapterError, match=r"module .*t5-m0: use_dora=True.*how='linear'"):
        combine(paths, WEIGHTS[:2], "linear", base_model=FACTORIES["t5"]())
    with pytest.raises(AdapterError, match=r"module .*t5-m0: use_dora=True.*pass the base model"):
        combine(paths, WEIGHTS[:2], "svd")


def test_rank_pattern_peft_unloadable_ours_reloads(tmp_path):
    paths = make_modules(tmp_path, "t5", rank_pattern={"v": 2}, alpha_pattern={"v": 3})
    theirs = peft_merged("t5", paths, WEIGHTS, "linear")
    expected = features(theirs, "t5")  # in memory PEFT's linear merge is right...
    theirs.save_pretrained(tmp_path / "theirs", selected_adapters=["merged"])
    with pytest.raises(RuntimeError, match="size mismatch"):  # ...but its folder says r=4 for the rank-2 layers
        peft.PeftModel.from_pretrained(FACTORIES["t5"](), tmp_path / "theirs" / "merged")
    got = features(ours(tmp_path, "t5", paths, WEIGHTS, "linear"), "t5")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    back = peft.PeftModel.from_pretrained(FACTORIES["t5"](), tmp_path / "ours-linear")
    torch.testing.assert_close(features(back, "t5"), expected, atol=1e-5, rtol=0)


# ---- modules whose base is not the stored one ----------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_modules_combined_exactly(tmp_path, init):
    paths = make_modules(tmp_path, "t5", n=2, init_lora_weights=init)
    one = features(ll.load_adapter(FACTORIES["t5"](), paths[0], verbose=False), "t5")
    torch.testing.assert_close(features(ours(tmp_path, "t5", paths[:1], [1.0], "cat"), "t5"), one, atol=1e-5, rtol=0)
    reference = features(exact_reference("t5", paths, WEIGHTS[:2]), "t5")
    got = features(ours(tmp_path, "t5", paths, WEIGHTS[:2], "svd", svd_rank=16), "t5")
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)
    with pytest.raises(AdapterError, match=rf"module .*t5-m0: init_lora_weights='{init}'.*pass the base model"):
        combine(paths, WEIGHTS[:2], "cat")


@pytest.mark.parametrize(("init", "why"), [("pissa_niter_4", "randomised SVD"), ("loftq", "LoftQ"), ("corda", "CorDA")])
def test_underivable_inits_refused(tmp_path, init, why):
    paths = make_modules(tmp_path, "t5", n=1)
    config_file = paths[0] / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "init_lora_weights": init}))
    with pytest.raises(AdapterError, match=rf"init_lora_weights='{init}'.*{why}"):
        combine(paths, [1.0], "cat", base_model=FACTORIES["t5"]())


# ---- bad input -----------------------------------------------------------------------------------------


def test_bad_settings_named():
    with pytest.raises(ValueError, match="how must be one of"):
        CombineSettings("average")
    with pytest.raises(ValueError, match="needs density"):
        CombineSettings("ties")
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        CombineSettings("dare_linear", density=1.5)
    with pytest.raises(ValueError, match="svd_rank"):
        CombineSettings("linear", svd_rank=4)
    assert set(SVD_OPS) < set(HOWS)


def test_bad_weights_and_mixed_ranks(tmp_path):
    paths = make_modules(tmp_path, "t5", n=2)
    with pytest.raises(ValueError, match=r"expected 2 \(one per module\)"):
        combine(paths, [1.0], "linear")
    with pytest.raises(ValueError, match="finite"):
        combine(paths, [1.0, float("nan")], "linear")
    other = make_modules(tmp_path, "t5", n=1, seed=5, r=2)
    with pytest.raises(AdapterError, match=r"module .*t5-m5: layer .* has r=2 but module .* has r=4.*'cat'"):
        combine([paths[0], other[0]], [1.0, 1.0], "ties", density=0.5)
    combined = combine([paths[0], other[0]], [1.0, 1.0], "cat")  # cat takes mixed ranks
    assert combined.config.r == 6


@pytest.mark.parametrize(
    ("how", "extra"),
    [("ties", ["--density", "0.6"]), ("dare_linear", ["--density", "0.5", "--seed", "3"]), ("cat", [])],
)
def test_cli_combine_writes_what_combine_computes(tmp_path, how, extra, capsys):
    from loraloom.cli import main

    paths = make_modules(tmp_path, "t5")
    argv = ["combine", *map(str, paths), "--weights", *map(str, WEIGHTS), "--how", how, *extra]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    assert f"how={how}" in capsys.readouterr().out
    options = {"density": float(extra[1])} if extra else {}
    expected = combine(paths, WEIGHTS, how, seed=int(extra[3]) if len(extra) > 2 else 0, **options)
    loaded = ll.load_adapter(FACTORIES["t5"](), tmp_path / "cli", verbose=False)
    in_process = ll.load_adapter(FACTORIES["t5"](), expected.save(tmp_path / "api"), verbose=False)
    assert torch.equal(features(loaded, "t5"), features(in_process, "t5"))
    for key, tensor in ll.read_adapter(tmp_path / "cli")[1].items():
        assert torch.equal(tensor, expected.tensors[key]), key


def test_cli_combine_bad_input_is_one_line(tmp_path, capsys):
    from loraloom.cli import main

    paths = make_modules(tmp_path, "t5", n=2)
    assert (
        main(["combine", *map(str, paths), "--weights", "1", "--out", str(tmp_path / "o")]) == 2
    )  # 1 weight, 2 modules
    assert (
        main(["combine", *map(str, paths), "--weights", "1", "1", "--how", "ties", "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "expected 2" in err[0] and "density" in err[1]
    with pytest.raises(SystemExit):
        main(["combine", *map(str, paths), "--weights", "1", "1", "--how", "nope", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("how", ["ties", "dare_ties", "cat"])
def test_merge_search_scores_the_merge_it_returns_and_leaves_the_model(tmp_path, how):
    import copy

    from hub_modules import EXAMPLES, tokenizer

    from loraloom.data import collate
    from loraloom.hub import SearchSettings, encode_few_shot
    from loraloom.hub.merge_search import load_combined, merge_search

    model = FACTORIES["t5"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    paths = make_modules(tmp_path, "t5")
    features = encode_few_shot(model, tokenizer(), [ll.Example(e["input"], e["target"]) for e in EXAMPLES])
    combine_settings = CombineSettings(how, density=None if how == "cat" else 0.5, seed=2)
    search = SearchSettings(mode="nevergrad", budget=6, seed=1)
    found, combined = merge_search(model, paths, features, pad_token_id=0, combine=combine_settings, search=search)
    assert len(found.trace) == 6 and found.complete and not hasattr(model, "loraloom_config")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the objective of the returned merge, recomputed from scratch: mean token cross-entropy + 0.05 mean|w|
    merged = load_combined(copy.deepcopy(model), combined).eval()
    batch = collate(features, 0)
    with torch.no_grad():
        logits = merged(**batch).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    w = torch.tensor(found.weights)
    assert found.objective == pytest.approx(float(loss) + 0.05 * float(w.abs().mean()), abs=1e-5)
    assert combined.weights == pytest.approx(found.weights)
