"""Composition methods on the built-in zoo: which N modules, and how they are put together.

    python benchmarks/composition.py [--quick] [--seeds 1-5] [--tasks a,b] [--methods m1,m2] [--out DIR]

The whole 32-module hub (16 instructed + 16 bare modules) is the pool, N = 20 modules per cell, on the
demo's held-out tasks (8 bare tasks: the task is known only from the 5 examples), 5 seeds (each drawing its own 5 examples
and test set, unless ``--split-seed``), through the
experiment harness with the demo's settings (5 shots, K = 40, 50 test examples per task and seed). With
the whole hub as the pool, a random 20 holds on average 10 modules of the wrong asking (instructed, of no
use on a bare input): that is what a smarter selection should fix. Methods (harness/methods.py):

- lorahub: the paper's, 20 drawn at random with the seed, gradient-free search;
- lorahub-arrow / lorahub-retrieval / lorahub-embedding: the same search over the 20 that Arrow's
  alignment / their own few-shot loss / their task-card embedding rank first;
- retrieval-best: the one module of lowest few-shot loss, alone; arrow: Arrow's per-token routing (top 3)
  over the Arrow-selected 20, no search;
- ties / dare / cat: lorahub's random 20, weights searched like lorahub's but every candidate merged with
  the operator (ties, dare_ties at density 0.5, cat); zero-shot as the floor.

Cells are stored in the run folder (``--out``): an interrupted run resumes where it stopped. Prints, per
method, the mean exact match, the spread across seeds (std over the 5 seeds, per task, averaged over the
tasks; and the std of the per-seed mean over tasks) and seconds per cell.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from loraloom.data import load_examples
from loraloom.demo import demo_settings
from loraloom.harness import Task, experiment
from loraloom.seeds import parse_seeds
from loraloom.zoo.build import ARTIFACTS
from loraloom.zoo.verify import read_manifest

METHODS = (
    "zero-shot",
    "retrieval-best",
    "lorahub",
    "lorahub-arrow",
    "lorahub-retrieval",
    "lorahub-embedding",
    "arrow",
    "ties",
    "dare",
    "cat",
)
DEFAULT_OUT = Path(__file__).resolve().parent / ".composition-run"


def spread(rows: list[dict], method: str) -> dict[str, float]:
    """Mean exact match of ``method``'s finished cells, its std across seeds two ways, seconds per cell."""
    cells = [r for r in rows if r["method"] == method and r["status"] == "done"]
    tasks = sorted({r["task"] for r in cells})
    seeds = sorted({r["seed"] for r in cells})
    by_task = [[r["score"] for r in cells if r["task"] == t] for t in tasks]
    by_seed = [statistics.mean(r["score"] for r in cells if r["seed"] == s) for s in seeds]
    return {
        "cells": len(cells),
        "mean": statistics.mean(r["score"] for r in cells) if cells else float("nan"),
        "task_std": statistics.mean(statistics.pstdev(s) for s in by_task) if by_task else float("nan"),
        "seed_std": statistics.pstdev(by_seed) if len(by_seed) > 1 else 0.0,
        "seconds": statistics.mean(r["seconds"] for r in cells) if cells else float("nan"),
    }


def table(rows: list[dict], methods: list[str]) -> str:
    lines = [
        "| method | cells | mean EM | std across seeds (per task, mean) | std of seed means | s / cell |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method in methods:
        s = spread(rows, method)
        lines.append(
            f"| {method} | {s['cells']} | {100 * s['mean']:.1f} | {100 * s['task_std']:.1f} | "
            f"{100 * s['seed_std']:.1f} | {s['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 tasks, 2 seeds, K = 10, 10 test examples")
    parser.add_argument("--seeds", default="1-5", help="default: %(default)s")
    parser.add_argument("--tasks", help="comma-separated held-out tasks (default: the demo's 8)")
    parser.add_argument("--methods", default=",".join(METHODS), help="default: %(default)s")
    parser.add_argument("--num", type=int, default=20, help="modules per cell (default: %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the run folder (default: %(default)s)")
    split = "one learning/test split for every seed (the paper's BBH protocol: only the module draw and the search "
    parser.add_argument("--split-seed", type=int, help=split + "seed vary); default: each seed draws its own split")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # matrices this small gain nothing from more threads; 2 shared cores here

    manifest = read_manifest(ARTIFACTS)
    pool = [str(ARTIFACTS / entry["module"]) for entry in manifest["upstream"].values()]
    names = args.tasks.split(",") if args.tasks else list(manifest["demo"]["tasks"])
    seeds = parse_seeds(args.seeds)
    changes = {"num_modules": args.num, "split_seed": args.split_seed}
    out = Path(args.out)
    if args.quick:
        names, seeds = names[:2], seeds[:2]
        changes.update(budget=10, max_test=10)
        out = out.with_name(out.name + "-quick")
    tasks = [Task(n, load_examples(ARTIFACTS / "tasks" / f"{n}.jsonl")) for n in names]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(f"{len(tasks)} tasks x {len(seeds)} seeds x {len(methods)} methods, pool {len(pool)}, N = {args.num}; {out}")
    start = time.perf_counter()
    results = experiment(
        base=str(ARTIFACTS / "base"),
        pool=pool,
        tasks=tasks,
        methods=methods,
        seeds=seeds,
        out=str(out),
        settings=demo_settings(**changes),
        progress=sys.stderr.isatty(),
    )
    print(table(list(results), methods))
    print(f"tasks: {', '.join(names)}; seeds: {seeds}; wall {time.perf_counter() - start:.0f}s (this call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
