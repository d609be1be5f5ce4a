"""A tiny world for the experiment harness tests: a saved base model, a pool of LoRA modules, BBH-format tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

from hub_modules import WORDS, make_modules, tokenizer
from tiny_models import tiny_llama, tiny_t5

from loraloom.harness import ExperimentSettings

BBH_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bbh"

# Tiny budgets: every method runs, in well under a second a cell.
FAST = ExperimentSettings(budget=4, epochs=2, gradient_runs=1, max_new_tokens=4, num_modules=4, max_test=3)


def task_examples(kind: str, n: int, seed: int) -> list[dict[str, str]]:
    """``kind`` = "copy" or "reverse" over 2-3 words of the tokenizer's word list."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 3))
        target = words if kind == "copy" else words[::-1]
        out.append({"input": f"{kind}: {' '.join(words)}", "target": " ".join(target)})
    return out


def write_bbh(folder: Path, name: str, examples: list[dict[str, str]]) -> Path:
    """A task file in BIG-Bench Hard's format."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"canary": "test data", "examples": examples}))
    return path


def build_world(root: Path, arch: str = "t5", seed: int = 0) -> dict[str, Path]:
    """base/ (model + tokenizer), pool/ (6 LoRA modules on q, v), tasks/ (copy_words, reverse_words: 9 examples each)."""
    causal = arch == "llama"
    tok = tokenizer(add_eos=not causal)
    model = tiny_llama(seed) if causal else tiny_t5(seed)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    make_modules(model, root / "pool", 6, targets=["q_proj", "v_proj"] if causal else ["q", "v"])
    write_bbh(root / "tasks", "copy_words", task_examples("copy", 9, seed=1))
    write_bbh(root / "tasks", "reverse_words", task_examples("reverse", 9, seed=2))
    return {"base": root / "base", "pool": root / "pool", "tasks": root / "tasks"}
