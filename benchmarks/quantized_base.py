"""Benchmark: a weight-only int8 frozen base (``quantize.py``) against the float32 base, on FLAN-T5-base's shapes.

Two jobs, each run in a fresh process per base so that its peak RSS is its own (imports included):

- train:   ``load_base`` + LoRA (r=16 on q, v) + ``loraloom.train`` for ``--steps`` steps, batch 4, random
           words (64-token inputs, 16-token targets).
- lorahub: ``load_base`` + ``loraloom.lorahub`` over 20 random LoRA modules (r=16 on q, v) on 5 examples,
           budget 10 forward passes, scored in fp32 (``dtype="fp32"``) on every base.

Three bases: ``fp32`` (``load_base`` as it is), ``int8`` (``quantize="int8"``, which also sets glibc's mmap
threshold: ``quantize.keep_heap_small``) and ``fp32-heap`` (float32 with that same allocator setting, to show
what the setting alone gives). The model (random weights, ~248M parameters, 1 GB in float32) is written once to
a temp folder. Reported: peak RSS of each job for each base and the ratios to fp32 (target: int8 <= 0.5x
float32), the final training loss / LoraHub objective of each (target: within 2%) and the job's wall time
(loaded machine: indicative only). The last line holds the ratios.

    .venv/bin/python benchmarks/quantized_base.py [--steps N] [--rounds N]
"""

from __future__ import annotations

import argparse
import functools
import random
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import interleave, median, run_isolated
from lora_train_varlen import word_tokenizer

JOBS = ("train", "lorahub")
BASES = ("fp32", "fp32-heap", "int8")


def flan_t5_base_config():
    from transformers import T5Config

    return T5Config(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, initializer_factor=0.05,  # small random weights: a loss near log(vocab), as a real model's
    )  # fmt: skip


def write_base(folder: Path) -> None:
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    T5ForConditionalGeneration(flan_t5_base_config()).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)


def write_modules(base: Path, folder: Path, n: int = 20) -> list[str]:
    """n random LoRA modules (non-zero B) for the base, saved as PEFT folders."""
    import loraloom
    from loraloom.models import load_base

    paths = []
    for i in range(n):
        model, _ = load_base(base)
        torch.manual_seed(100 + i)
        config = loraloom.LoraConfig(r=16, lora_alpha=32, target_modules=["q", "v"], init_lora_weights=False)
        model = loraloom.add_adapter(model, config, verbose=False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)
        paths.append(str(loraloom.save_adapter(model, folder / f"m{i:02d}")))
    return paths


def examples(n: int, src: int, tgt: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(32000)}" for _ in range(k))

    return [{"input": text(src), "target": text(tgt)} for _ in range(n)]


def run(job: str, quantize: str, base: str, modules: list[str], steps: int) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import loraloom
    from loraloom.models import load_base
    from loraloom.quantize import keep_heap_small

    start = time.perf_counter()
    model, tok = load_base(base, quantize="int8" if quantize == "int8" else None)
    if quantize == "fp32-heap":
        keep_heap_small()
    if job == "train":
        config = loraloom.LoraConfig(r=16, lora_alpha=32, target_modules=["q", "v"])
        data = examples(4 * steps, 63, 15, seed=1)
        result = loraloom.train(model, tok, data, config, max_steps=steps, batch_size=4, lr=1e-3, progress=False)
        return {"value": sum(result.losses[-3:]) / 3, "seconds": time.perf_counter() - start}
    # fp32 scoring on every base, so that only the base's precision differs: the default ("auto") scores both in
    # bf16 where the CPU computes it natively (a float base with a bf16 copy of its weights beside them).
    few = examples(5, 63, 15, seed=2)
    result = loraloom.lorahub(model, modules, few, tokenizer=tok, budget=10, dtype="fp32", progress=False)
    return {"value": result.objective, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="training steps (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all runs (default %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        write_base(base)
        modules = write_modules(base, Path(tmp) / "modules")
        peers = {
            f"{job}-{q}": functools.partial(run_isolated, run, job, q, str(base), modules, args.steps)
            for job in JOBS
            for q in BASES
        }
        runs = interleave(peers, args.rounds)
    print(f"T5 with FLAN-T5-base's shapes (random weights); {args.rounds} round(s); peak RSS of each fresh process")
    print(f"{'job':<8} {'base':<9} {'peak RSS MiB':>13} {'/ fp32':>7} {'loss / objective':>17} {'seconds':>8}")
    line = []
    for job in JOBS:
        rss = {q: median([r for _, r in runs[f"{job}-{q}"]]) for q in BASES}
        value = {q: median([v["value"] for v, _ in runs[f"{job}-{q}"]]) for q in BASES}
        seconds = {q: median([v["seconds"] for v, _ in runs[f"{job}-{q}"]]) for q in BASES}
        for q in BASES:
            ratio = rss[q] / rss["fp32"]
            print(f"{job:<8} {q:<9} {rss[q]:>13.0f} {ratio:>6.2f}x {value[q]:>17.4f} {seconds[q]:>8.1f}")
        line.append(
            f"{job}: rss int8/fp32={rss['int8'] / rss['fp32']:.2f}x int8/fp32-heap={rss['int8'] / rss['fp32-heap']:.2f}x"
            f" value int8/fp32={value['int8'] / value['fp32']:.3f}"
        )
    print("RESULT " + "  ".join(line))


if __name__ == "__main__":
    main()
