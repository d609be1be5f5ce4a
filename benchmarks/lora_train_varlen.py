"""Benchmark: LoRA training on variable-length data, loraloom's ``train`` vs PEFT + transformers' ``Trainer``.

The data are seq2seq examples whose lengths are drawn like instruction data: inputs log-normal around 90
tokens, clipped to 16-512; targets log-normal around 20, clipped to 4-128; random words of a word-level
tokenizer (the same token ids for every peer). The model has FLAN-T5-small's shapes (random weights);
LoRA r=16, alpha=32 on q and v; AdamW lr 1e-4, 6% linear warm-up then linear decay; batch 8.

Peers, each in its own fresh process (its own peak RSS), every round in a rotated order:

- trainer:           PEFT + ``Trainer`` with its defaults (float32, batches in random order).
- trainer-tuned:     PEFT + ``Trainer`` with ``group_by_length=True`` and ``bf16=True`` (the same tricks).
- loraloom:          ``loraloom.train`` with its defaults (length-grouped batches; bf16 autocast where native).
- loraloom-plain:    ``loraloom.train`` with ``group_by_length=False, bf16=False``.

Tokens/s counts the real (non-pad) input and target tokens of the examples (one pass over them), over the
wall time from the examples to a trained adapter (tokenizing, building the model, training) in both peers. "final loss" is the mean training loss of the last 10 steps. The ratio is the
median over rounds of the per-round ratio. The last line holds the ratios.

    .venv/bin/python benchmarks/lora_train_varlen.py [--quick] [--steps N] [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
from common import interleave, median, run_isolated
from lora_train import flan_t5_small_config

PEERS = ("trainer", "trainer-tuned", "loraloom", "loraloom-plain")
WORDS = 32000  # word-level vocabulary (ids 4 .. 32003 < FLAN-T5's 32128)


@dataclass(frozen=True)
class Settings:
    steps: int = 40
    batch: int = 8
    r: int = 16
    lora_alpha: int = 32
    lr: float = 1e-4
    warmup_ratio: float = 0.06
    seed: int = 0
    threads: int | None = 1


def lengths(rng: random.Random, median_len: float, low: int, high: int) -> int:
    return min(high, max(low, round(rng.lognormvariate(math.log(median_len), 0.8))))


def make_examples(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(k))

    return [{"input": text(lengths(rng, 90, 16, 512)), "target": text(lengths(rng, 20, 4, 128))} for _ in range(n)]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "</s>", "<s>", "<unk>", *(f"w{i}" for i in range(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def base_model():
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration(flan_t5_small_config())


def train_trainer(s: Settings, examples: list[dict], tuned: bool) -> list[float]:
    import peft
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = word_tokenizer()
    features = [{"input_ids": tok(e["input"])["input_ids"], "labels": tok(e["target"])["input_ids"]} for e in examples]
    torch.manual_seed(s.seed)
    model = peft.get_peft_model(
        base_model(),
        peft.LoraConfig(r=s.r, lora_alpha=s.lora_alpha, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"),
    )
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out, per_device_train_batch_size=s.batch, learning_rate=s.lr, max_steps=s.steps, warmup_steps=round(s.warmup_ratio * s.steps),
            lr_scheduler_type="linear", weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=True, seed=s.seed, dataloader_num_workers=0, disable_tqdm=True, bf16=tuned,
            train_sampling_strategy="group_by_length" if tuned else "random",
        )  # fmt: skip
        collator = DataCollatorForSeq2Seq(tok, model=model, padding=True)
        trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator)
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train_loraloom(s: Settings, examples: list[dict], plain: bool) -> list[float]:
    import loraloom

    options = {"group_by_length": False, "bf16": False} if plain else {}
    config = loraloom.LoraConfig(r=s.r, lora_alpha=s.lora_alpha, target_modules=["q", "v"])
    args = loraloom.TrainArgs(
        max_steps=s.steps, batch_size=s.batch, lr=s.lr, warmup_ratio=s.warmup_ratio, seed=s.seed, **options
    )
    return loraloom.train(base_model(), word_tokenizer(), examples, config, args, progress=False).losses


def measure(peer: str, s: Settings, n_examples: int) -> dict:
    warnings.filterwarnings("ignore")
    if s.threads:
        torch.set_num_threads(s.threads)
    examples = make_examples(n_examples, s.seed)
    tokens = sum(len(e["input"].split()) + len(e["target"].split()) + 2 for e in examples)  # + eos each
    start = time.perf_counter()  # from examples to a trained adapter: tokenizing, building, training
    if peer.startswith("trainer"):
        losses = train_trainer(s, examples, tuned=peer == "trainer-tuned")
    else:
        losses = train_loraloom(s, examples, plain=peer == "loraloom-plain")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "final_loss": sum(losses[-10:]) / len(losses[-10:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 steps, 1 round")
    parser.add_argument("--steps", type=int, help="optimizer steps per peer (default 40)")
    parser.add_argument("--rounds", type=int, help="rounds of all peers (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each peer (default 1)")
    args = parser.parse_args()
    steps, rounds = (6, 1) if args.quick else (40, 3)
    s = Settings(steps=args.steps or steps, threads=args.threads)
    rounds = args.rounds or rounds
    n_examples = s.steps * s.batch  # one pass: every peer trains on every example once
    print(
        f"T5 (FLAN-T5-small shapes), {n_examples} variable-length examples (inputs 16-512, targets 4-128 tokens), "
        f"batch {s.batch}, {s.steps} steps, LoRA r={s.r} on q,v, {s.threads} thread(s), {rounds} round(s)"
    )
    runs = interleave({p: functools.partial(run_isolated, measure, p, s, n_examples) for p in PEERS}, rounds)
    stats = {p: [r for r, _ in runs[p]] for p in PEERS}
    peak = {p: median([rss for _, rss in runs[p]]) for p in PEERS}

    def tps(r: dict) -> float:
        return r["tokens"] / r["seconds"]

    def speed_vs(peer: str, ref: str) -> float:
        return median([tps(a) / tps(b) for a, b in zip(stats[peer], stats[ref], strict=True)])

    print(f"{'peer':<15} {'tokens/s':>9} {'vs trainer':>11} {'s/run':>7} {'final loss':>11} {'peak RSS MiB':>13}")
    for p in PEERS:
        loss = median([r["final_loss"] for r in stats[p]])
        secs = median([r["seconds"] for r in stats[p]])
        print(
            f"{p:<15} {median([tps(r) for r in stats[p]]):>9.0f} {speed_vs(p, 'trainer'):>10.2f}x {secs:>7.1f} "
            f"{loss:>11.4f} {peak[p]:>13.0f}"
        )
    loss_gap = median([r["final_loss"] for r in stats["loraloom"]]) / median(
        [r["final_loss"] for r in stats["trainer"]]
    )
    print(
        f"RESULT speed loraloom/trainer={speed_vs('loraloom', 'trainer'):.2f}x  "
        f"loraloom/trainer-tuned={speed_vs('loraloom', 'trainer-tuned'):.2f}x  final loss ratio={loss_gap:.3f}  "
        f"rss loraloom/trainer={peak['loraloom'] / peak['trainer']:.2f}x"
    )


if __name__ == "__main__":
    main()
