"""ADAPT: find the weights w that minimise the objective, and keep a trace of every evaluation.

``nevergrad_search`` is LoraHub's gradient-free search (any nevergrad optimizer by name; NGOpt as in the
paper) through nevergrad's ask/tell interface: with ``population`` P > 1 it asks P candidates at a time
(the optimizer is told it has P workers) and scores them in one batched pass. ``gradient_search`` is an
extra: Adam on w through the bank, the same objective, clamped to the same bounds.

Every mode spends the same ``budget``, counted in forward-pass equivalents (one candidate scored = 1, an
Adam step = ``ADAM_STEP_COST``): see ``SearchSettings.budget``.

Both return the best *evaluated* weights: their objective value is known exactly (the objective is a
pure function of w), whereas an optimizer's own recommendation may be a point it never scored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.base import is_quantized
from ..devices import fast_bf16
from ..quantize import is_int8
from .bank import check_layer_groups
from .objective import DEFAULT_ALPHA, FORMULAS, Objective, Scores

DEFAULT_OPTIMIZER = "NGOpt"
DEFAULT_BUDGET = 40
DEFAULT_BOUNDS = 1.5
# Sequential (NGOpt then runs Cobyla, as the reference does): every population-4 search measured in
# benchmarks/lorahub_search.py (MetaModel, CMA, TwoPointsDE) ended above it at K = 40, and so did the
# demo world (0.34 vs 0.53 exact match); NGOpt's MetaModel also fails on small pools under numpy 2.
DEFAULT_POPULATION = 1
DEFAULT_LR = 0.05
DEFAULT_GRADIENT_STEPS = 8
DEFAULT_MODE = "gradient"  # measured: benchmarks/lorahub_search.py, see benchmarks/README.md
MODES = ("nevergrad", "gradient", "hybrid")
# What an Adam step costs in the budget's unit, one objective evaluation (a forward pass over the few-shot
# examples, no gradient). Measured by benchmarks/lorahub_step_cost.py (one thread, medians over rounds, CPU
# time): a step of gradient_search (forward with gradients for w, backward, update) costs 1.9x an
# evaluation on the tests' tiny T5, 2.3x on their tiny GPT-2, 2.0x / 2.1x on FLAN-T5-small shapes (20
# modules r=16 on q,v; example sets a / b), and at most 2.4x in any round. Rounded up, so that a search
# never costs more than ``budget`` evaluations would.
ADAM_STEP_COST = 3
DTYPES = ("auto", "fp32", "bf16")
# nevergrad imports bayes_opt (and with it scikit-learn and pandas: ~0.3-0.5 s) only to register these two
# optimizers; NGOpt and every other optimizer do without it.
BAYES_OPT_OPTIMIZERS = ("BO", "BOSplit")


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
    gradient: bool = False  # scored by an Adam step (forward + backward), not by a forward pass alone

    @property
    def cost(self) -> int:
        """Forward-pass equivalents charged to the budget: 1, or ``ADAM_STEP_COST`` for an Adam step."""
        return ADAM_STEP_COST if self.gradient else 1


@dataclass
class SearchResult:
    weights: list[float]  # the best evaluated weights
    objective: float
    trace: list[Evaluation] = field(default_factory=list)
    method: str = ""  # e.g. "nevergrad:NGOpt>Cobyla" or "gradient:Adam"
    seconds: float = 0.0
    import_seconds: float = 0.0  # of that, importing the optimizer library (nevergrad: ~2 s the first time)
    complete: bool = True  # False: cut short (an optimizer error, or interrupted) before the budget was spent
    interrupted: bool = False  # cut short by KeyboardInterrupt (Ctrl-C)
    stopped: str = ""  # why it was cut short, one line ("" when complete)
    nonfinite: int = 0  # evaluations whose loss was NaN or inf (objective +inf in the trace)

    @property
    def adam_steps(self) -> int:
        """Adam steps taken (a step skipped for a NaN or inf loss or gradient counts: its cost was spent)."""
        return sum(e.gradient for e in self.trace)

    @property
    def cost(self) -> int:
        """Forward-pass equivalents spent: what ``SearchSettings.budget`` bounds."""
        return sum(e.cost for e in self.trace)


def adam_cost(steps: int) -> int:
    """The budget an Adam run of ``steps`` steps spends: the steps, then one evaluation of the w it ends on."""
    return ADAM_STEP_COST * steps + 1


class _Tracer:
    """Scores batches of candidates, records them, and shows the best value on a progress bar."""

    def __init__(self, objective: Scorer, total: int, progress: bool, desc: str) -> None:
        self.objective, self.trace = objective, []
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="eval", disable=not progress)

    def record(self, w: torch.Tensor, scores: Scores, seconds: float, gradient: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        for row, value, loss, penalty in zip(w.tolist(), scores.values, scores.losses, scores.penalties, strict=True):
            self.trace.append(
                Evaluation(
                    len(self.trace), row, float(loss), float(penalty), float(value), seconds / len(w), elapsed, gradient
                )
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


@dataclass(frozen=True)
class SearchSettings:
    """How ``lorahub`` searches for w: checked once on creation, saved as is (``to_dict``) in weights.json."""

    mode: str = DEFAULT_MODE
    """"nevergrad" (gradient-free, the paper), "gradient" (Adam on w), or "hybrid" (nevergrad, then
    ``gradient_steps`` Adam steps from the best w it found)."""
    budget: int | None = None
    """The search's cost in forward-pass equivalents, the same unit in every mode: scoring one candidate
    (one forward pass over the few-shot examples, no gradient; the reference's evaluation) costs 1, an Adam
    step ``ADAM_STEP_COST`` = 3 (forward with gradients for w, and backward: measured 1.9-2.4). Every mode
    spends at most ``budget``:

    - nevergrad: ``budget`` candidates scored (the paper's K, the reference's ``max_inference_step``);
    - gradient: ``(budget - 1) // 3`` Adam steps, then one evaluation of the w the last step moved to
      (40: 13 steps + 1 = 40); a budget under 4 buys no step, only the evaluation of the start;
    - hybrid: nevergrad scores ``budget - 3 * gradient_steps - 1`` candidates, then ``gradient_steps`` Adam
      steps and the evaluation of their last w.

    ``adam_steps``, ``evaluations`` and ``cost`` give the split; a ``SearchResult`` records what was spent
    (its ``cost`` and ``adam_steps``; every scored w is in its trace). None: ``DEFAULT_BUDGET`` = 40."""
    optimizer: str = DEFAULT_OPTIMIZER
    """A nevergrad optimizer by name: "NGOpt" (the paper's), "CMA", "TwoPointsDE", "Cobyla", ..."""
    population: int = DEFAULT_POPULATION
    """Candidates scored per forward pass (nevergrad's workers). 1 is the sequential search (NGOpt then
    runs Cobyla, as the reference does)."""
    seed: int = 0
    """The optimizer's random state (and the random module selection of ``lorahub``)."""
    bounds: float = DEFAULT_BOUNDS
    """Every weight lies in [-bounds, bounds]."""
    lr: float = DEFAULT_LR
    """Adam's learning rate (gradient and hybrid modes)."""
    gradient_steps: int = DEFAULT_GRADIENT_STEPS
    """Hybrid mode: the Adam steps that end the search (each costs ``ADAM_STEP_COST`` of the budget)."""
    sigma: float | None = None
    """The gradient-free optimizer's initial step size; nevergrad's default when None."""
    formula: str = "mean"
    """The objective's formula: "mean" (mean token cross-entropy + alpha·mean|w|) or "reference" (the reference
    package's: its loss term is divided by the number of examples and depends on ``batch_size``)."""
    alpha: float = DEFAULT_ALPHA
    """Weight of the L1 penalty alpha·mean|w|."""
    batch_size: int | None = None
    """Examples per batch of the "reference" formula (all of them when None); "mean" ignores it."""
    dtype: str = "auto"
    """The precision the search evaluates in: "bf16" (about twice as fast where it is native), "fp32" (the
    model's own), or "auto": bf16 where the model's device computes it natively (``devices.fast_bf16``: CPUs
    with AVX512-BF16 or AMX, CUDA with bf16) and the model is float32 or loraloom's int8, as ``train`` does;
    else fp32 (a half-precision model, or one quantized by another library, is scored as it is).
    ``for_model`` resolves it, and a result records the resolved value."""
    layer_groups: str | int | None = None
    """None: one weight per module (the paper). "stack": one per module per stack (encoder / decoder);
    an int k: one per module per k consecutive layers of each stack."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.budget is None:
            object.__setattr__(self, "budget", DEFAULT_BUDGET)
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1:
            raise ValueError(f"budget must be a positive number of forward passes, got {self.budget!r}")
        if not self.bounds > 0:
            raise ValueError(f"bounds must be positive (weights lie in [-bounds, bounds]), got {self.bounds!r}")
        check_optimizer(self.optimizer, self.mode)
        if not isinstance(self.population, int) or self.population < 1:
            raise ValueError(f"population must be a positive integer, got {self.population!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.sigma is not None and not self.sigma > 0:
            raise ValueError(f"sigma must be positive or None, got {self.sigma!r}")
        steps = self.gradient_steps
        if self.mode == "hybrid" and not (isinstance(steps, int) and 0 < steps and adam_cost(steps) < self.budget):
            most = (self.budget - 2) // ADAM_STEP_COST
            raise ValueError(
                f"gradient_steps must lie in 1..{most} in hybrid mode with budget {self.budget} (an Adam step costs "
                f"{ADAM_STEP_COST}, the evaluation of its last w 1, and nevergrad needs 1), got {self.gradient_steps!r}"
            )
        if self.formula not in FORMULAS:
            raise ValueError(f"formula must be one of {FORMULAS}, got {self.formula!r}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {self.batch_size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        check_layer_groups(self.layer_groups)

    @classmethod
    def from_options(cls, settings: SearchSettings | None = None, **options: Any) -> SearchSettings:
        """``settings`` (default: the defaults) with ``options`` replaced; unknown names are a clear error."""
        if "objective" in options:  # its name before "formula": "objective" is the value the search minimises
            warnings.warn("the search option 'objective' is now 'formula'", DeprecationWarning, stacklevel=3)
            options["formula"] = options.pop("objective")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"unknown search option(s) {', '.join(unknown)}; SearchSettings has {', '.join(names)}")
        if "dtype" in options:
            options["dtype"] = dtype_name(options["dtype"])
        return cls(**options) if settings is None else dataclasses.replace(settings, **options)

    @property
    def adam_steps(self) -> int:
        """The Adam steps the budget buys: ``(budget - 1) // 3`` in gradient mode, ``gradient_steps`` in hybrid."""
        if self.mode == "gradient":
            return (self.budget - 1) // ADAM_STEP_COST
        return self.gradient_steps if self.mode == "hybrid" else 0

    @property
    def evaluations(self) -> int:
        """The candidates the gradient-free search scores: all the budget (nevergrad), what Adam leaves (hybrid)."""
        if self.mode == "gradient":
            return 0
        return self.budget - adam_cost(self.gradient_steps) if self.mode == "hybrid" else self.budget

    @property
    def cost(self) -> int:
        """The forward-pass equivalents a complete search spends: at most ``budget``."""
        return self.evaluations + (adam_cost(self.adam_steps) if self.mode != "nevergrad" else 0)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The compute dtype: None (fp32, as the model is) or torch.bfloat16."""
        if self.dtype == "auto":
            raise ValueError('SearchSettings.dtype "auto" depends on the model: resolve it with for_model(model)')
        return torch.bfloat16 if self.dtype == "bf16" else None

    def for_model(self, model: nn.Module) -> SearchSettings:
        """These settings with dtype "auto" made concrete for ``model`` (see ``dtype``)."""
        if self.dtype != "auto":
            return self
        params = [p for p in model.parameters() if p.is_floating_point()]
        native = bool(params) and fast_bf16(params[0].device)
        # loraloom's int8 weights dequantize into whatever dtype they report; other quantized tensors stay as they are
        castable = all(
            is_int8(p) or (p.dtype in (torch.float32, torch.bfloat16) and not is_quantized(p)) for p in params
        )
        return dataclasses.replace(self, dtype="bf16" if native and castable else "fp32")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dtype_name(dtype: str | torch.dtype | None) -> str:
    """ "fp32" or "bf16" from a name, a torch dtype or None (fp32)."""
    aliases = {None: "fp32", "float32": "fp32", "bfloat16": "bf16", torch.float32: "fp32", torch.bfloat16: "bf16"}
    return aliases.get(dtype, dtype)


def run_search(
    objective: Objective,
    settings: SearchSettings,
    *,
    random_state: np.random.RandomState | None = None,
    progress: bool = False,
) -> SearchResult:
    """Minimise ``objective`` as ``settings`` say: nevergrad, Adam, or nevergrad then Adam (hybrid)."""
    if settings.mode == "gradient":
        return gradient_search(objective, settings, progress=progress)
    start = time.perf_counter()
    import_nevergrad(settings.optimizer)  # deferred: slow to import, and gradient mode does without it

    import_seconds = time.perf_counter() - start
    if settings.mode == "hybrid":
        found = hybrid_search(objective, settings, random_state=random_state, progress=progress)
    else:
        found = nevergrad_search(objective, settings, random_state=random_state, progress=progress)
    return dataclasses.replace(found, seconds=found.seconds + import_seconds, import_seconds=import_seconds)


def hybrid_search(
    objective: Objective,
    settings: SearchSettings,
    *,
    random_state: np.random.RandomState | None = None,
    progress: bool = False,
) -> SearchResult:
    """Gradient-free for ``settings.evaluations``, then ``gradient_steps`` Adam steps from the best w found."""
    first = nevergrad_search(
        objective, settings, budget=settings.evaluations, random_state=random_state, progress=progress
    )
    if not first.complete:  # cut short (an optimizer error, Ctrl-C): what it kept is the result
        return first
    second = gradient_search(objective, settings, steps=settings.gradient_steps, init=first.weights, progress=progress)
    trace = first.trace + [
        dataclasses.replace(e, index=len(first.trace) + e.index, elapsed=first.seconds + e.elapsed)
        for e in second.trace
    ]
    best = min(trace, key=lambda e: e.objective)
    return dataclasses.replace(
        first,
        weights=best.weights,
        objective=best.objective,
        trace=trace,
        method=f"{first.method}+{second.method}",
        seconds=first.seconds + second.seconds,
        complete=second.complete,
        interrupted=second.interrupted,
        stopped=second.stopped,
    )


def import_nevergrad(optimizer: str = DEFAULT_OPTIMIZER) -> Any:
    """nevergrad, imported on first use without bayes_opt unless ``optimizer`` is one that needs it."""
    if "nevergrad" not in sys.modules and optimizer not in BAYES_OPT_OPTIMIZERS and "bayes_opt" not in sys.modules:
        sys.modules["bayes_opt"] = None  # nevergrad's `from bayes_opt import ...` fails as it does when not installed
        try:
            import nevergrad
        finally:
            if sys.modules.get("bayes_opt", 0) is None:
                del sys.modules["bayes_opt"]
    import nevergrad

    return nevergrad


def check_optimizer(name: str, mode: str) -> None:
    """A nevergrad optimizer name the mode uses, checked before any work (gradient mode has none but Adam)."""
    if mode == "gradient":
        if name != DEFAULT_OPTIMIZER:
            raise ValueError(
                f"optimizer {name!r}: mode 'gradient' runs Adam and takes no optimizer (set lr instead); the "
                "optimizer names a nevergrad optimizer for modes 'nevergrad' and 'hybrid'"
            )
        return
    ng = import_nevergrad(name)
    if name in BAYES_OPT_OPTIMIZERS and name not in ng.optimizers.registry:
        raise ValueError(
            f"optimizer {name!r} needs the bayes_opt package, and nevergrad was imported here without it (by an "
            "earlier search, or bayes_opt is not installed): `import nevergrad` before the first search"
        )
    if not isinstance(name, str) or name not in ng.optimizers.registry:
        close = difflib.get_close_matches(str(name), list(ng.optimizers.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see nevergrad.optimizers.registry)"
        raise ValueError(f"unknown nevergrad optimizer {name!r}{hint}")


def nevergrad_optimizer(
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
    check_optimizer(name, "nevergrad")
    ng = import_nevergrad(name)  # slow to import: only when searching
    parametrization = ng.p.Array(init=np.zeros(n), lower=-bounds, upper=bounds)
    parametrization.random_state = random_state
    if sigma is not None:
        parametrization.set_mutation(sigma=sigma)
    return ng.optimizers.registry[name](parametrization=parametrization, budget=budget, num_workers=workers)


def _describe(optimizer) -> str:
    """NGOpt and its kin delegate to a chosen optimizer: name the chain, e.g. "NGOpt>Cobyla"."""
    names, opt = [], optimizer
    while opt is not None and len(names) < 5:
        # A configured optimizer's name is its whole repr (ConfPortfolio(optimizers=[...]): a page long): the class part
        name = str(getattr(opt, "name", type(opt).__name__)).split("(")[0]
        if not names or name != names[-1]:
            names.append(name)
        try:
            opt = getattr(opt, "optim", None)  # NGOpt builds its choice on first access: may fail
        except Exception:
            break
    return ">".join(names)


class Scorer(Protocol):
    """What the nevergrad search needs: scores for P x N weights (``Objective`` is one)."""

    n_weights: int  # weights per candidate

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
    settings: SearchSettings,
    *,
    budget: int | None = None,
    random_state: np.random.RandomState | None = None,
    progress: bool = False,
) -> SearchResult:
    """Minimise the objective with ``settings``' nevergrad optimizer over ``budget`` evaluations (default: the
    settings' budget), ``population`` at a time; ``random_state`` (default: from the settings' seed) seeds it.

    The search never loses its work: an exception inside the optimizer (ask or tell) or a
    KeyboardInterrupt ends it with the best evaluated weights so far, ``complete=False`` and a
    ``LoraHubWarning`` naming the cause (with nothing evaluated yet, the error is raised: an
    ``OptimizerError``, or the KeyboardInterrupt). Whatever ends it, the threads nevergrad started
    for recast optimizers (Cobyla, Powell, ...) are stopped. A NaN or inf loss is traced as +inf and
    told to the optimizer as ``NONFINITE_SCORE``. Sequential-only optimizers run one candidate a pass.
    """
    from nevergrad.common import errors as ng_errors

    from .recast import recast_threads, stop_recast_threads

    budget = settings.budget if budget is None else budget  # hybrid's share, checked by its settings
    optimizer, population = settings.optimizer, _population_for(settings.optimizer, settings.population)
    n = objective.n_weights
    random_state = random_state or np.random.RandomState(settings.seed)
    opt = nevergrad_optimizer(optimizer, n, budget, settings.bounds, population, random_state, settings.sigma)
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
    ng = import_nevergrad(optimizer)

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
    settings: SearchSettings,
    *,
    steps: int | None = None,
    init: float | Sequence[float] | None = None,
    progress: bool = False,
) -> SearchResult:
    """Adam on w at ``settings.lr`` (one forward + backward per step) for ``steps`` (default: the steps the
    settings' budget buys, ``settings.adam_steps``), clamped to [-bounds, bounds] after each step; then the w
    the last step moved to is scored with one forward pass, so that Adam's last move is not lost. The cost:
    ``adam_cost(steps)`` = 3 per step + 1.

    w starts at ``init``: a vector, or one value for every module (default 1/N), not 0: at w = 0 both
    A_hat and B_hat vanish and so does the gradient of B_hat·A_hat.
    """
    steps, bounds = settings.adam_steps if steps is None else steps, settings.bounds
    n = objective.n_weights
    start = torch.full((n,), 1.0 / n) if init is None else torch.as_tensor(init, dtype=torch.float32).expand(n)
    w = start.clone().reshape(1, n).requires_grad_(True)
    adam = torch.optim.Adam([w], lr=settings.lr)
    tracer = _Tracer(objective, steps + 1, progress, "lorahub Adam")
    stop: KeyboardInterrupt | None = None
    last_good: torch.Tensor | None = None  # the last w whose loss and gradient were finite
    try:
        with _frozen(objective.model):
            for _ in range(steps):
                scored = w.detach().clone()
                if _adam_step(objective, w, adam, bounds, tracer):
                    last_good = scored
                elif last_good is None:
                    break  # non-finite from the start: no finite point to step back to
                else:  # skip the step: back half way towards the last finite w, and try again from there
                    with torch.no_grad():
                        w.copy_((w + last_good) / 2)
        if steps == 0 or last_good is not None:  # w moved since it was last scored (or was never scored)
            tracer.score(w.detach().clone())
    except KeyboardInterrupt as e:  # Ctrl-C: keep the steps taken (none taken: nothing to keep)
        tracer.bar.close()
        if not tracer.trace:
            raise
        stop = e
    found = tracer.result("gradient:Adam")
    found.nonfinite = sum(not math.isfinite(e.objective) for e in found.trace)
    bad_steps = sum(e.gradient and not math.isfinite(e.objective) for e in found.trace)
    if stop is not None:
        _cut_short(found, stop, f"interrupted after {found.adam_steps} of {steps} Adam steps")
    elif found.nonfinite == len(found.trace):
        found.complete = False
        what = "every Adam step" if steps else "the start"
        found.stopped = f"{what} had a NaN or inf loss: no finite weights found"
        warnings.warn(found.stopped, LoraHubWarning, stacklevel=2)
    elif found.nonfinite:
        notes = []
        if bad_steps:
            notes.append(
                f"{bad_steps} of {found.adam_steps} Adam steps had a NaN or inf loss (or gradient): skipped, "
                "each stepping back half way towards the last finite weights"
            )
        if found.nonfinite > bad_steps:
            notes.append("the w Adam ended on had a NaN or inf loss")
        warnings.warn("; ".join(notes), LoraHubWarning, stacklevel=2)
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
        scores = objective.gradient(w)
    tracer.record(w.detach().clone(), scores, time.perf_counter() - start, gradient=True)
    if not torch.isfinite(scores.values).all() or w.grad is None or not torch.isfinite(w.grad).all():
        return False
    adam.step()
    with torch.no_grad():
        w.clamp_(-bounds, bounds)
    return True


__all__ = [
    "ADAM_STEP_COST",
    "DEFAULT_BOUNDS",
    "DEFAULT_BUDGET",
    "DEFAULT_GRADIENT_STEPS",
    "DEFAULT_LR",
    "DEFAULT_OPTIMIZER",
    "DEFAULT_POPULATION",
    "MODES",
    "NONFINITE_SCORE",
    "Evaluation",
    "LoraHubWarning",
    "OptimizerError",
    "Scorer",
    "SearchResult",
    "SearchSettings",
    "adam_cost",
    "gradient_search",
    "hybrid_search",
    "nevergrad_optimizer",
    "nevergrad_search",
    "run_search",
]
