"""One function per method: given a cell's learning and test examples and the base model, score the method.

Every method leaves the base model as it came (LoraHub merges its composition into a deep copy,
retrieval-best loads its module and removes it, the gradient baselines train a deep copy), so one loaded
base serves every cell of a process. Each returns an ``Outcome``: the exact match on the test examples
(greedy generation, the reference's normalisation, via ``evaluate``), the predictions, the input tokens
per test example the method feeds the model, and what it chose (LoraHub weights and modules).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..adapters import load_adapter, remove_adapter
from ..adapters.registry import config_for
from ..data import Example, pad_token_id_of
from ..evaluate import evaluate
from ..hub import encode_few_shot, lorahub, select_arrow, select_random, select_retrieval
from ..hub.arrow import arrow
from ..hub.combine import DENSITY_OPS, CombineSettings
from ..hub.merge_search import load_combined, merge_search
from ..hub.objective import model_max_length
from ..tasks import task_of
from ..train import FULL, train
from .settings import GRADIENT_METHODS, LORAHUB_METHODS, MERGE_METHODS, ROUTING_METHODS, ExperimentSettings

POOL_METHODS = (*LORAHUB_METHODS, "retrieval-best", *MERGE_METHODS, *ROUTING_METHODS)


@dataclass
class Job:
    """Everything one cell (task, method, seed, run) needs, as plain data: it travels to Ray workers."""

    task: str
    method: str
    seed: int
    run: int
    settings_hash: str
    learn: list[Example]
    test: list[Example]
    settings: ExperimentSettings
    pool: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, int, int, str]:
        return (self.task, self.method, self.seed, self.run, self.settings_hash)


@dataclass
class Outcome:
    """What a method did on one cell."""

    score: float | None  # exact match on the test examples; None when skipped
    input_tokens: float | None  # mean input tokens per test example, as the method feeds the model
    predictions: list[dict[str, Any]] = field(default_factory=list)
    status: str = "done"  # "done" or "skipped"
    reason: str | None = None  # why it was skipped (or, when done, a note: a LoraHub search cut short)
    weights: list[float] | None = None  # LoraHub weights (retrieval-best: [1.0])
    modules: list[str] | None = None  # the modules they weigh
    details: dict[str, Any] = field(default_factory=dict)


def mean_tokens(tokenizer: Any, texts: list[str]) -> float:
    return sum(len(ids) for ids in tokenizer(texts)["input_ids"]) / len(texts)


def score(model: nn.Module, tokenizer: Any, job: Job, test: list[Example] | None = None) -> Outcome:
    """Exact match of ``model`` on the cell's test examples (or ``test``: the same targets, other inputs)."""
    test = test if test is not None else job.test
    s = job.settings
    result = evaluate(model, tokenizer, test, batch_size=s.batch_size, max_new_tokens=s.max_new_tokens, progress=False)
    return Outcome(
        score=result.score, input_tokens=mean_tokens(tokenizer, [e.input for e in test]), predictions=result.predictions
    )


def zero_shot(job: Job, model: nn.Module, tokenizer: Any) -> Outcome:
    """The base model on the test inputs as they are."""
    return score(model, tokenizer, job)


def context_limit(model: nn.Module, tokenizer: Any, settings: ExperimentSettings) -> int:
    """The longest prompt the model takes: the setting, else the smaller of the model's and the tokenizer's."""
    if settings.max_context is not None:
        return settings.max_context
    limit = model_max_length(model)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:  # HF's "no limit" is ~1e30
        limit = min(limit, tokenizer_limit)
    return limit


def icl(job: Job, model: nn.Module, tokenizer: Any) -> Outcome:
    """The learning examples as demonstrations in front of each test input; skipped if that is too long."""
    sep = job.settings.icl_separator
    demos = sep.join(f"{e.input}\n{e.target}" for e in job.learn)
    prompts = [Example(f"{demos}{sep}{e.input}", e.target) for e in job.test]
    lengths = [len(ids) for ids in tokenizer([p.input for p in prompts])["input_ids"]]
    generated = job.settings.max_new_tokens if task_of(model) == "causal" else 0  # in the same window
    limit = context_limit(model, tokenizer, job.settings)
    if max(lengths) + generated > limit:
        reason = (
            f"the longest ICL prompt has {max(lengths)} tokens"
            + (f" (+{generated} generated)" if generated else "")
            + f", more than the model's context of {limit}"
        )
        return Outcome(score=None, input_tokens=sum(lengths) / len(lengths), status="skipped", reason=reason)
    outcome = score(model, tokenizer, job, prompts)
    outcome.details["context_limit"] = limit
    return outcome


def run_lorahub(job: Job, model: nn.Module, tokenizer: Any) -> Outcome:
    """``ll.lorahub`` on the learning examples (N modules from the pool, chosen and searched as the method
    says: ``LORAHUB_METHODS``), then the composition scored."""
    s = job.settings
    select = LORAHUB_METHODS[job.method][0]
    num = min(s.num_modules, len(job.pool))
    search = dataclasses.replace(s.search_settings(job.method), seed=job.seed)  # the search the cell's hash covers
    result = lorahub(
        model, examples=job.learn, tokenizer=tokenizer, pool=job.pool, num=num, select=select, settings=search
    )
    if result.interrupted:  # Ctrl-C inside the search: stop the sweep, store nothing for this cell
        raise KeyboardInterrupt
    # Merged into a copy: the result knows how its weights map onto layers; the shared base stays as it is.
    outcome = score(result.merge(copy.deepcopy(model)), tokenizer, job)
    outcome.weights, outcome.modules = list(result.weights), list(result.modules)
    outcome.details = {
        "num_modules": num,
        "pool_size": len(job.pool),
        "all_modules": num < s.num_modules,  # the pool held fewer than num_modules: all of it was used
        "lorahub_settings": result.settings,  # what actually ran, as LoraHub reports it
        "selection": result.selection.to_dict(),
        "objective": result.objective,
        "trace": [e.objective for e in result.trace],
        "adam_steps": result.adam_steps,  # of the trace's evaluations, those scored by an Adam step
        "cost": result.cost,  # forward-pass equivalents spent, at most the budget
        "timings": result.timings,
        "complete": result.complete,
    }
    if not result.complete:  # an optimizer error ended the search early: the best weights so far, noted
        outcome.reason = f"LoraHub search cut short after {len(result.trace)} evaluations: {result.stopped}"
    return outcome


def retrieval_best(job: Job, model: nn.Module, tokenizer: Any) -> Outcome:
    """The one pool module with the lowest loss on the learning examples, applied alone (as trained)."""
    features = encode_few_shot(model, tokenizer, job.learn)
    selection = select_retrieval(job.pool, 1, model, features, pad_token_id=pad_token_id_of(tokenizer))
    best = selection.modules[0]
    load_adapter(model, best, verbose=False)
    try:
        outcome = score(model, tokenizer, job)
    finally:
        remove_adapter(model)
    outcome.weights, outcome.modules = [1.0], [best]
    outcome.details = {"loss": selection.scores[best], "scores": selection.scores}
    return outcome


def run_merge(job: Job, model: nn.Module, tokenizer: Any) -> Outcome:
    """The N modules lorahub draws for this seed, weights searched as lorahub searches them, but every
    candidate merged with the method's operator (``MERGE_METHODS``: ties, dare_ties, cat); the best merge
    is loaded into a copy of the base and scored."""
    s, how = job.settings, MERGE_METHODS[job.method]
    num = min(s.num_modules, len(job.pool))
    chosen = select_random(job.pool, num, job.seed)  # lorahub's draw: the operator is the only difference
    combine = CombineSettings(how, density=s.merge_density if how in DENSITY_OPS else None, seed=job.seed)
    search = dataclasses.replace(s.search_settings(job.method), seed=job.seed)
    trial = copy.deepcopy(model)  # the search installs an adapter: the shared base stays as it is
    features = encode_few_shot(trial, tokenizer, job.learn)
    found, combined = merge_search(
        trial, chosen.modules, features, pad_token_id=pad_token_id_of(tokenizer), combine=combine, search=search
    )
    if found.interrupted:
        raise KeyboardInterrupt
    outcome = score(load_combined(trial, combined), tokenizer, job)
    outcome.weights, outcome.modules = list(found.weights), list(chosen.modules)
    outcome.details = {
        "operator": how,
        "density": combine.density,
        "num_modules": num,
        "pool_size": len(job.pool),
        "selection": chosen.to_dict(),
        "objective": found.objective,
        "trace": [e.objective for e in found.trace],
        "cost": found.cost,
        "search": found.method,
        "complete": found.complete,
    }
    if not found.complete:
        outcome.reason = f"merge search cut short after {len(found.trace)} evaluations: {found.stopped}"
    return outcome


def run_arrow(job: Job, model: nn.Module, tokenizer: Any) -> Outcome:
    """Arrow routing (per token, top-k modules by prototype alignment) over the N pool modules Arrow's
    alignment with the learning examples selects; no search, the learning examples only pick the N."""
    s = job.settings
    num = min(s.num_modules, len(job.pool))
    features = encode_few_shot(model, tokenizer, job.learn)
    selection = select_arrow(job.pool, num, model, features)
    top_k = min(s.arrow_top_k, num)
    outcome = score(arrow(copy.deepcopy(model), selection.modules, top_k=top_k), tokenizer, job)
    outcome.modules = list(selection.modules)
    outcome.details = {"num_modules": num, "pool_size": len(job.pool), "top_k": top_k, **selection.to_dict()}
    return outcome


def gradient_baseline(job: Job, model: nn.Module, tokenizer: Any) -> Outcome:
    """Train a copy of the base (an adapter, or every weight for "full") on the learning examples, score it."""
    s, name = job.settings, job.method
    adapter = FULL if name == FULL else dataclasses.replace(config_for(name), **s.adapter_options.get(name, {}))
    trained = copy.deepcopy(model)
    result = train(
        trained,
        tokenizer,
        job.learn,
        adapter=adapter,
        epochs=s.epochs,
        batch_size=s.train_batch_size,
        lr=s.learning_rates[name],
        seed=1000 * job.seed + job.run,
        progress=False,
    )
    outcome = score(trained, tokenizer, job)
    outcome.details = {
        "train_seed": 1000 * job.seed + job.run,
        "train_seconds": result.seconds,
        "first_loss": result.losses[0],
        "last_loss": result.losses[-1],
        "trainable_params": result.trainable_params,
        "adapter": adapter if isinstance(adapter, str) else adapter.to_dict(),
    }
    return outcome


METHODS: dict[str, Callable[[Job, nn.Module, Any], Outcome]] = {
    "zero-shot": zero_shot,
    "icl": icl,
    **dict.fromkeys(LORAHUB_METHODS, run_lorahub),
    "retrieval-best": retrieval_best,
    **dict.fromkeys(MERGE_METHODS, run_merge),
    "arrow": run_arrow,
    **dict.fromkeys(GRADIENT_METHODS, gradient_baseline),
}


def runs_of(method: str, settings: ExperimentSettings) -> int:
    """Gradient baselines train ``gradient_runs`` times per task and seed; every other method runs once."""
    return settings.gradient_runs if method in GRADIENT_METHODS else 1


__all__ = ["METHODS", "POOL_METHODS", "Job", "Outcome", "context_limit", "runs_of"]
