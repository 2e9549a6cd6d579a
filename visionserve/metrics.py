"""Prometheus metrics of one serving process (text format at GET /metrics).

Each `Metrics` has its own registry, so that several apps in one process (tests) do not share
counters; the names are what dashboards and the benchmark read.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

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
            "Requests answered, by protocol, endpoint and status.",
            ["protocol", "endpoint", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "visionserve_request_latency_seconds",
            "Server time per request, by protocol and endpoint.",
            ["protocol", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "visionserve_queue_time_seconds",
            "Time a preprocessed request waited in the batcher's queue before its batch started.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "visionserve_batch_size",
            "Images per predict_batch call.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.compute_time = Histogram(
            "visionserve_compute_time_seconds",
            "Time of one predict_batch call.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "visionserve_queue_depth", "Requests waiting in the batcher's queue.", registry=self.registry
        )
        self.rejected = Counter(
            "visionserve_rejected",
            "Requests dropped before they were computed: queue_full, deadline, cancelled.",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
