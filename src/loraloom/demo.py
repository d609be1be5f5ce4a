"""The demos: ``loraloom demo`` (LoraHub on the built-in zoo) and ``loraloom demo lora`` (LoRA from nothing).

``loraloom demo`` (``make demo``) is loraloom's main job on the zoo shipped in the package
(``loraloom.zoo``): for each held-out task, 5 examples, 5 seeds, through the experiment harness:
zero-shot, the best single module, LoraHub (average and best over seeds; gradient-free, and its gradient
mode beside it), LoRA on the 5 examples and in-context learning. It prints the Table-1-style result and
writes report.md and plots.

``loraloom demo lora`` is the LoRA walk-through, offline, from nothing:

1. Build a word-level tokenizer and a small T5 from scratch, and pre-train the T5 fully on two toy
   tasks ("copy: cat dog" -> "cat dog", "reverse: cat dog" -> "dog cat"): the base model.
   (Sentences are 2 to 5 words from a list of 16.)
2. A new task the base has never seen: "shift", which replaces every word by the next one in the word
   list ("shift: cat dog" -> "dog eel"). Score the base on it, teach it with LoRA (``train``), score again.
3. Save the adapter as a PEFT folder, reload it into a fresh copy of the saved base (``load_adapter``)
   and check the outputs are identical; merge it (``merge_and_unload``) and check they stay the same.
4. Print a few generations and a summary. The base, the adapter and the data stay in the output folder,
   ready for the CLI (``loraloom inspect|eval|merge``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import T5ForConditionalGeneration

from .adapters import LoraConfig, load_adapter, merge_and_unload
from .devices import add_device_arguments, model_device, resolve_device, resolve_dtype
from .evaluate import evaluate, generate
from .files import atomic_write
from .seeds import parse_seeds
from .train import TrainArgs, save_full_model, train
from .zoo.base import build_demo_t5, train_tokenizer

# The toy language: a few short words. Tasks take sentences of 2 to 5 of them.
LORA_DEMO_OUT = "demo_out/lora"
HUB_DEMO_OUT = "demo_out/hub"
WORDS = "ant bee cat dog eel fox gnu hen ibis jay kiwi lark mole newt owl pig".split()
MIN_WORDS, MAX_WORDS = 2, 5


# ---- the toy tasks -----------------------------------------------------------------------------


def task_target(task: str, sentence: list[str], words: list[str]) -> list[str]:
    if task == "copy":
        return sentence
    if task == "reverse":
        return sentence[::-1]
    if task == "shift":  # each word -> the next one in the word list, the last -> the first
        return [words[(words.index(w) + 1) % len(words)] for w in sentence]
    raise ValueError(f"unknown toy task {task!r}; the demo has {TASKS}")


TASKS = ("copy", "reverse", "shift")


def make_examples(task: str, n: int, seed: int, words: list[str] = WORDS) -> list[dict[str, str]]:
    """``n`` random examples of ``task`` over ``words``: {"input": "<task>: w1 w2 ...", "target": "..."}."""
    rng = random.Random(f"{task}-{seed}")
    examples = []
    for _ in range(n):
        sentence = rng.choices(words, k=rng.randint(MIN_WORDS, MAX_WORDS))
        target = task_target(task, sentence, words)
        examples.append({"input": f"{task}: {' '.join(sentence)}", "target": " ".join(target)})
    return examples


def write_jsonl(path: Path, examples: list[dict[str, str]]) -> None:
    text = "".join(json.dumps(e) + "\n" for e in examples)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class DemoResult:
    base_scores: dict[str, float]  # exact match of the pre-trained base on each toy task
    before: float  # exact match on "shift" before LoRA
    after: float  # ... and after
    merged_after: float  # ... after merging the reloaded adapter into the reloaded base
    reload_identical: bool
    merge_max_diff: float
    adapter_params: int
    total_params: int
    seconds: float
    out_dir: Path


@torch.no_grad()
def reload_and_merge(model, tokenizer, probe_examples, out: Path, progress: bool) -> tuple[Any, bool, float]:
    """The saved adapter reloaded into a fresh copy of the saved base, then merged: (merged model, whether the
    reloaded logits equal the trained model's, the merged model's largest logit difference)."""
    device, dtype = model_device(model), next(model.parameters()).dtype
    probe = tokenizer([e["input"] for e in probe_examples], padding=True, return_tensors="pt")
    targets = tokenizer([e["target"] for e in probe_examples], padding=True, return_tensors="pt")
    probe = {**probe, "decoder_input_ids": targets["input_ids"]}
    probe = {k: v.to(device) for k, v in probe.items()}
    expected = model(**probe).logits
    fresh = T5ForConditionalGeneration.from_pretrained(out / "base", dtype=dtype).to(device).eval()
    reloaded = load_adapter(fresh, out / "adapter", verbose=progress)
    reload_identical = torch.equal(reloaded(**probe).logits, expected)
    merged = merge_and_unload(reloaded)
    return merged, reload_identical, (merged(**probe).logits - expected).abs().max().item()


def run_lora_demo(
    out_dir: str | Path = LORA_DEMO_OUT,
    *,
    seed: int = 0,
    pretrain_steps: int = 800,
    lora_steps: int = 300,
    n_train: int = 2000,
    n_test: int = 200,
    n_words: int = len(WORDS),
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> DemoResult:
    """The whole demo; the defaults are ``make demo``'s, smaller settings make a quick test."""
    if not 2 <= n_words <= len(WORDS):
        raise ValueError(f"n_words must be in [2, {len(WORDS)}], got {n_words}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    words = WORDS[:n_words]
    say = print if progress else (lambda *a, **k: None)

    say("== 1. a base model: a small T5 pre-trained from scratch on 'copy' and 'reverse'")
    pretrain = make_examples("copy", n_train // 2, seed, words) + make_examples("reverse", n_train // 2, seed, words)
    lora_train = make_examples("shift", n_train // 2, seed, words)
    test = make_examples("shift", n_test, seed + 1, words)
    write_jsonl(out / "shift_train.jsonl", lora_train)
    write_jsonl(out / "shift_test.jsonl", test)
    tokenizer = train_tokenizer([e["input"] for e in pretrain + lora_train])
    target = resolve_device(device)
    model = build_demo_t5(tokenizer, seed=seed).to(target, resolve_dtype(dtype, target))
    train(model, tokenizer, pretrain, "full", TrainArgs(max_steps=pretrain_steps, batch_size=32, lr=3e-3, seed=seed),
          progress=progress)  # fmt: skip
    save_full_model(model, tokenizer, out / "base")
    base_scores = {
        task: evaluate(model, tokenizer, make_examples(task, n_test, seed + 1, words), progress=False).score
        for task in TASKS
    }
    say("   base exact match: " + ", ".join(f"{t} {s:.1%}" for t, s in base_scores.items()))

    say("== 2. teach it 'shift' with LoRA")
    before = base_scores["shift"]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q", "k", "v", "o"])
    args = TrainArgs(max_steps=lora_steps, batch_size=32, lr=5e-3, seed=seed)
    result = train(model, tokenizer, lora_train, config, args, output_dir=out / "adapter", progress=progress)
    trained = evaluate(model, tokenizer, test, predictions_file=out / "predictions.jsonl", progress=False)
    say(f"   'shift' exact match: {before:.1%} before -> {trained.score:.1%} after ({result.seconds:.1f}s)")

    say("== 3. reload the saved adapter into a fresh base, then merge it")
    merged, reload_identical, merge_max_diff = reload_and_merge(model, tokenizer, test[:32], out, progress)
    merged_score = evaluate(merged, tokenizer, test, progress=False).score
    say(
        f"   reloaded logits identical: {reload_identical}; merged: max |diff| {merge_max_diff:.2e}, "
        f"exact match {merged_score:.1%}"
    )

    say("== 4. a few generations of the merged model")
    shown = test[:5]
    for e, p in zip(shown, generate(merged, tokenizer, [e["input"] for e in shown]), strict=True):
        say(f"   {e['input']!r:42} -> {p!r:30} {'ok' if p == e['target'] else 'want ' + repr(e['target'])}")

    demo = DemoResult(
        base_scores=base_scores,
        before=before,
        after=trained.score,
        merged_after=merged_score,
        reload_identical=reload_identical,
        merge_max_diff=merge_max_diff,
        adapter_params=result.trainable_params,
        total_params=result.total_params,
        seconds=time.perf_counter() - t0,
        out_dir=out,
    )
    say(
        f"\nSummary: LoRA ({demo.adapter_params:,} of {demo.total_params:,} parameters) took 'shift' from "
        f"{demo.before:.1%} to {demo.after:.1%} exact match in {demo.seconds:.0f}s.\n"
        f"Files in {out}/: base/ (the T5 + tokenizer), adapter/ (PEFT folder), shift_*.jsonl, predictions.jsonl.\n"
        f"Try: loraloom inspect {out}/adapter\n"
        f"     loraloom eval --base {out}/base --adapter {out}/adapter --data {out}/shift_test.jsonl"
    )
    return demo


# ---- the main job: LoraHub on the built-in zoo ----------------------------------------------------

DEMO_SEEDS = (1, 2, 3, 4, 5)
# lorahub-gradient (Adam on the same weights; K = 40 forward-pass equivalents buy 13 steps) is not the
# paper's gradient-free method; it is shown beside it because on this world it finds much better weights in
# the same budget.
DEMO_METHODS = ("zero-shot", "retrieval-best", "lorahub", "lorahub-gradient", "lora", "icl")


def demo_settings(**changes):
    """The demo's experiment settings: the paper's protocol (5 shots, N = 20, K = 40), adapted to the zoo.

    - LoraHub runs the library's gradient-free default: the sequential search (population 1: nevergrad's
      NGOpt then picks Cobyla, as the reference's search does). Measured on this zoo (8 tasks x 5 seeds,
      K = 40): sequential 0.53 mean exact match, population 4 (NGOpt picks MetaModel) 0.34, gradient
      mode 0.89 (13 Adam steps: K counts forward-pass equivalents in every mode; 0.96 when it bought 40
      steps, at about three times the reference's cost).
    - LoRA on the 5 examples trains a module shaped like the zoo's (r 8, q and v) with the zoo's
      module learning rate (5e-3): the paper's 2e-4 is for 3B-parameter models and barely moves a
      1M-parameter one in 40 steps, which would make the baseline a straw man.
    - Answers are at most 3 words: 8 new tokens suffice; a test set of 50 per task and seed keeps the
      demo within ~5 minutes on 2 cores.
    """
    from .harness import ExperimentSettings

    values = dict(
        shots=5,
        max_test=50,
        num_modules=20,
        budget=40,
        learning_rates={"lora": 5e-3},
        gradient_runs=1,
        adapter_options={"lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q", "v"]}},
        max_new_tokens=8,
        batch_size=64,
    )
    values.update(changes)
    return ExperimentSettings.from_dict(values)


def run_hub_demo(
    out_dir: str | Path = HUB_DEMO_OUT,
    *,
    zoo: str | Path | None = None,
    tasks: list[str] | None = None,
    seeds: Iterable[int] = DEMO_SEEDS,
    methods: Iterable[str] = DEMO_METHODS,
    settings=None,
    progress: bool = True,
):
    """LoraHub on the zoo's held-out tasks through ``ll.experiment``; returns the harness's results.

    ``zoo``: an artifacts folder (default: the one shipped in the package), checked with
    ``zoo verify`` first. ``tasks``: held-out task names (default: the manifest's demo tasks).
    """
    from .data import load_examples
    from .harness import Task, experiment, report  # the harness: imported only when the demo runs
    from .zoo.build import ARTIFACTS
    from .zoo.verify import read_manifest, verify

    t0 = time.perf_counter()
    zoo = Path(zoo) if zoo is not None else ARTIFACTS
    say = print if progress else (lambda *a, **k: None)
    verify(zoo, load=False)
    manifest = read_manifest(zoo)
    demo = manifest["demo"]
    names = list(tasks) if tasks else list(demo["tasks"])
    unknown = [n for n in names if n not in manifest["held_out"]]
    if unknown:
        raise ValueError(f"not held-out zoo tasks: {unknown}; choose from {', '.join(manifest['held_out'])}")
    pool = [str(zoo / manifest["upstream"][m]["module"]) for m in demo["pool"]]
    task_list = [Task(n, load_examples(zoo / "tasks" / f"{n}.jsonl")) for n in names]
    settings = settings if settings is not None else demo_settings()
    say(
        f"LoraHub demo: {len(task_list)} held-out tasks x {len(list(seeds))} seeds, {len(pool)} modules in the "
        f"pool, methods {', '.join(methods)}; output in {out_dir}"
    )
    results = experiment(
        base=str(zoo / "base"),
        pool=pool,
        tasks=task_list,
        methods=list(methods),
        seeds=list(seeds),
        out=str(out_dir),
        settings=settings,
        progress=progress,
    )
    report_path = report(str(out_dir))
    say("\n" + results.markdown())
    say(f"\nreport: {report_path}  (demo wall time {time.perf_counter() - t0:.0f}s)")
    return results


def positive_int(text: str) -> int:
    """An argparse type: refused at parse time, before any folder is made."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options: shared by ``python -m loraloom.demo`` and ``loraloom demo``."""
    parser.add_argument("which", nargs="?", choices=("hub", "lora"), default="hub", help="default: %(default)s")
    parser.add_argument("--out", help=f"output folder (default: {HUB_DEMO_OUT}, or {LORA_DEMO_OUT} for lora)")
    parser.add_argument("--tasks", help="hub: comma-separated held-out task names (default: the zoo's demo set)")
    parser.add_argument("--seeds", default="1-5", help="hub: seeds, e.g. 1-5 or 1,3 (default: %(default)s)")
    parser.add_argument("--zoo", help="hub: a zoo artifacts folder (default: the one in the package)")
    parser.add_argument("--seed", type=int, default=0, help="lora: the walk-through's seed")
    parser.add_argument("--pretrain-steps", type=positive_int, default=800, help="lora: base pre-training steps")
    parser.add_argument("--lora-steps", type=positive_int, default=300, help="lora: LoRA training steps")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (default 1: a model this small gains nothing from more)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or step-by-step output")
    return parser


def run_from_args(args: argparse.Namespace):
    # Intra-op threads only add synchronisation on matrices this small, and on a busy machine their
    # spin-waiting can slow generation down many times over.
    torch.set_num_threads(args.threads)
    if args.which == "lora":
        return run_lora_demo(
            args.out or LORA_DEMO_OUT,
            seed=args.seed,
            pretrain_steps=args.pretrain_steps,
            lora_steps=args.lora_steps,
            device=args.device,
            dtype=args.dtype,
            progress=not args.quiet,
        )
    return run_hub_demo(
        args.out or HUB_DEMO_OUT,
        zoo=args.zoo,
        tasks=args.tasks.split(",") if args.tasks else None,
        seeds=parse_seeds(args.seeds),
        settings=demo_settings(device=args.device, dtype=args.dtype),
        progress=not args.quiet,
    )


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="python -m loraloom.demo",
        description="LoraHub on the built-in zoo (default), or `lora`: the LoRA walk-through from nothing.",
    )
    return run_from_args(add_device_arguments(add_demo_arguments(parser)).parse_args(argv))


if __name__ == "__main__":
    main()
