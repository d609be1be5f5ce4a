"""Rows of every adapter type in one batch (LoRA, rsLoRA with rank/alpha patterns, lora_bias, DoRA, IA3,
FourierFT, the base), cache revalidation, and per-adapter loads.

The adapters are PEFT's own folders (PEFT 0.21 writes them from random weights). The oracle for each row is
that row run alone through a fresh base carrying only its adapter, both with ``ll.load_adapter`` and with
PEFT; the server's rows must match both within 1e-5.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path

import peft
import pytest
import torch
from hub_modules import make_modules, tokenizer
from loopback import serving
from tiny_models import VOCAB, tiny_gpt2, tiny_llama

import loraloom as ll
from loraloom.adapters import AdapterError
from loraloom.serve import AdapterCache, AdapterWeights, Engine, MultiLora, Request, SamplingParams, UnknownAdapter
from loraloom.serve.multi import UnservableAdapter

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# Per architecture: LoRA's targets, IA3's targets and feed-forward ones, FourierFT's targets (two of them,
# a second FourierFT on other layers with another n and seed, so rows of one type differ in size).
TARGETS = {
    "llama": dict(
        lora=["q_proj", "v_proj"],
        ia3=(["k_proj", "v_proj", "down_proj"], ["down_proj"]),
        fourier=(["q_proj", "v_proj"], ["q_proj", "o_proj", "up_proj"]),
    ),
    "gpt2": dict(lora=["c_attn"], ia3=(["c_attn", "mlp.c_proj"], ["mlp.c_proj"]), fourier=(["mlp.c_proj"], ["c_attn"])),
}
KINDS = ["lora", "rslora", "lorabias", "dora", "ia3", "fourierft", "fourier2"]


def peft_configs(arch: str) -> dict[str, peft.PeftConfig]:
    t = TARGETS[arch]
    lora = dict(target_modules=t["lora"], init_lora_weights=False)
    ia3_targets, feedforward = t["ia3"]
    return {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, **lora),
        # rsLoRA; the first target at rank 2 (rank_pattern), the last with its own alpha (alpha_pattern).
        "rslora": peft.LoraConfig(
            r=6, lora_alpha=5, use_rslora=True, rank_pattern={t["lora"][0]: 2}, alpha_pattern={t["lora"][-1]: 3}, **lora
        ),
        "lorabias": peft.LoraConfig(r=4, lora_alpha=8, lora_bias=True, **lora),
        "dora": peft.LoraConfig(r=4, lora_alpha=6, use_dora=True, **lora),
        "ia3": peft.IA3Config(target_modules=ia3_targets, feedforward_modules=feedforward, init_ia3_weights=False),
        "fourierft": peft.FourierFTConfig(n_frequency=300, scaling=10.0, target_modules=t["fourier"][0]),
        "fourier2": peft.FourierFTConfig(
            n_frequency=120, scaling=7.0, random_loc_seed=5, target_modules=t["fourier"][1]
        ),
    }


def make_peft_folder(arch: str, config: peft.PeftConfig, folder: Path, seed: int) -> peft.PeftModel:
    """A PEFT model with random weights (DoRA's magnitude moved off its initial norm, lora_bias non-zero), saved."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(FACTORIES[arch](), config).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
            elif "lora_B" in name and name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    pm.save_pretrained(folder)
    return pm


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """arch -> (folder of adapter folders, {kind: PEFT model}) made once per architecture."""
    made = {}

    def world(arch: str):
        if arch not in made:
            root = tmp_path_factory.mktemp(f"rows-{arch}")
            models = {
                k: make_peft_folder(arch, c, root / k, seed=i) for i, (k, c) in enumerate(peft_configs(arch).items())
            }
            made[arch] = (root, models)
        return made[arch]

    return world


def ids_batch(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def prefill_and_step(model, ids: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill logits of ``ids`` and the logits of one decode token ``step`` after them (KV cache)."""
    out = model(input_ids=ids, use_cache=True)
    return out.logits, model(input_ids=step, past_key_values=out.past_key_values, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_mixed_batch_of_every_type_matches_each_adapter_alone_and_peft(worlds, arch):
    root, peft_models = worlds(arch)
    cache = AdapterCache(root)
    plan = [None, *KINDS, "lora", "ia3", "fourierft", None, "dora"]  # repeats: rows of one adapter share its slot
    rows = [cache.get(k) if k else None for k in plan]
    assert [cache.get(k).kind for k in KINDS] == ["lora", "lora", "lora", "dora", "ia3", "fourierft", "fourierft"]
    ids, step = ids_batch(len(plan), 7, seed=1), ids_batch(len(plan), 1, seed=2)
    model = FACTORIES[arch]()
    MultiLora(model).set_rows(rows)
    got_prefill, got_step = prefill_and_step(model, ids, step)
    base_prefill, _ = prefill_and_step(FACTORIES[arch](), ids, step)
    for i, kind in enumerate(plan):
        row, row_step = ids[i : i + 1], step[i : i + 1]
        want = prefill_and_step(
            ll.load_adapter(FACTORIES[arch](), root / kind, verbose=False) if kind else FACTORIES[arch](), row, row_step
        )
        torch.testing.assert_close(got_prefill[i : i + 1], want[0], atol=1e-5, rtol=1e-5, msg=f"row {i} ({kind})")
        torch.testing.assert_close(got_step[i : i + 1], want[1], atol=1e-5, rtol=1e-5, msg=f"row {i} ({kind}) decode")
        if kind:
            oracle = prefill_and_step(peft_models[kind], row, row_step)
            torch.testing.assert_close(got_prefill[i : i + 1], oracle[0], atol=1e-5, rtol=1e-5, msg=f"{kind} vs PEFT")
            torch.testing.assert_close(got_step[i : i + 1], oracle[1], atol=1e-5, rtol=1e-5, msg=f"{kind} vs PEFT")
            assert (got_prefill[i] - base_prefill[i]).abs().max() > 1e-3, f"{kind} changes nothing: a vacuous test"


def test_lora_rows_do_not_pay_for_other_types(worlds):
    """A LoRA-only batch runs the two batched matmuls alone; in a mixed batch each group holds only its rows."""
    root, _ = worlds("llama")
    cache = AdapterCache(root)
    model = tiny_llama()
    multi = MultiLora(model)
    multi.set_rows([cache.get("lora"), None, cache.get("rslora")])
    q = multi.layers["model.layers.0.self_attn.q_proj"]
    assert q.A.shape[0] == 3 and (q.dora, q.ia3_in, q.ia3_out, q.fourier, q.lora_bias) == (None,) * 5
    multi.set_rows([cache.get("ia3"), cache.get("lora"), cache.get("fourierft"), cache.get("dora"), None])
    assert q.fourier[0].tolist() == [2] and q.dora[0].tolist() == [3]
    assert q.B[[0, 2, 4]].abs().sum() == 0  # the LoRA stacks of non-LoRA rows are zero slots
    down = multi.layers["model.layers.0.mlp.down_proj"]
    assert down.ia3_in[0].tolist() == [0] and down.A is None and down.fourier is None
    multi.clear()
    assert all(layer.A is None and layer.fourier is None for layer in multi.layers.values())


class Tok:
    """Decodes ids as numbers (the engine only needs decode and the special ids)."""

    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def greedy_alone(folder: Path | None, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of a fresh base carrying only this adapter (None: the base), up to the first eos."""
    ref = ll.load_adapter(tiny_llama(), folder, verbose=False) if folder else tiny_llama()
    out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=2, pad_token_id=0
    )
    out = out[0, len(prompt) :].tolist()
    return out[: out.index(2)] if 2 in out else out


def test_engine_continuous_batching_over_every_type_matches_generate_alone(worlds):
    root, _ = worlds("llama")
    cache = AdapterCache(root)
    engine = Engine(tiny_llama(), Tok(), max_batch=4)  # rows join and leave while others decode
    names = [None, *KINDS]
    g = torch.Generator().manual_seed(7)
    prompts = [
        torch.randint(3, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(2, 10, (12,), generator=g)
    ]
    requests = [
        Request(
            p, cache.get(names[i % 8]) if names[i % 8] else None, SamplingParams(max_tokens=3 + i % 5, temperature=0)
        )
        for i, p in enumerate(prompts)
    ]
    engine.generate(requests)
    for i, r in enumerate(requests):
        folder = root / names[i % 8] if names[i % 8] else None
        assert r.output_ids == greedy_alone(folder, prompts[i], r.params.max_tokens), f"request {i} ({names[i % 8]})"


@pytest.mark.parametrize(
    "field, config",
    [
        ("bias", dict(peft_type="LORA", bias="lora_only")),
        ("modules_to_save", dict(peft_type="LORA", modules_to_save=["lm_head"])),
        ("init_lora_weights", dict(peft_type="LORA", init_lora_weights="pissa")),
        ("bias", dict(peft_type="FOURIERFT", n_frequency=100, bias="all")),
        ("target_modules", dict(peft_type="LORA", target_modules=["embed_tokens", "q_proj"])),
    ],
)
def test_what_rows_cannot_carry_is_refused_naming_the_field(tmp_path, field, config):
    config = dict(config)
    kind = config.pop("peft_type")
    make = {"LORA": peft.LoraConfig, "FOURIERFT": peft.FourierFTConfig}[kind]
    config.setdefault("target_modules", ["q_proj", "v_proj"])
    make_peft_folder("llama", make(**config), tmp_path / "x", seed=0)
    with pytest.raises(UnservableAdapter, match=field):
        AdapterCache(tmp_path).get("x")


def test_cache_revalidates_a_changed_folder_and_drops_a_deleted_one(tmp_path, worlds, monkeypatch):
    root, _ = worlds("llama")
    shutil.copytree(root / "lora", tmp_path / "x")
    cache = AdapterCache(tmp_path)
    engine = Engine(tiny_llama(), Tok(), max_batch=4)
    prompt = ids_batch(1, 5, seed=3)[0].tolist()

    def run(adapter) -> list[int]:
        return engine.generate([Request(prompt, adapter, SamplingParams(max_tokens=4, temperature=0))])[0].output_ids

    first = cache.get("x")
    assert cache.get("x") is first and cache.loads == 1  # unchanged: not read again
    assert run(first) == greedy_alone(root / "lora", prompt, 4)
    shutil.rmtree(tmp_path / "x")
    shutil.copytree(root / "ia3", tmp_path / "x")  # another adapter (another type) under the same name
    second = cache.get("x")
    assert second is not first and second.kind == "ia3" and cache.loads == 2
    assert run(second) == greedy_alone(root / "ia3", prompt, 4)
    shutil.rmtree(tmp_path / "x")
    with pytest.raises(UnknownAdapter, match="'x'"):
        cache.get("x")
    assert cache.cached() == []  # its memory is freed too
    # A registered folder (an absolute path, as POST /v1/adapters registers) that is deleted.
    shutil.copytree(root / "dora", tmp_path / "elsewhere" / "y")
    cache.add("y", (tmp_path / "elsewhere" / "y").resolve())
    shutil.rmtree(tmp_path / "elsewhere" / "y")
    with pytest.raises(UnknownAdapter, match="'y'.*deleted"):
        cache.get("y")
    # A relative folder (as --adapter NAME=FOLDER may give), deleted once cached: not mistaken for a hub id.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root / "ia3", tmp_path / "rel" / "z")
    cache.add("z", "rel/z")
    shutil.rmtree(tmp_path / "rel" / "z")
    with pytest.raises(UnknownAdapter, match="'z'.*deleted"):
        cache.get("z")
    assert cache.cached() == []


def test_a_rewrite_keeping_mtime_and_size_is_still_seen(tmp_path):
    """copytree keeps the files' mtimes; a same-size rewrite is then told apart by its inode change time."""
    make_modules(tiny_llama(), tmp_path / "a", 1, targets=["q_proj"], seed=1)
    make_modules(tiny_llama(), tmp_path / "b", 1, targets=["q_proj"], seed=2)
    shutil.copytree(tmp_path / "a" / "m00", tmp_path / "pool" / "x")
    cache = AdapterCache(tmp_path / "pool")
    first = cache.get("x")
    shutil.rmtree(tmp_path / "pool" / "x")
    shutil.copytree(tmp_path / "b" / "m00", tmp_path / "pool" / "x")
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # same mtime and size as before
        os.utime(tmp_path / "pool" / "x" / name, ns=((tmp_path / "a" / "m00" / name).stat().st_mtime_ns,) * 2)
    second = cache.get("x")
    assert second is not first and not torch.equal(
        second.layers["model.layers.0.self_attn.q_proj"].A, first.layers["model.layers.0.self_attn.q_proj"].A
    )


def slow_loader(monkeypatch, slow_name: str) -> tuple[threading.Event, threading.Event, list[str]]:
    """Make reading ``slow_name`` wait for ``release`` (set ``started`` first): a load that takes long.
    The list returned collects the name of every read."""
    started, release, reads = threading.Event(), threading.Event(), []
    real = AdapterWeights.from_folder

    def from_folder(source, name, dtype=torch.float32):
        reads.append(name)
        if name == slow_name:
            started.set()
            assert release.wait(30), "the test never released the slow load"
        return real(source, name, dtype)

    monkeypatch.setattr(AdapterWeights, "from_folder", staticmethod(from_folder))
    return started, release, reads


def test_a_slow_load_blocks_neither_cached_adapters_nor_other_loads(tmp_path, monkeypatch):
    make_modules(tiny_llama(), tmp_path, 3, targets=["q_proj"])
    (tmp_path / "m02").rename(tmp_path / "slow")
    cache = AdapterCache(tmp_path)
    cached = cache.get("m00")
    started, release, reads = slow_loader(monkeypatch, "slow")
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("slow"))) for _ in range(2)]
    threads[0].start()
    assert started.wait(10)
    threads[1].start()  # a second request for the adapter being read waits for that same read
    t0 = time.monotonic()
    assert cache.get("m00") is cached
    assert cache.get("m01").name == "m01"  # another adapter loads meanwhile
    assert time.monotonic() - t0 < 2.0 and threads[0].is_alive()
    release.set()
    for t in threads:
        t.join(10)
    assert len(got) == 2 and got[0] is got[1] and reads == ["slow", "m01"]  # one read of slow for both


def test_a_failed_load_reaches_every_waiter_and_is_retried(tmp_path, monkeypatch):
    make_modules(tiny_llama(), tmp_path, 1, targets=["q_proj"])
    weights = tmp_path / "m00" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:50])
    cache = AdapterCache(tmp_path)
    started, release, reads = slow_loader(monkeypatch, "m00")
    errors = []

    def ask():
        try:
            cache.get("m00")
        except AdapterError as e:
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    threads[0].start()
    assert started.wait(10)
    for t in threads[1:]:
        t.start()
    time.sleep(0.2)  # the others are now waiting on the first one's read
    release.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 3 and all("adapter_model.safetensors" in str(e) for e in errors) and reads == ["m00"]
    assert cache.cached() == [] and cache.loads == 0  # not cached: the next use reads again
    weights.write_bytes(good)
    assert cache.get("m00").kind == "lora" and cache.loads == 1


# ---- through the HTTP server, with the official openai client ---------------------------------------------

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from loraloom.evaluate import generate  # noqa: E402
from loraloom.models import load_base  # noqa: E402
from loraloom.serve.app import create_app  # noqa: E402

PROMPT = "copy: ant bee cat dog"


@pytest.fixture(scope="module")
def server(worlds, tmp_path_factory):
    root = tmp_path_factory.mktemp("rows-server")
    tiny_llama().save_pretrained(root / "base")
    tokenizer(add_eos=False).save_pretrained(root / "base")
    shutil.copytree(worlds("llama")[0], root / "adapters")
    model, tok = load_base(str(root / "base"), "causal")
    app = create_app(Engine(model, tok, max_batch=8), AdapterCache(root / "adapters", limit_mib=64))
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        yield {"root": root, "app": app, "client": client, "url": f"{url}/v1"}


def expected(root: Path, adapter: str | None, prompt: str = PROMPT, max_tokens: int = 8) -> str:
    model, tok = load_base(str(root / "base"), "causal")
    if adapter:
        model = ll.load_adapter(model, root / "adapters" / adapter, verbose=False)
    return generate(model, tok, [prompt], max_new_tokens=max_tokens, batch_size=1)[0]


def test_http_concurrent_requests_of_every_type_match_each_alone(server):
    """One burst of requests over every type (and the base), batched together by the server."""
    jobs = [(k, p) for k in ["base", *KINDS] for p in (PROMPT, "reverse: gnu hen owl")]

    async def run():
        client = openai.AsyncOpenAI(base_url=server["url"], api_key="unused", max_retries=0, timeout=60)
        outs = await asyncio.gather(
            *[client.completions.create(model=k, prompt=p, max_tokens=8, temperature=0) for k, p in jobs]
        )
        await client.close()
        return [o.choices[0].text for o in outs]

    texts = asyncio.run(run())
    for (kind, prompt), text in zip(jobs, texts, strict=True):
        assert text == expected(server["root"], None if kind == "base" else kind, prompt), kind
    assert len({expected(server["root"], k) for k in ["lora", "dora", "ia3", "fourierft"]}) > 1


def test_http_changed_folder_is_reloaded_and_deleted_one_is_a_404(server):
    client, adapters = server["client"], server["root"] / "adapters"
    shutil.copytree(adapters / "lora", adapters / "swap")
    ask = dict(model="swap", prompt=PROMPT, max_tokens=8, temperature=0)
    assert client.completions.create(**ask).choices[0].text == expected(server["root"], "lora")
    shutil.rmtree(adapters / "swap")
    shutil.copytree(adapters / "fourierft", adapters / "swap")
    assert client.completions.create(**ask).choices[0].text == expected(server["root"], "fourierft")
    shutil.rmtree(adapters / "swap")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(**ask)
    assert e.value.body["code"] == "model_not_found" and "'swap'" in e.value.body["message"]
    assert "swap" not in [m.id for m in client.models.list()]


def test_http_unservable_adapter_is_a_400_naming_the_field(server):
    make_peft_folder(
        "llama", peft.LoraConfig(target_modules=["q_proj"], bias="all"), server["root"] / "adapters" / "biased", 0
    )
    with pytest.raises(openai.BadRequestError) as e:
        server["client"].completions.create(model="biased", prompt=PROMPT, max_tokens=2)
    assert "'bias'" in e.value.body["message"] and e.value.body["param"] == "model"
    assert server["client"].completions.create(model="dora", prompt=PROMPT, max_tokens=2).usage.completion_tokens


def test_http_slow_load_does_not_delay_requests_for_cached_adapters(server, monkeypatch):
    client, adapters = server["client"], server["root"] / "adapters"
    shutil.copytree(adapters / "ia3", adapters / "slow")
    client.completions.create(model="dora", prompt=PROMPT, max_tokens=1)  # cached before the slow load starts
    started, release, _ = slow_loader(monkeypatch, "slow")
    slow = []
    waiting = threading.Thread(
        target=lambda: slow.append(client.completions.create(model="slow", prompt=PROMPT, max_tokens=8, temperature=0))
    )
    waiting.start()
    try:
        assert started.wait(10)
        t0 = time.monotonic()
        out = client.completions.create(model="dora", prompt=PROMPT, max_tokens=8, temperature=0)
        assert time.monotonic() - t0 < 5.0 and waiting.is_alive()  # done while "slow" is still loading
        assert out.choices[0].text == expected(server["root"], "dora")
    finally:
        release.set()
        waiting.join(30)
    assert slow[0].choices[0].text == expected(server["root"], "slow")
