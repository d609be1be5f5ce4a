"""``GET /metrics``: the server's state in Prometheus' text format, read from the live objects when scraped.

Names follow vLLM's where one means the same (``num_requests_waiting``, ``num_requests_running``,
``generation_tokens_total``, ``request_success_total{finished_reason}``) under the ``loraloom:`` prefix.
A registry of its own per app, so that several apps in one process (tests, replicas) never collide.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .cache import AdapterCache
from .scheduler import RATE_WINDOW, Scheduler

PREFIX = "loraloom:"


class ServerMetrics:
    """A prometheus_client collector over the scheduler, its engine, the adapter cache and the HTTP statuses."""

    def __init__(self, scheduler: Scheduler, cache: AdapterCache, statuses: Counter[str]) -> None:
        self.scheduler, self.cache, self.statuses = scheduler, cache, statuses
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        scheduler, engine = self.scheduler, self.scheduler.engine
        yield _gauge("num_requests_waiting", "Requests waiting for a row of the batch.", len(scheduler.waiting))
        # A finished row leaves the batch at the next step: it is no longer running.
        running = sum(not r.finished for r in list(engine.rows))
        yield _gauge("num_requests_running", "Rows in the running batch.", running)
        yield CounterMetricFamily(PREFIX + "generation_tokens", "Tokens generated, all rows.",
                                  value=engine.generated_tokens)  # fmt: skip
        yield _gauge("generation_tokens_per_second", f"Tokens generated per second over the last {RATE_WINDOW:g} s.",
                     scheduler.tokens_per_second())  # fmt: skip
        yield _gauge("adapter_cache_entries", "Adapters loaded in the cache.", len(self.cache.cached()))
        yield _gauge(
            "adapter_cache_bytes", "Bytes of adapter (and composition bank) tensors cached.", self.cache.nbytes
        )
        finished = CounterMetricFamily(PREFIX + "request_success", "Rows ended, by finish reason.",
                                       labels=["finished_reason"])  # fmt: skip
        for reason, count in sorted(scheduler.finished.items()):
            finished.add_metric([reason], count)
        yield finished
        yield CounterMetricFamily(PREFIX + "engine_steps", "Token boundaries (engine steps) run so far.",
                                  value=scheduler.steps)  # fmt: skip
        yield CounterMetricFamily(PREFIX + "requests_cancelled", "Requests abandoned by their client.",
                                  value=scheduler.cancelled)  # fmt: skip
        http = CounterMetricFamily(PREFIX + "http_requests", "HTTP responses, by status code.", labels=["code"])
        for code, count in sorted(self.statuses.items()):
            http.add_metric([code], count)
        yield http

    def exposition(self) -> tuple[bytes, str]:
        """(the text format's body, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


__all__ = ["ServerMetrics"]
