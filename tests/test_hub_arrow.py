"""Arrow: per-token routing against PEFT's create_arrow_model, and select="arrow" picking the aligned module."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from hub_modules import EXAMPLES, make_modules, tokenizer
from tiny_models import logits, model_inputs, tiny_llama, tiny_t5, tiny_word_tokenizer

import loraloom as ll
from loraloom.adapters import LoraConfig, remove_adapter, write_adapter_folder
from loraloom.adapters.base import AdapterError, layer_dims
from loraloom.adapters.inject import find_targets
from loraloom.cli import main
from loraloom.data import load_examples
from loraloom.hub import ArrowLayer, encode_few_shot, load_bank, select, select_arrow
from loraloom.hub.arrow import prototypes

TARGETS = ["q_proj", "v_proj"]


def spectral_modules(model, root, n: int, *, seed: int = 0, gap: float = 0.3, prefix: str = "m") -> list[str]:
    """``n`` LoRA folders whose B·A have top singular value 1 and the rest <= ``gap``, in random directions.

    PEFT finds the prototype with 15 power iterations, which converge as gap^30: with a clear gap its
    prototypes are exact to float precision and the two implementations must agree.
    """
    g = torch.Generator().manual_seed(seed)
    r = 4
    singular = torch.tensor([1.0, gap, gap * 0.7, gap * 0.4])
    paths = []
    for i in range(n):
        tensors = {}
        for name in find_targets(model, TARGETS):
            d_in, d_out = layer_dims(model.get_submodule(name))
            V, _ = torch.linalg.qr(torch.randn(d_in, r, generator=g))
            U, _ = torch.linalg.qr(torch.randn(d_out, r, generator=g))
            tensors[f"base_model.model.{name}.lora_A.weight"] = singular.sqrt()[:, None] * V.T
            tensors[f"base_model.model.{name}.lora_B.weight"] = U * singular.sqrt()
        folder = root / f"{prefix}{i:02d}"
        write_adapter_folder(folder, LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS), tensors)
        paths.append(str(folder))
    return paths


def peft_arrow(modules, general=None, **config):
    arrow_config = peft.ArrowConfig(rng_seed=0, use_gks=general is not None, **config)
    return peft.create_arrow_model(tiny_llama(), modules, arrow_config, general_adapter_paths=general)


@pytest.mark.parametrize(
    ("top_k", "temperature", "n_general"),
    [(3, 1.0, 0), (1, 1.0, 0), (2, 0.5, 0), (4, 2.0, 0), (2, 1.0, 2)],
)
def test_arrow_matches_peft_create_arrow_model(tmp_path, top_k, temperature, n_general):
    modules = spectral_modules(tiny_llama(), tmp_path, 4)
    general = spectral_modules(tiny_llama(), tmp_path, n_general, seed=9, prefix="g") if n_general else None
    inputs = model_inputs("llama")
    base = logits(tiny_llama(), inputs)
    expected = logits(peft_arrow(modules, general, top_k=top_k, router_temperature=temperature), inputs)
    assert (expected - base).abs().max() > 1e-2  # the routed modules change the outputs

    model = ll.arrow(tiny_llama(), modules, top_k=top_k, temperature=temperature, general=general)
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)
    layers = [m for m in model.modules() if isinstance(m, ArrowLayer)]
    assert len(layers) == 4 and all(layer.top_k == top_k for layer in layers)
    torch.testing.assert_close(logits(remove_adapter(model), inputs), base, atol=0, rtol=0)


def test_routing_picks_top_k_per_token(tmp_path):
    """Top-k matters token by token: k=1 and k=4 give different outputs, and a token routes only to its top k."""
    modules = spectral_modules(tiny_llama(), tmp_path, 4)
    inputs = model_inputs("llama")
    outs = [logits(ll.arrow(tiny_llama(), modules, top_k=k), inputs) for k in (1, 4)]
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    layer = next(m for m in ll.arrow(tiny_llama(), modules, top_k=2).modules() if isinstance(m, ArrowLayer))
    c = layer.coefficients(torch.randn(50, layer.in_features, generator=torch.Generator().manual_seed(0)))
    assert ((c > 0).sum(1) == 2).all() and torch.allclose(c.sum(1), torch.ones(50))
    assert len(set(c.argmax(1).tolist())) > 1  # different tokens prefer different modules


def test_prototypes_are_the_top_right_singular_vectors():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 4, 16, generator=g), torch.randn(3, 12, 4, generator=g)
    protos = prototypes(A, B)
    for i in range(3):
        _, _, Vh = torch.linalg.svd(B[i] @ A[i])
        assert abs(float(protos[i] @ Vh[0])) == pytest.approx(1.0, abs=1e-5)


def test_arrow_refuses_what_it_cannot_route(tmp_path):
    modules = spectral_modules(tiny_llama(), tmp_path, 2)
    with pytest.raises(ValueError, match="top_k must be a number of modules from 1 to 2"):
        ll.arrow(tiny_llama(), modules, top_k=3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ll.arrow(tiny_llama(), modules, top_k=1, temperature=0)
    model = ll.arrow(tiny_llama(), modules, top_k=1)
    with pytest.raises(AdapterError, match="no single update to merge"):
        next(m for m in model.modules() if isinstance(m, ArrowLayer)).merge()
    with pytest.raises(AdapterError, match="already carries an adapter"):
        ll.arrow(model, modules, top_k=1)


# ---- select="arrow" ------------------------------------------------------------------------------


def layer_inputs(model, features) -> dict[str, torch.Tensor]:
    """The inputs each q/v layer sees for the examples (all tokens), captured independently of loraloom."""
    seen: dict[str, list[torch.Tensor]] = {}
    names = find_targets(model, TARGETS)
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: seen.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for n in names
    ]
    with torch.no_grad():
        for f in features:
            model(input_ids=torch.tensor([f["input_ids"]]))
    for h in hooks:
        h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


def aligned_pool(model, root, features) -> list[str]:
    """A pool of 5 where module 3's B·A has its top right-singular vector along the examples' main input
    direction on every layer. Module 1 is a decoy: the direction is its A's largest row, but B nearly
    ignores it, so its ΔW points elsewhere. The others are random and larger in norm than module 3."""
    pool = make_modules(model, root, 5, targets=TARGETS, scale=0.5, seed=3)
    inputs = layer_inputs(model, features)
    g = torch.Generator().manual_seed(7)
    for i in (1, 3):
        tensors = {}
        for name, x in inputs.items():
            direction = torch.linalg.svd(x / x.norm(dim=1, keepdim=True), full_matrices=False)[2][0]
            d_in, d_out = layer_dims(model.get_submodule(name))
            A = torch.randn(4, d_in, generator=g) * 0.05
            B = torch.randn(d_out, 4, generator=g) * 0.05
            A[0] = direction * (10.0 if i == 1 else 1.0)
            if i == 1:
                B[:, 0] *= 1e-3  # the decoy's ΔW barely uses its first row
                B[:, 1:] *= 40
            tensors[f"base_model.model.{name}.lora_A.weight"] = A
            tensors[f"base_model.model.{name}.lora_B.weight"] = B
        write_adapter_folder(pool[i], LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), tensors)
    return pool


def llama_features():
    texts = [e["input"] + " " + e["target"] for e in EXAMPLES]
    tok = tiny_word_tokenizer(texts, add_bos=True)
    model = tiny_llama()
    return model, tok, encode_few_shot(model, tok, load_examples(EXAMPLES))


def test_select_arrow_picks_the_module_aligned_with_the_inputs(tmp_path, monkeypatch):
    model, _, features = llama_features()
    pool = aligned_pool(model, tmp_path, features)
    chosen = select_arrow(pool, 2, model, features)
    assert chosen.method == "arrow" and chosen.pool_size == 5 and set(chosen.scores) == set(pool)
    assert chosen.modules[0] == pool[3]  # the aligned module wins; the decoy and the bigger ones do not
    others = [chosen.scores[m] for m in pool if m != pool[3]]
    assert chosen.scores[pool[3]] > 2 * max(others)  # random directions in 32 dims: E|cos| ~ 0.14
    assert chosen.modules == sorted(pool, key=lambda m: -chosen.scores[m])[:2]

    # Deterministic, and a module scores the same whichever chunk of the pool it is read with.
    assert select_arrow(pool, 2, model, features).scores == chosen.scores
    monkeypatch.setattr(select, "RETRIEVAL_CHUNK", 2)
    again = select_arrow(pool, 2, model, features)
    assert again.modules == chosen.modules
    assert again.scores == pytest.approx(chosen.scores, abs=1e-12)


def test_select_arrow_scores_match_a_direct_computation(tmp_path):
    """The score is the mean over layers of the mean over tokens of |cos(x, prototype)|."""
    model, _, features = llama_features()
    pool = make_modules(model, tmp_path, 3, targets=TARGETS, seed=5)
    bank = load_bank(pool)
    inputs = layer_inputs(model, features)
    expected = torch.zeros(3, dtype=torch.float64)
    for name, x in inputs.items():
        x = x.double()
        for i in range(3):
            _, _, Vh = torch.linalg.svd(bank.B[name][i].double() @ bank.A[name][i].double())
            expected[i] += ((x @ Vh[0]).abs() / x.norm(dim=1)).mean() / len(inputs)
    scores = select_arrow(pool, 3, model, features).scores
    assert [scores[m] for m in pool] == pytest.approx(expected.tolist(), abs=1e-9)


def test_compose_selects_with_arrow_on_t5(tmp_path):
    """``loraloom compose --select arrow`` (lorahub's pool selection) on a seq2seq model: encoder and decoder
    layers both scored, the best-aligned modules composed."""
    model = tiny_t5()
    model.save_pretrained(tmp_path / "base")
    tokenizer().save_pretrained(tmp_path / "base")
    pool = make_modules(model, tmp_path / "pool", 4)
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    args = ["compose", "--base", str(tmp_path / "base"), "--pool", str(tmp_path / "pool"), "--num", "2"]
    args += ["--select", "arrow", "--examples", str(tmp_path / "few.jsonl"), "--budget", "2", "--mode", "nevergrad"]
    args += ["--no-bf16"]  # the scores are compared with an fp32 selection below
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "weights.json").read_text())
    selection = saved["selection"]
    assert selection["method"] == "arrow" and set(selection["scores"]) == set(pool)
    assert saved["settings"]["dtype"] == "fp32"
    assert saved["modules"] == selection["modules"] == sorted(pool, key=lambda m: -selection["scores"][m])[:2]
    assert all(0 < s < 1 for s in selection["scores"].values())
    features = encode_few_shot(model, tokenizer(), load_examples(EXAMPLES))
    assert selection["scores"] == pytest.approx(select_arrow(pool, 2, model, features).scores, abs=1e-12)
