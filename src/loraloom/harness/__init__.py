"""The experiment harness: the LoraHub paper's BBH protocol and its baselines, for any base model and pool.

tasks.py (task sources, splits) -> settings.py (every protocol setting, hashed per cell) -> methods.py
(one function per method) -> runner.py (``experiment``: the cells, serially or on Ray) -> store.py
(SQLite results, resume) -> results.py (tables) -> report.py (report.md, CSV, plots).
"""

from .methods import METHODS, POOL_METHODS
from .report import report
from .results import Results, load_results
from .runner import DEFAULT_METHODS, experiment
from .settings import ExperimentSettings
from .tasks import BBH_TASKS, Task, load_tasks

__all__ = [
    "BBH_TASKS",
    "DEFAULT_METHODS",
    "METHODS",
    "POOL_METHODS",
    "ExperimentSettings",
    "Results",
    "Task",
    "experiment",
    "load_results",
    "load_tasks",
    "report",
]
