"""The asyncio side of serving: requests wait, join the engine's batch at the next token boundary, and get
their tokens back as each step makes them.

``pick`` chooses who joins (room in the batch, ``max_loras``); ``Scheduler`` runs ``Engine.step`` in one worker
thread so the event loop stays free to accept requests and stream tokens while a step computes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from .engine import Engine, Request

RATE_WINDOW = 10.0  # seconds over which the tokens/s gauge averages


def pick(waiting: list[Request], running: Sequence[Request], room: int, max_loras: int | None):
    """(the waiting requests that join now, the ones that keep waiting), in order of arrival.

    At most ``room`` join. With ``max_loras``, a request whose adapter is not yet in the batch joins only while
    the batch holds fewer distinct adapters than that (the base model takes no slot, as in vLLM); the requests
    after one held back may still join."""
    active = {id(r.adapter) for r in running if r.adapter is not None and not (r.finished or r.cancelled)}  # leaving
    new, held = [], []
    for r in waiting:
        lora_ok = r.adapter is None or id(r.adapter) in active or max_loras is None or len(active) < max_loras
        if len(new) < room and lora_ok:
            new.append(r)
            if r.adapter is not None:
                active.add(id(r.adapter))
        else:
            held.append(r)
    return new, held


class Scheduler:
    """Runs the engine's steps from an asyncio loop; requests join at the next token boundary.

    The model runs in one worker thread, so the event loop stays free to accept requests and stream
    tokens while a step computes. ``submit`` queues a request; its queue then receives the request after
    every step that changed it (several requests may share one queue: ``follow``); ``cancel`` (a client that
    went away) frees its row at the next step.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.waiting: list[Request] = []
        self._wake = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraloom-model")
        self._task: asyncio.Task | None = None
        self.steps = 0  # token boundaries so far
        self.cancelled = 0  # requests abandoned before they finished (clients that went away)
        self.finished: Counter[str] = Counter()  # rows ended so far, by finish reason
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens made) of the steps in the last RATE_WINDOW

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._worker.shutdown(wait=True)

    def submit(self, request: Request, queue: asyncio.Queue | None = None) -> Request:
        request.queue = queue if queue is not None else asyncio.Queue()
        self.waiting.append(request)
        self._wake.set()
        return request

    def cancel(self, request: Request) -> None:
        if not request.finished and not request.cancelled:
            request.cancelled = True
            self.cancelled += 1
            self._wake.set()

    def tokens_per_second(self) -> float:
        """Tokens made per second over the last RATE_WINDOW seconds."""
        horizon = time.monotonic() - RATE_WINDOW
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / RATE_WINDOW

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.waiting = [r for r in self.waiting if not r.cancelled]
            if not self.waiting and not self.engine.rows:
                self._wake.clear()
                await self._wake.wait()
                continue
            engine = self.engine
            # Finished rows leave at the start of the step: their room goes to waiting requests now, not after
            # the whole batch drains.
            new, self.waiting = pick(self.waiting, engine.rows, engine.max_batch - engine.occupied(), engine.max_loras)
            made = engine.generated_tokens
            try:
                changed = await loop.run_in_executor(self._worker, engine.step, new)
            except Exception as e:  # a failed step must not stop the server: its requests get the error
                changed = await loop.run_in_executor(
                    self._worker, engine.fail_all, f"generation failed: {type(e).__name__}: {e}", new
                )
            self.steps += 1
            self._recent.append((time.monotonic(), engine.generated_tokens - made))
            for r in changed:
                if r.finished and not r.counted:
                    r.counted = True
                    self.finished[r.finish_reason] += 1
                r.queue.put_nowait(r)

    async def follow(self, requests: Sequence[Request]) -> AsyncIterator[Request]:
        """Yield each of ``requests`` (submitted with one shared queue) after every step that changed it, until
        all have finished; the unfinished ones are cancelled when the caller stops early (a client gone)."""
        queue = requests[0].queue
        try:
            # Until all have finished and every wake-up is read: rows that finish in one step each get theirs.
            while not (all(r.finished for r in requests) and queue.empty()):
                yield await queue.get()
        finally:
            for r in requests:
                self.cancel(r)

    async def stream(self, request: Request):
        """Yield text pieces of ``request`` as they are made; ends when it finishes (cancels if abandoned)."""
        async for _ in self.follow([request]):
            text = request.take_text()
            if text:
                yield text
        text = request.take_text()
        if text:
            yield text

    async def complete(self, request: Request) -> Request:
        await self.complete_all([request])
        return request

    async def complete_all(self, requests: Sequence[Request]) -> None:
        async for _ in self.follow(requests):
            pass


__all__ = ["RATE_WINDOW", "Scheduler", "pick"]
