"""LoraHub: compose N LoRA modules with weights w found from a few examples of a new task.

bank.py (modules stacked per layer) -> compose.py (the composed layer, one w row per candidate) ->
objective.py (few-shot loss + L1 penalty, a pure function of w) -> search.py (``SearchSettings``;
nevergrad ask/tell, gradient and hybrid modes, trace) -> engine.py (``lorahub``) -> result.py (save, merge). select.py picks modules
from a pool. arrow.py routes each token through its best-aligned modules instead (Arrow, no search).
"""

from .arrow import ArrowLayer
from .bank import ModuleBank, layer_groups_of, list_pool, load_bank
from .compose import ComposedLoraLayer, Composition
from .engine import lorahub, merge_composition
from .objective import Objective, Scores, encode_few_shot
from .result import LoraHubResult, read_weights
from .search import (
    DEFAULT_MODE,
    DEFAULT_OPTIMIZER,
    DEFAULT_POPULATION,
    MODES,
    Evaluation,
    SearchResult,
    SearchSettings,
    gradient_search,
    hybrid_search,
    nevergrad_search,
    run_search,
)
from .select import Selection, select_arrow, select_embedding, select_random, select_retrieval

__all__ = [
    "DEFAULT_MODE",
    "DEFAULT_OPTIMIZER",
    "DEFAULT_POPULATION",
    "MODES",
    "ArrowLayer",
    "ComposedLoraLayer",
    "Composition",
    "Evaluation",
    "LoraHubResult",
    "ModuleBank",
    "Objective",
    "Scores",
    "SearchResult",
    "SearchSettings",
    "Selection",
    "merge_composition",
    "encode_few_shot",
    "gradient_search",
    "hybrid_search",
    "layer_groups_of",
    "list_pool",
    "load_bank",
    "lorahub",
    "nevergrad_search",
    "read_weights",
    "run_search",
    "select_arrow",
    "select_embedding",
    "select_random",
    "select_retrieval",
]
