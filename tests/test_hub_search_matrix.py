"""Every optimizer x module count x population: a result or a clear error before any evaluation, never a hang.

Each cell runs ``ll.lorahub`` in a forked child process (the tiny model and modules are built once, in
the parent) and must end within a timeout: the child's exit waits for every non-daemon thread, as the
interpreter does, so a recast optimizer thread left waiting (the original hang) fails the cell. The
full matrix is ``slow`` (run it with ``-m slow``); a few cells that cover each way a search can end run
by default.
"""

from __future__ import annotations

import multiprocessing
import threading
import traceback
import warnings

import pytest
from hub_modules import EXAMPLES, make_modules, tokenizer
from tiny_models import tiny_t5

import loraloom as ll
from loraloom.hub.recast import recast_threads
from loraloom.hub.search import LoraHubWarning

OPTIMIZERS = ["NGOpt", "CMA", "TwoPointsDE", "DE", "PSO", "OnePlusOne", "Cobyla", "Powell", "MetaModel", "RandomSearch"]
MODULE_COUNTS = [1, 2, 4, 20]
POPULATIONS = [1, 4]
BUDGET = 16  # past MetaModel's warm-up on 1 and 2 modules, where nevergrad 1.0.12 + numpy 2 raise in it
TIMEOUT = 120  # seconds per cell: a finished search takes about one
# One cell per way a search ends: complete sequential (NGOpt>Cobyla, a recast thread), complete parallel
# (CMA, 20 modules), a sequential-only optimizer asked for 4 a pass (Powell), and an optimizer error cut
# short (MetaModel on 2 modules).
FAST = [("NGOpt", 4, 1), ("CMA", 20, 4), ("Powell", 2, 4), ("MetaModel", 2, 4)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import nevergrad  # noqa: F401  (imported once here, not in every child)

    tokenizer()
    model = tiny_t5()
    return model, make_modules(model, tmp_path_factory.mktemp("matrix"), max(MODULE_COUNTS))


def is_tqdm_monitor(thread: threading.Thread) -> bool:
    """tqdm's one daemon thread per process, started with the first bar and kept for later ones."""
    return type(thread).__name__ == "TMonitor"


def run_cell(model, modules, optimizer, population, connection) -> None:
    """In the child: one search; sends what happened, then exits (joining any thread left)."""
    before = set(threading.enumerate())
    report = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = ll.lorahub(
                model,
                modules,
                EXAMPLES,
                tokenizer=tokenizer(),
                mode="nevergrad",
                budget=BUDGET,
                optimizer=optimizer,
                population=population,
            )
        report.update(
            outcome="complete" if result.complete else "cut short",
            evaluations=len(result.trace),
            best_is_min=result.objective == min(e.objective for e in result.trace),
            weights=len(result.weights),
            method=result.settings["method"],
            stopped=result.stopped,
            notes=[str(w.message) for w in caught if issubclass(w.category, LoraHubWarning)],
        )
    except Exception as e:  # a failure before any evaluation: its message must be clear
        report.update(outcome="error", error=f"{type(e).__name__}: {e}", where=traceback.format_exc(limit=-1))
    report["threads_left"] = [t.name for t in threading.enumerate() if t not in before and not is_tqdm_monitor(t)]
    report["recast_left"] = len(recast_threads())
    connection.send(report)
    connection.close()


def cell(world, optimizer, n_modules, population) -> dict:
    model, modules = world
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=run_cell, args=(model, modules[:n_modules], optimizer, population, sender))
    child.start()
    sender.close()
    try:
        report = receiver.recv() if receiver.poll(TIMEOUT) else {"outcome": "hung in the search", "hung": True}
    except EOFError:
        report = {"outcome": f"died (exit code {child.exitcode})", "hung": False, "died": True}
    child.join(10)
    if child.is_alive():  # the search ended, but the process cannot exit: a thread is left waiting
        child.kill()
        child.join()
        report.update(outcome=report["outcome"] + ", then hung at exit", hung=True)
    return report


def check(report: dict, optimizer: str, n_modules: int, population: int) -> None:
    assert not report.get("hung") and not report.get("died"), report
    assert report["threads_left"] == [] and report["recast_left"] == 0, report
    if report["outcome"] == "error":  # allowed only before any evaluation, with loraloom's own message
        assert report["error"].startswith(("OptimizerError: ", "ValueError: ")), report
        return
    assert report["evaluations"] >= 1 and report["best_is_min"] and report["weights"] == n_modules, report
    if report["outcome"] == "complete":
        assert report["evaluations"] == BUDGET and report["stopped"] == "", report
    else:  # cut short: a one-line reason naming the optimizer and the error
        assert f"after {report['evaluations']} of {BUDGET} evaluations" in report["stopped"], report
        assert "failed (" in report["stopped"] and "\n" not in report["stopped"], report
    sequential = optimizer in ("Cobyla", "Powell")
    if sequential and population > 1:
        assert any("one candidate at a time" in note for note in report["notes"]), report


@pytest.mark.parametrize(("optimizer", "n_modules", "population"), FAST)
def test_cell(world, optimizer, n_modules, population):
    report = cell(world, optimizer, n_modules, population)
    check(report, optimizer, n_modules, population)
    if (optimizer, n_modules) == ("MetaModel", 2):  # the failure: contained, not raised
        assert report["outcome"] in ("cut short", "complete"), report


@pytest.mark.slow
def test_full_matrix(world, capsys):
    """Prints one line per cell (run with -s to see the table); fails on any bad cell."""
    bad = []
    for optimizer in OPTIMIZERS:
        for n_modules in MODULE_COUNTS:
            for population in POPULATIONS:
                report = cell(world, optimizer, n_modules, population)
                with capsys.disabled():
                    detail = report.get("stopped") or report.get("error") or ""
                    print(
                        f"{optimizer:12} n={n_modules:<2} P={population}  {report['outcome']:9} "
                        f"{report.get('evaluations', 0):>2} evals  {report.get('method', '')}  {detail}"
                    )
                try:
                    check(report, optimizer, n_modules, population)
                except AssertionError as e:
                    bad.append(f"{optimizer} n={n_modules} P={population}: {e}")
    assert not bad, "\n".join(bad)


def test_a_configured_optimizer_is_named_by_its_class_not_its_repr():
    """NGOpt with a large budget picks a ConfPortfolio, whose name is its whole repr (a page long): the method
    recorded in weights.json and printed by ``compose`` names the class."""
    import numpy as np

    from loraloom.hub.search import _describe, import_nevergrad

    import_nevergrad("NGOpt")
    import nevergrad as ng

    parametrization = ng.p.Array(init=np.zeros(4)).set_bounds(-1.5, 1.5)
    optimizer = ng.optimizers.registry["NGOpt"](parametrization=parametrization, budget=30000, num_workers=1)
    optimizer.tell(optimizer.ask(), 1.0)
    assert "(" in str(optimizer.optim.name)  # the repr the method used to carry
    assert _describe(optimizer) == "NGOpt>ConfPortfolio"
