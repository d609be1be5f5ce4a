"""ADAPT: find the weights w that minimise the objective, and keep a trace of every evaluation.

``nevergrad_search`` is LoraHub's gradient-free search (any nevergrad optimizer by name; NGOpt as in the
paper) through nevergrad's ask/tell interface: with ``population`` P > 1 it asks P candidates at a time
(the optimizer is told it has P workers) and scores them in one batched pass. ``gradient_search`` is an
extra: Adam on w through the bank, the same objective, clamped to the same bounds.

Both return the best *evaluated* weights: their objective value is known exactly (the objective is a
pure function of w), whereas an optimizer's own recommendation may be a point it never scored.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .objective import Objective, Scores

DEFAULT_OPTIMIZER = "NGOpt"
DEFAULT_BUDGET = 40
DEFAULT_BOUNDS = 1.5


@dataclass
class Evaluation:
    """One scored candidate."""

    index: int  # 0-based, in evaluation order
    weights: list[float]
    loss: float
    penalty: float
    objective: float  # loss + penalty; +inf if the loss was not finite
    seconds: float  # wall time of the pass that scored it, divided among the candidates of that pass
    elapsed: float  # wall time since the search started, when this value was known


@dataclass
class SearchResult:
    weights: list[float]  # the best evaluated weights
    objective: float
    trace: list[Evaluation] = field(default_factory=list)
    method: str = ""  # e.g. "nevergrad:NGOpt>Cobyla" or "gradient:Adam"
    seconds: float = 0.0
    complete: bool = True  # False: cut short (an optimizer error, or interrupted) before the budget was spent
    interrupted: bool = False  # cut short by KeyboardInterrupt (Ctrl-C)
    stopped: str = ""  # why it was cut short, one line ("" when complete)
    nonfinite: int = 0  # evaluations whose loss was NaN or inf (objective +inf in the trace)


class _Tracer:
    """Scores batches of candidates, records them, and shows the best value on a progress bar."""

    def __init__(self, objective: Scorer, total: int, progress: bool, desc: str) -> None:
        self.objective, self.trace = objective, []
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="eval", disable=not progress)

    def record(self, w: torch.Tensor, scores: Scores, seconds: float) -> None:
        elapsed = time.perf_counter() - self.start
        for row, value, loss, penalty in zip(w.tolist(), scores.values, scores.losses, scores.penalties, strict=True):
            self.trace.append(
                Evaluation(len(self.trace), row, float(loss), float(penalty), float(value), seconds / len(w), elapsed)
            )
        self.bar.update(len(w))
        self.bar.set_postfix(best=f"{self.best.objective:.4f}")

    def score(self, w: torch.Tensor) -> Scores:
        start = time.perf_counter()
        scores = self.objective(w)
        self.record(w, scores, time.perf_counter() - start)
        return scores

    @property
    def best(self) -> Evaluation:
        return min(self.trace, key=lambda e: e.objective)

    def result(self, method: str) -> SearchResult:
        self.bar.close()
        best = self.best
        return SearchResult(best.weights, best.objective, self.trace, method, time.perf_counter() - self.start)


def check_search_args(budget: int, bounds: float, population: int = 1) -> None:
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive number of evaluations, got {budget!r}")
    if not bounds > 0:
        raise ValueError(f"bounds must be positive (weights lie in [-bounds, bounds]), got {bounds!r}")
    if not isinstance(population, int) or population < 1:
        raise ValueError(f"population must be a positive integer, got {population!r}")


def make_optimizer(
    name: str,
    n: int,
    budget: int,
    bounds: float,
    workers: int,
    random_state: np.random.RandomState,
    sigma: float | None = None,
):
    """A nevergrad optimizer by registry name over w in [-bounds, bounds]^n, starting at w = 0.

    ``sigma`` is the initial step size (nevergrad's default when None).
    """
    import nevergrad as ng  # slow to import: only when searching

    if name not in ng.optimizers.registry:
        close = difflib.get_close_matches(name, list(ng.optimizers.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see nevergrad.optimizers.registry)"
        raise ValueError(f"unknown nevergrad optimizer {name!r}{hint}")
    parametrization = ng.p.Array(init=np.zeros(n), lower=-bounds, upper=bounds)
    parametrization.random_state = random_state
    if sigma is not None:
        parametrization.set_mutation(sigma=sigma)
    return ng.optimizers.registry[name](parametrization=parametrization, budget=budget, num_workers=workers)


def _describe(optimizer) -> str:
    """NGOpt and its kin delegate to a chosen optimizer: name the chain, e.g. "NGOpt>Cobyla"."""
    names, opt = [], optimizer
    while opt is not None and len(names) < 5:
        name = getattr(opt, "name", type(opt).__name__)
        if not names or name != names[-1]:
            names.append(name)
        try:
            opt = getattr(opt, "optim", None)  # NGOpt builds its choice on first access: may fail
        except Exception:
            break
    return ">".join(names)


class Scorer(Protocol):
    """What the nevergrad search needs: scores for P x N weights (``Objective`` is one)."""

    n_modules: int

    def __call__(self, weights: torch.Tensor) -> Scores: ...


# What the optimizer is told for a candidate whose loss is NaN or inf (the trace keeps +inf): large but
# finite, as every optimizer needs (nevergrad clips >= 5e20 with a warning; CMA's and MetaModel's
# models, scipy's Cobyla and Powell take no inf or NaN), and far above any cross-entropy a language
# model reaches (about log(vocabulary size) for a uniform guess: ~10 to 12).
NONFINITE_SCORE = 1e4


class LoraHubWarning(UserWarning):
    """Something a LoraHub user should know: a search cut short, non-finite losses, a setting adjusted."""


class OptimizerError(RuntimeError):
    """The optimizer failed before any evaluation: there is no result to keep."""


def nevergrad_search(
    objective: Scorer,
    *,
    optimizer: str = DEFAULT_OPTIMIZER,
    budget: int = DEFAULT_BUDGET,
    bounds: float = DEFAULT_BOUNDS,
    population: int = 1,
    seed: int = 0,
    random_state: np.random.RandomState | None = None,
    progress: bool = False,
) -> SearchResult:
    """Minimise the objective with a nevergrad optimizer over ``budget`` evaluations, P at a time.

    The search never loses its work: an exception inside the optimizer (ask or tell) or a
    KeyboardInterrupt ends it with the best evaluated weights so far, ``complete=False`` and a
    ``LoraHubWarning`` naming the cause (with nothing evaluated yet, the error is raised: an
    ``OptimizerError``, or the KeyboardInterrupt). Whatever ends it, the threads nevergrad started
    for recast optimizers (Cobyla, Powell, ...) are stopped. A NaN or inf loss is traced as +inf and
    told to the optimizer as ``NONFINITE_SCORE``. Sequential-only optimizers run one candidate a pass.
    """
    from nevergrad.common import errors as ng_errors

    from .recast import recast_threads, stop_recast_threads

    check_search_args(budget, bounds, population)
    population = _population_for(optimizer, population)
    n = objective.n_modules
    opt = make_optimizer(optimizer, n, budget, bounds, population, random_state or np.random.RandomState(seed))
    if population > 1:
        # Parallel optimizers sample their first candidates around the init; score w = 0 itself too
        # (sequential NGOpt / Cobyla ask for it first anyway).
        opt.suggest(np.zeros(n))
    tracer = _Tracer(objective, budget, progress, f"lorahub {optimizer}")
    threads_before = recast_threads()
    stop: BaseException | None = None  # what ended the search before the budget was spent
    try:
        with warnings.catch_warnings():
            # Noise for our users: nevergrad clips losses >= 5e20, and its Cobyla settings trip a scipy
            # warning about rhoend.
            warnings.filterwarnings("ignore", category=ng_errors.LossTooLargeWarning)
            warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")
            while len(tracer.trace) < budget:
                try:
                    candidates = [opt.ask() for _ in range(min(population, budget - len(tracer.trace)))]
                except Exception as e:  # the optimizer's failure, not ours: keep what was evaluated
                    stop = e
                    break
                w = torch.tensor(np.stack([c.value for c in candidates]), dtype=torch.float32)
                scores = tracer.score(w)  # an error here is ours (the model, the modules): raised
                try:
                    for candidate, value in zip(candidates, scores.values.tolist(), strict=True):
                        opt.tell(candidate, value if math.isfinite(value) else NONFINITE_SCORE)
                except Exception as e:
                    stop = e
                    break
    except KeyboardInterrupt as e:
        stop = e
    finally:
        tracer.bar.close()
        stop_recast_threads(opt, stop, threads_before)
    name = _describe(opt)
    if not tracer.trace:  # stopped before any evaluation: nothing to keep
        if isinstance(stop, KeyboardInterrupt):
            raise stop
        raise OptimizerError(f"nevergrad optimizer {name} failed before any evaluation: {_one_line(stop)}") from stop
    found = tracer.result(f"nevergrad:{name}")
    found.nonfinite = sum(not math.isfinite(e.objective) for e in found.trace)
    if found.nonfinite:
        warnings.warn(
            f"{found.nonfinite} of {len(found.trace)} candidates had a NaN or inf loss: traced as +inf, "
            f"told to the optimizer as {NONFINITE_SCORE:g}",
            LoraHubWarning,
            stacklevel=2,
        )
    if stop is not None:
        cause = "interrupted" if isinstance(stop, KeyboardInterrupt) else f"{name} failed ({_one_line(stop)})"
        _cut_short(found, stop, f"{cause} after {len(found.trace)} of {budget} evaluations")
    return found


def _cut_short(found: SearchResult, stop: BaseException, what: str) -> None:
    """Mark ``found`` as cut short by ``stop`` and say so in one warning line."""
    found.complete, found.interrupted = False, isinstance(stop, KeyboardInterrupt)
    found.stopped = f"{what}: kept the best weights so far"
    warnings.warn(found.stopped, LoraHubWarning, stacklevel=3)


def _population_for(optimizer: str, population: int) -> int:
    """``population``, or 1 for an optimizer that takes one candidate at a time (Cobyla, Powell, BO...)."""
    import nevergrad as ng

    if population > 1 and getattr(ng.optimizers.registry.get(optimizer), "no_parallelization", False):
        warnings.warn(
            f"{optimizer} evaluates one candidate at a time: running population 1, not {population}",
            LoraHubWarning,
            stacklevel=3,
        )
        return 1
    return population


def _one_line(error: BaseException, limit: int = 200) -> str:
    """ "TypeError: message" on one line, cut to ``limit`` characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def gradient_search(
    objective: Objective,
    *,
    steps: int = DEFAULT_BUDGET,
    lr: float = 0.05,
    bounds: float = DEFAULT_BOUNDS,
    init: float | None = None,
    progress: bool = False,
) -> SearchResult:
    """Adam on w (one forward + backward per step), clamped to [-bounds, bounds] after each step.

    w starts at ``init`` (default 1/N) for every module, not at 0: at w = 0 both A_hat and B_hat vanish
    and so does the gradient of B_hat·A_hat.
    """
    check_search_args(steps, bounds)
    n = objective.n_modules
    w = torch.full((1, n), 1.0 / n if init is None else float(init), requires_grad=True)
    adam = torch.optim.Adam([w], lr=lr)
    tracer = _Tracer(objective, steps, progress, "lorahub Adam")
    stop: KeyboardInterrupt | None = None
    try:
        with _frozen(objective.model):
            for _ in range(steps):
                if not _adam_step(objective, w, adam, bounds, tracer):
                    break  # a non-finite loss or gradient: no direction to follow
    except KeyboardInterrupt as e:  # Ctrl-C: keep the steps taken (none taken: nothing to keep)
        tracer.bar.close()
        if not tracer.trace:
            raise
        stop = e
    found = tracer.result("gradient:Adam")
    if stop is not None:
        _cut_short(found, stop, f"interrupted after {len(found.trace)} of {steps} Adam steps")
    return found


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Gradients for w only: the model's own parameters stay untouched (no .grad, no memory for it)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _adam_step(objective: Objective, w: torch.Tensor, adam: torch.optim.Adam, bounds: float, tracer: _Tracer) -> bool:
    """Score w, record it, and take one clamped Adam step; False if the loss or gradient is not finite."""
    start = time.perf_counter()
    adam.zero_grad()
    with torch.enable_grad():
        scores = objective.scores(w, objective.token_loss_sums(w))
        if torch.isfinite(scores.values).all():
            scores.values.sum().backward()
    tracer.record(w.detach().clone(), _detached(scores), time.perf_counter() - start)
    if w.grad is None or not torch.isfinite(w.grad).all():
        return False
    adam.step()
    with torch.no_grad():
        w.clamp_(-bounds, bounds)
    return True


def _detached(scores: Scores) -> Scores:
    return Scores(scores.values.detach(), scores.losses.detach(), scores.penalties.detach())


__all__ = [
    "DEFAULT_BOUNDS",
    "DEFAULT_BUDGET",
    "DEFAULT_OPTIMIZER",
    "NONFINITE_SCORE",
    "Evaluation",
    "LoraHubWarning",
    "OptimizerError",
    "Scorer",
    "SearchResult",
    "check_search_args",
    "gradient_search",
    "make_optimizer",
    "nevergrad_search",
]
