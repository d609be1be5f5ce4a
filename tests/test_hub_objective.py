"""The objective: a pure function of w, equal to the HF model's own loss, without padding, P at a time."""

from __future__ import annotations

import pytest
import torch
from hub_modules import EXAMPLES, make_modules, tokenizer
from tiny_models import tiny_gpt2, tiny_llama, tiny_t5
from transformers import BartConfig, BartForConditionalGeneration

from loraloom.data import collate, load_examples
from loraloom.hub import Composition, Objective, encode_few_shot, load_bank
from loraloom.hub.objective import length_buckets, parameters_in

W = torch.tensor([[0.4, -1.0, 1.3], [0.0, 0.0, 0.0], [1.5, 0.2, -0.7], [0.4, -1.0, 1.3]])


def tiny_bart():
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        decoder_start_token_id=1,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config).eval()


ARCHS = {  # model factory, LoRA targets, seq2seq (its tokenizer appends eos)
    "t5": (tiny_t5, ["q", "v"], True),
    "bart": (tiny_bart, ["q_proj", "v_proj"], True),
    "llama": (tiny_llama, ["q_proj", "v_proj"], False),
    "gpt2": (tiny_gpt2, ["c_attn"], False),
}


def setup(tmp_path, arch="t5", **kwargs):
    factory, targets, seq2seq = ARCHS[arch]
    model = factory()
    bank = load_bank(make_modules(model, tmp_path, 3, targets=targets))
    features = encode_few_shot(model, tokenizer(add_eos=seq2seq), load_examples(EXAMPLES))
    composition = Composition(model, bank)
    return model, composition, features, Objective(composition, features, pad_token_id=0, **kwargs)


def hf_loss(model, composition, features, w, chunk=None):
    """The model's own (padded, mean over label tokens) loss per chunk of examples, as the reference gets it."""
    composition.set_weights(w)
    chunk = chunk or len(features)
    with torch.no_grad():
        out = [model(**collate(features[s : s + chunk], 0)).loss.item() for s in range(0, len(features), chunk)]
    composition.clear()
    return out


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_same_weights_same_value_and_population_matches_sequential(tmp_path, arch):
    model, composition, features, objective = setup(tmp_path, arch)
    bank_before = {k: v.clone() for k, v in composition.bank.A.items()}
    with torch.inference_mode():  # the computation itself (no memo), before and after other weights: identical
        before = objective.token_loss_sums(W)
        objective.token_loss_sums(torch.tensor([[9.0, -9.0, 9.0]]))
        assert torch.equal(objective.token_loss_sums(W), before)
        # reordered rows, computed afresh: the same values up to float rounding (each row is its own candidate)
        reordered = objective.token_loss_sums(W[[3, 2, 1, 0]])
        assert torch.allclose(reordered, before.flip(0), atol=1e-5, rtol=0)
    assert all(torch.equal(composition.bank.A[k], v) for k, v in bank_before.items())  # the bank is never written
    first = objective(W)
    assert torch.equal(first.values[0], first.values[3])  # the same w in two rows of one pass
    fresh = Objective(composition, features, pad_token_id=0)  # an empty memo: the value is recomputed
    assert torch.allclose(fresh(W[[3, 2, 1, 0]]).values, first.values.flip(0), atol=1e-5, rtol=0)
    assert torch.equal(objective(W[[3, 2, 1, 0]]).values, first.values.flip(0))  # the memo: exactly, wherever
    sequential = Objective(objective.composition, objective.features, pad_token_id=0)
    one_by_one = torch.cat([sequential(w).values for w in W])
    assert torch.allclose(first.values, one_by_one, atol=1e-5, rtol=0)
    assert len(set(first.values.tolist())) == 3  # different w, different values
    assert not model.training


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_mean_objective_is_the_models_loss_plus_l1(tmp_path, arch):
    model, composition, features, objective = setup(tmp_path, arch)
    scores = objective(W[:3])
    for i, w in enumerate(W[:3]):
        (loss,) = hf_loss(model, composition, features, w)  # one batch: mean over every target token
        assert scores.losses[i].item() == pytest.approx(loss, abs=1e-5)
        assert scores.penalties[i].item() == pytest.approx(0.05 * w.abs().mean().item(), abs=1e-7)
        assert scores.values[i].item() == pytest.approx(loss + 0.05 * w.abs().mean().item(), abs=1e-5)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_reference_objective_reproduces_its_formula(tmp_path, batch_size):
    """Σ_batches mean_token_loss(batch) / n_examples + 0.05·mean|w| (lorahub/algorithm.py)."""
    model, composition, features, _ = setup(tmp_path)
    objective = Objective(composition, features, pad_token_id=0, formula="reference", batch_size=batch_size)
    scores = objective(W[:3])
    for i, w in enumerate(W[:3]):
        losses = hf_loss(model, composition, features, w, chunk=batch_size)
        expected = sum(losses) / len(features) + 0.05 * w.abs().mean().item()
        assert scores.values[i].item() == pytest.approx(expected, abs=1e-5)


def test_nan_or_inf_loss_scores_inf(tmp_path):
    model, composition, features, objective = setup(tmp_path)
    for name in composition.bank.layers:  # module 0 blows the activations up to inf / NaN
        composition.layers[name].bank_A[0].fill_(1e30)
        composition.layers[name].bank_B[0].fill_(1e30)
    scores = objective(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert scores.values[0].item() == float("inf")
    assert torch.isfinite(scores.values[1])


def test_bf16_mode_is_close_and_restores_the_model(tmp_path):
    model, composition, features, fp32 = setup(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with parameters_in(model, torch.bfloat16):
        assert next(model.parameters()).dtype == torch.bfloat16
        bf16 = Objective(composition, features, pad_token_id=0, dtype=torch.bfloat16)(W)
    assert torch.allclose(bf16.values, fp32(W).values, rtol=2e-2)
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())


def test_length_buckets_trade_padding_against_calls():
    lengths = [(40, 5), (128, 5), (52, 4), (70, 5), (39, 5)]
    assert length_buckets(lengths, copies=1, call_cost=0) == [[4], [0], [2], [3], [1]]
    assert length_buckets(lengths, copies=1, call_cost=10_000) == [[4, 0, 2, 3, 1]]
    # short examples share a call; the long one runs alone
    assert length_buckets(lengths, copies=4, call_cost=64) == [[4, 0], [2], [3], [1]]
    assert length_buckets([(7,), (7,), (7,)], copies=8, call_cost=0) == [[0, 1, 2]]


def test_objective_uses_few_forward_calls_and_no_padding_waste(tmp_path):
    model, composition, features, objective = setup(tmp_path)
    batches = objective.micro_batches(4)
    encoder = [(idx, b) for idx, b in batches if "input_ids" in b]
    decoder = [(idx, b) for idx, b in batches if "decoder_input_ids" in b]
    assert len(encoder) + len(decoder) == len(batches)
    for calls in (encoder, decoder):  # each side sees every example once
        assert sorted(i for idx, _ in calls for i in idx) == list(range(len(features)))
    padded = sum(b["input_ids"].numel() for _, b in encoder)
    real = sum(len(f["input_ids"]) for f in features)
    assert padded < collate(features, 0)["input_ids"].numel()
    assert padded <= 1.25 * real
    # the decoder is padded to its longest target only, and never to an input's length
    assert all(b["decoder_input_ids"].shape[1] == max(len(features[i]["labels"]) for i in idx) for idx, b in decoder)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_split_matches_one_padded_forward(tmp_path, arch):
    """Encoder and decoder in calls of their own give the loss of one padded forward of the whole model."""
    model, composition, features, objective = setup(tmp_path, arch)
    batch = collate(features, 0)
    batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    labels = batch.pop("labels")
    for p in (1, 3):
        w = W[:p]
        composition.set_weights(w)
        with torch.no_grad():
            logits = model(**{k: v.repeat(p, 1) for k, v in batch.items()}).logits
        composition.clear()
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.repeat(p, 1).flatten(), ignore_index=-100, reduction="none"
        )
        expected = loss.view(p, -1).sum(1).double() / (labels != -100).sum()
        got = Objective(composition, features, pad_token_id=0)(w).losses
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bad_examples(tmp_path):
    model = tiny_t5()
    with pytest.raises(ValueError, match="no few-shot examples"):
        encode_few_shot(model, tokenizer(), [])
    _, composition, features, _ = setup(tmp_path / "a")
    with pytest.raises(ValueError, match="no target tokens"):
        Objective(composition, [{"input_ids": [5, 6, 1], "labels": [-100]}], pad_token_id=0)
    with pytest.raises(ValueError, match="formula must be one of"):
        Objective(composition, features, pad_token_id=0, formula="l2")


def test_too_long_examples_are_truncated_with_a_warning(tmp_path):
    model = tiny_llama()  # 128 positions
    long = [{"input": "copy: " + " ".join(["kiwi"] * 200), "target": "kiwi"}]
    with pytest.warns(UserWarning, match="truncated 1 of 1"):
        features = encode_few_shot(model, tokenizer(add_eos=False), load_examples(long))
    assert len(features[0]["input_ids"]) == 128
    composition = Composition(model, load_bank(make_modules(model, tmp_path, 2, targets=["q_proj"])))
    assert torch.isfinite(Objective(composition, features, pad_token_id=0)([0.5, 0.5]).values).all()
