"""LoraHub's objective against an older revision of it, in one process: the same value, and what it costs.

    python benchmarks/lorahub_objective_ab.py [--old REV] [--rounds 7] [--work DIR]

Loads ``src/loraloom/hub/objective.py`` as it was at git revision ``--old`` (default: the branch point,
c3da4cb) beside the current one, on the setting of ``lorahub_vs_reference.py`` (FLAN-T5-small shapes, 20
modules r=16 on q,v, example set a; built there first). Both score the same composition, so only the
objective's own code differs. Printed: the objective of a few w under both (max |difference|), and per
round, interleaved, the CPU time (one thread) of an evaluation of one fresh w and of one gradient-mode
step (forward with gradients for w, backward), medians over rounds. CPU time moves far less with a
shared machine's load than wall time does, but not nothing (the cores share caches).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lorahub_vs_reference import build_setting, setting  # noqa: E402


def load_revision(rev: str, tmp: Path):
    """objective.py at ``rev``, as the module ``loraloom.hub.objective_<rev>`` (its relative imports work)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:src/loraloom/hub/objective.py"], capture_output=True, text=True, check=True, cwd=HERE
    ).stdout
    path = tmp / f"objective_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"loraloom.hub.objective_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="c3da4cb", help="git revision of the objective to compare with")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "loraloom-lorahub-bench"))
    args = parser.parse_args()

    import torch

    from loraloom.compat import reference_features
    from loraloom.hub import Composition, load_bank
    from loraloom.hub import objective as current
    from loraloom.models import load_base

    torch.set_num_threads(1)
    work = Path(args.work) / "small-a"
    build_setting(work)
    base, modules, examples = setting(work)
    model, tokenizer = load_base(base)
    model.requires_grad_(False)  # as gradient mode runs: gradients for w only
    features = reference_features(model, tokenizer, [e["input"] for e in examples], [e["target"] for e in examples])
    with tempfile.TemporaryDirectory() as tmp, Composition(model, load_bank(modules, base_model=model)) as comp:
        old = load_revision(args.old, Path(tmp))
        objectives = {
            args.old: old.Objective(comp, features, pad_token_id=0),
            "current": current.Objective(comp, features, pad_token_id=0),
        }
        g = torch.Generator().manual_seed(0)
        w = torch.rand(4, comp.n_weights, generator=g) * 3 - 1.5
        values = {k: o(w).values for k, o in objectives.items()}
        diff = (values[args.old] - values["current"]).abs().max().item()
        print(f"objective of 4 w: {values['current'].tolist()}; max |{args.old} - current| = {diff:.2e}")
        evals: dict[str, list[float]] = {k: [] for k in objectives}
        steps: dict[str, list[float]] = {k: [] for k in objectives}
        for r in range(args.rounds + 1):  # round 0 warms up
            order = list(objectives.items())
            for name, o in order if r % 2 else order[::-1]:
                w = torch.rand(1, comp.n_weights, generator=g) * 3 - 1.5

                def evaluate(o=o, w=w) -> None:
                    with torch.inference_mode():
                        o.token_loss_sums(w)

                def step(o=o, w=w) -> None:
                    o.token_loss_sums(w.clone().requires_grad_(True)).sum().backward()

                e, s = cpu_seconds(evaluate), cpu_seconds(step)
                if r:
                    evals[name].append(e)
                    steps[name].append(s)
    print(f"CPU ms, one thread, medians over {args.rounds} interleaved rounds:")
    for name in objectives:
        print(
            f"  {name:10s} evaluation {1000 * statistics.median(evals[name]):6.0f}   "
            f"step (forward + backward) {1000 * statistics.median(steps[name]):6.0f}"
        )
    ratio_e = statistics.median(evals["current"]) / statistics.median(evals[args.old])
    ratio_s = statistics.median(steps["current"]) / statistics.median(steps[args.old])
    print(
        "RESULT "
        + json.dumps({"max_abs_diff": diff, "evaluation_current_over_old": ratio_e, "step_current_over_old": ratio_s})
    )


if __name__ == "__main__":
    main()
