"""LoraHub: what one Adam step of the gradient search costs, in objective evaluations (forward passes).

    python benchmarks/lorahub_step_cost.py [--settings tiny-t5,tiny-gpt2,small-a,small-b] [--rounds 7]

The search budget is counted in forward-pass equivalents: one objective evaluation of one candidate on the
few-shot examples (``Objective.__call__``, no gradient) costs 1. This script measures an Adam step of
``gradient_search`` (forward with gradients for w, backward, the Adam update and the clamp) against that
unit, in one process with one thread: per round, ``--evals`` evaluations of fresh random w and a
``--steps``-step gradient search; the ratio is per round (step seconds over evaluation seconds), and the
median over rounds is printed, in wall time and in CPU time (with one thread, CPU time moves far less
with a shared machine's load). Settings: the tests' tiny T5 and GPT-2 (5 examples, 4 modules r=4 on their
attention), and FLAN-T5-small shapes with 20 modules r=16 on q,v and the example sets a / b of
``lorahub_vs_reference.py`` (built in ``--work`` on first use; random weights, no download).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lorahub_vs_reference import build_setting, setting  # noqa: E402

from loraloom.adapters import LoraConfig, write_adapter_folder  # noqa: E402
from loraloom.adapters.base import layer_dims  # noqa: E402
from loraloom.adapters.inject import find_targets  # noqa: E402
from loraloom.data import load_examples  # noqa: E402
from loraloom.hub import Composition, Objective, encode_few_shot, load_bank  # noqa: E402
from loraloom.hub.search import SearchSettings, gradient_search  # noqa: E402
from loraloom.models import load_base  # noqa: E402
from loraloom.zoo.base import train_tokenizer  # noqa: E402

TINY_WORDS = "ant bee cat dog eel fox gnu hen jay kiwi lark mole newt owl pig rat seal toad vole yak".split()
TINY_EXAMPLES = [  # tests/hub_modules.py's examples
    {"input": "copy: ant bee", "target": "ant bee"},
    {"input": "copy: cat dog eel fox gnu hen jay kiwi", "target": "cat dog"},
    {"input": "reverse: lark mole newt", "target": "newt mole lark"},
    {"input": "copy: owl pig rat seal toad vole yak ant bee cat dog eel fox", "target": "owl"},
    {"input": "reverse: gnu hen", "target": "hen gnu"},
]


def tiny_setting(kind: str, root: Path):
    """The tests' tiny T5 or GPT-2 (tests/tiny_models.py's configs), its tokenizer, 4 random modules."""
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "t5":
        config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
        model, targets = T5ForConditionalGeneration(config).eval(), ["q", "v"]
    else:
        config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                            bos_token_id=1, eos_token_id=1, pad_token_id=0)  # fmt: skip
        model, targets = GPT2LMHeadModel(config).eval(), ["c_attn"]
    tokenizer = train_tokenizer([" ".join(TINY_WORDS) + " copy: reverse:"] * 4, vocab_size=120, add_eos=kind == "t5")
    g = torch.Generator().manual_seed(0)
    modules = []
    for i in range(4):
        tensors = {}
        for name in find_targets(model, targets):
            d_in, d_out = layer_dims(model.get_submodule(name))
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(4, d_in, generator=g) * 0.2
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, 4, generator=g) * 0.2
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=kind == "gpt2")
        write_adapter_folder(root / f"m{i}", config, tensors)
        modules.append(str(root / f"m{i}"))
    return model, tokenizer, modules, TINY_EXAMPLES


def load_setting(name: str, work: Path):
    if name.startswith("tiny-"):
        return tiny_setting(name.removeprefix("tiny-"), work / name)
    shape, _, example_set = name.partition("-")
    build_setting(work / name, shape, example_set)
    base, modules, examples = setting(work / name)
    model, tokenizer = load_base(base)
    return model, tokenizer, modules, examples


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def measure(name: str, work: Path, rounds: int, evals: int, steps: int) -> dict[str, float]:
    model, tokenizer, modules, examples = load_setting(name, work)
    features = encode_few_shot(model, tokenizer, load_examples(examples))
    bank = load_bank(modules, base_model=model)
    settings = SearchSettings(mode="gradient", budget=steps * 8)
    g = torch.Generator().manual_seed(0)
    wall, cpu = [], []
    with Composition(model, bank) as composition:
        objective = Objective(composition, features, pad_token_id=tokenizer.pad_token_id)
        objective(torch.rand(1, len(bank), generator=g))  # warm-up
        gradient_search(objective, settings, steps=2)
        for _ in range(rounds):
            w0, c0 = clocks()
            for _ in range(evals):  # fresh w each time: no memo hit
                objective(torch.rand(1, len(bank), generator=g))
            w1, c1 = clocks()
            gradient_search(objective, settings, steps=steps)
            w2, c2 = clocks()
            wall.append(((w2 - w1) / steps) / ((w1 - w0) / evals))
            cpu.append(((c2 - c1) / steps) / ((c1 - c0) / evals))
            forward_ms = 1000 * (w1 - w0) / evals
    return {
        "wall": statistics.median(wall),
        "cpu": statistics.median(cpu),
        "max_cpu": max(cpu),
        "forward_ms": forward_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="tiny-t5,tiny-gpt2,small-a,small-b")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--evals", type=int, default=8, help="objective evaluations per round")
    parser.add_argument("--steps", type=int, default=4, help="Adam steps per round")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "loraloom-lorahub-bench"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'setting':10} {'step/eval wall':>15} {'step/eval cpu':>14} {'max cpu':>8} {'eval ms':>8}")
    for name in args.settings.split(","):
        r = measure(name, Path(args.work), args.rounds, args.evals, args.steps)
        print(f"{name:10} {r['wall']:15.2f} {r['cpu']:14.2f} {r['max_cpu']:8.2f} {r['forward_ms']:8.1f}", flush=True)


if __name__ == "__main__":
    main()
