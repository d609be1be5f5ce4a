"""The zoo's task world: a seeded generator of short text-to-text tasks a 1M-parameter T5 learns in minutes.

A *skill* is "the word of category C" (8 categories of 6 words); a *format* says how the answer is
written: ``say`` -> ``red``, ``the`` -> ``the red``, ``is`` -> ``it is red``. An input is 3 to 5 words
from distinct categories, one of them of category C. A task is one (category, format) pair, asked in
one of two ways:

- instructed (task name ``color-the``): the input names the pair, ``color the : milk red bus`` -> ``the red``;
- bare (task name ``color-the-bare``): the input starts with a generic ``task :`` prefix, so the pair
  is known only from examples (or from a module trained on them), ``task : milk red bus`` -> ``the red``.

Of the 24 pairs, 16 are upstream (they train the base, instructed only, and one LoRA module each, in
both askings) and 8 are held out: each category is held out with one format it is never trained with,
so a held-out task is a known skill in a known format, combined for the first time. Held-out tasks
never train the base or any module. (Measured in a pilot: positional skills, counting and option-letter
answers were not learnt at this scale; content skills and prefix formats were, see DEMO-PILOT.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CATEGORIES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "black", "white", "pink"),
    "animal": ("cat", "dog", "horse", "lion", "mouse", "bird"),
    "food": ("bread", "rice", "apple", "cake", "egg", "soup"),
    "tool": ("hammer", "saw", "drill", "knife", "rope", "axe"),
    "body": ("hand", "foot", "nose", "ear", "knee", "arm"),
    "place": ("park", "bank", "school", "beach", "farm", "city"),
    "drink": ("milk", "tea", "juice", "water", "coffee", "wine"),
    "vehicle": ("bus", "car", "train", "boat", "bike", "truck"),
}
FORMATS: dict[str, str] = {"say": "{}", "the": "the {}", "is": "it is {}"}
MIN_WORDS, MAX_WORDS = 3, 5
BARE_PREFIX = "task"  # the generic instruction of a bare task
ASKINGS = ("instructed", "bare")


@dataclass(frozen=True)
class TaskSpec:
    """One task: a skill (category), an answer format and how it is asked."""

    category: str
    format: str
    asking: str = "instructed"

    @property
    def name(self) -> str:
        base = f"{self.category}-{self.format}"
        return base if self.asking == "instructed" else f"{base}-bare"

    @property
    def pair(self) -> str:
        return f"{self.category}-{self.format}"


def _held_out_format(category_index: int) -> str:
    """Category i is held out with format i mod 3: each format is held out for 2 or 3 categories."""
    return list(FORMATS)[category_index % len(FORMATS)]


def held_out_pairs() -> list[tuple[str, str]]:
    return [(c, _held_out_format(i)) for i, c in enumerate(CATEGORIES)]


def upstream_pairs() -> list[tuple[str, str]]:
    held = set(held_out_pairs())
    return [(c, f) for c in CATEGORIES for f in FORMATS if (c, f) not in held]


def upstream_tasks(asking: str = "instructed") -> list[TaskSpec]:
    """The 16 upstream tasks asked one way: what the base (instructed) and the modules train on."""
    return [TaskSpec(c, f, asking) for c, f in upstream_pairs()]


def held_out_tasks(asking: str = "bare") -> list[TaskSpec]:
    """The 8 held-out tasks: one per category, each with a format that category never trains with."""
    return [TaskSpec(c, f, asking) for c, f in held_out_pairs()]


def task_by_name(name: str) -> TaskSpec:
    parts = name.split("-")
    asking = "bare" if parts[-1] == "bare" else "instructed"
    if asking == "bare":
        parts = parts[:-1]
    if len(parts) != 2 or parts[0] not in CATEGORIES or parts[1] not in FORMATS:
        raise ValueError(
            f"unknown zoo task {name!r}: expected CATEGORY-FORMAT[-bare] with a category from "
            f"{', '.join(CATEGORIES)} and a format from {', '.join(FORMATS)}"
        )
    return TaskSpec(parts[0], parts[1], asking)


def make_example(spec: TaskSpec, rng: random.Random) -> dict[str, str]:
    """One example of ``spec``: 3-5 words from distinct categories including ``spec.category``, shuffled."""
    n = rng.randint(MIN_WORDS, MAX_WORDS)
    others = rng.sample([c for c in CATEGORIES if c != spec.category], n - 1)
    categories = [spec.category, *others]
    rng.shuffle(categories)
    words = [rng.choice(CATEGORIES[c]) for c in categories]
    answer = words[categories.index(spec.category)]
    prefix = f"{spec.category} {spec.format}" if spec.asking == "instructed" else BARE_PREFIX
    return {"input": f"{prefix} : {' '.join(words)}", "target": FORMATS[spec.format].format(answer)}


def make_examples(spec: TaskSpec | str, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` examples of a task, the same for the same ``seed`` (string seeds hash stably in ``random``)."""
    spec = task_by_name(spec) if isinstance(spec, str) else spec
    rng = random.Random(f"{spec.name}/{seed}")
    return [make_example(spec, rng) for _ in range(n)]


def base_training_batch(step: int, batch_size: int, seed: int) -> list[dict[str, str]]:
    """The base model's batch at ``step``: upstream instructed tasks only, drawn uniformly, fixed per step.

    Each step's batch depends only on (seed, step), so an interrupted build resumes on the same data.
    """
    rng = random.Random(f"base/{seed}/{step}")
    tasks = upstream_tasks("instructed")
    return [make_example(rng.choice(tasks), rng) for _ in range(batch_size)]


def vocabulary_texts() -> list[str]:
    """Every word the world uses, for the tokenizer."""
    words = [w for ws in CATEGORIES.values() for w in ws]
    prompt_words = [*CATEGORIES, *FORMATS, BARE_PREFIX, ":", "the", "it", "is"]
    return [" ".join(words), " ".join(prompt_words)]


__all__ = [
    "ASKINGS",
    "BARE_PREFIX",
    "CATEGORIES",
    "FORMATS",
    "TaskSpec",
    "base_training_batch",
    "held_out_pairs",
    "held_out_tasks",
    "make_example",
    "make_examples",
    "task_by_name",
    "upstream_pairs",
    "upstream_tasks",
    "vocabulary_texts",
]
