"""Every protocol setting of an experiment, in one validated dataclass that is recorded and hashed.

Defaults are the LoraHub paper's BBH protocol (SPEC section 3): 5 learning examples per task and seed,
N = 20 modules, budget K = 40, gradient baselines trained 40 epochs on the same 5 examples (lr 3e-5 full,
2e-4 LoRA / IA3, FourierFT at its documented 5e-2), 3 runs each. Frozen once validated:
``replace(**changes)`` makes a new, validated copy.

A cell (task, method, seed, run) is keyed by the hash of only the settings its method reads
(``cell_fields``): changing the LoraHub budget makes new LoraHub cells and keeps every LoRA cell. LoraHub
cells hash the search as it will run (``SearchSettings``, LoraHub's defaults included), so a changed
default in the engine makes new cells too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.registry import ADAPTER_TYPES, config_for
from ..devices import resolve_device, resolve_dtype
from ..hub.combine import DENSITY_OPS
from ..hub.search import SearchSettings
from ..train import FULL, FULL_LR

# What the runner passes to ll.lorahub itself; lorahub_options must not set these.
LORAHUB_RESERVED = ("base", "modules", "examples", "tokenizer", "pool", "num", "select", "budget", "seed", "mode")
# The LoraHub methods: how each chooses its N modules and searches; the rest of the search is lorahub_options.
LORAHUB_METHODS = {
    "lorahub": ("random", "nevergrad"),  # the paper's: N drawn with the seed, gradient-free search
    "lorahub-retrieval": ("retrieval", "nevergrad"),  # the N with the lowest loss on the learning examples
    "lorahub-gradient": ("random", "gradient"),  # Adam on w instead of the gradient-free search
    "lorahub-arrow": ("arrow", "nevergrad"),  # the N whose Arrow prototypes the learning examples align with
    "lorahub-embedding": ("embedding", "nevergrad"),  # the N whose effect embedding is nearest the examples'
}
# Merge methods: the N modules lorahub draws (random, with the seed), the weights searched as lorahub searches
# them (nevergrad, budget K, lorahub_options) but every candidate merged with this hub/combine.py operator.
MERGE_METHODS = {"ties": "ties", "dare": "dare_ties", "cat": "cat"}
# Arrow routing (hub/arrow.py) over the N modules Arrow's alignment selects: no search at all.
ROUTING_METHODS = ("arrow",)
# One gradient baseline per registered adapter type, and full fine-tuning.
GRADIENT_METHODS = (*(name.lower() for name in ADAPTER_TYPES), FULL)
# The harness's learning rates where the LoraHub paper's baselines differ from a type's own default_lr.
PAPER_LR = {FULL: FULL_LR, "ia3": 2e-4}


def default_learning_rates() -> dict[str, float]:
    """Per gradient method: the paper's learning rate, else the adapter type's ``default_lr``."""
    return {**{name.lower(): cls.default_lr for name, cls in ADAPTER_TYPES.items()}, **PAPER_LR}


@dataclass(frozen=True)
class ExperimentSettings:
    shots: int = 5
    """Learning examples per task and seed, drawn with the split seed; the rest are the test examples."""
    max_test: int | None = None
    """At most this many test examples per task (the first of the seeded shuffle); None = all of them."""
    split_seed: int | None = None
    """None: each seed draws its own split (learning and test examples). An int: one split for every
    seed, drawn with this seed (the paper's BBH protocol, where only the module sampling varies)."""
    num_modules: int = 20
    """LoraHub N: modules composed per seed (all of the pool when it holds fewer; recorded per cell)."""
    budget: int = 40
    """LoraHub K, in forward-pass equivalents in every method (``SearchSettings.budget``): K candidates scored
    (lorahub, lorahub-retrieval), or (K - 1) // 3 Adam steps and one last evaluation (lorahub-gradient)."""
    merge_density: float = 0.5
    """ties / dare: the fraction of each module's entries the operator keeps (``CombineSettings.density``)."""
    arrow_top_k: int = 3
    """arrow: the modules each token is routed through (PEFT's ArrowConfig default; at most N)."""
    lorahub_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``ll.lorahub`` in the lorahub* methods (e.g. {"population": 1});
    recorded as given, and each cell also records the settings LoraHub reports it ran with."""
    epochs: int = 40
    """Gradient baselines: epochs over the learning examples."""
    learning_rates: dict[str, float] = field(default_factory=default_learning_rates)
    """Per gradient method, its learning rate (``lr_<method>`` in ``from_dict`` / ``--set`` sets one): the
    paper's (full 3e-5, LoRA 2e-4, IA3 2e-4), else the type's ``default_lr`` (FourierFT 5e-2). Methods left
    out keep their default."""
    gradient_runs: int = 3
    """Gradient baselines: training runs per task and seed (run r trains with seed 1000 * seed + r); the
    report shows their mean."""
    train_batch_size: int = 8
    """Gradient baselines: examples per optimizer step (8 >= 5 shots: one full batch an epoch)."""
    adapter_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per gradient method ("lora", "ia3", "fourierft"), fields of its adapter config, e.g.
    {"lora": {"r": 16, "target_modules": ["q", "v"]}}; default: the type's own defaults."""
    max_new_tokens: int = 64
    """Greedy generation: at most this many new tokens per test example."""
    batch_size: int = 16
    """Test examples generated per batch."""
    icl_separator: str = "\n\n"
    """ICL: the prompt is the demonstrations ("input\\ntarget") and the test input, joined by this."""
    max_context: int | None = None
    """ICL: the longest prompt the model takes; None = the smaller of the model's position limit and the
    tokenizer's model_max_length. Longer prompts skip the ICL cell, with the reason recorded."""

    device: str = "auto"
    """Where the base model runs: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """The base model's precision: fp32, bf16, fp16, or auto (bf16 on GPUs that support it, else fp32)."""
    num_gpus: float = 0.0
    """Ray: GPUs each cell asks for (fractional: cells share a GPU); 0 on CPU machines."""

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype, resolve_device(self.device))  # a missing device fails here, before any cell
        if isinstance(self.num_gpus, bool) or not isinstance(self.num_gpus, (int, float)) or not self.num_gpus >= 0:
            raise ValueError(f"ExperimentSettings.num_gpus must be a number >= 0, got {self.num_gpus!r}")
        for name in ("shots", "num_modules", "budget", "epochs", "gradient_runs", "train_batch_size", "arrow_top_k"):
            _check_int(self, name, minimum=1)
        _check_int(self, "max_new_tokens", minimum=1)
        _check_int(self, "batch_size", minimum=1)
        for name in ("max_test", "max_context"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1)
        if self.split_seed is not None:
            _check_int(self, "split_seed", minimum=0)
        if not isinstance(self.learning_rates, dict):
            raise ValueError(f"ExperimentSettings.learning_rates must be a dict, got {self.learning_rates!r}")
        object.__setattr__(self, "learning_rates", {**default_learning_rates(), **self.learning_rates})
        for method, value in self.learning_rates.items():
            if method not in GRADIENT_METHODS:
                raise ValueError(
                    f"ExperimentSettings.learning_rates: unknown method {method!r}; use {GRADIENT_METHODS}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ExperimentSettings lr_{method} must be a positive number, got {value!r}")
        density = self.merge_density
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"ExperimentSettings.merge_density must be in (0, 1], got {density!r}")
        if not isinstance(self.lorahub_options, dict) or not all(isinstance(k, str) for k in self.lorahub_options):
            raise ValueError(
                f"ExperimentSettings.lorahub_options must be a dict of keyword arguments, got {self.lorahub_options!r}"
            )
        reserved = sorted(set(self.lorahub_options) & set(LORAHUB_RESERVED))
        if reserved:
            raise ValueError(
                f"ExperimentSettings.lorahub_options sets {reserved}: the harness passes these itself "
                "(use num_modules, budget, the seeds and the methods lorahub / lorahub-retrieval / lorahub-gradient)"
            )
        for method in (*LORAHUB_METHODS, *MERGE_METHODS):  # unknown or bad search options fail here, not per cell
            try:
                self.search_settings(method)
            except (TypeError, ValueError) as e:
                raise ValueError(f"ExperimentSettings.lorahub_options: {e}") from e
        if not isinstance(self.adapter_options, dict):
            raise ValueError(f"ExperimentSettings.adapter_options must be a dict, got {self.adapter_options!r}")
        types = [m for m in GRADIENT_METHODS if m != FULL]
        unknown = sorted(set(self.adapter_options) - set(types))
        if unknown:
            raise ValueError(f"ExperimentSettings.adapter_options: unknown adapter {unknown}; use {', '.join(types)}")
        if not all(isinstance(v, dict) for v in self.adapter_options.values()):
            raise ValueError("ExperimentSettings.adapter_options: each value must be a dict of config fields")
        for name, options in self.adapter_options.items():  # a config that cannot be built fails here, not per cell
            try:
                dataclasses.replace(config_for(name), **options)
            except (TypeError, ValueError) as e:
                raise ValueError(f"ExperimentSettings.adapter_options[{name!r}]: {e}") from e
        if not isinstance(self.icl_separator, str):
            raise ValueError(f"ExperimentSettings.icl_separator must be a string, got {self.icl_separator!r}")
        try:
            json.dumps(self.to_dict(), sort_keys=True)
        except TypeError as e:
            raise ValueError(f"ExperimentSettings must hold JSON values only (they are recorded): {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExperimentSettings:
        """Settings from a dict; an unknown name is an error listing the known ones."""
        values = dict(values)
        rates = {
            k.removeprefix("lr_"): values.pop(k) for k in list(values) if k.removeprefix("lr_") in GRADIENT_METHODS
        }
        if rates:
            values["learning_rates"] = {**values.get("learning_rates", {}), **rates}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown experiment setting(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_assignments(cls, assignments: list[str], **values: Any) -> ExperimentSettings:
        """Settings from ``NAME=VALUE`` strings (VALUE read as JSON, else as text; ``--set``) and ``values``."""
        parsed: dict[str, Any] = {}
        for item in assignments:
            name, eq, text = item.partition("=")
            if not eq or not name.strip():
                raise ValueError(f"--set {item!r}: expected NAME=VALUE, e.g. --set max_new_tokens=16")
            try:
                parsed[name.strip().replace("-", "_")] = json.loads(text)
            except json.JSONDecodeError:
                parsed[name.strip().replace("-", "_")] = text
        return cls.from_dict({**parsed, **values})

    def replace(self, **changes: Any) -> ExperimentSettings:
        return ExperimentSettings.from_dict({**self.to_dict(), **changes})

    def cell_fields(self, method: str) -> dict[str, Any]:
        """The settings a method's cells depend on (what their hash covers)."""
        names = ["shots", "max_test", "split_seed", "max_new_tokens", "batch_size"]
        if method == "icl":
            names += ["icl_separator", "max_context"]
        elif method in LORAHUB_METHODS or method in MERGE_METHODS:
            names += ["num_modules"] + (["merge_density"] if MERGE_METHODS.get(method) in DENSITY_OPS else [])
        elif method in ROUTING_METHODS:
            names += ["num_modules", "arrow_top_k"]
        elif method in GRADIENT_METHODS:
            names += ["epochs", "train_batch_size"]
        values = {name: getattr(self, name) for name in names}
        dtype = resolve_dtype(self.dtype, resolve_device(self.device))
        if dtype != torch.float32:  # results in another precision are other cells (fp32 cells keep their hashes)
            values["dtype"] = str(dtype).removeprefix("torch.")
        if method in GRADIENT_METHODS:  # under its old field name: the hashes of earlier runs still match
            values[f"lr_{method}"] = self.learning_rates[method]
        if method in MERGE_METHODS:
            values["operator"] = MERGE_METHODS[method]
        if method in LORAHUB_METHODS or method in MERGE_METHODS:  # the search as it will run (not the seed)
            search = self.search_settings(method)
            values["search"] = {k: v for k, v in search.to_dict().items() if k != "seed"}
            if search.adam_steps:  # the budget once counted Adam steps: cells from then are other cells
                values["search"]["adam_steps"] = search.adam_steps
        if method in self.adapter_options:
            values["adapter_options"] = self.adapter_options[method]
        return values

    def search_settings(self, method: str) -> SearchSettings:
        """The LoraHub search of ``method``'s cells (with seed 0; each cell uses its own seed); a merge method's
        is the gradient-free one."""
        mode = LORAHUB_METHODS[method][1] if method in LORAHUB_METHODS else "nevergrad"
        # The precision of a cell is the experiment's ``dtype`` (the model's), not the machine's: "fp32" scores in
        # the model's own, so cells hash and score the same on every machine unless lorahub_options ask otherwise.
        options = {"dtype": "fp32", **self.lorahub_options, "mode": mode, "budget": self.budget}
        return SearchSettings.from_options(None, **options)

    def hash(self) -> str:
        """A stable hash of every setting."""
        return stable_hash(self.to_dict())


def stable_hash(value: Any) -> str:
    """12 hex digits of SHA-256 over the value's sorted-key JSON: the same settings, the same hash."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _check_int(settings: ExperimentSettings, name: str, *, minimum: int) -> None:
    value = getattr(settings, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ExperimentSettings.{name} must be an integer >= {minimum}, got {value!r}")


__all__ = [
    "GRADIENT_METHODS",
    "LORAHUB_METHODS",
    "MERGE_METHODS",
    "ROUTING_METHODS",
    "LORAHUB_RESERVED",
    "ExperimentSettings",
    "stable_hash",
]
