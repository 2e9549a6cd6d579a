"""The server's own figures for one row: its Prometheus metrics scraped before and after, subtracted.

Every served process exposes `GET /metrics` (the gRPC process on a port of its own). Counters and
histograms only grow, so the difference between a scrape just before a row and one just after is
what that row caused: how many batches of which size, how long requests queued, how long
`predict_batch` took, what was rejected and why. Rows run one at a time, so nothing else adds to
the counts in between (the scrapes themselves are HTTP requests on another endpoint).

Queue-time and compute-time percentiles are estimated from the histogram buckets by linear
interpolation within the bucket, as Prometheus' `histogram_quantile` does: their resolution is
the buckets' (`visionserve.metrics.LATENCY_BUCKETS`), and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import httpx2
from prometheus_client.parser import text_string_to_metric_families

from bench.access import KEY_HINT, OPEN, Access

BATCH_SIZE = "visionserve_batch_size"
QUEUE_TIME = "visionserve_queue_time_seconds"
COMPUTE_TIME = "visionserve_compute_time_seconds"
REJECTED = "visionserve_rejected"
"""Family names as the parser gives them (a counter's family drops the `_total` suffix)."""
REQUESTS = "visionserve_requests"


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram summed over its label sets: upper bounds (ascending, ending with
    +Inf), the cumulative count at each, the total count and the sum of observed values."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]
    count: float
    total: float

    @classmethod
    def empty(cls, bounds: Iterable[float]) -> Histogram:
        """No observations, with these bucket bounds."""
        upper = tuple(bounds)
        return cls(bounds=upper, cumulative=tuple(0.0 for _ in upper), count=0.0, total=0.0)

    def minus(self, earlier: Histogram) -> Histogram:
        """What was observed since `earlier` (a scrape of the same histogram)."""
        if not earlier.bounds:  # NOTE: a labelled histogram has no buckets before its first value
            return self
        if earlier.bounds != self.bounds:
            raise ValueError("the histogram's buckets changed between scrapes (did the server restart?)")
        return Histogram(
            bounds=self.bounds,
            cumulative=tuple(a - b for a, b in zip(self.cumulative, earlier.cumulative, strict=True)),
            count=self.count - earlier.count,
            total=self.total - earlier.total,
        )

    def plus(self, other: Histogram) -> Histogram:
        """Both histograms' observations (e.g. two rounds of one row)."""
        if not self.bounds:
            return other
        if not other.bounds:
            return self
        if other.bounds != self.bounds:
            raise ValueError("cannot add histograms with different buckets")
        return Histogram(
            bounds=self.bounds,
            cumulative=tuple(a + b for a, b in zip(self.cumulative, other.cumulative, strict=True)),
            count=self.count + other.count,
            total=self.total + other.total,
        )

    @property
    def mean(self) -> float | None:
        """The mean observed value, or None without observations."""
        return self.total / self.count if self.count > 0 else None

    def per_bucket(self) -> dict[str, int]:
        """Observations in each bucket that has any, keyed by its range: `1`, `5-6`, `>128`.
        Meant for integer-valued histograms (batch sizes); ranges are inclusive."""
        return {label: count for label, _, count in self.buckets()}

    def buckets(self) -> list[tuple[str, float, int]]:
        """(range, upper bound, observations) of each bucket that has any, ascending; the range as
        in `per_bucket`, the bound `math.inf` for the last bucket."""
        found: list[tuple[str, float, int]] = []
        previous = 0.0
        below = 0.0
        for bound, cumulative in zip(self.bounds, self.cumulative, strict=True):
            count = round(cumulative - below)
            if count:
                if math.isinf(bound):
                    key = f">{previous:g}"
                else:
                    low = math.floor(previous) + 1
                    key = f"{bound:g}" if low >= bound else f"{low}-{bound:g}"
                found.append((key, bound, count))
            previous, below = bound, cumulative
        return found

    def quantile(self, q: float) -> float | None:
        """The `q` quantile (0-1) estimated from the buckets, as Prometheus' `histogram_quantile`:
        linear within the bucket it falls in, from 0 for the first; the highest finite bound when it
        falls in the +Inf bucket. None without observations."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile must be between 0 and 1, got {q}")
        if self.count <= 0 or not self.bounds:
            return None
        rank = q * self.cumulative[-1]
        lower_bound = 0.0
        lower_count = 0.0
        for bound, cumulative in zip(self.bounds, self.cumulative, strict=True):
            if cumulative >= rank and cumulative > lower_count:
                if math.isinf(bound):
                    return lower_bound
                fraction = (rank - lower_count) / (cumulative - lower_count)
                return lower_bound + (bound - lower_bound) * fraction
            lower_bound, lower_count = bound, cumulative
        return lower_bound


@dataclass(frozen=True)
class MetricsSnapshot:
    """One scrape: every histogram and counter of interest, summed over label sets where the
    labels do not matter here."""

    histograms: Mapping[str, Histogram] = field(default_factory=dict)
    rejected: Mapping[str, float] = field(default_factory=dict)
    """Rejected requests by reason (`queue_full`, `deadline`, `cancelled`)."""
    requests: Mapping[str, float] = field(default_factory=dict)
    """Answered requests keyed `<protocol> <endpoint> <status>`."""
    gauges: Mapping[str, float] = field(default_factory=dict)
    """Gauges without labels, by sample name (`process_resident_memory_bytes`, `process_threads`,
    `visionserve_event_loop_tasks`, ...): the process's figures when scraped."""


def parse_metrics(text: str, model: str | None = None) -> MetricsSnapshot:
    """A Prometheus text exposition -> the figures the benchmark reports; with `model`, only the
    samples labelled with that model (and those with no model label)."""
    histograms: dict[str, Histogram] = {}
    rejected: dict[str, float] = {}
    requests: dict[str, float] = {}
    gauges: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        samples = [
            sample
            for sample in family.samples
            if model is None or sample.labels.get("model", model) in (model, "")
        ]
        if family.type == "gauge":
            gauges.update((sample.name, sample.value) for sample in samples if not sample.labels)
        elif family.type == "histogram":
            buckets: dict[float, float] = {}
            count = total = 0.0
            for sample in samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
                elif sample.name.endswith("_sum"):
                    total += sample.value
            bounds = tuple(sorted(buckets))
            histograms[family.name] = Histogram(
                bounds=bounds, cumulative=tuple(buckets[b] for b in bounds), count=count, total=total
            )
        elif family.name == REJECTED:
            for sample in samples:
                if sample.name.endswith("_total"):
                    reason = sample.labels.get("reason", "")
                    rejected[reason] = rejected.get(reason, 0.0) + sample.value
        elif family.name == REQUESTS:
            for sample in samples:
                if sample.name.endswith("_total"):
                    parts = (sample.labels.get(name, "") for name in ("protocol", "endpoint", "status"))
                    key = " ".join(parts)
                    requests[key] = requests.get(key, 0.0) + sample.value
    return MetricsSnapshot(histograms=histograms, rejected=rejected, requests=requests, gauges=gauges)


def scrape(
    url: str, *, timeout_s: float = 10.0, access: Access = OPEN, model: str | None = None
) -> MetricsSnapshot:
    """GET `url` (a `/metrics` endpoint) with `access`'s key and CAs, and parse it (`model`: only
    that model's samples); proxies from the environment are ignored. A 401 raises ValueError
    saying how to give the key."""
    with httpx2.Client(timeout=timeout_s, trust_env=False, verify=access.ssl_context()) as client:
        response = client.get(url, headers=access.headers())
    if response.status_code == 401:
        sent = "the key given is not valid" if access.api_key else KEY_HINT
        raise ValueError(f"GET {url} answered HTTP 401: the deployment needs an API key; {sent}")
    if response.status_code != 200:
        raise ValueError(f"GET {url} answered HTTP {response.status_code}; is it a visionserve process?")
    return parse_metrics(response.text, model)


def _counter_difference(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, int]:
    found = {key: round(value - before.get(key, 0.0)) for key, value in after.items()}
    return {key: value for key, value in sorted(found.items()) if value}


@dataclass(frozen=True)
class ServerFigures:
    """What the server saw during one row (the difference of two scrapes; rounds added up)."""

    batch_size: Histogram
    queue_time_s: Histogram
    compute_time_s: Histogram
    rejected: Mapping[str, int] = field(default_factory=dict)
    """Requests dropped before they were computed, by reason."""
    requests: Mapping[str, int] = field(default_factory=dict)
    """Answered requests keyed `<protocol> <endpoint> <status>` (the scrapes excluded)."""

    @classmethod
    def between(cls, before: MetricsSnapshot, after: MetricsSnapshot) -> ServerFigures:
        """The figures of what happened between two scrapes of one server."""

        def histogram(name: str) -> Histogram:
            late = after.histograms.get(name)
            if late is None:
                return Histogram.empty(())
            early = before.histograms.get(name) or Histogram.empty(late.bounds)
            return late.minus(early)

        requests = {
            key: value
            for key, value in _counter_difference(after.requests, before.requests).items()
            if " /metrics " not in key
        }
        return cls(
            batch_size=histogram(BATCH_SIZE),
            queue_time_s=histogram(QUEUE_TIME),
            compute_time_s=histogram(COMPUTE_TIME),
            rejected=_counter_difference(after.rejected, before.rejected),
            requests=requests,
        )

    def plus(self, other: ServerFigures) -> ServerFigures:
        """Both periods' figures (rounds of one row)."""

        def added(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
            return {key: a.get(key, 0) + b.get(key, 0) for key in sorted({*a, *b})}

        return ServerFigures(
            batch_size=self.batch_size.plus(other.batch_size),
            queue_time_s=self.queue_time_s.plus(other.queue_time_s),
            compute_time_s=self.compute_time_s.plus(other.compute_time_s),
            rejected=added(self.rejected, other.rejected),
            requests=added(self.requests, other.requests),
        )

    @property
    def batches(self) -> int:
        """`predict_batch` calls."""
        return round(self.batch_size.count)

    @property
    def mean_batch(self) -> float | None:
        """Images per `predict_batch` call, on average."""
        return self.batch_size.mean

    def queue_ms(self, q: float) -> float | None:
        """Queue time's `q` quantile (0-1) in ms, a bucket estimate."""
        value = self.queue_time_s.quantile(q)
        return None if value is None else value * 1e3

    def compute_ms(self, q: float) -> float | None:
        """`predict_batch` time's `q` quantile (0-1) in ms, a bucket estimate."""
        value = self.compute_time_s.quantile(q)
        return None if value is None else value * 1e3

    def to_dict(self) -> dict[str, object]:
        """Plain data for JSON (times in ms; percentiles are bucket estimates)."""

        def rounded(value: float | None, digits: int = 3) -> float | None:
            return None if value is None else round(value, digits)

        compute_mean = self.compute_time_s.mean
        return {
            "batches": self.batches,
            "mean_batch": rounded(self.mean_batch),
            "batch_size_counts": self.batch_size.per_bucket(),
            "queued_requests": round(self.queue_time_s.count),
            "queue_time_ms_p50_estimate": rounded(self.queue_ms(0.5)),
            "queue_time_ms_p99_estimate": rounded(self.queue_ms(0.99)),
            "compute_time_ms_mean": rounded(None if compute_mean is None else compute_mean * 1e3),
            "compute_time_ms_p50_estimate": rounded(self.compute_ms(0.5)),
            "compute_time_ms_p99_estimate": rounded(self.compute_ms(0.99)),
            "compute_time_s_total": rounded(self.compute_time_s.total, 4),
            "rejected": dict(self.rejected),
            "requests": dict(self.requests),
        }
