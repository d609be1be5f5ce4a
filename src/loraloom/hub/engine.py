"""``lorahub``: compose a hub of LoRA modules for a new task from a few examples.

The data flow: module files -> bank (one read per file) -> composed layers installed once in the base
model -> each evaluation sets w and runs one forward per micro-batch for P candidates -> optimizer ->
best w -> result (merge into the base, or save as a PEFT folder). The base model is left as it came.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch import nn

from ..adapters.base import is_quantized as quantized_weight
from ..data import load_examples, pad_token_id_of
from ..models import load_base
from .bank import ModuleBank, load_bank
from .compose import Composition
from .objective import Objective, encode_few_shot, parameters_in
from .result import LoraHubResult
from .search import SearchSettings, run_search
from .select import (
    DEFAULT_NUM,
    METHODS,
    Selection,
    pool_modules,
    select_arrow,
    select_embedding,
    select_random,
    select_retrieval,
)


class _Clock:
    """Wall seconds per phase of a run, in the order the phases ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def lorahub(
    base: nn.Module | str,
    modules: Sequence[str | os.PathLike] | ModuleBank | None = None,
    examples: str | os.PathLike | Iterable[Any] | None = None,
    *,
    tokenizer: Any = None,
    pool: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num: int = DEFAULT_NUM,
    select: str = "random",
    settings: SearchSettings | None = None,
    max_length: int | None = None,
    input_field: str = "input",
    target_field: str = "target",
    device: str | None = None,
    low_memory: bool | None = None,
    progress: bool = False,
    **options: Any,
) -> LoraHubResult:
    """Find weights w for ``modules`` (or ``num`` modules chosen from ``pool``) that fit ``examples``.

    Args:
        base: the base model (seq2seq or causal LM) or its folder / hub id.
        modules: LoRA module folders or hub ids (all the same rank, alpha and targets), or a bank.
        examples: few-shot (input, target) examples: a .jsonl/.json/.csv file, or a list of dicts,
            pairs or ``Example``s. Too-long examples are truncated to the model's limit with a warning.
        pool, num, select: instead of ``modules``, ``num`` modules from a pool (a folder of module folders, or
            a list): ``"random"`` drawn with the seed (the paper); the ``num`` best by ``"retrieval"`` (own
            few-shot loss), ``"arrow"`` (prototype alignment) or ``"embedding"`` (task cards): hub/select.py.
        device: where a base given by name loads ("auto", "cpu", "cuda:1"; a model object stays put).
        low_memory: Adam's steps run one example's forward and backward at a time, keeping one example's
            activations instead of all of them (the same w and objective up to float rounding, more forward
            calls). None: on when the base is quantized (``load_base(..., quantize="int8")``), which asks
            for a small footprint.
        settings: how to search (``SearchSettings``: mode, budget, formula, dtype, ...; default when None).
        **options: any ``SearchSettings`` field by name, overriding ``settings`` (``budget=40, seed=1``).

    Returns a ``LoraHubResult``: best weights and objective, the trace of every evaluation, the modules
    and how they were chosen, the settings and a time budget per phase; ``.save(dir)`` and ``.merge()``.
    The base model is not modified. A search cut short (the optimizer failed, or Ctrl-C) still returns the
    best weights evaluated so far, with ``complete=False``, ``interrupted`` and a one-line ``stopped`` (and a
    ``LoraHubWarning``); with nothing evaluated yet, the error (or the KeyboardInterrupt) is raised.
    """
    search = SearchSettings.from_options(settings, **options)  # dtype "auto" is resolved once the model is here
    if select not in METHODS or examples is None:
        bad = f"select must be one of {METHODS}, got {select!r}" if examples is not None else "no examples given"
        raise ValueError(bad)
    if (modules is None) == (pool is None):
        raise ValueError("pass either modules=[...] or pool=... (with num and select), not both or neither")
    clock = _Clock()

    # LOAD: the base model, the examples as token ids, and the modules into a bank.
    with clock.phase("base_load"):
        model, tokenizer = _base_and_tokenizer(base, tokenizer, device)
    search = search.for_model(model)
    with clock.phase("tokenisation"):
        features = encode_few_shot(model, tokenizer, load_examples(examples, input_field, target_field), max_length)
    pad_token_id = pad_token_id_of(tokenizer)
    with parameters_in(model, search.torch_dtype):
        with clock.phase("module_load"):
            selection = _select(modules, pool, num, select, search, model, features, pad_token_id, progress)
            bank = modules if isinstance(modules, ModuleBank) else load_bank(selection.modules, progress=progress)
        if low_memory is None:
            low_memory = is_quantized(model)

        # COMPOSE: install the composed layers; SEARCH: minimise the objective over w.
        with Composition(model, bank, search.layer_groups) as composition, clock.phase("search"):
            objective = Objective.from_settings(composition, features, pad_token_id, search, low_memory)
            found = run_search(objective, search, progress=progress)

    # RESULT: the best evaluated weights, the trace, and where the time went.
    timings = {**clock.seconds, **objective.seconds, "imports": found.import_seconds}
    timings["optimizer"] = max(timings["search"] - sum(objective.seconds.values()) - found.import_seconds, 0.0)
    return LoraHubResult(
        weights=found.weights,
        objective=found.objective,
        trace=found.trace,
        modules=list(bank.names),
        selection=selection,
        settings={**search.to_dict(), "method": found.method, "examples": len(features), "low_memory": low_memory},
        seconds=found.seconds,
        timings=timings,
        bank=bank,
        model=model,
        complete=found.complete,
        interrupted=found.interrupted,
        stopped=found.stopped,
        nonfinite=found.nonfinite,
    )


def is_quantized(model: nn.Module) -> bool:
    """Whether any weight of ``model`` is quantized: loraloom's int8 or torchao's (a tensor subclass)."""
    return any(quantized_weight(p) for p in model.parameters())


def _base_and_tokenizer(
    base: nn.Module | str | os.PathLike, tokenizer: Any, device: str | None
) -> tuple[nn.Module, Any]:
    if isinstance(base, (str, os.PathLike)):
        model, loaded = load_base(base, device=device or "auto")
        return model, tokenizer or loaded
    if device is not None:
        raise ValueError("device= places a base given by name; move a model object yourself (model.to(device))")
    if tokenizer is None:
        raise ValueError("pass tokenizer=... with a model object (or give the base model's folder or hub id)")
    return base, tokenizer


def _select(modules, pool, num, select, search, model, features, pad_token_id, progress) -> Selection:
    """Which modules to compose: the given ones, or ``num`` from the pool (random with the seed, retrieval, arrow)."""
    if pool is not None:
        candidates = pool_modules(pool)
        if select == "random":
            return select_random(candidates, num, search.seed)
        if select == "arrow":
            return select_arrow(candidates, num, model, features, progress=progress)
        if select == "embedding":
            return select_embedding(candidates, num, model, features, progress=progress)
        return select_retrieval(
            candidates, num, model, features, pad_token_id=pad_token_id, dtype=search.torch_dtype, progress=progress
        )
    if isinstance(modules, ModuleBank):
        return Selection("given", list(modules.names), len(modules))
    names = [str(modules)] if isinstance(modules, (str, os.PathLike)) else [str(m) for m in modules]
    return Selection("given", names, len(names))


def merge_composition(
    base_model: nn.Module,
    modules: Sequence[str | os.PathLike] | ModuleBank,
    weights: Sequence[float],
    layer_groups: str | int | None = None,
) -> nn.Module:
    """Merge the composition of ``modules`` with ``weights`` (e.g. from ``read_weights``) into ``base_model``."""
    bank = modules if isinstance(modules, ModuleBank) else load_bank(modules, base_model=base_model)
    bank.check_weights(weights, layer_groups=layer_groups)
    return Composition(base_model, bank, layer_groups).merge(weights)


__all__ = ["lorahub", "merge_composition"]
