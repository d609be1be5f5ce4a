"""The results of a sweep: one row per cell, a per task x method summary, Table-1-style markdown, and
``report(run_dir)``: report.md, results.csv and plots/ in the run folder.

Scores are exact match in percent. A method's score on a task is the mean over seeds of the mean over its
runs (gradient baselines run several times per seed); LoraHub methods also show the best seed, as in the
paper. The average row averages the tasks; a method skipped or failed on some task is marked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import LORAHUB_METHODS, MERGE_METHODS
from .store import COLUMNS, Store

REPORT_MD, RESULTS_CSV, PLOTS_DIR = "report.md", "results.csv", "plots"


def shows_best(method: str) -> bool:
    """LoraHub methods (and the merges searched like them) report the average and the best over seeds (the
    paper's Table 1)."""
    return method in LORAHUB_METHODS or method in MERGE_METHODS


@dataclass
class Results:
    """One dict per cell: task, method, seed, run, status, score, n_test, input_tokens, seconds, ..."""

    rows: list[dict[str, Any]]
    methods: list[str] = field(default_factory=list)  # column order; default: as the rows come
    run_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.methods:
            self.methods = list(dict.fromkeys(r["method"] for r in self.rows))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r["task"] for r in self.rows))

    def table(self) -> list[dict[str, Any]]:
        """Per task and method: mean / best / std over seeds (of the mean over runs), seeds counted,
        mean input tokens per example and seconds per cell, skipped and failed cells."""
        out = []
        for task in self.tasks:
            for method in self.methods:
                cells = [r for r in self.rows if r["task"] == task and r["method"] == method]
                if cells:
                    out.append({"task": task, "method": method, **summarise(cells)})
        return out

    def per_method(self) -> list[dict[str, Any]]:
        """Per method over every task: input tokens per example and seconds per cell (the cost columns)."""
        out = []
        for method in self.methods:
            cells = [r for r in self.rows if r["method"] == method]
            ran = [r for r in cells if r["status"] in ("done", "skipped") and r["seconds"] is not None]
            tokens = [r["input_tokens"] for r in cells if r["status"] == "done" and r["input_tokens"] is not None]
            out.append(
                {
                    "method": method,
                    "cells": len(cells),
                    "done": sum(r["status"] == "done" for r in cells),
                    "input_tokens": statistics.fmean(tokens) if tokens else None,
                    "seconds": statistics.fmean(r["seconds"] for r in ran) if ran else None,
                    "total_seconds": sum(r["seconds"] for r in ran),
                }
            )
        return out

    def markdown(self) -> str:
        """The Table-1-style table (exact match %, tasks x methods, an average row) and the cost per method."""
        table = {(r["task"], r["method"]): r for r in self.table()}
        header, columns = ["Task"], []
        for method in self.methods:
            columns.append((method, "mean"))
            header.append(f"{method} avg" if shows_best(method) else method)
            if shows_best(method):
                columns.append((method, "best"))
                header.append(f"{method} best")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        notes: list[str] = []
        for task in self.tasks:
            cells = [_cell_text(table.get((task, m)), stat) for m, stat in columns]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        averages = []
        for method, stat in columns:
            values = [table[(t, method)][stat] for t in self.tasks if (t, method) in table]
            present = [v for v in values if v is not None]
            text = f"{100 * statistics.fmean(present):.1f}" if present else "n/a"
            if present and len(present) < len(self.tasks):
                text += "*"
                note = f"\\* {method}: average over the {len(present)} of {len(self.tasks)} tasks it scored on."
                if note not in notes:
                    notes.append(note)
            averages.append(text)
        lines.append("| **Average** | " + " | ".join(averages) + " |")

        lines += [
            "",
            "| Method | input tokens / example | seconds / cell | cells done | total seconds |",
            "|---|---|---|---|---|",
        ]
        for m in self.per_method():
            tokens = f"{m['input_tokens']:.1f}" if m["input_tokens"] is not None else "n/a"
            seconds = f"{m['seconds']:.2f}" if m["seconds"] is not None else "n/a"
            lines.append(
                f"| {m['method']} | {tokens} | {seconds} | {m['done']}/{m['cells']} | {m['total_seconds']:.1f} |"
            )

        for r in self.table():
            if r["skipped"]:
                notes.append(f"{r['task']} / {r['method']}: skipped {r['skipped']} cell(s): {r['reason']}")
            if r["failed"]:
                notes.append(f"{r['task']} / {r['method']}: {r['failed']} failed cell(s): {r['error']}")
            if r["noted"]:
                notes.append(f"{r['task']} / {r['method']}: {r['noted']} cell(s) noted: {r['note']}")
        if notes:
            lines += [""] + [f"- {n}" if not n.startswith("\\*") else n for n in notes]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """Every cell as one CSV row (JSON columns as JSON text)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items() if k in COLUMNS}
            )
        return buf.getvalue()


def summarise(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Scores over seeds for one task and method (each seed: the mean over its finished runs)."""
    by_seed: dict[int, list[float]] = {}
    for r in cells:
        if r["status"] == "done" and r["score"] is not None:
            by_seed.setdefault(r["seed"], []).append(r["score"])
    per_seed = [statistics.fmean(v) for _, v in sorted(by_seed.items())]
    skipped = [r for r in cells if r["status"] == "skipped"]
    failed = [r for r in cells if r["status"] == "failed"]
    done = [r for r in cells if r["status"] == "done"]
    return {
        "mean": statistics.fmean(per_seed) if per_seed else None,
        "best": max(per_seed) if per_seed else None,
        "std": statistics.pstdev(per_seed) if per_seed else None,
        "seeds": len(per_seed),
        "runs": len(done),
        "input_tokens": statistics.fmean(r["input_tokens"] for r in done) if done else None,
        "seconds": statistics.fmean(r["seconds"] for r in done) if done else None,
        "skipped": len(skipped),
        "reason": skipped[0]["error"] if skipped else None,
        "failed": len(failed),
        "noted": sum(bool(r["error"]) for r in done),  # done, with a note (a LoraHub search cut short)
        "note": next((r["error"] for r in done if r["error"]), None),
        "error": (failed[0]["error"] or "").splitlines()[0] if failed else None,
    }


def _cell_text(summary: dict[str, Any] | None, stat: str) -> str:
    if summary is None:
        return ""
    if summary[stat] is None:
        return "skipped" if summary["skipped"] else "failed"
    return f"{100 * summary[stat]:.1f}" + ("†" if summary["failed"] else "")


def load_results(run_dir: str | os.PathLike) -> tuple[Results, dict[str, Any]]:
    """The results of the latest experiment call in ``run_dir`` and what it was run with."""
    with Store(run_dir, create=False) as store:
        keys, info = store.latest()
        rows = store.rows(keys)
    return Results(rows, methods=info.get("methods", []), run_dir=Path(run_dir)), info


__all__ = ["Results", "load_results", "shows_best", "summarise"]
