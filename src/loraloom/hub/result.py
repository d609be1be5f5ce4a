"""What a LoraHub run leaves behind: the weights, the trace, the composed module, and how to save them.

``save(dir)`` writes ``dir/adapter`` (the composed module as a PEFT folder: loads in PEFT, in loraloom,
and in the reference's ``lorahub_inference`` after ``PeftModel.from_pretrained``), ``dir/weights.json``
(modules, weights, settings, and what the search spent: ``evaluations``, ``adam_steps`` and ``cost`` in
forward-pass equivalents; ``read_weights`` reads it back and checks it), ``dir/trace.csv`` (one row per
evaluation, with its ``cost``: 1, or ``ADAM_STEP_COST`` for an Adam step) and ``dir/trace.png`` (objective per evaluation, and the weights as bars).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters.peft_format import write_adapter_folder
from ..files import atomic_folder
from .bank import ModuleBank
from .compose import Composition
from .search import Evaluation
from .select import Selection

ADAPTER_DIR, WEIGHTS_FILE, TRACE_CSV, TRACE_PNG = "adapter", "weights.json", "trace.csv", "trace.png"
MERGED_DIR = "merged"  # written by `loraloom compose --merge` after the save
# A save replaces all of an earlier result, so no folder mixes two (a stale trace.png or merged/).
RESULT_ENTRIES = (ADAPTER_DIR, WEIGHTS_FILE, TRACE_CSV, TRACE_PNG, MERGED_DIR)


@dataclass
class LoraHubResult:
    weights: list[float]  # one per module, in the order of ``modules``
    objective: float  # the best objective value found (that of ``weights``)
    trace: list[Evaluation]
    modules: list[str]
    selection: Selection
    settings: dict[str, Any] = field(default_factory=dict)  # optimizer, budget, seed, objective kind, ...
    seconds: float = 0.0  # search wall time
    # Wall seconds per phase: base_load, tokenisation, module_load, search (= imports + composition + forward
    # + backward + optimizer), and merge once merged. imports: the optimizer library, imported on first use.
    timings: dict[str, float] = field(default_factory=dict)
    bank: ModuleBank | None = field(default=None, repr=False)
    model: nn.Module | None = field(default=None, repr=False)  # the base model, left as it was given
    complete: bool = True  # False: the search was cut short (see ``stopped``); ``weights`` are the best so far
    interrupted: bool = False  # cut short by Ctrl-C (KeyboardInterrupt)
    stopped: str = ""  # why the search was cut short, one line ("" when complete)
    nonfinite: int = 0  # evaluations whose loss was NaN or inf (objective +inf in the trace)

    @property
    def best(self) -> Evaluation:
        return min(self.trace, key=lambda e: e.objective)

    @property
    def adam_steps(self) -> int:
        """Adam steps taken (gradient and hybrid modes; each also in ``trace``)."""
        return sum(e.gradient for e in self.trace)

    @property
    def cost(self) -> int:
        """Forward-pass equivalents the search spent (at most the settings' budget)."""
        return sum(e.cost for e in self.trace)

    def merge(self, model: nn.Module | None = None) -> nn.Module:
        """Merge the composed module into ``model`` (default: the base model of the run), in place."""
        model = model if model is not None else self.model
        if model is None or self.bank is None:
            raise ValueError("this result holds no model or module bank to merge (was it read from disk?)")
        start = time.perf_counter()
        merged = Composition(model, self.bank, self.layer_groups).merge(self.weights)
        self.timings["merge"] = time.perf_counter() - start
        return merged

    @property
    def layer_groups(self) -> str | int | None:
        """None (one weight per module), "stack" or k: how ``weights`` map to layers (see ``SearchSettings``)."""
        return self.settings.get("layer_groups")

    def save_adapter(self, out_dir: str | os.PathLike) -> Path:
        """The composed module (A_hat, B_hat per layer) as a PEFT LoRA folder."""
        if self.bank is None:
            raise ValueError("this result holds no module bank to compose")
        config = dataclasses.replace(
            self.bank.config, init_lora_weights=True, lora_dropout=0.0, base_model_name_or_path=self._base_name()
        )
        return write_adapter_folder(out_dir, config, self.bank.peft_tensors(self.weights, self.layer_groups))

    def _base_name(self) -> str | None:
        name = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        return name or (self.bank.config.base_model_name_or_path if self.bank is not None else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modules": self.modules,
            "weights": self.weights,
            "objective": self.objective if math.isfinite(self.objective) else None,
            "settings": self.settings,
            "selection": self.selection.to_dict(),
            "evaluations": len(self.trace),
            "adam_steps": self.adam_steps,
            "cost": self.cost,
            "complete": self.complete,
            "interrupted": self.interrupted,
            "stopped": self.stopped,
            "nonfinite_evaluations": self.nonfinite,
            "seconds": self.seconds,
            "timings": self.timings,
        }

    def save(self, out_dir: str | os.PathLike, *, plot: bool = True) -> Path:
        """Write adapter/, weights.json, trace.csv and (if ``plot``) trace.png into ``out_dir``."""
        out = Path(out_dir)
        text = json.dumps(self.to_dict(), indent=2, default=str) + "\n"
        # The files go in together: never new weights beside an old trace.
        with atomic_folder(out, owns=RESULT_ENTRIES) as tmp:
            self.save_adapter(tmp / ADAPTER_DIR)
            (tmp / WEIGHTS_FILE).write_text(text)
            (tmp / TRACE_CSV).write_text(trace_csv(self.trace, self.modules))
            if plot:
                plot_trace(self, tmp / TRACE_PNG)
        return out


def trace_csv(trace: list[Evaluation], modules: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["eval", "objective", "loss", "penalty", "seconds", "elapsed", "cost"] + [f"w{i}" for i in range(len(modules))]
    )
    for e in trace:
        writer.writerow(
            [e.index, repr(e.objective), repr(e.loss), repr(e.penalty), f"{e.seconds:.6f}", f"{e.elapsed:.6f}", e.cost]
            + [repr(w) for w in e.weights]
        )
    return buf.getvalue()


def plot_trace(result: LoraHubResult, path: str | os.PathLike) -> None:
    """Objective per evaluation (with the best so far) beside the final weights as bars."""
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no process-wide backend

    values = [e.objective for e in result.trace]
    best, running = [], math.inf
    for v in values:
        running = min(running, v)
        best.append(running)
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    left.plot(range(1, len(values) + 1), values, ".", color="tab:gray", label="evaluation")
    left.plot(range(1, len(values) + 1), best, "-", color="tab:blue", label="best so far")
    nonfinite = [i for i, v in enumerate(values, 1) if not math.isfinite(v)]
    if nonfinite:  # off the chart otherwise: mark them along the top
        top = max((v for v in values if math.isfinite(v)), default=1.0)
        left.plot(nonfinite, [top] * len(nonfinite), "x", color="tab:red", label="NaN / inf loss")
    title = f"LoraHub search ({result.settings.get('method', '')})"
    if not result.complete:
        title += ", interrupted" if result.interrupted else ", cut short"
    left.set(xlabel="evaluation", ylabel="objective", title=title)
    left.legend()
    right.bar(range(len(result.weights)), result.weights, color="tab:blue")
    right.axhline(0, color="black", linewidth=0.5)
    right.set(xlabel="module", ylabel="weight", title=f"weights (objective {result.objective:.4f})")
    right.set_xticks(range(len(result.weights)), [Path(m).name for m in result.modules], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def read_weights(path: str | os.PathLike, modules: list[str] | None = None) -> tuple[list[str], list[float]]:
    """(modules, weights) from a weights.json; with ``modules`` given, the counts must agree.

    Per-layer-group weights (``settings.layer_groups`` set) hold one weight per module per group,
    group-major; pass ``layer_groups=read_layer_groups(path)`` to ``compose`` with them."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read weights ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("weights"), list):
        raise ValueError(f"{path}: expected an object with a 'weights' list")
    weights = data["weights"]
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"{path}: 'weights' must hold finite numbers")
    file_modules = data.get("modules")
    grouped = (data.get("settings") or {}).get("layer_groups") is not None
    per = "per weight of a layer group" if grouped else "per weight"

    def fits(n: int) -> bool:  # one weight per module, or per module per group
        return n > 0 and (len(weights) % n == 0 if grouped else len(weights) == n)

    if not isinstance(file_modules, list) or not fits(len(file_modules)):
        raise ValueError(f"{path}: 'modules' must list one module {per} ({len(weights)} weights)")
    if modules is not None and not fits(len(modules)):
        raise ValueError(f"{path}: holds {len(weights)} weights but {len(modules)} modules were given")
    return [str(m) for m in (modules if modules is not None else file_modules)], [float(w) for w in weights]


def read_layer_groups(path: str | os.PathLike) -> str | int | None:
    """The ``layer_groups`` setting a weights.json was found with (None: one weight per module)."""
    path = Path(path)
    data = json.loads((path / WEIGHTS_FILE if path.is_dir() else path).read_text())
    return (data.get("settings") or {}).get("layer_groups")


__all__ = ["LoraHubResult", "plot_trace", "read_layer_groups", "read_weights", "trace_csv"]
