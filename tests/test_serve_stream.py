"""Throughput behaviour of the streaming path, checked by what it computes, never by how long it takes:
many concurrent streams each get what they get alone; a request joins as soon as a row frees (before the
batch drains); incremental detokenization gives the full decode's text; /metrics counts the engine's steps.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hub_modules import make_modules, tokenizer
from loopback import serving
from tiny_models import tiny_gpt2, tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraloom.models import load_base
from loraloom.serve import AdapterCache, Engine, Request, SamplingParams
from loraloom.serve.app import Access, create_app
from loraloom.serve.scheduler import Scheduler

pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

PROMPTS = ["copy: ant bee", "reverse: cat dog eel", "copy: fox", "copy: gnu hen jay kiwi lark", "reverse: owl pig"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def world(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"stream-{request.param}")
    tok = tokenizer(add_eos=False)
    model = tiny_llama(seed=3) if request.param == "llama" else tiny_gpt2(seed=3)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    targets = ["q_proj", "v_proj"] if request.param == "llama" else ["c_attn"]
    make_modules(model, root / "adapters", 2, r=4, targets=targets, scale=0.4, seed=1)
    return root


@pytest.fixture(scope="module")
def server(world):
    model, tok = load_base(str(world / "base"), "causal")
    engine = Engine(model, tok, max_batch=4)  # fewer rows than streams: requests wait, then join as rows free
    app = create_app(engine, AdapterCache(world / "adapters", limit_mib=64), Access())
    with serving(app) as url:
        yield {"url": url, "app": app}


def jobs() -> list[dict]:
    """12 requests over 2 adapters and the base, of 2 to 13 new tokens: rows finish at different steps."""
    names = ["m00", "m01", "base"]
    return [{"model": names[i % 3], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 2 + i, "temperature": 0}
            for i in range(12)]  # fmt: skip


async def stream_text(http: httpx.AsyncClient, body: dict) -> tuple[str, int]:
    """(the streamed text, completion tokens from the usage chunk)."""
    text, tokens = [], 0
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text += [c["text"] for c in chunk["choices"]]
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return "".join(text), tokens


def test_concurrent_streams_each_equal_their_own_output_alone(server):
    with httpx.Client(base_url=server["url"], timeout=60) as http:  # one at a time: each alone in the batch
        alone = [http.post("/v1/completions", json=body).json() for body in jobs()]

    async def together() -> list[tuple[str, int]]:
        async with httpx.AsyncClient(base_url=server["url"], timeout=60) as http:
            return await asyncio.gather(*(stream_text(http, body) for body in jobs()))

    streamed = asyncio.run(together())
    assert [s for s, _ in streamed] == [a["choices"][0]["text"] for a in alone]
    assert [n for _, n in streamed] == [a["usage"]["completion_tokens"] for a in alone]
    assert sum(n for _, n in streamed) > 12  # not all stopped at once: the batch really turned over


def test_metrics_count_the_engine_steps(server):
    def steps(http: httpx.Client) -> float:
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
        return families["loraloom:engine_steps"].samples[0].value

    no_eos = {str(t): -100 for t in server["app"].state.engine.eos_ids}  # runs to max_tokens
    body = {"model": "base", "prompt": "copy: ant", "max_tokens": 5, "temperature": 0, "logit_bias": no_eos}
    with httpx.Client(base_url=server["url"], timeout=60) as http:
        before = steps(http)
        assert http.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 5
        after = steps(http)
    # 5 tokens: the prefill's step makes 2, then 3 more; a last step may drop the finished row before the scrape.
    assert 4 <= after - before <= 5 and after <= server["app"].state.scheduler.steps


def test_a_request_joins_when_a_row_frees_not_when_the_batch_drains(world):
    """Batch of 2: a long row A, a short row B; C waits for a row and joins at the step right after B's last
    token (B's row leaves at the start of that step), while A is still running."""
    model, tok = load_base(str(world / "base"), "causal")
    engine = Engine(model, tok, max_batch=2)
    no_eos = {t: -100.0 for t in engine.eos_ids}  # rows run to max_tokens: when each finishes is known
    long_, short, waiting = (Request(tok("copy: ant bee")["input_ids"], None,
                                     SamplingParams(max_tokens=n, temperature=0, logit_bias=no_eos))
                             for n in (12, 3, 3))  # fmt: skip
    history: list[dict[int, tuple[int, bool]]] = []  # after each step: request id -> (tokens, finished)
    step = engine.step

    def recorded(new=()):  # in the model's thread, before anyone else sees the step's results
        changed = step(new)
        history.append({r.id: (len(r.output_ids), r.finished) for r in (long_, short, waiting)})
        return changed

    engine.step = recorded

    async def run() -> None:
        scheduler = Scheduler(engine)
        scheduler.start()
        for r in (long_, short, waiting):
            scheduler.submit(r)
        await scheduler.complete_all([long_, short, waiting])
        await scheduler.stop()

    asyncio.run(run())
    first_step = {r.id: next(i + 1 for i, h in enumerate(history) if h[r.id][0]) for r in (long_, short, waiting)}
    last_step = {r.id: next(i + 1 for i, h in enumerate(history) if h[r.id][1]) for r in (long_, short, waiting)}
    # A row's first step makes 2 tokens (the prefill's and one decode): B ends at step 2, A at step 11.
    assert last_step[short.id] == 2 and first_step[waiting.id] == 3  # counting B's finished row as taken: 4
    assert last_step[long_.id] == 11  # the batch had not drained when C joined
    assert [len(r.output_ids) for r in (long_, short, waiting)] == [12, 3, 3]


# ---- incremental detokenization -------------------------------------------------------------------

UNICODE = ["naïve café", "日本語のテキスト", "emoji 🙂🚀 mixed", "Ελληνικά και русский", "plain ascii words"]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme): a multi-byte character can take several tokens, one byte each."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(UNICODE[:2], trainer)  # the other texts split into single bytes
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def decode_one_at_a_time(tok, ids: list[int]) -> tuple[str, list[str]]:
    """(the text of ``ids`` added one token at a time, the text after each token)."""
    r = Request([0], params=SamplingParams(max_tokens=len(ids)))
    texts = []
    for i, token in enumerate(ids):
        r.output_ids.append(token)
        r.text += r.new_text(tok, final=i == len(ids) - 1)  # the last token: anything incomplete goes out as is
        texts.append(r.text)
    return r.text, texts


@pytest.mark.parametrize("kind", ["byte-level", "wordpiece"])
def test_incremental_text_equals_the_full_decode(kind):
    tok = byte_level_tokenizer() if kind == "byte-level" else tokenizer(add_eos=False)
    texts = UNICODE if kind == "byte-level" else ["copy: ant bee", "reverse: kiwi lark owlant", "cat: dog : owlant"]
    special = tok.convert_tokens_to_ids(tok.eos_token)
    for text in texts:
        ids = tok(text)["input_ids"]
        ids = ids[:2] + [special] + ids[2:]  # a skipped special token inside the output
        full = tok.decode(ids, skip_special_tokens=True)
        assert full == text  # the test's own premise: these texts round-trip
        out, partial = decode_one_at_a_time(tok, ids)
        assert out == full
        assert all(full.startswith(p) and "\ufffd" not in p for p in partial)  # never half a character
    if kind == "byte-level":
        assert any(len(tok(t)["input_ids"]) > len(t.encode()) // 2 for t in UNICODE[2:])  # multi-byte splits


def test_output_ending_in_half_a_character_keeps_it_as_the_full_decode_does():
    tok = byte_level_tokenizer()
    ids = tok("🙂")["input_ids"]
    assert len(ids) == 4  # one token per byte: cut after 2 of them
    out, partial = decode_one_at_a_time(tok, ids[:2])
    assert out == tok.decode(ids[:2], skip_special_tokens=True) and out.endswith("\ufffd") and partial[0] == ""
