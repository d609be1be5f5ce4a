"""``report(run_dir)``: report.md, results.csv and the plots of an experiment, drawn on matplotlib ``Figure``
objects (no pyplot state).

- ``methods.png``: per method, the task-average exact match of each seed (dots) and their mean with
  the spread over seeds (bar and error bar: one standard deviation).
- ``weights-<method>.png``: per LoraHub method, a heat-map per task of the weights found (rows: seeds,
  columns: the modules; blank where a seed did not draw the module).
- ``traces-<method>.png``: per LoraHub method, the best objective so far against evaluations, one line
  per seed, a panel per task.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files import atomic_folder, atomic_write
from .results import PLOTS_DIR, REPORT_MD, RESULTS_CSV, Results, load_results, shows_best

if TYPE_CHECKING:  # matplotlib takes ~0.4 s to import: only when a plot is drawn
    from matplotlib.figure import Figure


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
    from matplotlib.figure import Figure

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
    from matplotlib.figure import Figure

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


def report(run_dir: str | os.PathLike, *, plots: bool = True) -> Path:
    """Write report.md, results.csv and (with ``plots``) plots/*.png into ``run_dir``; returns report.md's path."""
    run_dir = Path(run_dir)
    results, info = load_results(run_dir)
    plot_files: list[str] = []
    if plots:  # the folder is swapped in whole: no plot of an earlier report survives beside new ones
        with atomic_folder(run_dir / PLOTS_DIR, owns=("*.png",)) as tmp:
            plot_files = write_plots(results, tmp)
    text = report_markdown(results, info, plot_files)
    atomic_write(run_dir / RESULTS_CSV, lambda t: Path(t).write_text(results.to_csv(), encoding="utf-8"))
    atomic_write(run_dir / REPORT_MD, lambda t: Path(t).write_text(text, encoding="utf-8"))
    return run_dir / REPORT_MD


def report_markdown(results: Results, info: dict[str, Any], plot_files: list[str]) -> str:
    statuses = [r["status"] for r in results.rows]
    lines = [
        "# Experiment report",
        "",
        f"- base model: `{info.get('base')}`",
        f"- module pool: {info.get('pool_size', 0)} modules",
        f"- tasks: {len(results.tasks)}; methods: {', '.join(results.methods)}; seeds: {info.get('seeds')}",
        f"- cells: {len(statuses)} ({statuses.count('done')} done, {statuses.count('skipped')} skipped, "
        f"{statuses.count('failed')} failed)",
        "",
        "## Exact match (%)",
        "",
        "Mean over seeds (gradient baselines: of the mean over runs); LoraHub: average and best seed."
        + (" † some cells of this task and method failed." if "failed" in statuses else ""),
        "",
        results.markdown(),
    ]
    if plot_files:
        lines += ["## Plots", ""] + [f"![{Path(f).stem}]({PLOTS_DIR}/{f})" for f in plot_files] + [""]
    lines += ["## Settings", "", "```json", json.dumps(info.get("settings", {}), indent=2, sort_keys=True), "```", ""]
    for method in results.methods:  # what LoraHub reports it ran with (one cell's; only the seed differs)
        ran = next((r for r in results.rows if r["method"] == method and r["status"] == "done" and r["details"]), None)
        if ran and "lorahub_settings" in ran["details"]:
            search = {k: v for k, v in ran["details"]["lorahub_settings"].items() if k != "seed"}
            lines += [f"{method} search, as run:", "", "```json", json.dumps(search, sort_keys=True), "```", ""]
    lines += [
        f"Every cell, with its settings hash, predictions file, LoraHub weights and modules: {RESULTS_CSV} "
        "and results.sqlite.",
        "",
    ]
    return "\n".join(lines)


__all__ = ["report", "report_markdown", "write_plots"]
