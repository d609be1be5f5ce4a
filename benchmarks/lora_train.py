"""Benchmark: one LoRA training step, PEFT vs loraloom, on a T5 with FLAN-T5-small's shapes (random weights).

Peers, each built from the same seed and fed the same batch (inputs 8x64 tokens, labels 8x16 tokens by
default), trained with AdamW (lr 1e-4) over the trainable parameters:

- floor:         the frozen model with gradients flowing back through the whole stack (the embedding
                 outputs require grad) but no weight gradients: no LoRA step can cost less.
- peft:          PEFT LoRA, r=16, alpha=32 on q and v.
- loraloom:      loraloom LoRA, same settings.
- loraloom-bf16: loraloom with the forward run under torch.autocast("cpu", dtype=torch.bfloat16).

Each peer runs in its own fresh process (so peak RSS is its own), times ``--steps`` steps after a
warm-up, and every round runs all peers in a rotated order. The speed ratio is the median over rounds
of the per-round ratio, which cancels load drift on a shared machine. The last line holds the ratios.

    .venv/bin/python benchmarks/lora_train.py [--quick] [--steps N] [--rounds N] [--threads N] [--tgt-len N]
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from dataclasses import dataclass

import peft
import torch
from common import interleave, median, peak_rss_mb, run_isolated, time_calls
from transformers import T5Config, T5ForConditionalGeneration

import loraloom

PEERS = ("floor", "peft", "loraloom", "loraloom-bf16")


@dataclass(frozen=True)
class Settings:
    steps: int = 20
    warmup: int = 3
    batch: int = 8
    src_len: int = 64
    tgt_len: int = 16
    r: int = 16
    lora_alpha: int = 32
    lr: float = 1e-4
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"


def flan_t5_small_config() -> T5Config:
    return T5Config(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=1024,
        num_layers=8,
        num_decoder_layers=8,
        num_heads=6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def make_batch(s: Settings) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(s.seed)
    vocab = flan_t5_small_config().vocab_size
    return {
        "input_ids": torch.randint(2, vocab, (s.batch, s.src_len), generator=g),
        "attention_mask": torch.ones(s.batch, s.src_len, dtype=torch.long),
        "labels": torch.randint(2, vocab, (s.batch, s.tgt_len), generator=g),
    }


def build(peer: str, s: Settings) -> torch.nn.Module:
    torch.manual_seed(s.seed)
    model = T5ForConditionalGeneration(flan_t5_small_config())
    if peer == "floor":
        model.requires_grad_(False)
        for stack in (model.encoder, model.decoder):
            stack.embed_tokens.register_forward_hook(lambda module, args, out: out.requires_grad_())
        return model
    targets = ["q", "v"]
    if peer == "peft":
        config = peft.LoraConfig(r=s.r, lora_alpha=s.lora_alpha, target_modules=targets, task_type="SEQ_2_SEQ_LM")
        return peft.get_peft_model(model, config)
    config = loraloom.LoraConfig(r=s.r, lora_alpha=s.lora_alpha, target_modules=targets)
    return loraloom.add_adapter(model, config, verbose=False)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    batch: dict[str, torch.Tensor],
    bf16: bool,
    losses: list[float],
) -> None:
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())


def measure(peer: str, s: Settings) -> dict:
    """Run in a fresh process: build ``peer``, time its training steps, note memory and losses."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations hit inside peft
    if s.threads:
        torch.set_num_threads(s.threads)
    model = build(peer, s).to(s.device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s.lr) if trainable else None
    batch = {k: v.to(s.device) for k, v in make_batch(s).items()}
    rss_built = peak_rss_mb()
    torch.manual_seed(s.seed + 1)  # same dropout masks for every peer, whatever its init drew
    losses: list[float] = []
    step = functools.partial(train_step, model, optimizer, batch, peer.endswith("bf16"), losses)
    for _ in range(s.warmup):
        step()
    cpu_start = time.process_time()
    times = time_calls(step, s.steps, warmup=0)
    return {
        "step_s": median(times),
        "cpu_step_s": (time.process_time() - cpu_start) / s.steps,
        "rss_built_mb": rss_built,
        "trainable": sum(p.numel() for p in trainable),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run: 5 steps after 2 warm-up steps, 1 round")
    parser.add_argument("--steps", type=int, help="timed steps per peer per round (default 20)")
    parser.add_argument("--rounds", type=int, help="rounds of all peers (default 3)")
    parser.add_argument("--tgt-len", type=int, default=16, help="label length (default 16)")
    parser.add_argument("--threads", type=int, help="torch threads in each peer (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: %(default)s)")
    args = parser.parse_args()
    steps, warmup, rounds = (5, 2, 1) if args.quick else (20, 3, 3)
    s = Settings(
        steps=args.steps or steps, warmup=warmup, tgt_len=args.tgt_len, threads=args.threads, device=args.device
    )
    rounds = args.rounds or rounds
    print(
        f"T5 (FLAN-T5-small shapes, random weights), batch {s.batch}x{s.src_len} -> labels {s.batch}x{s.tgt_len}, "
        f"LoRA r={s.r} alpha={s.lora_alpha} on q,v, AdamW lr={s.lr}; {s.steps} timed steps after {s.warmup} "
        f"warm-up, {rounds} round(s), torch {torch.__version__}, peft {peft.__version__}, on {s.device}"
    )

    runs = interleave({peer: functools.partial(run_isolated, measure, peer, s) for peer in PEERS}, rounds)
    stats = {peer: [result for result, _ in runs[peer]] for peer in PEERS}
    peak = {peer: median([rss for _, rss in runs[peer]]) for peer in PEERS}

    def speed_vs(peer: str, ref: str, key: str = "step_s") -> float:  # per-round ratio, median over rounds
        return median([b[key] / a[key] for a, b in zip(stats[peer], stats[ref], strict=True)])

    print(
        f"{'peer':<14} {'steps/s':>8} {'ms/step':>8} {'vs peft':>8} {'cpu ms/step':>12} {'peak RSS MiB':>13} "
        f"{'over model':>11} {'trainable':>10}  loss first/last"
    )
    for peer in PEERS:
        step_s = median([r["step_s"] for r in stats[peer]])
        cpu_s = median([r["cpu_step_s"] for r in stats[peer]])
        over_model = peak[peer] - median([r["rss_built_mb"] for r in stats[peer]])
        first, last = stats[peer][0]["first_loss"], stats[peer][0]["last_loss"]
        print(
            f"{peer:<14} {1 / step_s:>8.2f} {1000 * step_s:>8.0f} {speed_vs(peer, 'peft'):>7.3f}x {1000 * cpu_s:>12.0f} "
            f"{peak[peer]:>13.0f} {over_model:>11.0f} {stats[peer][0]['trainable']:>10,}  {first:.4f}/{last:.4f}"
        )
    per_round = [p["step_s"] / ll["step_s"] for p, ll in zip(stats["peft"], stats["loraloom"], strict=True)]
    print("loraloom/peft speed per round: " + " ".join(f"{ratio:.3f}x" for ratio in per_round))
    print(
        f"by cpu time: loraloom/peft={speed_vs('loraloom', 'peft', 'cpu_step_s'):.3f}x  "
        f"bf16 vs peft={speed_vs('loraloom-bf16', 'peft', 'cpu_step_s'):.2f}x (load-robust with --threads 1)"
    )
    print(f"a peft step costs {1 / speed_vs('peft', 'floor'):.3f}x a floor step")
    print(
        f"RESULT speed loraloom/peft={speed_vs('loraloom', 'peft'):.3f}x  "
        f"rss loraloom/peft={peak['loraloom'] / peak['peft']:.3f}x  "
        f"bf16 speed vs peft fp32={speed_vs('loraloom-bf16', 'peft'):.2f}x"
    )


if __name__ == "__main__":
    main()
