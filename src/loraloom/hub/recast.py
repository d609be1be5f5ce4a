"""End the threads of nevergrad's recast optimizers when a search ends, whatever ended it.

nevergrad runs optimizers written for a callback API (scipy's Cobyla, Powell, SQP, ...: NGOpt picks
Cobyla for a sequential search, portfolios hold several, MetaModel minimises its surrogate with Powell)
in a non-daemon thread (``recaster._MessagingThread``) that, after each candidate, waits on a queue for
that candidate's loss. A search that stops before the library is done leaves the thread waiting for
ever, and the interpreter waits for it at exit: the process never ends.

nevergrad's own way to end such a thread is the message ``None`` on that queue (``MessagingThread.stop``,
which the optimizer's ``__del__`` also sends): the thread then raises inside the library and returns.
``stop_recast_threads`` sends it to every recast optimizer the search can reach (the optimizer tree,
and the frames of the exception that ended the search: MetaModel's inner Powell lives only there) and
waits for those threads to end; if other recast threads started during the search are still alive
(a member a portfolio dropped, held only by a reference cycle), it collects garbage once so that their
``__del__`` stops them. Threads it cannot reach even so (another search's, running at the same time
in this process) are left alone.
"""

from __future__ import annotations

import gc
import threading
import time
import traceback
from collections.abc import Iterable
from typing import Any

JOIN_SECONDS = 5.0  # a stopped thread returns within milliseconds
UNREACHED_SECONDS = 0.5  # for threads we could not reach: maybe another search's, left running


def recast_threads() -> set[threading.Thread]:
    """nevergrad's recast-optimizer threads alive now."""
    from nevergrad.optimization.recaster import _MessagingThread

    return {t for t in threading.enumerate() if isinstance(t, _MessagingThread)}


def stop_recast_threads(
    optimizer: Any, error: BaseException | None = None, started_before: Iterable[threading.Thread] = ()
) -> list[threading.Thread]:
    """Stop the recast threads of ``optimizer`` (and of the optimizers in ``error``'s traceback) and wait
    for them to end; then, if recast threads started since ``started_before`` are still alive, collect
    garbage and wait for those a moment. Returns the threads still alive: none, unless another search
    runs in this process at the same time (its threads are left alone)."""
    from nevergrad.optimization.base import Optimizer
    from nevergrad.optimization.recaster import RecastOptimizer

    roots = [optimizer]
    if error is not None:
        for frame, _ in traceback.walk_tb(error.__traceback__):
            roots.extend(v for v in frame.f_locals.values() if isinstance(v, Optimizer))
    ours = []
    for opt in _optimizer_tree(roots, Optimizer):
        messaging = getattr(opt, "_messaging_thread", None) if isinstance(opt, RecastOptimizer) else None
        if messaging is not None:
            messaging.stop()
            ours.append(messaging._thread)
    del roots
    if error is not None:
        traceback.clear_frames(error.__traceback__)  # drop the optimizers the frames still hold
    left = _join(ours, JOIN_SECONDS)
    before = set(started_before) | set(ours)
    unreached = [t for t in recast_threads() if t not in before]
    if unreached:  # held by no one but a reference cycle (a portfolio's dropped member)
        gc.collect()
        left += _join(unreached, UNREACHED_SECONDS)
    return left


def _optimizer_tree(roots: list[Any], optimizer_type: type) -> list[Any]:
    """The optimizers in ``roots`` and every optimizer they hold (NGOpt's choice, a portfolio's members,
    a chain's stages, ...), found through their attributes, lists, tuples and dicts."""
    seen: set[int] = set()
    found, stack = [], list(roots)
    while stack:
        opt = stack.pop()
        if id(opt) in seen:
            continue
        seen.add(id(opt))
        found.append(opt)
        for value in vars(opt).values():
            if isinstance(value, dict):
                value = list(value.values())
            items = value if isinstance(value, (list, tuple)) else [value]
            stack.extend(v for v in items if isinstance(v, optimizer_type))
    return found


def _join(threads: list[threading.Thread], seconds: float) -> list[threading.Thread]:
    deadline = time.monotonic() + seconds
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    return [t for t in threads if t.is_alive()]


__all__ = ["recast_threads", "stop_recast_threads"]
