"""LoraHub: compose N LoRA modules with weights w found from a few examples of a new task.

bank.py (modules stacked per layer) -> compose.py (the composed layer, one w row per candidate) ->
objective.py (few-shot loss + L1 penalty, a pure function of w) -> search.py (nevergrad ask/tell,
gradient mode, trace) -> engine.py (``lorahub``) -> result.py (save, merge). select.py picks modules
from a pool.
"""

from .bank import ModuleBank, list_pool, load_bank
from .compose import ComposedLoraLayer, Composition
from .engine import DEFAULT_POPULATION, compose, load_base_model, lorahub
from .objective import Objective, Scores, encode_few_shot
from .result import LoraHubResult, read_weights
from .search import Evaluation, SearchResult, gradient_search, nevergrad_search
from .select import Selection, select_random, select_retrieval

__all__ = [
    "DEFAULT_POPULATION",
    "ComposedLoraLayer",
    "Composition",
    "Evaluation",
    "LoraHubResult",
    "ModuleBank",
    "Objective",
    "Scores",
    "SearchResult",
    "Selection",
    "compose",
    "encode_few_shot",
    "gradient_search",
    "list_pool",
    "load_bank",
    "load_base_model",
    "lorahub",
    "nevergrad_search",
    "read_weights",
    "select_random",
    "select_retrieval",
]
