"""Latency statistics: percentiles and the summary every benchmark row reports, in milliseconds.

Samples are collected in seconds (`time.perf_counter` differences) and converted once, here; every
field that holds a latency says its unit in its name. Warm-up is never passed in: the measuring
modules run it as a separate phase and drop its samples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

MS_PER_S = 1e3


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) of ascending values, linearly interpolated between ranks.

    The same definition as numpy's default (`method="linear"`): rank (n - 1) * q / 100.
    """
    if not sorted_values:
        raise ValueError("the percentile of no values is undefined")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"a percentile must be between 0 and 100, got {q}")
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


@dataclass(frozen=True)
class LatencySummary:
    """Latencies of one measurement, in milliseconds."""

    count: int
    mean_ms: float
    stdev_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


def summarize(latencies_s: Sequence[float]) -> LatencySummary:
    """Summarise latencies given in seconds (at least one) as milliseconds."""
    if not latencies_s:
        raise ValueError("no latencies to summarise (every request failed?)")
    values = sorted(v * MS_PER_S for v in latencies_s)
    return LatencySummary(
        count=len(values),
        mean_ms=statistics.fmean(values),
        stdev_ms=statistics.stdev(values) if len(values) > 1 else 0.0,
        min_ms=values[0],
        p50_ms=percentile(values, 50),
        p90_ms=percentile(values, 90),
        p95_ms=percentile(values, 95),
        p99_ms=percentile(values, 99),
        max_ms=values[-1],
    )


@dataclass(frozen=True)
class Measurement:
    """One measured run (warm-up excluded): the successful requests' latencies, the failures by
    kind, and the wall time from the first request sent to the last one answered.

    Failed requests never contribute a latency; they are counted in `errors` only.
    """

    latencies_s: tuple[float, ...]
    wall_s: float
    errors: Mapping[str, int] = field(default_factory=dict)
    error_latencies_s: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    """Failures that were answered (e.g. `HTTP 503`): how long each answer took, by kind. An
    overload run holds rejections to their own latency target (they must be immediate)."""
    skipped: int = 0
    """Live-stream frames answered `skipped` (a newer frame was computed instead): neither a
    success nor a failure, and never timed."""

    @property
    def completed(self) -> int:
        """Requests answered successfully."""
        return len(self.latencies_s)

    @property
    def failed(self) -> int:
        """Requests that failed, whatever the kind."""
        return sum(self.errors.values())

    @property
    def sent(self) -> int:
        """Requests sent: completed + failed (+ skipped, for a live stream)."""
        return self.completed + self.failed + self.skipped

    @property
    def throughput_rps(self) -> float:
        """Completed requests per second of wall time."""
        return self.completed / self.wall_s if self.wall_s > 0 else 0.0

    @classmethod
    def merged(cls, parts: Sequence[Measurement]) -> Measurement:
        """Parts of one measurement taken at different times, as one: latencies in order,
        wall times and error counts added up."""
        errors: dict[str, int] = {}
        error_latencies: dict[str, tuple[float, ...]] = {}
        for part in parts:
            for kind, count in part.errors.items():
                errors[kind] = errors.get(kind, 0) + count
            for kind, values in part.error_latencies_s.items():
                error_latencies[kind] = error_latencies.get(kind, ()) + tuple(values)
        return cls(
            latencies_s=tuple(v for part in parts for v in part.latencies_s),
            wall_s=sum(part.wall_s for part in parts),
            errors=errors,
            error_latencies_s=error_latencies,
            skipped=sum(part.skipped for part in parts),
        )

    def summary(self) -> LatencySummary | None:
        """The latency summary in milliseconds, or None when no request succeeded."""
        return summarize(self.latencies_s) if self.latencies_s else None

    def failures_summary(self, kinds: Iterable[str]) -> LatencySummary | None:
        """The latency summary (ms) of the answered failures of `kinds`, or None if there were none."""
        values = [v for kind in kinds for v in self.error_latencies_s.get(kind, ())]
        return summarize(values) if values else None
