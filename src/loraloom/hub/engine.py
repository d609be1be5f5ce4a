"""``lorahub``: compose a hub of LoRA modules for a new task from a few examples.

The data flow: module files -> bank (one read per file) -> composed layers installed once in the base
model -> each evaluation sets w and runs one forward per micro-batch for P candidates -> optimizer ->
best w -> result (merge into the base, or save as a PEFT folder). The base model is left as it came.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..data import Example, load_examples, pad_token_id_of
from .bank import ModuleBank, load_bank
from .compose import Composition
from .objective import DEFAULT_ALPHA, Objective, encode_few_shot, parameters_in
from .result import LoraHubResult
from .search import (
    DEFAULT_BOUNDS,
    DEFAULT_BUDGET,
    DEFAULT_OPTIMIZER,
    SearchResult,
    check_search_args,
    gradient_search,
    nevergrad_search,
)
from .select import METHODS, Selection, pool_modules, select_random, select_retrieval

# Candidates scored per forward pass (nevergrad workers). FLAN-T5-small shapes, 5 examples, 2 CPU cores,
# per candidate relative to one bare padded fp32 forward: 1 a pass ~1.0x (bf16 ~0.55x), 4 a pass ~0.62x
# (bf16 ~0.38x), 8 a pass ~0.62x (bf16 ~0.36x) while leaving a budget of 40 only 5 rounds. The price of
# workers: NGOpt then runs MetaModel instead of the sequential Cobyla, which found better weights in
# benchmarks/lorahub_vs_reference.py (10.19 vs 10.56). population=1 is that sequential search.
DEFAULT_POPULATION = 4
MODES = ("nevergrad", "gradient")
DTYPES = {None: None, "fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def load_base_model(name_or_path: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a seq2seq or causal LM folder or hub id, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(name_or_path)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return auto.from_pretrained(name_or_path).eval(), AutoTokenizer.from_pretrained(name_or_path)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None (fp32 evaluation) or torch.bfloat16, from "bf16", "fp32", a torch dtype or None."""
    if isinstance(dtype, torch.dtype):
        dtype = {torch.float32: None, torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of 'fp32', 'bf16' (or None), got {dtype!r}")
    return DTYPES[dtype]


def lorahub(
    base: nn.Module | str,
    modules: Sequence[str | os.PathLike] | ModuleBank | None = None,
    examples: str | os.PathLike | Iterable[Any] | None = None,
    *,
    tokenizer: Any = None,
    pool: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num: int = 20,
    select: str = "random",
    budget: int = DEFAULT_BUDGET,
    seed: int = 0,
    optimizer: str = DEFAULT_OPTIMIZER,
    population: int = DEFAULT_POPULATION,
    objective: str = "mean",
    alpha: float = DEFAULT_ALPHA,
    batch_size: int | None = None,
    bounds: float = DEFAULT_BOUNDS,
    dtype: str | torch.dtype | None = None,
    mode: str = "nevergrad",
    lr: float = 0.05,
    max_length: int | None = None,
    input_field: str = "input",
    target_field: str = "target",
    progress: bool = False,
) -> LoraHubResult:
    """Find weights w for ``modules`` (or ``num`` modules chosen from ``pool``) that fit ``examples``.

    Args:
        base: the base model (seq2seq or causal LM) or its folder / hub id.
        modules: LoRA module folders or hub ids (all the same rank, alpha and targets), or a bank.
        examples: few-shot (input, target) examples: a .jsonl/.json/.csv file, or a list of dicts,
            pairs or ``Example``s. Too-long examples are truncated to the model's limit with a warning.
        pool, num, select: instead of ``modules``, choose ``num`` modules from a pool (a folder of
            module folders, or a list): ``"random"`` draws them with ``seed`` (the paper),
            ``"retrieval"`` keeps the ``num`` with the lowest few-shot loss on their own.
        budget: objective evaluations (nevergrad) or Adam steps (gradient mode).
        optimizer: a nevergrad optimizer name: "NGOpt" (the paper's), "CMA", "TwoPointsDE", "Cobyla", ...
        population: candidates scored per forward pass (nevergrad's workers): 4 is ~1.6x faster a
            candidate than 1 on CPU; 1 is the sequential search (NGOpt then picks Cobyla, as the
            reference does), which can find better weights within a small budget.
        objective: "mean" = mean token cross-entropy + alpha * mean|w| (default, alpha = 0.05), or
            "reference" = the reference package's formula (its loss term is divided by the number of
            examples and depends on ``batch_size``).
        bounds: each weight lies in [-bounds, bounds]; the search starts at w = 0.
        dtype: "bf16" evaluates in bfloat16 (faster on CPUs with AVX512-BF16 or AMX); default fp32.
        mode: "nevergrad" (gradient-free, the paper) or "gradient" (Adam on w with learning rate ``lr``).

    Returns a ``LoraHubResult``: best weights and objective, the trace of every evaluation, the modules
    and how they were chosen; ``.save(dir)`` and ``.merge()``. The base model is not modified.

    A search cut short (the optimizer failed, or Ctrl-C) still returns: the best weights evaluated so
    far, with ``complete=False``, ``interrupted`` and a one-line ``stopped`` (and a ``LoraHubWarning``).
    Nothing evaluated yet: the error (or the KeyboardInterrupt) is raised.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if select not in METHODS:
        raise ValueError(f"select must be one of {METHODS}, got {select!r}")
    check_search_args(budget, bounds, population)
    compute_dtype = resolve_dtype(dtype)
    if examples is None:
        raise ValueError("no few-shot examples given: pass examples=[...] or a file")
    if (modules is None) == (pool is None):
        raise ValueError("pass either modules=[...] or pool=... (with num and select), not both or neither")

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    if isinstance(base, (str, os.PathLike)):
        model, loaded_tokenizer = load_base_model(str(base))
        timings["load_model"] = time.perf_counter() - clock
        tokenizer = tokenizer or loaded_tokenizer
    else:
        model = base
    if tokenizer is None:
        raise ValueError("pass tokenizer=... with a model object (or give the base model's folder or hub id)")
    few_shot: list[Example] = load_examples(examples, input_field, target_field)
    features = encode_few_shot(model, tokenizer, few_shot, max_length)
    pad_token_id = pad_token_id_of(tokenizer)

    with parameters_in(model, compute_dtype):
        if pool is not None:
            candidates = pool_modules(pool)
            if select == "random":
                selection = select_random(candidates, num, seed)
            else:
                selection = select_retrieval(
                    candidates, num, model, features, pad_token_id=pad_token_id, dtype=compute_dtype, progress=progress
                )
        elif isinstance(modules, ModuleBank):
            selection = Selection("given", list(modules.names), len(modules))
        else:
            names = [str(m) for m in modules] if not isinstance(modules, (str, os.PathLike)) else [str(modules)]
            selection = Selection("given", names, len(names))
        clock = time.perf_counter()
        bank = modules if isinstance(modules, ModuleBank) else load_bank(selection.modules, progress=progress)
        timings["load_modules"] = time.perf_counter() - clock

        with Composition(model, bank) as composition:
            scorer = Objective(
                composition,
                features,
                pad_token_id=pad_token_id,
                kind=objective,
                alpha=alpha,
                batch_size=batch_size,
                dtype=compute_dtype,
            )
            if mode == "gradient":
                found: SearchResult = gradient_search(scorer, steps=budget, lr=lr, bounds=bounds, progress=progress)
            else:
                found = nevergrad_search(
                    scorer,
                    optimizer=optimizer,
                    budget=budget,
                    bounds=bounds,
                    population=population,
                    seed=seed,
                    progress=progress,
                )

    settings = {
        "method": found.method,
        "mode": mode,
        "optimizer": optimizer if mode == "nevergrad" else "Adam",
        "budget": budget,
        "population": population if mode == "nevergrad" else 1,
        "seed": seed,
        "objective": objective,
        "alpha": alpha,
        "batch_size": batch_size,
        "bounds": bounds,
        "dtype": "bf16" if compute_dtype is not None else "fp32",
        "examples": len(features),
    }
    if mode == "gradient":
        settings["lr"] = lr
    return LoraHubResult(
        weights=found.weights,
        objective=found.objective,
        trace=found.trace,
        modules=list(bank.names),
        selection=selection,
        settings=settings,
        seconds=found.seconds,
        timings={**timings, "search": found.seconds},
        bank=bank,
        model=model,
        complete=found.complete,
        interrupted=found.interrupted,
        stopped=found.stopped,
        nonfinite=found.nonfinite,
    )


def compose(
    base_model: nn.Module, modules: Sequence[str | os.PathLike] | ModuleBank, weights: Sequence[float]
) -> nn.Module:
    """Merge the composition of ``modules`` with ``weights`` (e.g. from ``read_weights``) into ``base_model``."""
    bank = modules if isinstance(modules, ModuleBank) else load_bank(modules, base_model=base_model)
    bank.check_weights(weights)
    return Composition(base_model, bank).merge(weights)


__all__ = ["DEFAULT_POPULATION", "compose", "load_base_model", "lorahub", "resolve_dtype"]
