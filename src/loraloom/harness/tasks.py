"""Tasks of an experiment: BBH-format JSON files, folders of JSONL files, or Python lists.

A task source is one of:

- ``"bbh:DIR"``: every ``*.json`` file in DIR, BIG-Bench Hard's format (``{"canary": ..., "examples":
  [{"input", "target"}, ...]}``); the task is named after the file.
- ``"bbh:download"``: the 27 BBH files fetched from the public BIG-Bench Hard repository into
  ``~/.cache/loraloom/bbh`` (once; a clear error when offline).
- ``"jsonl:DIR"``: every ``*.jsonl`` file in DIR, one ``{"input", "target"}`` object per line.
- a list of ``Task`` objects.

Splits: per task and seed, ``shots`` learning examples drawn with the seed; the rest are test examples
(in the seeded order, capped at ``max_test``).
"""

from __future__ import annotations

import fnmatch
import os
import random
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import DataError, Example, load_examples
from ..files import atomic_write
from .settings import stable_hash

BBH_TASKS = (
    "boolean_expressions causal_judgement date_understanding disambiguation_qa dyck_languages formal_fallacies "
    "geometric_shapes hyperbaton logical_deduction_five_objects logical_deduction_seven_objects "
    "logical_deduction_three_objects movie_recommendation multistep_arithmetic_two navigate object_counting "
    "penguins_in_a_table reasoning_about_colored_objects ruin_names salient_translation_error_detection snarks "
    "sports_understanding temporal_sequences tracking_shuffled_objects_five_objects "
    "tracking_shuffled_objects_seven_objects tracking_shuffled_objects_three_objects web_of_lies word_sorting"
).split()
BBH_URL = "https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/main/bbh/{task}.json"
BBH_CACHE = Path(os.environ.get("LORALOOM_CACHE", Path.home() / ".cache" / "loraloom")) / "bbh"


@dataclass
class Task:
    """A named task: its (input, target) examples (dicts, pairs or ``Example``s; stored as ``Example``s)."""

    name: str
    examples: list[Any]
    source: str | None = field(default=None, compare=False)  # the file it came from, if any

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise DataError(f"a task needs a non-empty name, got {self.name!r}")
        if any(c in self.name for c in "/\\") or self.name in (".", ".."):
            raise DataError(f"task name {self.name!r} names a predictions folder: no '/' or '\\', not '.' or '..'")
        try:
            self.examples = load_examples(list(self.examples))
        except DataError as e:
            raise DataError(f"task {self.name!r}: {e}") from e

    def fingerprint(self) -> str:
        """A hash of the examples: cells of a changed task are new cells."""
        return stable_hash([[e.input, e.target] for e in self.examples])

    def split(self, shots: int, seed: int, max_test: int | None = None) -> tuple[list[Example], list[Example]]:
        """(``shots`` learning examples, the test examples): one shuffle with ``random.Random(seed)``;
        the first ``shots`` learn, the next ``max_test`` (default: all the rest) test."""
        n = len(self.examples)
        if n < shots + 1:
            raise DataError(f"task {self.name!r}: {n} examples, fewer than shots + 1 = {shots + 1}")
        order = random.Random(seed).sample(range(n), n)
        test = order[shots:] if max_test is None else order[shots : shots + max_test]
        return [self.examples[i] for i in order[:shots]], [self.examples[i] for i in test]


def load_tasks(source: str | os.PathLike | Sequence[Task], task_filter: str | None = None) -> list[Task]:
    """Tasks from a source string (``bbh:DIR``, ``bbh:download``, ``jsonl:DIR``) or a list; ``task_filter``
    is a glob over task names (``"logical_*"``). Every file is read and checked here, before any work."""
    if isinstance(source, (str, os.PathLike)):
        tasks = _tasks_from_string(str(source))
    else:
        tasks = list(source)
        if not all(isinstance(t, Task) for t in tasks):
            raise DataError("tasks: expected 'bbh:DIR', 'jsonl:DIR', 'bbh:download' or a list of Task objects")
    if not tasks:
        raise DataError(f"tasks: no tasks in {source!r}")
    names = [t.name for t in tasks]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise DataError(f"tasks: two tasks are named {duplicate!r}")
    if task_filter:
        tasks = [t for t in tasks if fnmatch.fnmatchcase(t.name, task_filter)]
        if not tasks:
            raise DataError(f"task filter {task_filter!r} matches none of the tasks: {', '.join(names)}")
    return tasks


def _tasks_from_string(source: str) -> list[Task]:
    kind, sep, where = source.partition(":")
    if not sep or kind not in ("bbh", "jsonl") or not where:
        raise DataError(f"tasks {source!r}: expected 'bbh:DIR', 'bbh:download' or 'jsonl:DIR'")
    folder = download_bbh() if (kind, where) == ("bbh", "download") else Path(where).expanduser()
    if not folder.is_dir():
        raise DataError(f"tasks {source!r}: {folder} is not a directory")
    suffix = ".json" if kind == "bbh" else ".jsonl"
    files = sorted(folder.glob(f"*{suffix}"))
    if not files:
        raise DataError(f"tasks {source!r}: no {suffix} files in {folder}")
    return [read_task_file(f) for f in files]


def read_task_file(path: Path) -> Task:
    """A task from a BBH JSON or a JSONL file, named after the file; an empty file is an error naming it."""
    if path.stat().st_size == 0 or not path.read_text(encoding="utf-8", errors="replace").strip():
        raise DataError(f"{path}: empty task file")
    return Task(path.stem, load_examples(path), source=str(path))


def download_bbh(folder: Path = BBH_CACHE, tasks: Sequence[str] = BBH_TASKS, timeout: float = 30.0) -> Path:
    """The BBH task files in ``folder``, fetched from the public BIG-Bench Hard repository if missing."""
    for task in tasks:
        path = folder / f"{task}.json"
        if path.is_file():
            continue
        url = BBH_URL.format(task=task)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise DataError(
                f"bbh:download: cannot fetch {url} ({e}); are you offline? Put the BIG-Bench Hard files "
                "(github.com/suzgunmirac/BIG-Bench-Hard, folder bbh/) in a folder and pass --tasks bbh:DIR"
            ) from e
        atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
    return folder


__all__ = ["BBH_TASKS", "Task", "download_bbh", "load_tasks", "read_task_file"]
