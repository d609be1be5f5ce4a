"""Benchmark: FourierFT, PEFT vs loraloom: training speed and memory, unmerged generation speed.

Training, on BERT-base shapes (random weights) with a 2-class head, batch 16x128, AdamW, adapters on
query and value (the classifier head trains too, as PEFT does for SEQ_CLS):
- peft-lora:          PEFT LoRA r=8, the speed FourierFT is asked to match;
- peft-fourierft:     PEFT FourierFT n_frequency=1000, scaling=150;
- loraloom-fourierft: loraloom FourierFT, same settings and the same coefficients.

Generation, on FLAN-T5-small shapes (random weights), greedy, batch 4, 32 new tokens, adapters on q, v:
- base:               the model without adapter;
- peft-fourierft:     PEFT FourierFT, unmerged;
- loraloom-fourierft: loraloom FourierFT, unmerged (W + ΔW is built on the first call and reused).

Each peer runs in a fresh process (its own peak RSS), times its calls after a warm-up, and every round
runs all peers in a rotated order; speed ratios are the median over rounds of per-round ratios, which
cancels load drift on a shared machine; CPU-time ratios are printed beside them (robust to load with
--threads 1). The FourierFT peers get identical coefficients, so their first losses and logits must agree
(the "check" column). The last lines hold the ratios.

--layers instead times single layers per shape (BERT, GPT-2 Conv1D, T5 shapes; several token counts):
training forward+backward, and a 4-token no-grad forward, for base, LoRA and FourierFT of both libraries.

    .venv/bin/python benchmarks/fourierft.py [--quick] [--rounds N] [--threads N] [--only train|generate] [--layers]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
import zlib
from dataclasses import dataclass

import peft
import psutil
import torch
from common import interleave, median, peak_rss_mb, run_isolated, time_calls
from lora_train import flan_t5_small_config
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, T5ForConditionalGeneration
from transformers.pytorch_utils import Conv1D

import loraloom

TRAIN_PEERS = ("peft-lora", "peft-fourierft", "loraloom-fourierft")
GEN_PEERS = ("base", "peft-fourierft", "loraloom-fourierft")
LAYER_PEERS = ("base", "peft-lora", "peft-fourierft", "loraloom-lora", "loraloom-fourierft")
# --layers: one adapted layer, (what, d_in, d_out, tokens, Conv1D?)
LAYER_SHAPES = [
    ("BERT-base query, 16x128 tokens", 768, 768, 2048, False),
    ("BERT-base query, 1x128 tokens", 768, 768, 128, False),
    ("BERT-base FFN output, 16x128", 3072, 768, 2048, False),
    ("GPT-2 c_attn (Conv1D), 4x128", 768, 2304, 512, True),
    ("FLAN-T5-small q, 4x64", 512, 384, 256, False),
]


@dataclass(frozen=True)
class Settings:
    # training
    batch: int = 16
    seq_len: int = 128
    train_steps: int = 5
    train_warmup: int = 2
    lr: float = 1e-3
    # generation
    gen_batch: int = 4
    prompt_len: int = 32
    new_tokens: int = 32
    gen_calls: int = 5
    # adapters
    lora_r: int = 8
    n_frequency: int = 1000
    scaling: float = 150.0
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"


def adapt(model: torch.nn.Module, peer: str, targets: list[str], s: Settings, task: str) -> torch.nn.Module:
    if peer == "base":
        return model
    if peer == "peft-lora":
        return peft.get_peft_model(
            model, peft.LoraConfig(r=s.lora_r, lora_alpha=s.lora_r, target_modules=targets, task_type=task)
        )
    if peer == "peft-fourierft":
        config = peft.FourierFTConfig(
            n_frequency=s.n_frequency, scaling=s.scaling, target_modules=targets, task_type=task
        )
        model = peft.get_peft_model(model, config)
    else:
        config = loraloom.FourierFTConfig(n_frequency=s.n_frequency, scaling=s.scaling, target_modules=targets)
        model = loraloom.add_adapter(model, config, verbose=False)
    # The same coefficients for both FourierFT peers, drawn per layer path.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fourierft_spectrum" in name:
                path = name.removeprefix("base_model.model.").removesuffix(".default")
                g = torch.Generator().manual_seed(s.seed + zlib.crc32(path.encode()))
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def measure_training(peer: str, s: Settings) -> dict:
    """In a fresh process: build the peer on BERT-base shapes and time AdamW steps."""
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    model = BertForSequenceClassification(BertConfig(num_labels=2))
    model = adapt(model, peer, ["query", "value"], s, "SEQ_CLS").to(s.device).train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=s.lr)
    g = torch.Generator().manual_seed(s.seed)
    batch = {
        "input_ids": torch.randint(1000, 30000, (s.batch, s.seq_len), generator=g),
        "attention_mask": torch.ones(s.batch, s.seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (s.batch,), generator=g),
    }
    batch = {k: v.to(s.device) for k, v in batch.items()}
    rss_built = peak_rss_mb()
    losses: list[float] = []

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    torch.manual_seed(s.seed + 1)  # the same dropout masks for every peer
    for _ in range(s.train_warmup):
        step()
    cpu_start = time.process_time()
    times = time_calls(step, s.train_steps, warmup=0)
    head = sum(p.numel() for n, p in trainable.items() if "classifier" in n)
    return {
        "seconds": median(times),
        "cpu_seconds": (time.process_time() - cpu_start) / s.train_steps,
        "rss_built_mb": rss_built,
        "adapter_params": sum(p.numel() for p in trainable.values()) - head,
        "head_params": head,
        "check": f"loss {losses[0]:.5f}",
    }


def measure_generation(peer: str, s: Settings) -> dict:
    """In a fresh process: build the peer on FLAN-T5-small shapes and time greedy generation."""
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    model = T5ForConditionalGeneration(flan_t5_small_config())
    model = adapt(model, peer, ["q", "v"], s, "SEQ_2_SEQ_LM").to(s.device).eval()
    g = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(2, 32000, (s.gen_batch, s.prompt_len), generator=g).to(s.device)
    rss_built = peak_rss_mb()

    @torch.no_grad()
    def generate() -> None:
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=s.new_tokens,
            min_new_tokens=s.new_tokens,
            do_sample=False,
        )
        if ids.is_cuda:  # the time of the work, not of queueing it
            torch.cuda.synchronize()

    start = time.perf_counter()
    generate()  # the warm-up; loraloom builds W + ΔW here, once
    first = time.perf_counter() - start
    cpu_start = time.process_time()
    times = time_calls(generate, s.gen_calls, warmup=0)
    cpu_seconds = (time.process_time() - cpu_start) / s.gen_calls
    with torch.no_grad():  # random weights generate pad tokens only: compare the logits instead
        check = model(input_ids=ids, decoder_input_ids=ids[:, :8]).logits.double().abs().sum().item()
    return {
        "seconds": median(times),
        "cpu_seconds": cpu_seconds,
        "first_call_s": first,
        "rss_built_mb": rss_built,
        "rss_now_mb": psutil.Process().memory_info().rss / 2**20,  # holds loraloom's cached W + ΔW
        "check": f"logits |sum| {check:.6g}",
    }


class Holder(nn.Module):
    """A model of one layer, so both libraries can adapt it by name."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def layer_peer(peer: str, d_in: int, d_out: int, conv1d: bool, s: Settings) -> nn.Module:
    torch.manual_seed(s.seed)
    model = Holder(Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)).requires_grad_(False)
    if peer == "loraloom-lora":
        return loraloom.add_adapter(model, loraloom.LoraConfig(r=s.lora_r, target_modules=["proj"]), verbose=False)
    return adapt(model, peer, ["proj"], s, None)


def train_call(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    model(x).backward(grad)


def measure_layers(s: Settings, reps: int) -> None:
    """Per shape, one layer: training forward+backward (x requires grad, as inside a network) and a
    no-grad forward of 4 tokens (a generation step); all peers interleaved, median of ``reps``."""
    print(f"{'shape':<32} {'tokens':>6} " + " ".join(f"{p:>18}" for p in LAYER_PEERS) + "  (ms, train fwd+bwd)")
    for what, d_in, d_out, tokens, conv1d in LAYER_SHAPES:
        peers = {p: layer_peer(p, d_in, d_out, conv1d, s) for p in LAYER_PEERS}
        x = torch.randn(tokens, d_in, requires_grad=True)
        grad = torch.randn(tokens, d_out)
        step = {
            p: functools.partial(time_calls, functools.partial(train_call, m, x, grad), 1, 1) for p, m in peers.items()
        }
        times = interleave(step, reps, what)
        ms = {p: 1000 * median([t[0] for t in ts]) for p, ts in times.items()}
        print(f"{what:<32} {tokens:>6} " + " ".join(f"{ms[p]:>18.2f}" for p in LAYER_PEERS))
        x4 = torch.randn(4, d_in)
        with torch.no_grad():
            infer = {p: functools.partial(time_calls, functools.partial(m, x4), 20, 5) for p, m in peers.items()}
            times = interleave(infer, reps, what + " (4 tokens, no grad)")
        us = {p: 1e6 * median([median(t) for t in ts]) for p, ts in times.items()}
        print(f"{'  no-grad forward (us)':<32} {4:>6} " + " ".join(f"{us[p]:>18.1f}" for p in LAYER_PEERS))


def run_peers(measure, peers: tuple[str, ...], s: Settings, rounds: int, desc: str):
    runs = interleave({peer: functools.partial(run_isolated, measure, peer, s) for peer in peers}, rounds, desc)
    stats = {peer: [result for result, _ in runs[peer]] for peer in peers}
    peak = {peer: median([rss for _, rss in runs[peer]]) for peer in peers}
    return stats, peak


def speedup(stats: dict, peer: str, ref: str, key: str = "seconds") -> float:
    """How many times faster ``peer`` is than ``ref``: median over rounds of the per-round ratio."""
    return median([b[key] / a[key] for a, b in zip(stats[peer], stats[ref], strict=True)])


def ratio(stats: dict, peer: str, ref: str) -> str:
    return f"{speedup(stats, peer, ref):.3f}x (by cpu time {speedup(stats, peer, ref, 'cpu_seconds'):.3f}x)"


def print_table(stats: dict, peak: dict, unit: str, per_call: float, ref: str) -> None:
    print(
        f"{'peer':<20} {unit:>10} {'s/call':>8} {'vs ' + ref:>16} {'cpu s/call':>11} {'cpu vs ' + ref:>18} "
        f"{'peak RSS MiB':>13} {'over model':>11}  check"
    )
    for peer in stats:
        seconds = median([r["seconds"] for r in stats[peer]])
        cpu = median([r["cpu_seconds"] for r in stats[peer]])
        over = peak[peer] - median([r["rss_built_mb"] for r in stats[peer]])
        print(
            f"{peer:<20} {per_call / seconds:>10.2f} {seconds:>8.3f} {speedup(stats, peer, ref):>15.3f}x "
            f"{cpu:>11.3f} {speedup(stats, peer, ref, 'cpu_seconds'):>17.3f}x "
            f"{peak[peer]:>13.0f} {over:>11.0f}  {stats[peer][0]['check']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer calls, 1 round")
    parser.add_argument("--rounds", type=int, help="rounds of all peers (default 3)")
    parser.add_argument("--threads", type=int, help="torch threads in each peer (default: torch's)")
    parser.add_argument("--only", choices=["train", "generate"], help="run one half only")
    parser.add_argument("--layers", action="store_true", help="per-shape timings of single layers, then exit")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: %(default)s)")
    args = parser.parse_args()
    s = Settings(threads=args.threads, device=args.device)
    if args.quick:
        s = dataclasses.replace(s, batch=4, train_steps=2, train_warmup=1, new_tokens=16, gen_calls=2)
    rounds = args.rounds or (1 if args.quick else 3)
    if s.threads:
        torch.set_num_threads(s.threads)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), peft {peft.__version__}, {rounds} round(s)")
    if args.layers:
        measure_layers(s, reps=3 if args.quick else 9)
        return
    result = []

    if args.only != "generate":
        print(
            f"\nTraining: BERT-base shapes + 2-class head, batch {s.batch}x{s.seq_len}, AdamW, on query,value; "
            f"{s.train_steps} timed steps after {s.train_warmup} warm-up"
        )
        stats, peak = run_peers(measure_training, TRAIN_PEERS, s, rounds, "training")
        print_table(stats, peak, "steps/s", 1.0, "peft-fourierft")
        lora, fft = stats["peft-lora"][0], stats["loraloom-fourierft"][0]
        print(
            f"trainable adapter parameters: LoRA r={s.lora_r} {lora['adapter_params']:,}  "
            f"FourierFT n={s.n_frequency} {fft['adapter_params']:,}  "
            f"({lora['adapter_params'] / fft['adapter_params']:.1f}x fewer; + {fft['head_params']:,} in the head)"
        )
        result.append(
            f"RESULT train speed loraloom-fourierft vs peft-fourierft {ratio(stats, 'loraloom-fourierft', 'peft-fourierft')}"
            f" target >= 1.15; vs peft-lora {ratio(stats, 'loraloom-fourierft', 'peft-lora')} target >= 1.0; "
            f"peak RSS vs peft-fourierft {peak['loraloom-fourierft'] / peak['peft-fourierft']:.3f}x target <= 1.0"
        )

    if args.only != "train":
        print(
            f"\nGeneration: FLAN-T5-small shapes, greedy, batch {s.gen_batch}, prompt {s.prompt_len}, "
            f"{s.new_tokens} new tokens, adapters unmerged on q,v; {s.gen_calls} timed calls"
        )
        stats, peak = run_peers(measure_generation, GEN_PEERS, s, rounds, "generation")
        print_table(stats, peak, "tokens/s", s.gen_batch * s.new_tokens, "base")
        for key, what in [
            ("first_call_s", "first call (s), loraloom's builds W + ΔW"),
            ("rss_now_mb", "RSS after (MiB)"),
        ]:
            values = {peer: median([r[key] for r in stats[peer]]) for peer in GEN_PEERS}
            print(f"{what}: " + "  ".join(f"{p} {v:.3f}" for p, v in values.items()))
        result.append(
            f"RESULT generate speed loraloom-fourierft vs base {ratio(stats, 'loraloom-fourierft', 'base')} "
            f"target >= 0.95; vs peft-fourierft {ratio(stats, 'loraloom-fourierft', 'peft-fourierft')} target >= 1.4; "
            f"peak RSS vs peft-fourierft {peak['loraloom-fourierft'] / peak['peft-fourierft']:.3f}x"
        )
    print()
    print("\n".join(result))


if __name__ == "__main__":
    main()
