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
    model = BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # positions that matter: a row given another row's positions decodes other tokens
        model.model.decoder.embed_positions.weight.normal_(0, 1.0)
    return model


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


# ---- the zoo over HTTP ---------------------------------------------------------------------------

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from loopback import serving  # noqa: E402

from loraloom import cli  # noqa: E402
from loraloom.cli import build_parser, options_of  # noqa: E402
from loraloom.models import load_base  # noqa: E402
from loraloom.serve.app import build_app  # noqa: E402
from loraloom.serve.options import ServeOptions  # noqa: E402
from loraloom.zoo import ARTIFACTS  # noqa: E402

KEY = "zoo-key"
# The zoo's bare prompts (no instruction): the base alone guesses, the modules answer (make_examples' first ones).
PROMPTS = ["task : arm cat car", "task : city cake bird milk hand", "task : red apple beach"]


def _zoo_options(*flags: str) -> ServeOptions:
    return options_of(ServeOptions, build_parser().parse_args(["serve", *flags]), named={})


def test_zoo_flag_sets_base_and_adapters_and_a_model_is_required(capsys):
    options = _zoo_options("--zoo", "--api-key", KEY)
    assert options.base == str(ARTIFACTS / "base") and options.adapters == str(ARTIFACTS / "modules")
    with pytest.raises(ValueError, match="--base FOLDER_OR_HUB_ID, or --zoo"):
        _zoo_options()
    with pytest.raises(ValueError, match="drop --base"):
        _zoo_options("--zoo", "--base", str(ARTIFACTS / "base"))
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "--base FOLDER_OR_HUB_ID, or --zoo" in err and len(err.splitlines()) == 1


def _zoo_expected(prompt: str, modules: dict[str, float] | None = None, max_tokens: int = 8) -> str:
    """Greedy ``generate`` in this process: the zoo's base with one module, or the modules composed."""
    model, tok = load_base(str(ARTIFACTS / "base"), "seq2seq")
    if modules and len(modules) == 1:
        model = load_adapter(model, str(ARTIFACTS / "modules" / next(iter(modules))))
    elif modules:
        names = sorted(modules)
        bank = load_bank([ARTIFACTS / "modules" / n for n in names])
        Composition(model, bank).set_weights([modules[n] for n in names])
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, num_beams=1)
    return tok.decode(out[0], skip_special_tokens=True)


def test_zoo_served_over_http_equals_generation_in_process():
    app = build_app(_zoo_options("--zoo", "--api-key", KEY, "--device", "cpu"))
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert any(m.id == "animal-is-bare" for m in client.models.list().data)
        # Several prompts of different lengths in one request: one batch, each row as alone.
        out = client.completions.create(model="animal-is-bare", prompt=PROMPTS, max_tokens=8, temperature=0)
        got = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
        assert got == [_zoo_expected(p, {"animal-is-bare": 1.0}) for p in PROMPTS]
        weights = {"animal-is-bare": 0.7, "color-the-bare": 0.6}
        composed = client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                             extra_body={"lorahub_weights": weights})  # fmt: skip
        assert composed.choices[0].text == _zoo_expected(PROMPTS[0], weights)
        assert got[:2] == ["it is cat", "it is bird"]  # the module's task (the base alone says "it is", "horse")
        assert composed.choices[0].text not in (got[0], _zoo_expected(PROMPTS[0]))  # the composition is its own
        stream = client.completions.create(model="animal-is-bare", prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                           stream=True)  # fmt: skip
        assert "".join(piece.choices[0].text for piece in stream) == got[1]
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="animal-is-bare", prompt=PROMPTS[0], max_tokens=4, echo=True)
        assert "echo" in str(e.value) and e.value.body["param"] == "echo"


# ---- the adapter cache: a hub id revalidated by its local snapshot ------------------------------------


def test_a_hub_adapter_is_reloaded_when_a_newer_snapshot_is_downloaded(tmp_path, monkeypatch):
    """A hub id's stamp is the snapshot its ref points at in the local hub cache (no request): a new download
    (refs/main moved to another commit) is loaded on the next use, the same snapshot is not read again."""
    import shutil

    import huggingface_hub.constants as hf

    model = tiny_t5()
    make_modules(model, tmp_path / "made", 2, r=4, targets=["q", "v"], seed=1, scale=0.5)
    repo = tmp_path / "hub" / "models--someone--adapter"
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # never a request: the local snapshot or nothing

    def download(module: str, commit: str) -> None:
        shutil.copytree(tmp_path / "made" / module, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    download("m00", "a" * 40)
    cache = AdapterCache(None)
    cache.add("h", "someone/adapter", load=False)
    first = cache.get("h")
    assert cache.get("h") is first and cache.loads == 1
    download("m01", "b" * 40)
    second = cache.get("h")
    assert second is not first and cache.loads == 2
    layer = next(iter(first.layers))
    assert not torch.equal(first.layers[layer].A, second.layers[layer].A)
