"""Benchmark: serving many LoRA adapters on one base model.

(a) Mixed-adapter forward pass, batch of 32 rows with 1, 8 or 32 distinct adapters (rows assigned round
robin), prefill (32 x 32 prompt tokens) and decode (one token per row after a 32-token KV cache):
- base:     the model without adapters;
- peft:     PEFT with every adapter loaded, ``model(..., adapter_names=[...])`` (it loops over the distinct
            adapters of the batch: gather rows, run, scatter);
- loraloom: ``serve.MultiLora``: one gather + two batched matmuls per layer. Prefill includes building the
            batch plan (``set_rows``: stacking the batch's adapters), as a new batch would; decode reuses it,
            as the engine does between rows joining or leaving.
The model has Llama's layout at a reduced size (random weights; --hidden etc.), LoRA r=16 on q,k,v,o.
Targets: loraloom >= 2x PEFT at 8 and 32 adapters, <= 1.3x the base model's time.

(b) The server (``loraloom serve`` in a subprocess, the same model, 8 adapters) under 1, 4 and 16
concurrent clients on loopback, each client sending its share of the same requests (greedy, up to 32 new
tokens, adapters round robin): completion tokens/s and p50/p99 request latency. One client is serving
the requests one at a time; target: >= 4x its throughput at 16 clients.

(c) Streams: N concurrent streaming clients (N = 32 and 64; httpx, SSE, on loopback) against one server
(--max-batch 64), each client sending its next request as soon as its last one ended (3 each; 16-47 new
tokens, so rows finish at different steps and new requests join a running batch), vs the same requests run
by ``Engine.generate`` in this process with max_batch N. Reports tokens/s of both, HTTP/engine, and the
time to each request's first streamed text (p50/p99). Targets: HTTP >= 0.8x the engine; 64 streams >= 32.

(d) One mixed batch of 32 rows (8 adapters + base) decoded to 32 new tokens, greedy: loraloom's
``Engine.generate`` vs PEFT's ``generate(adapter_names=...)`` and the plain base ``generate`` (tokens before
eos, per second); also counts the rows whose tokens equal PEFT's.

Peers run interleaved in rotated order every round (``common.interleave``); a ratio is the median over
rounds of per-round ratios. (a) is timed in CPU time of this single-threaded process (wall time beside it),
which a shared machine's load barely moves; (b)-(d) can only be wall time. Read the ratios, not the absolute
times. The server subprocess and this process (the clients) share the machine's cores.

    .venv/bin/python benchmarks/serving.py [--quick] [--rounds N] [--threads N]
        [--only forward server streams generate] [--streams 32 64] [--per-stream 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
import peft
import torch
import transformers
from common import interleave, median
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from loraloom.adapters import LoraConfig, write_adapter_folder
from loraloom.models import load_base
from loraloom.serve import AdapterCache, Engine, MultiLora, Request, SamplingParams
from loraloom.zoo.base import train_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, PROMPT_LEN, RANK = 32, 32, 16


def model_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_model(config: LlamaConfig) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def write_adapters(model: LlamaForCausalLM, root: Path, n: int) -> list[Path]:
    """``n`` PEFT LoRA folders with random A and B (r=16 on q,k,v,o of every layer)."""
    g = torch.Generator().manual_seed(1)
    names = [name for name, m in model.named_modules() if name.split(".")[-1] in TARGETS]
    paths = []
    for i in range(n):
        tensors = {}
        for name in names:
            layer = model.get_submodule(name)
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(RANK, layer.in_features, generator=g) * 0.02
            tensors[f"base_model.model.{name}.lora_B.weight"] = (
                torch.randn(layer.out_features, RANK, generator=g) * 0.02
            )
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, base_model_name_or_path="bench")
        paths.append(write_adapter_folder(root / f"a{i:02d}", config, tensors))
    return paths


# ---- (a) the forward pass --------------------------------------------------------------------------


class Peer:
    """One model (base, peft or loraloom) with a prefill call and a decode call for a given adapter mix."""

    def __init__(self, kind: str, config: LlamaConfig, paths: list[Path], device: str = "cpu") -> None:
        self.kind = kind
        model = build_model(config)
        if kind == "peft":
            model = peft.PeftModel.from_pretrained(model, str(paths[0]), adapter_name="a00")
            for i, p in enumerate(paths[1:], start=1):
                model.load_adapter(str(p), adapter_name=f"a{i:02d}")
            model.eval()
        elif kind == "loraloom":
            cache = AdapterCache(paths[0].parent, limit_mib=4096)
            self.adapters = [cache.get(p.name) for p in paths]
            self.multi = MultiLora(model.to(device))
        self.model = model.to(device)
        self.device = device

    def set_mix(self, n_adapters: int, ids: torch.Tensor) -> None:
        self.rows = [i % n_adapters for i in range(BATCH)]
        self.ids = ids = ids.to(self.device)
        self.mask = torch.ones_like(ids)
        with torch.no_grad():
            self.cache = self._forward(ids, self.mask, DynamicCache(), plan=True)[1]
        self.next_ids = ids[:, -1:]
        self.decode_mask = torch.ones(BATCH, PROMPT_LEN + 1, dtype=torch.long, device=self.device)

    def _forward(self, ids, mask, cache, plan: bool):
        kwargs = {}
        if self.kind == "peft":
            kwargs["adapter_names"] = [f"a{r:02d}" for r in self.rows]
        elif self.kind == "loraloom":
            if plan:
                self.multi.clear()
            self.multi.set_rows([self.adapters[r] for r in self.rows])
        out = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                         logits_to_keep=1, **kwargs)  # fmt: skip
        return out.logits, out.past_key_values

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        return self._forward(self.ids, self.mask, DynamicCache(), plan=True)[0]

    @torch.no_grad()
    def decode(self) -> torch.Tensor:
        logits, cache = self._forward(self.next_ids, self.decode_mask, self.cache, plan=False)
        cache.crop(-1)  # back to the prompt-length cache for the next call
        return logits


def cpu_and_wall(fn, steps: int) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds) of ``steps`` calls after one warm-up call.

    With one torch thread, this process's CPU time barely moves when other processes load the machine,
    so the ratios are read on it; wall time is printed beside them.
    """
    fn()
    cpu, wall = [], []
    for _ in range(steps):
        c, w = time.process_time(), time.perf_counter()
        fn()
        if torch.cuda.is_available():  # the time of the work, not of queueing it
            torch.cuda.synchronize()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return median(cpu), median(wall)


def bench_forward(args: argparse.Namespace) -> list[str]:
    config = model_config(args)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(build_model(config), Path(tmp), max(args.adapters))
        peers = {kind: Peer(kind, config, paths, args.device) for kind in ("base", "peft", "loraloom")}
        ids = torch.randint(3, config.vocab_size, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(2))
        print(f"model: Llama layout, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; LoRA r={RANK} "
              f"on {','.join(TARGETS)}; batch {BATCH}; prefill {BATCH}x{PROMPT_LEN}, decode 1 token after {PROMPT_LEN}; "
              f"CPU ms per call (ratios per round on CPU time, then median; wall-clock ratio beside)")  # fmt: skip
        print(f"{'adapters':>8} {'phase':>7} {'base':>8} {'peft':>8} {'loraloom':>8} {'peft/loraloom':>13} "
              f"{'loraloom/base':>13} {'added: peft/loraloom':>20} {'wall peft/loraloom':>18} {'max|diff|':>9}")  # fmt: skip
        for n in args.adapters:
            for peer in peers.values():
                peer.set_mix(n, ids)
            for phase in ("prefill", "decode"):
                diff = (getattr(peers["peft"], phase)() - getattr(peers["loraloom"], phase)()).abs().max().item()
                steps = args.steps if phase == "decode" else max(2, args.steps // 6)
                calls = {
                    k: (lambda p=p, ph=phase, st=steps: cpu_and_wall(getattr(p, ph), st)) for k, p in peers.items()
                }
                runs = interleave(calls, args.rounds, desc=f"{n} adapters {phase}")
                cpu = {k: [c for c, _ in v] for k, v in runs.items()}
                wall = {k: [w for _, w in v] for k, v in runs.items()}

                def per_round(t, a, b):
                    return median([x / y for x, y in zip(t[a], t[b], strict=True)])

                vs_peft, vs_base = per_round(cpu, "peft", "loraloom"), per_round(cpu, "loraloom", "base")
                ms = {k: 1e3 * median(v) for k, v in cpu.items()}
                # What the adapters add over the base model: PEFT's over loraloom's.
                # Within noise of the base (<= 1% of it) the ratio means nothing: shown as inf.
                ll_added = ms["loraloom"] - ms["base"]
                added = (ms["peft"] - ms["base"]) / ll_added if ll_added > 0.01 * ms["base"] else float("inf")
                wall_vs_peft = per_round(wall, "peft", "loraloom")
                print(f"{n:>8} {phase:>7} {ms['base']:8.2f} {ms['peft']:8.2f} {ms['loraloom']:8.2f} {vs_peft:12.2f}x "
                      f"{vs_base:12.2f}x {added:19.1f}x {wall_vs_peft:17.2f}x {diff:9.1e}", flush=True)  # fmt: skip
                lines.append(f"{n} adapters {phase}: loraloom {vs_peft:.2f}x faster than peft (wall {wall_vs_peft:.2f}x), "
                             f"{vs_base:.2f}x the base model's time; time added over the base: peft {added:.1f}x loraloom's")  # fmt: skip
    return lines


# ---- (b) the server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_clients(url: str, jobs: list[dict], clients: int) -> tuple[float, int, list[float]]:
    """(wall seconds, completion tokens, per-request latencies) for ``jobs`` shared by ``clients`` workers."""
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    latencies: list[float] = []
    tokens = 0
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def worker() -> None:
            nonlocal tokens
            while not queue.empty():
                job = queue.get_nowait()
                start = time.perf_counter()
                r = await http.post("/v1/completions", json=job)
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)
                tokens += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - start, tokens, latencies


def write_world(root: Path, args: argparse.Namespace) -> list[str]:
    """The base model (saved with its tokenizer) and 8 adapters under ``root``; returns the words of the vocabulary."""
    config = model_config(args)
    words = [f"w{i}" for i in range(config.vocab_size - 64)]
    tokenizer = train_tokenizer([" ".join(words)], vocab_size=config.vocab_size, add_eos=False)
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    model = build_model(config)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    write_adapters(model, root / "adapters", 8)
    return words


def start_server(root: Path, args: argparse.Namespace, max_batch: int) -> tuple[subprocess.Popen, str]:
    """``loraloom serve`` on 127.0.0.1 over ``root``'s base and adapters; returns (process, URL) once it answers."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "loraloom", "serve", "--base", str(root / "base"), "--adapters",
           str(root / "adapters"), "--port", str(port), "--max-batch", str(max_batch), "--device", args.device]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("the server did not start")
        try:
            httpx.get(url + "/v1/models")
            return server, url
        except httpx.TransportError:
            time.sleep(0.3)


def make_jobs(words: list[str], n: int, max_tokens: tuple[int, int], seed: int = 3) -> list[dict]:
    """``n`` greedy completion bodies: prompts of 8-23 words, adapters a00..a07 round robin (every 9th: the
    base), ``max_tokens`` drawn from [lo, hi) so that rows finish at different steps and others join."""
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for i in range(n):
        length = int(torch.randint(8, 24, (1,), generator=g))
        prompt = " ".join(words[int(t)] for t in torch.randint(0, len(words), (length,), generator=g))
        new = int(torch.randint(*max_tokens, (1,), generator=g)) if max_tokens[1] > max_tokens[0] else max_tokens[0]
        model_name = f"a{i % 8:02d}" if i % 9 else "base"
        jobs.append({"model": model_name, "prompt": prompt, "max_tokens": new, "temperature": 0})
    return jobs


def bench_server(args: argparse.Namespace) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        words = write_world(root, args)
        server, url = start_server(root, args, max_batch=32)
        try:
            jobs = make_jobs(words, args.requests, (32, 32))
            asyncio.run(run_clients(url, jobs[:4], 4))  # warm-up: loads the adapters
            levels = {f"{c} clients": (lambda c=c: asyncio.run(run_clients(url, jobs, c))) for c in args.clients}
            results = interleave(levels, args.rounds, desc="server")
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"server: {args.requests} requests, up to 32 new tokens each, 8 adapters + base, max batch 32")
    print(f"{'clients':>8} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} {'vs 1 client':>11}")
    one = f"{args.clients[0]} clients"
    for name, runs in results.items():
        rate = median([tok / wall for wall, tok, _ in runs])
        lat = [x for _, _, ls in runs for x in ls]
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        ratio = median([(t / w) / (t1 / w1) for (w, t, _), (w1, t1, _) in zip(runs, results[one], strict=True)])
        print(f"{name.split()[0]:>8} {rate:9.1f} {p50:7.3f} {p99:7.3f} {ratio:10.2f}x")
        lines.append(f"server {name}: {rate:.0f} tokens/s, p50 {p50:.3f}s, p99 {p99:.3f}s, {ratio:.2f}x one at a time")
    return lines


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


# ---- (c) streams: the in-process engine vs the HTTP path -------------------------------------------


async def run_streams(url: str, jobs: list[dict], streams: int) -> tuple[float, int, list[float]]:
    """(wall seconds, completion tokens, first-token latencies) of ``jobs`` streamed by ``streams`` clients,
    each sending its next job as soon as its last one ended."""
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job | {"stream": True, "stream_options": {"include_usage": True}})
    first: list[float] = []
    tokens = 0
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client() -> None:
            nonlocal tokens
            while not queue.empty():
                job = queue.get_nowait()
                start, seen = time.perf_counter(), False
                async with http.stream("POST", "/v1/completions", json=job) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if not seen and chunk["choices"] and chunk["choices"][0]["text"]:
                            seen = True
                            first.append(time.perf_counter() - start)
                        if chunk.get("usage"):
                            tokens += chunk["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(streams)))
    return time.perf_counter() - start, tokens, first


def engine_requests(engine: Engine, cache: AdapterCache, jobs: list[dict]) -> list[Request]:
    tok = engine.tokenizer
    return [
        Request(tok(j["prompt"])["input_ids"], None if j["model"] == "base" else cache.get(j["model"]),
                SamplingParams(max_tokens=j["max_tokens"], temperature=0))
        for j in jobs
    ]  # fmt: skip


def run_engine(engine: Engine, cache: AdapterCache, jobs: list[dict], max_batch: int) -> tuple[float, int]:
    """(wall seconds, tokens) of ``Engine.generate`` on ``jobs``, at most ``max_batch`` rows at a time
    (tokenizing included, as the server does)."""
    engine.max_batch = max_batch
    start = time.perf_counter()
    done = engine.generate(engine_requests(engine, cache, jobs))
    return time.perf_counter() - start, sum(len(r.output_ids) for r in done)


def process_cpu(pid: int | None = None) -> float:
    """CPU seconds (user + system, every thread) of this process or of process ``pid`` (Linux' /proc)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(fn, pid: int | None = None) -> tuple:
    """``fn()``'s result tuple with the CPU seconds it took (this process's, or process ``pid``'s) appended."""
    start = process_cpu(pid)
    out = fn()
    return (*out, process_cpu(pid) - start)


def bench_streams(args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        words = write_world(root, args)
        model, tokenizer = load_base(str(root / "base"), "causal", device=args.device)
        cache = AdapterCache(root / "adapters", limit_mib=4096)
        engine = Engine(model, tokenizer, max_batch=max(args.streams))  # one per model: it wraps its layers
        jobs = {
            n: make_jobs(words, n * args.per_stream, (args.new_tokens // 2, args.new_tokens * 3 // 2))
            for n in args.streams
        }
        server, url = start_server(root, args, max_batch=args.max_batch or max(args.streams))
        try:
            asyncio.run(run_streams(url, make_jobs(words, 9, (4, 5), seed=4), 9))  # warm-up: loads the adapters
            run_engine(engine, cache, make_jobs(words, 9, (4, 5), seed=4), 9)
            peers = {}
            for n in args.streams:  # each with the CPU seconds it took: this process's, or the server's
                peers[f"engine {n}"] = lambda n=n: with_cpu(lambda: run_engine(engine, cache, jobs[n], n))
                peers[f"http {n}"] = lambda n=n: with_cpu(lambda: asyncio.run(run_streams(url, jobs[n], n)), server.pid)
            results = interleave(peers, args.rounds, desc="streams")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return report_streams(args, results)


def report_streams(args: argparse.Namespace, results: dict[str, list]) -> list[str]:
    print(f"streams: each of N clients streams {args.per_stream} requests in turn (greedy, "
          f"{args.new_tokens // 2}-{args.new_tokens * 3 // 2 - 1} new tokens, 8 adapters + base); server --max-batch "
          f"{args.max_batch or max(args.streams)}; the engine in this process runs the same requests with max_batch N")  # fmt: skip
    print("(cpu: tokens per CPU second of the server process vs of this process running the engine; the load of a "
          "shared machine barely moves it)")  # fmt: skip
    print(f"{'streams':>8} {'engine tok/s':>12} {'http tok/s':>10} {'http/engine':>11} {'cpu http/engine':>15} "
          f"{'first p50 s':>11} {'first p99 s':>11}")  # fmt: skip
    lines, rate = [], {}
    for n in args.streams:
        engine, http = results[f"engine {n}"], results[f"http {n}"]
        rate[n] = [t / w for w, t, _, _ in http]
        pairs = list(zip(http, engine, strict=True))
        ratio = median([(th / wh) / (te / we) for (wh, th, _, _), (we, te, _) in pairs])
        cpu = median([(th / ch) / (te / ce) for (_, th, _, ch), (_, te, ce) in pairs])
        first = [x for _, _, fs, _ in http for x in fs]
        p50, p99 = percentile(first, 50), percentile(first, 99)
        e_rate, h_rate = median([t / w for w, t, _ in engine]), median(rate[n])
        print(f"{n:>8} {e_rate:12.1f} {h_rate:10.1f} {ratio:10.2f}x {cpu:14.2f}x {p50:11.3f} {p99:11.3f}")
        lines.append(f"streams {n}: http {h_rate:.0f} tokens/s, engine {e_rate:.0f} tokens/s, http/engine {ratio:.2f}x "
                     f"(target >= 0.8), per CPU second {cpu:.2f}x; first token p50 {p50:.3f}s p99 {p99:.3f}s")  # fmt: skip
    lo, hi = args.streams[0], args.streams[-1]
    scale = median([b / a for a, b in zip(rate[lo], rate[hi], strict=True)])
    print(f"http tokens/s, {hi} streams / {lo} streams: {scale:.2f}x")
    lines.append(f"streams {hi} vs {lo}: http {scale:.2f}x the tokens/s (target >= 1)")
    return lines


# ---- (d) one mixed batch: loraloom's engine vs PEFT's generate(adapter_names=) and the base ---------


def new_tokens(out: torch.Tensor, width: int, eos: int) -> int:
    """Tokens generated per row before its first eos (what the engine counts), summed."""
    new = out[:, width:]
    done = (new == eos).int().cumsum(dim=1) > 0
    return int((~done).sum())


def same_tokens(engine: Engine, cache: AdapterCache, jobs: list[dict], hf_ids: torch.Tensor) -> int:
    """Rows whose greedy tokens (up to eos) from loraloom's engine equal PEFT's generate's."""
    done = engine.generate(engine_requests(engine, cache, jobs))
    eos = engine.eos_ids
    same = 0
    for r, row in zip(done, hf_ids.tolist(), strict=True):
        theirs = row[: next((i for i, t in enumerate(row) if t in eos), len(row))]
        same += r.output_ids == theirs
    return same


def bench_generate(args: argparse.Namespace) -> list[str]:
    rows = args.streams[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        words = write_world(root, args)
        jobs = make_jobs(words, rows, (args.new_tokens, args.new_tokens))
        model, tokenizer = load_base(str(root / "base"), "causal", device=args.device)
        cache = AdapterCache(root / "adapters", limit_mib=4096)
        engine = Engine(model, tokenizer, max_batch=rows)
        base, _ = load_base(str(root / "base"), "causal", device=args.device)
        tuned = peft.PeftModel.from_pretrained(load_base(str(root / "base"), "causal")[0], str(root / "adapters" / "a00"),
                                               adapter_name="a00").to(args.device).eval()  # fmt: skip
        for i in range(1, 8):
            tuned.load_adapter(str(root / "adapters" / f"a{i:02d}"), adapter_name=f"a{i:02d}")
        tokenizer.padding_side = "left"
        batch = tokenizer([j["prompt"] for j in jobs], return_tensors="pt", padding=True).to(args.device)
        names = [j["model"] if j["model"] != "base" else "__base__" for j in jobs]
        eos, width = model.config.eos_token_id, batch["input_ids"].shape[1]

        def hf(m, **more) -> tuple[float, int]:
            start = time.perf_counter()
            with torch.no_grad():
                out = m.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, **more)  # fmt: skip
            return time.perf_counter() - start, new_tokens(out, width, eos)

        peers = {"loraloom": lambda: run_engine(engine, cache, jobs, rows), "peft": lambda: hf(tuned, adapter_names=names),
                 "base": lambda: hf(base)}  # fmt: skip
        for peer in peers.values():
            peer()  # warm-up
        same = same_tokens(engine, cache, jobs, hf_ids=tuned.generate(**batch, max_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id, adapter_names=names)[:, width:])  # fmt: skip
        results = interleave(peers, args.rounds, desc="generate")
    rate = {k: median([t / w for w, t in v]) for k, v in results.items()}
    vs = {k: median([(tl / wl) / (t / w) for (wl, tl), (w, t) in zip(results["loraloom"], v, strict=True)])
          for k, v in results.items()}  # fmt: skip
    print(f"generate: one batch of {rows} rows (8 adapters + base, mixed), {args.new_tokens} new tokens, greedy; "
          f"rows whose tokens equal PEFT's: {same}/{rows}")  # fmt: skip
    print(f"{'peer':>9} {'tokens/s':>9} {'loraloom/peer':>13}")
    for k in results:
        print(f"{k:>9} {rate[k]:9.1f} {vs[k]:12.2f}x")
    return [f"generate {rows} mixed rows: loraloom {rate['loraloom']:.0f} tokens/s, peft {rate['peft']:.0f}, "
            f"base {rate['base']:.0f}; loraloom/peft {vs['peft']:.2f}x, loraloom/base {vs['base']:.2f}x; "
            f"{same}/{rows} rows equal to PEFT's tokens"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer calls and requests, 1 round")
    parser.add_argument("--rounds", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=20, help="timed decode calls per peer and round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=["forward", "server", "streams", "generate"],
                        help="run only these parts (default: all)")  # fmt: skip
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--vocab", type=int, default=2000, help="small, so the LM head weighs about as little as in a 7B model"
    )
    parser.add_argument("--requests", type=int, default=48, help="server requests per level (default: %(default)s)")
    parser.add_argument("--streams", type=int, nargs="+", default=[32, 64], help="concurrent streams (default: 32 64)")
    parser.add_argument("--per-stream", type=int, default=3, help="requests each stream sends in turn")
    parser.add_argument("--max-batch", type=int, help="the streams' server --max-batch (default: the most streams)")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per request (streams: on average)")
    args = parser.parse_args()
    args.adapters, args.clients = [1, 8, 32], [1, 4, 16]
    args.streams = sorted(args.streams)
    if args.quick:
        args.rounds, args.steps, args.hidden, args.layers, args.requests = 1, 4, 256, 2, 16
        args.per_stream, args.new_tokens = 1, 16
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values is PEFT's spelling; same for all
    transformers.logging.set_verbosity_error()
    lines = []
    if args.only is None or "forward" in args.only:
        lines += bench_forward(args)
    if args.only is None or "server" in args.only:
        lines += bench_server(args)
    if args.only is None or "streams" in args.only:
        lines += bench_streams(args)
    if args.only is None or "generate" in args.only:
        lines += bench_generate(args)
    for line in lines:
        print("RESULT " + line)


if __name__ == "__main__":
    main()
