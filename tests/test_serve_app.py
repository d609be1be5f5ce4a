"""The OpenAI-compatible server, driven by the official ``openai`` client on 127.0.0.1.

One server (uvicorn in a thread, a random free port) serves a tiny Llama saved with a word tokenizer and
a chat template, and a folder of LoRA adapters (one of them broken). Expected texts come from the base
model run alone with the adapter (``load_adapter`` / the hub's ``Composition``) and ``generate``.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from hub_modules import WORDS, make_modules, tokenizer
from loopback import serving
from tiny_models import tiny_llama

from loraloom.adapters import load_adapter
from loraloom.evaluate import generate
from loraloom.hub import Composition, load_bank

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from loraloom.models import load_base  # noqa: E402
from loraloom.serve import AdapterCache, Engine, Request, SamplingParams  # noqa: E402
from loraloom.serve.app import Access, create_app  # noqa: E402

TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}assistant :"
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = tiny_llama(seed=3)
    tok = tokenizer(add_eos=False)
    tok.chat_template = TEMPLATE
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    adapters = root / "adapters"
    make_modules(model, adapters, 3, r=4, targets=TARGETS, scale=0.4, seed=1)
    make_modules(model, adapters, 1, r=8, targets=["q_proj"], scale=0.4, seed=2, prefix="wide")
    broken = adapters / "broken"
    shutil.copytree(adapters / "m00", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    make_modules(model, root / "later", 1, r=4, targets=TARGETS, scale=0.4, seed=9, prefix="late")
    return root


@pytest.fixture(scope="module")
def server(world):
    model, tok = load_base(str(world / "base"), "causal")
    access = Access(manage=True, roots=(str(world / "adapters"), str(world / "later")))
    app = create_app(Engine(model, tok, max_batch=32), AdapterCache(world / "adapters", limit_mib=64), access)
    with serving(app) as url:
        yield {"url": url, "app": app}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected(world, prompt: str, adapter: str | None = None, weights: dict | None = None, max_tokens=8) -> str:
    """Greedy text of ``prompt`` from the base model carrying only this adapter / composition."""
    model, tok = load_base(str(world / "base"), "causal")
    if weights:
        names = sorted(weights)
        Composition(model, load_bank([world / "adapters" / n for n in names])).set_weights([weights[n] for n in names])
    elif adapter:
        model = load_adapter(model, world / "adapters" / adapter)
    return generate(model, tok, [prompt], max_new_tokens=max_tokens, batch_size=1)[0]


PROMPT = "copy: ant bee cat dog"


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["base", "broken", "m00", "m01", "m02", "wide00"]


@pytest.mark.parametrize("adapter", [None, "m01", "wide00"])
def test_completion_by_adapter_name(world, client, adapter):
    out = client.completions.create(model=adapter or "base", prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.choices[0].text == expected(world, PROMPT, adapter)
    assert out.usage.completion_tokens <= 8 and out.model == (adapter or "base")
    assert out.choices[0].finish_reason in ("stop", "length")


def test_adapters_change_the_output(world):
    texts = {expected(world, PROMPT, a, max_tokens=8) for a in [None, "m00", "m01", "m02"]}
    assert len(texts) > 1  # otherwise the name tests above could not tell adapters apart


def test_chat_completion_uses_the_template(world, client):
    messages = [{"role": "user", "content": "reverse: gnu hen"}]
    out = client.chat.completions.create(model="m02", messages=messages, max_tokens=6, temperature=0)
    prompt = TEMPLATE.replace("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}", "")
    want = expected(world, "user : reverse: gnu hen " + prompt, "m02", max_tokens=6)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want


def test_streaming_completion_and_chat(world, client):
    pieces = list(client.completions.create(model="m00", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == expected(world, PROMPT, "m00")
    assert pieces[-1].choices[0].finish_reason in ("stop", "length") and len(pieces) > 2
    chunks = list(
        client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "copy: owl"}], max_tokens=5, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    plain = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "copy: owl"}], max_tokens=5, temperature=0
    )
    assert text == plain.choices[0].message.content and chunks[0].choices[0].delta.role == "assistant"


def test_composed_weights_per_request(world, client):
    weights = {"m00": 0.9, "m02": -0.6}
    out = client.completions.create(
        model="base", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"lorahub_weights": weights}
    )
    assert out.choices[0].text == expected(world, PROMPT, weights=weights)


def test_error_cases(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found" and "no-such-adapter" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="base", prompt=PROMPT, max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        client.completions.create(model="base", prompt=" ".join(WORDS * 6), max_tokens=16)
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        client.completions.create(model="base", prompt="")
    with pytest.raises(openai.BadRequestError, match="not in the bank"):
        client.completions.create(model="base", prompt=PROMPT, extra_body={"lorahub_weights": {"m00": 1, "zz": 1}})
    with pytest.raises(openai.BadRequestError, match="r=8"):  # modules of different ranks do not compose
        client.completions.create(model="base", prompt=PROMPT, extra_body={"lorahub_weights": {"m00": 1, "wide00": 1}})
    with pytest.raises(openai.InternalServerError, match="broken.*adapter_model.safetensors"):
        client.completions.create(model="broken", prompt=PROMPT)
    raw = httpx.post(
        server["url"] + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    raw = httpx.post(server["url"] + "/v1/completions", json={"prompt": PROMPT})
    assert raw.status_code == 400 and "model" in raw.json()["error"]["message"]
    # The server is still up and serving after all of these.
    assert client.completions.create(model="m00", prompt=PROMPT, max_tokens=2, temperature=0).usage.completion_tokens


def test_no_chat_template_is_a_400(world):
    model, tok = load_base(str(world / "base"), "causal")
    tok.chat_template = None
    from fastapi.testclient import TestClient

    with TestClient(create_app(Engine(model, tok), AdapterCache(world / "adapters"))) as c:
        r = c.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_disconnect_mid_stream_frees_the_slot(server, client):
    engine, scheduler = server["app"].state.engine, server["app"].state.scheduler
    eos, engine.eos_ids = engine.eos_ids, set()  # no early stop: the row runs until it is freed
    try:
        cancelled = scheduler.cancelled
        body = {"model": "m01", "messages": [{"role": "user", "content": "copy: ant"}], "max_tokens": 100,
                "temperature": 0, "stream": True}  # fmt: skip
        with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body) as r:
            assert next(r.iter_lines()).startswith("data: ")  # the first chunk names the role: then hang up
        deadline = time.monotonic() + 10
        # Cancelled before it finished (not run to its 100 tokens), and its row left at a token boundary.
        while scheduler.cancelled == cancelled or engine.rows or scheduler.waiting:
            assert time.monotonic() < deadline, "the abandoned request was never freed"
            time.sleep(0.01)
    finally:
        engine.eos_ids = eos
    out = client.completions.create(model="m01", prompt=PROMPT, max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1 and out.choices[0].finish_reason in ("stop", "length")


def test_disconnect_while_waiting_for_a_whole_completion_frees_the_slot(server, monkeypatch):
    engine, scheduler = server["app"].state.engine, server["app"].state.scheduler
    monkeypatch.setattr(engine, "eos_ids", set())
    monkeypatch.setattr("loraloom.serve.app.DISCONNECT_POLL", 0.05)
    slow = engine.step
    monkeypatch.setattr(engine, "step", lambda new=(): (time.sleep(0.02), slow(new))[1])  # >= 2 s for 100 tokens
    cancelled = scheduler.cancelled
    body = {"model": "m02", "prompt": PROMPT, "max_tokens": 100, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server["url"] + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while scheduler.cancelled == cancelled or engine.rows:
        assert time.monotonic() < deadline, "the abandoned request was never freed"
        time.sleep(0.01)


def test_add_and_remove_adapters_while_serving(world, server, client):
    url = server["url"] + "/v1/adapters"
    r = httpx.post(url, json={"name": "late", "source": str(world / "later" / "late00")})
    assert r.status_code == 200, r.text
    assert "late" in [m.id for m in client.models.list()]
    out = client.completions.create(model="late", prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.choices[0].text == expected(world, PROMPT, "../later/late00")
    bad = httpx.post(url, json={"name": "bad", "source": str(world / "nowhere")})  # outside the allowed folders
    assert bad.status_code == 403 and "nowhere" not in bad.json()["error"]["message"]
    assert httpx.delete(url + "/late").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt=PROMPT, max_tokens=3)


def test_load_32_clients_200_requests_match_one_at_a_time(world, server):
    """Bounded load on loopback: no errors, and every output equals serving that request alone."""
    rng = random.Random(0)
    choices = [("base", None), ("m00", None), ("m01", None), ("m02", None), ("wide00", None),
               ("base", {"m00": 0.5, "m01": 0.5}), ("base", {"m01": -1.0, "m02": 1.2})]  # fmt: skip
    jobs = []
    for i in range(200):
        model, weights = rng.choice(choices)
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        jobs.append((model, weights, prompt, rng.randint(1, 10), i % 5 == 0))

    async def run():
        client = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
        queue: asyncio.Queue = asyncio.Queue()
        for i, job in enumerate(jobs):
            queue.put_nowait((i, job))
        results: dict[int, str] = {}

        async def worker():
            while not queue.empty():
                i, (model, weights, prompt, n, stream) = queue.get_nowait()
                extra = {"lorahub_weights": weights} if weights else None
                out = await client.completions.create(
                    model=model, prompt=prompt, max_tokens=n, temperature=0, stream=stream, extra_body=extra
                )
                results[i] = "".join([c.choices[0].text async for c in out]) if stream else out.choices[0].text

        await asyncio.gather(*(worker() for _ in range(32)))
        await client.close()
        return results

    start = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - start
    assert len(results) == 200

    # One at a time, on a separate engine over the same files.
    model, tok = load_base(str(world / "base"), "causal")
    engine, cache = Engine(model, tok, max_batch=1), AdapterCache(world / "adapters")
    for i, (name, weights, prompt, n, _) in enumerate(jobs):
        adapter = cache.compose(weights) if weights else (cache.get(name) if name != "base" else None)
        (alone,) = engine.generate(
            [Request(tok(prompt)["input_ids"], adapter, SamplingParams(max_tokens=n, temperature=0))]
        )
        assert results[i] == alone.text, f"request {i}: {jobs[i]}"
    nonempty = sum(bool(t) for t in results.values())
    assert nonempty > 100, "most outputs should hold text, or the comparison above says little"
    print(f"load test: 200 requests, 32 clients, {elapsed:.2f}s, {nonempty} non-empty outputs")


def test_cli_serve_subprocess(world):
    """``loraloom serve`` starts, lists the adapters, answers one completion, and stops cleanly on Ctrl-C."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "loraloom", "serve", "--base", str(world / "base"), "--adapters",
           str(world / "adapters"), "--port", str(port), "--max-batch", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "loraloom serve did not come up"
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]][:3] == ["base", "broken", "m00"]
        body = {"model": "m00", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
        assert r.json()["choices"][0]["text"] == expected(world, PROMPT, "m00")
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop, without uvicorn's re-raised KeyboardInterrupt
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Application shutdown complete" in out, out
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)


def test_named_adapters_load_on_first_use(world):
    from fastapi.testclient import TestClient

    from loraloom.serve.app import ServeOptions, build_app

    options = ServeOptions(base=str(world / "base"), named={"late": str(world / "later" / "late00")})
    with TestClient(build_app(options)) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", "late"]
        assert c.app.state.cache.cached() == []  # nothing read until a request names it
        r = c.post("/v1/completions", json={"model": "late", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.json()["choices"][0]["text"] == expected(world, PROMPT, "../later/late00")
    with pytest.raises(ValueError, match="base"):
        ServeOptions(base=str(world / "base"), named={"base": "x"})


def test_cli_serve_bad_arguments(world, capsys):
    from loraloom.cli import main

    assert main(["serve", "--base", str(world / "base"), "--adapters", str(world / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert (
        main(["serve", "--base", str(world / "base"), "--adapters", str(world / "adapters"), "--max-batch", "0"]) == 2
    )
