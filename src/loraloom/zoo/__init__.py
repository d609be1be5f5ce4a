"""loraloom's built-in world: a task generator, a tiny T5 base and a hub of LoRA modules, shipped built."""

from .build import ARTIFACTS, MANIFEST, BuildReport, BuildSettings, build
from .tasks import TaskSpec, held_out_tasks, make_examples, upstream_tasks

__all__ = [
    "ARTIFACTS",
    "MANIFEST",
    "BuildReport",
    "BuildSettings",
    "TaskSpec",
    "build",
    "held_out_tasks",
    "make_examples",
    "upstream_tasks",
]
