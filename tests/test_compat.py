"""loraloom.compat: the reference package's lorahub_learning / lorahub_inference, same arguments and results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hub_modules import EXAMPLES, edit_config, make_modules, tokenizer
from tiny_models import logits, model_inputs, tiny_llama, tiny_t5

from loraloom import compat
from loraloom.compat import (
    FewShotDataset,
    default_get_loss,
    default_l1_regularization,
    lorahub_inference,
    lorahub_learning,
    reference_features,
)
from loraloom.data import normalise_answer
from loraloom.hub import Composition, Objective, load_bank, merge_composition
from loraloom.hub import search as search_module
from loraloom.hub.search import nevergrad_search

INPUTS = [e["input"] for e in EXAMPLES]
OUTPUTS = [e["target"] for e in EXAMPLES]


@pytest.fixture(scope="module")
def saved_t5(tmp_path_factory):
    """A tiny T5 + tokenizer folder and 3 modules whose configs name it as their base."""
    root = tmp_path_factory.mktemp("compat")
    model = tiny_t5()
    model.save_pretrained(root / "base")
    tokenizer().save_pretrained(root / "base")
    modules = make_modules(model, root / "modules", 3)
    for m in modules:
        edit_config(m, base_model_name_or_path=str(root / "base"))
    return root, modules


def reference_value(model, tok, modules, w, batch_size=None):
    """The reference's get_score for w: default_get_loss on its padded dataset + default_l1_regularization."""
    features = reference_features(model, tok, INPUTS, OUTPUTS)
    dataset = FewShotDataset(INPUTS, OUTPUTS, features, tok.pad_token_id)
    with Composition(model, load_bank(modules)) as composition:
        composition.set_weights(w)
        return default_get_loss(dataset, model, batch_size) + default_l1_regularization(w.tolist())


def test_learning_returns_weights_merged_model_and_tokenizer(saved_t5):
    root, modules = saved_t5
    weights, model, tok = lorahub_learning(modules, INPUTS, OUTPUTS, max_inference_step=6, seed=42)
    assert isinstance(weights, np.ndarray) and weights.shape == (3,)
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert not any(type(m).__name__ == "ComposedLoraLayer" for m in model.modules())
    assert tok("ant").input_ids == tokenizer()("ant").input_ids
    expected = merge_composition(tiny_t5(), modules, weights.tolist())  # the same composition, merged
    inputs = model_inputs("t5")
    assert torch.allclose(logits(model, inputs), logits(expected, inputs), atol=1e-5)


def test_learning_is_reproducible_and_seeded(saved_t5):
    _, modules = saved_t5
    a = lorahub_learning(modules, INPUTS, OUTPUTS, 6, seed=7)[0]
    b = lorahub_learning(modules, INPUTS, OUTPUTS, 6, seed=7)[0]
    assert np.array_equal(a, b)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_default_objective_is_the_references(saved_t5, batch_size):
    """The fast path (no padding, bank composition) scores what the reference's get_score scores."""
    root, modules = saved_t5
    model, tok = tiny_t5(), tokenizer()
    w = torch.tensor([0.9, -0.4, 1.2])
    expected = reference_value(model, tok, modules, w, batch_size)
    with Composition(model, load_bank(modules)) as composition:
        features = reference_features(model, tok, INPUTS, OUTPUTS)
        fast = Objective(composition, features, pad_token_id=0, formula="reference", batch_size=batch_size)
        assert fast(w).values.item() == pytest.approx(expected, abs=1e-5)


def test_custom_loss_and_regular_are_used(saved_t5):
    _, modules = saved_t5
    seen = {"loss": 0, "regular": 0}

    def get_loss(dataset, model, batch_size):
        seen["loss"] += 1
        assert dataset["input"] == INPUTS and len(dataset) == 5 and batch_size == 3
        return default_get_loss(dataset, model, batch_size)

    def get_regular(weights):
        seen["regular"] += 1
        assert len(weights) == 3
        return 10.0 * sum(abs(x) for x in weights)  # a heavy penalty: stay near 0

    weights, _, _ = lorahub_learning(
        modules, INPUTS, OUTPUTS, 5, batch_size=3, get_loss=get_loss, get_regular=get_regular
    )
    assert seen == {"loss": 5, "regular": 5}
    assert np.abs(weights).sum() <= 0.5 + 1e-9


def test_inference_predictions_and_accuracy(saved_t5):
    root, _ = saved_t5
    predictions, accuracy = lorahub_inference(INPUTS[:3], str(root / "base"), str(root / "base"), batch_size=2)
    assert len(predictions) == 3 and accuracy is None
    model, tok = tiny_t5(), tokenizer()
    predictions2, accuracy = lorahub_inference(INPUTS[:3], model, tok, 2, example_outputs=predictions[:2] + ["x"])
    assert predictions2 == predictions
    assert accuracy == pytest.approx(200 / 3)


def test_causal_lm_base_works_too(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    tokenizer(add_eos=False).save_pretrained(tmp_path / "base")
    modules = make_modules(model, tmp_path / "modules", 2, targets=["q_proj", "v_proj"])
    weights, merged, _ = lorahub_learning(modules, INPUTS, OUTPUTS, 4, model_name_or_path=str(tmp_path / "base"))
    assert weights.shape == (2,) and type(merged).__name__ == "LlamaForCausalLM"


def test_bad_input(saved_t5, tmp_path):
    _, modules = saved_t5
    with pytest.raises(ValueError, match="no LoRA modules"):
        lorahub_learning([], INPUTS, OUTPUTS, 5)
    with pytest.raises(ValueError, match="5 example inputs but 4 outputs"):
        lorahub_learning(modules, INPUTS, OUTPUTS[:4], 5)
    with pytest.raises(ValueError, match="budget must be a positive"):
        lorahub_learning(modules, INPUTS, OUTPUTS, 0)
    nameless = make_modules(tiny_t5(), tmp_path, 1)
    edit_config(nameless[0], base_model_name_or_path=None)
    with pytest.raises(ValueError, match="names no base model"):
        lorahub_learning(nameless, INPUTS, OUTPUTS, 5)


def reference_key(s: str) -> str:
    """The reference's accuracy_score comparison, literally: output.strip().lower().replace(".", "")."""
    return s.strip().lower().replace(".", "")


@pytest.mark.parametrize(
    "prediction, truth, same",
    [
        ("(A) .", "(A)", False),  # strip before removing ".": the inner space stays
        ("(A).", "(a)", True),
        ("  Yes. ", "yes", True),
        ("yes .", "yes", False),
        (". yes", "yes", False),
        ("a.b", "ab", True),
    ],
)
def test_answers_are_compared_as_the_reference_compares_them(prediction, truth, same):
    assert (normalise_answer(prediction) == normalise_answer(truth)) is same
    assert normalise_answer(prediction) == reference_key(prediction)


class SpacedTokenizer:
    """A tokenizer whose decoded texts carry surrounding spaces, as some real tokenizers' do."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return [f" {text} " for text in self.tok.batch_decode(*args, **kwargs)]


def test_inference_returns_predictions_as_decoded_and_scores_them_as_the_reference(saved_t5):
    model, tok = tiny_t5(), SpacedTokenizer(tokenizer())
    inputs = INPUTS[1:4]  # one batch of 2, then 1
    predictions, _ = lorahub_inference(inputs, model, tok, batch_size=2)
    assert all(p.startswith(" ") and p.endswith(" ") for p in predictions)  # returned raw, not stripped
    raw = []
    for batch_inputs in (inputs[:2], inputs[2:]):  # the reference's loop: padded batches in order, input_ids only
        batch = tok(batch_inputs, max_length=2048, return_tensors="pt", padding=True)
        raw += tok.batch_decode(
            model.generate(input_ids=batch["input_ids"], max_new_tokens=256), skip_special_tokens=True
        )
    assert predictions == raw
    truths = [predictions[0].strip().upper() + ".", predictions[1].strip() + " .", "x"]  # match, no match, no
    _, accuracy = lorahub_inference(inputs, model, tok, 2, example_outputs=truths)
    assert accuracy == pytest.approx(100 / 3)  # "(A) ."-like answers do not match, as in the reference


@pytest.mark.parametrize(
    ("native", "dtype", "scored_in"), [(True, "auto", "bf16"), (False, "auto", "fp32"), (True, "fp32", "fp32")]
)
def test_candidates_are_scored_in_bf16_where_native_and_the_merged_model_is_float32(
    saved_t5, monkeypatch, native, dtype, scored_in
):
    _, modules = saved_t5
    monkeypatch.setattr(search_module, "fast_bf16", lambda device: native)
    seen = []

    def search(objective, settings, **kwargs):
        seen.append((settings.dtype, {p.dtype for p in objective.objective.model.parameters()}))
        return nevergrad_search(objective, settings, **kwargs)

    monkeypatch.setattr(compat, "nevergrad_search", search)
    weights, model, _ = lorahub_learning(modules, INPUTS, OUTPUTS, 4, dtype=dtype)
    assert seen == [(scored_in, {torch.bfloat16 if scored_in == "bf16" else torch.float32})]
    assert all(p.dtype == torch.float32 for p in model.parameters()) and np.all(np.abs(weights) <= 1.5)
