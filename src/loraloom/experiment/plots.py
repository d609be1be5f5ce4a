"""The report's plots, drawn on matplotlib ``Figure`` objects (no pyplot state).

- ``methods.png``: per method, the task-average exact match of each seed (dots) and their mean with
  the spread over seeds (bar and error bar: one standard deviation).
- ``weights-<method>.png``: per LoraHub method, a heat-map per task of the weights found (rows: seeds,
  columns: the modules; blank where a seed did not draw the module).
- ``traces-<method>.png``: per LoraHub method, the best objective so far against evaluations, one line
  per seed, a panel per task.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .results import Results, shows_best


def write_plots(results: Results, folder: Path) -> list[str]:
    """Draw every plot into ``folder``; returns the file names written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig = methods_figure(results)
    if fig is not None:
        fig.savefig(folder / "methods.png", dpi=100)
        written.append("methods.png")
    for method in results.methods:
        if not shows_best(method):
            continue
        rows = [r for r in results.rows if r["method"] == method and r["status"] == "done" and r["weights"]]
        if not rows:
            continue
        name = _safe(method)
        weights_figure(results.tasks, rows, method).savefig(folder / f"weights-{name}.png", dpi=100)
        traces_figure(results.tasks, rows, method).savefig(folder / f"traces-{name}.png", dpi=100)
        written += [f"weights-{name}.png", f"traces-{name}.png"]
    return written


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def methods_figure(results: Results) -> Figure | None:
    """Each method's task-average score per seed (mean over runs), with the mean and spread over seeds."""
    per_method: dict[str, list[float]] = {}
    tasks = results.tasks
    for method in results.methods:
        seeds = sorted({r["seed"] for r in results.rows if r["method"] == method})
        averages = []
        for seed in seeds:
            by_task = []
            for task in tasks:
                scores = [
                    r["score"]
                    for r in results.rows
                    if (r["task"], r["method"], r["seed"]) == (task, method, seed) and r["status"] == "done"
                ]
                if scores:
                    by_task.append(statistics.fmean(scores))
            if len(by_task) == len(tasks):  # only seeds scored on every task: averages stay comparable
                averages.append(100 * statistics.fmean(by_task))
        if averages:
            per_method[method] = averages
    if not per_method:
        return None
    fig = Figure(figsize=(max(5.0, 1.2 * len(per_method) + 2), 4))
    ax = fig.subplots()
    names = list(per_method)
    means = [statistics.fmean(per_method[m]) for m in names]
    spreads = [statistics.pstdev(per_method[m]) for m in names]
    ax.bar(range(len(names)), means, yerr=spreads, capsize=4, color="tab:blue", alpha=0.7)
    for i, m in enumerate(names):
        ax.plot([i] * len(per_method[m]), per_method[m], "o", color="black", markersize=3)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set(ylabel="exact match (%), average over tasks", title="Methods: mean and spread over seeds")
    fig.tight_layout()
    return fig


def _task_panels(tasks: list[str], rows: list[dict[str, Any]], panel_width: float) -> tuple[list[str], Figure, Any]:
    """The tasks that have rows, and a figure with one panel (axes, flattened) for each of them."""
    shown = [t for t in tasks if any(r["task"] == t for r in rows)]
    nrows, ncols = _grid(len(shown))
    fig = Figure(figsize=(panel_width * ncols, 3 * nrows + 0.5))
    return shown, fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def weights_figure(tasks: list[str], rows: list[dict[str, Any]], method: str) -> Figure:
    """A heat-map of the weights per task: seeds x modules (the union of the modules drawn)."""
    shown, fig, axes = _task_panels(tasks, rows, panel_width=5)
    for ax, task in zip(axes, shown, strict=False):
        cells = sorted((r for r in rows if r["task"] == task), key=lambda r: (r["seed"], r["run"]))
        modules = sorted({Path(m).name for r in cells for m in r["modules"]})
        grid = [[math.nan] * len(modules) for _ in cells]
        for i, r in enumerate(cells):
            for m, w in zip(r["modules"], r["weights"], strict=True):
                grid[i][modules.index(Path(m).name)] = w
        limit = max((abs(w) for row in grid for w in row if not math.isnan(w)), default=1.0) or 1.0
        image = ax.imshow(grid, cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_yticks(range(len(cells)), [f"seed {r['seed']}" for r in cells], fontsize=7)
        ax.set_xticks(range(len(modules)), modules, rotation=90, fontsize=6)
        ax.set_title(task, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    fig.suptitle(f"{method}: weights per task")
    fig.tight_layout()
    return fig


def traces_figure(tasks: list[str], rows: list[dict[str, Any]], method: str) -> Figure:
    """The best objective so far per evaluation, one line per seed, a panel per task."""
    shown, fig, axes = _task_panels(tasks, rows, panel_width=4.5)
    for ax, task in zip(axes, shown, strict=False):
        for r in sorted((r for r in rows if r["task"] == task), key=lambda r: r["seed"]):
            trace = (r["details"] or {}).get("trace") or []
            best, running = [], math.inf
            for value in trace:
                running = min(running, value)
                best.append(running)
            ax.plot(range(1, len(best) + 1), best, label=f"seed {r['seed']}")
        ax.set(xlabel="evaluation", ylabel="best objective", title=task)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    fig.suptitle(f"{method}: objective traces")
    fig.tight_layout()
    return fig


__all__ = ["methods_figure", "traces_figure", "weights_figure", "write_plots"]
