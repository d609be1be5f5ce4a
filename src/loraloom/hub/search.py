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
        opt = getattr(opt, "optim", None)
    return ">".join(names)


class Scorer(Protocol):
    """What the nevergrad search needs: scores for P x N weights (``Objective`` is one)."""

    n_modules: int

    def __call__(self, weights: torch.Tensor) -> Scores: ...


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
    """Minimise the objective with a nevergrad optimizer over ``budget`` evaluations, P at a time."""
    from nevergrad.common import errors as ng_errors

    check_search_args(budget, bounds, population)
    n = objective.n_modules
    opt = make_optimizer(optimizer, n, budget, bounds, population, random_state or np.random.RandomState(seed))
    if population > 1:
        # Parallel optimizers sample their first candidates around the init; score w = 0 itself too
        # (sequential NGOpt / Cobyla ask for it first anyway).
        opt.suggest(np.zeros(n))
    tracer = _Tracer(objective, budget, progress, f"lorahub {optimizer}")
    with warnings.catch_warnings():
        # Noise for our users: nevergrad clips +inf losses (NaN/inf forwards, scored +inf on purpose),
        # and its Cobyla settings trip a scipy warning about rhoend.
        warnings.filterwarnings("ignore", category=ng_errors.LossTooLargeWarning)
        warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")
        while len(tracer.trace) < budget:
            candidates = [opt.ask() for _ in range(min(population, budget - len(tracer.trace)))]
            w = torch.tensor(np.stack([c.value for c in candidates]), dtype=torch.float32)
            scores = tracer.score(w)
            for candidate, value in zip(candidates, scores.values.tolist(), strict=True):
                opt.tell(candidate, value)
    return tracer.result(f"nevergrad:{_describe(opt)}")


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
    with _frozen(objective.model):
        for _ in range(steps):
            if not _adam_step(objective, w, adam, bounds, tracer):
                break  # a non-finite loss or gradient: no direction to follow
    return tracer.result("gradient:Adam")


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
    "Evaluation",
    "Scorer",
    "SearchResult",
    "check_search_args",
    "gradient_search",
    "make_optimizer",
    "nevergrad_search",
]
