"""Measurement helpers shared by the benchmarks: isolated runs, peak memory, timing, interleaved rounds.

- ``run_isolated(fn, *args)`` runs ``fn`` in a fresh Python process and returns its result and that
  process's peak RSS, so one peer's memory peak never hides inside another's.
- ``peak_rss_mb()`` is the calling process's peak RSS so far (call it inside ``fn`` to split the peak
  into phases, e.g. "model built" and "after training").
- ``time_calls(fn, steps, warmup)`` times each call after a warm-up; take ``median`` of the result.
- ``interleave(peers, rounds)`` runs every peer once per round, rotating the order, so drift in a
  shared machine's load spreads over all peers instead of landing on one.

``run_isolated`` uses the "spawn" start method: ``fn`` must be a module-level function, and a script
that calls it must keep its top-level work under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux this is ``VmHWM`` of /proc/self/status: the high-water mark of this process's own memory.
    ``getrusage``'s ``ru_maxrss`` is not: a spawned worker is forked from the parent before it execs, and the
    kernel carries the forked copy's high-water mark (the parent's whole RSS) over the exec, so every peer
    measured below the parent's RSS read as the parent's RSS.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: ru_maxrss is bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kib) / 2**10


def _call_and_measure(fn: Callable[..., T], args: tuple, kwargs: dict) -> tuple[T, float]:
    result = fn(*args, **kwargs)
    return result, peak_rss_mb()


def run_isolated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``(fn(*args, **kwargs), peak RSS in MiB)``, run in a fresh spawned process (peak includes its imports)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_call_and_measure, fn, args, kwargs).result()


def time_calls(fn: Callable[[], Any], steps: int, warmup: int = 3) -> list[float]:
    """Seconds taken by each of ``steps`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleave(peers: dict[str, Callable[[], T]], rounds: int, desc: str = "rounds") -> dict[str, list[T]]:
    """Run each peer once per round (order rotated every round); results listed per peer, in round order."""
    names = list(peers)
    results: dict[str, list[T]] = {name: [] for name in names}
    with tqdm(total=rounds * len(names), desc=desc) as bar:
        for i in range(rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                bar.set_postfix_str(name)
                results[name].append(peers[name]())
                bar.update()
    return results


__all__ = ["interleave", "median", "peak_rss_mb", "run_isolated", "time_calls"]
