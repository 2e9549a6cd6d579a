"""Prometheus metrics of one serving process (text format at GET /metrics).

Each `Metrics` has its own registry, so that several apps in one process (tests) do not share
counters; the names are what dashboards and the benchmark read. Besides the request figures, the
registry holds the process's own (sampled when scraped): prometheus-client's standard `process_*`
(resident and virtual memory, open and max file descriptors, CPU seconds, start time; Linux only),
`process_threads` (OS threads, every native pool included) and `visionserve_event_loop_tasks`
(asyncio tasks on the serving event loop), which the soak test watches for growth.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PROC_STATUS = Path("/proc/self/status")

# NOTE: dense around 5-20 ms, where one image's compute time lies on CPU, so that percentiles
# estimated from the buckets (the benchmark does) are not off by a whole 10 ms bucket.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.0125,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """Request, queue and batch figures; thread-safe (prometheus-client locks internally)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "visionserve_requests",
            "Requests answered, by protocol, endpoint, status and model (empty: none named, e.g. "
            "health checks).",
            ["protocol", "endpoint", "status", "model"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "visionserve_request_latency_seconds",
            "Server time per request, by protocol, endpoint and model.",
            ["protocol", "endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "visionserve_queue_time_seconds",
            "Time a preprocessed request waited in the batcher's queue before its batch started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "visionserve_batch_size",
            "Images per predict_batch call.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.compute_time = Histogram(
            "visionserve_compute_time_seconds",
            "Time of one predict_batch call.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "visionserve_queue_depth",
            "Requests waiting in the batcher's queue.",
            ["model"],
            registry=self.registry,
        )
        self.budget_wait = Histogram(
            "visionserve_budget_wait_seconds",
            "Time a batch that found the cores taken waited for the compute budget (another model's "
            "batches, or this model's other instances, computing).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "visionserve_rejected",
            "Requests dropped before they were computed: queue_full, deadline, cancelled (the client "
            "left: mid-body, while decoded or while queued).",
            ["reason", "model"],
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "visionserve_connections_closed",
            "HTTP connections the server closed on a slow or surplus client: header_timeout, "
            "body_timeout (answered 408 when no answer had begun), connection_limit (answered 503).",
            ["reason"],
            registry=self.registry,
        )
        # NOTE: the process figures, standard names (process_resident_memory_bytes,
        # process_open_fds, ...); prometheus-client registers them only on its default registry.
        ProcessCollector(registry=self.registry)
        if os_threads() is not None:
            threads = Gauge(
                "process_threads",
                "OS threads of this process (/proc/self/status), the runtime's and the "
                "gRPC core's native threads included.",
                registry=self.registry,
            )
            threads.set_function(lambda: float(os_threads() or 0))
        self.event_loop = EventLoopCollector()
        self.registry.register(self.event_loop)

    def watch_event_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Report the asyncio tasks of `loop` (the serving loop) in `visionserve_event_loop_tasks`."""
        self.event_loop.loop = loop

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def os_threads() -> int | None:
    """The OS threads of this process, from /proc/self/status; None where there is no /proc."""
    try:
        text = PROC_STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return None


class EventLoopCollector(Collector):
    """`visionserve_event_loop_tasks`: the tasks not done on the watched event loop, counted on
    the loop's own thread when scraped.

    A scrape on the loop (the HTTP app's /metrics) counts at once; a scrape from another thread
    (the gRPC process's metrics server) asks the loop to count (`call_soon_threadsafe`) and
    waits up to `timeout_s`: `asyncio.all_tasks` is not safe from a thread other than the
    loop's. If the loop does not answer in time (it is blocked), the last count is reported.
    Nothing is reported before a loop is watched, or once it is closed.
    """

    def __init__(self, timeout_s: float = 1.0):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timeout_s = timeout_s
        self._last: int | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        count = self.count()
        if count is not None:
            yield GaugeMetricFamily(
                "visionserve_event_loop_tasks",
                "asyncio tasks not yet done on the serving event loop (requests in flight, "
                "connections, background tasks), counted on the loop's thread when scraped.",
                value=count,
            )

    def count(self) -> int | None:
        """The loop's tasks now (or the last count, if the loop is busy); None without a loop."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._last = len(asyncio.all_tasks(loop))
            return self._last
        counted = threading.Event()

        def count_on_loop() -> None:
            self._last = len(asyncio.all_tasks(loop))
            counted.set()

        try:
            loop.call_soon_threadsafe(count_on_loop)
        except RuntimeError:  # closed in the meantime
            return None
        counted.wait(self.timeout_s)
        return self._last
