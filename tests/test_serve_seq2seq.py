"""Serving encoder-decoders: ``Seq2SeqEngine``'s continuous batching equals ``model.generate`` row by row.

The oracle for every row is the same prompt run alone through ``generate`` on a fresh model carrying only its
adapter (``load_adapter``, or the hub's ``Composition`` for a LoraHub composition).
"""

from __future__ import annotations

import pytest
import torch
from hub_modules import make_modules
from tiny_models import VOCAB, tiny_t5
from transformers import BartConfig, BartForConditionalGeneration, MarianConfig, MarianMTModel

from loraloom.adapters import load_adapter
from loraloom.hub import Composition, load_bank
from loraloom.serve import AdapterCache, Engine, LoraWeights, Request, SamplingParams
from loraloom.serve.seq2seq import Seq2SeqEngine, make_engine


def tiny_bart(seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=1, decoder_start_token_id=1, forced_eos_token_id=None,
    )  # fmt: skip
    return BartForConditionalGeneration(cfg).eval()


class _Tok:
    """Enough of a tokenizer for the engine: ids in, words out."""

    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


ARCHS = {"t5": (tiny_t5, ["q", "v"]), "bart": (tiny_bart, ["q_proj", "v_proj"])}


def _alone(factory, prompt, source, weights, max_tokens):
    """``generate`` on a fresh model carrying only this row's adapter (None: the base), greedy, one prompt."""
    model = factory()
    if weights is not None:
        Composition(model, source).set_weights(weights)
    elif source is not None:
        model = load_adapter(model, source)
    model.generation_config.eos_token_id = None  # as the engine below: every row runs its full length
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, num_beams=1)  # fmt: skip
    return out[0, 1:].tolist()  # after the decoder start token


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_mixed_batch_equals_generate_alone(tmp_path, arch):
    factory, targets = ARCHS[arch]
    model = factory()
    paths = make_modules(model, tmp_path, 2, r=4, targets=targets, seed=1, scale=0.5)
    cache = AdapterCache(tmp_path)
    bank = load_bank(paths)
    w = [0.7, -0.6]
    composed = LoraWeights.from_bank(bank, w, name="composed")
    plan = [None, "m00", "m01", composed, "m00", None, "m01"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3, 7, 12, 2, 6)]
    max_tokens = [6, 4, 8, 5, 7, 3, 6]
    engine = make_engine(model, _Tok(), max_batch=8)
    assert isinstance(engine, Seq2SeqEngine)
    engine.eos_ids = set()  # every row runs its full length: rows leave at different steps
    requests = [
        Request(p, cache.get(a) if isinstance(a, str) else a, SamplingParams(max_tokens=m, temperature=0))
        for p, a, m in zip(prompts, plan, max_tokens, strict=True)
    ]
    # Three join at once, two after two steps (mid-generation), the rest after one more step.
    engine.step(requests[:3])
    engine.step()
    engine.step(requests[3:5])
    engine.step(requests[5:])
    while engine.rows:
        engine.step()
    for r, p, a, m in zip(requests, prompts, plan, max_tokens, strict=True):
        source, weights = (bank, w) if a is composed else (str(tmp_path / a) if a else None, None)
        assert r.finish_reason == "length"
        assert r.output_ids == _alone(factory, p, source, weights, m), f"row {r.id} ({a})"
    assert len({tuple(r.output_ids) for r in requests}) > 3  # the adapters and prompts do change the outputs


def test_engines_refuse_the_other_kind_and_unbatchable_models():
    with pytest.raises(ValueError, match="encoder-decoder"):
        Engine(tiny_t5(), _Tok())
    torch.manual_seed(0)
    marian = MarianMTModel(MarianConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                        encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_attention_heads=2,
                                        decoder_attention_heads=2, pad_token_id=0, decoder_start_token_id=0))  # fmt: skip
    with pytest.raises(ValueError) as e:
        make_engine(marian, _Tok())
    assert "'marian' is not supported" in str(e.value) and len(str(e.value)) < 200
