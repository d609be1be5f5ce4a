"""LoraHub search quality: best objective and seconds of candidate searches on the benchmark settings.

    python benchmarks/lorahub_search.py --setting small-a --searches default,sequential --seeds 5

Uses the settings of ``lorahub_vs_reference.py`` (built on first use in ``--work``/<setting>), loads the
base model, the 20 modules and the examples once, and runs each search for each seed in this process.
The best weights of each run are scored with the default "mean" objective in fp32, so runs are comparable
whatever objective or dtype they searched with. Objective values are deterministic per seed (machine load
changes the seconds only). Prints one JSON line per run and a table of medians; ``--out`` appends the
lines to a file.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lorahub_vs_reference import build_setting, setting  # noqa: E402

from loraloom.compat import reference_features  # noqa: E402
from loraloom.data import load_examples  # noqa: E402
from loraloom.hub import Composition, Objective, encode_few_shot, load_bank  # noqa: E402
from loraloom.hub.objective import parameters_in  # noqa: E402
from loraloom.hub.search import SearchSettings, adam_cost, run_search  # noqa: E402
from loraloom.models import load_base  # noqa: E402


def adam(steps: int, **fields) -> dict:
    """Gradient mode with the budget that buys ``steps`` Adam steps (3 each, + the last w scored)."""
    return {"mode": "gradient", "budget": adam_cost(steps), **fields}


def hybrid(evaluations: int, steps: int, **fields) -> dict:
    """Hybrid mode: ``evaluations`` gradient-free, then ``steps`` Adam steps (+ the last w scored)."""
    return {"mode": "hybrid", "budget": evaluations + adam_cost(steps), "gradient_steps": steps, **fields}


# name -> SearchSettings fields (budget 40 forward-pass equivalents unless given). The names count Adam steps
# (grad10: 10 steps) and hybrid's evaluations + steps; "grad-K40" is the default mode at the default budget.
# "reference" is NGOpt one at a time on the reference's formula, seeded as the reference seeds it (what
# loraloom.compat runs).
SEARCHES: dict[str, dict] = {
    "reference": {"mode": "nevergrad", "optimizer": "NGOpt", "population": 1},
    "sequential": {"mode": "nevergrad", "optimizer": "NGOpt", "population": 1},
    "ngopt4": {"mode": "nevergrad", "optimizer": "NGOpt", "population": 4},
    "cma4": {"mode": "nevergrad", "optimizer": "CMA", "population": 4},
    "cma4-s0.5": {"mode": "nevergrad", "optimizer": "CMA", "population": 4, "sigma": 0.5},
    "de4": {"mode": "nevergrad", "optimizer": "TwoPointsDE", "population": 4},
    "pso4": {"mode": "nevergrad", "optimizer": "PSO", "population": 4},
    "portfolio4": {"mode": "nevergrad", "optimizer": "Portfolio", "population": 4},
    "cobyla": {"mode": "nevergrad", "optimizer": "Cobyla", "population": 1},
    "grad-K40": {"mode": "gradient"},
    "grad40": adam(40),
    "grad20": adam(20),
    "grad10": adam(10),
    "grad10-lr0.1": adam(10, lr=0.1),
    "grad8-lr0.15": adam(8, lr=0.15),
    "grad10-bf16": adam(10, dtype="bf16"),
    "grad40-bf16": adam(40, dtype="bf16"),
    "grad40-lr0.1": adam(40, lr=0.1),
    "grad40-lr0.03": adam(40, lr=0.03),
    "hybrid-seq16+8": hybrid(16, 8, population=1),
    "grad6-lr0.1": adam(6, lr=0.1),
    "grad8-lr0.1": adam(8, lr=0.1),
    "grad12-lr0.1": adam(12, lr=0.1),
    "hybrid-seq32+8": hybrid(32, 8, population=1),
    "hybrid-cma4-32+8": hybrid(32, 8, optimizer="CMA", population=4),
    "hybrid-seq20+6-lr0.1": hybrid(20, 6, population=1, lr=0.1),
}


def parse_search(name: str) -> dict:
    """A named search, or name=json of SearchSettings fields."""
    if "=" in name:
        label, _, fields = name.partition("=")
        return json.loads(fields)
    return dict(SEARCHES[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="small-a", help="<shape>-<examples>: small-a, small-b, base-a, ...")
    parser.add_argument("--searches", default=",".join(SEARCHES))
    parser.add_argument("--seeds", type=int, default=5, help="seeds 1..N (a search that repeats itself runs twice)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "loraloom-lorahub-bench"))
    parser.add_argument("--out", help="append JSON lines here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work) / args.setting
    shape, _, example_set = args.setting.partition("-")
    build_setting(work, shape, example_set)
    base, modules, examples = setting(work)
    model, tokenizer = load_base(base)
    bank = load_bank(modules, base_model=model)
    features = encode_few_shot(model, tokenizer, load_examples(examples))
    inputs, targets = [e["input"] for e in examples], [e["target"] for e in examples]
    ref_features = reference_features(model, tokenizer, inputs, targets)
    rows = []
    with Composition(model, bank) as composition:
        scorer = Objective(composition, features, pad_token_id=0)
        times = []
        for _ in range(4):  # one warm-up
            t = time.perf_counter()
            scorer.token_loss_sums(torch.ones(1, len(bank)))
            times.append(time.perf_counter() - t)
        forward = statistics.median(times[1:])  # one unpadded fp32 candidate
    for name in re.split(r",(?![^{]*})", args.searches):  # commas inside {...} belong to the JSON
        fields = parse_search(name)
        dtype = {"bf16": torch.bfloat16}.get(fields.pop("dtype", None))
        previous = None
        with Composition(model, bank, fields.get("layer_groups")) as composition:
            scorer = Objective(composition, features, pad_token_id=0)
            for seed in range(1, args.seeds + 1):
                settings = SearchSettings(**{"budget": 40, **fields, "seed": seed})
                if name == "reference":
                    objective = Objective(composition, ref_features, pad_token_id=0, formula="reference")
                    random_state = np.random.RandomState(np.random.RandomState(seed).randint(2**32, dtype=np.uint32))
                else:
                    objective = Objective(composition, features, pad_token_id=0, dtype=dtype)
                    random_state = None
                start = time.perf_counter()
                with parameters_in(model, dtype):
                    found = run_search(objective, settings, random_state=random_state)
                seconds = time.perf_counter() - start
                best = scorer(torch.tensor(found.weights)).values.item()  # fp32, the mean objective
                row = {
                    "setting": args.setting,
                    "search": name,
                    "seed": seed,
                    "objective": best,
                    "seconds": seconds,
                    "forwards": seconds / forward,
                    "evaluations": len(found.trace),
                    "adam_steps": found.adam_steps,
                    "cost": found.cost,
                    "method": found.method,
                    "trace": [e.objective for e in found.trace],  # as searched (its own objective and dtype)
                    "elapsed": [e.elapsed for e in found.trace],
                }
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("trace", "elapsed")}), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                if settings.mode == "gradient" or (seed == 2 and found.weights == previous):
                    break  # the same search whatever the seed (Adam from 1/N; NGOpt>Cobyla): one run stands for all
                previous = found.weights
    print(f"\n{args.setting}: one unpadded fp32 forward {1000 * forward:.0f} ms; medians over seeds")
    print(f"{'search':28s}{'objective':>10s}{'seconds':>9s}{'forwards':>9s}  method")
    for name in dict.fromkeys(r["search"] for r in rows):
        rs = [r for r in rows if r["search"] == name]
        print(
            f"{name:28s}{statistics.median(r['objective'] for r in rs):10.4f}"
            f"{statistics.median(r['seconds'] for r in rs):9.2f}{statistics.median(r['forwards'] for r in rs):9.1f}"
            f"  {rs[0]['method']}"
        )


if __name__ == "__main__":
    main()
