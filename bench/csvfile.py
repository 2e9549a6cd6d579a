"""`bench.csv`: one line per result row, the columns a notebook plots or filters on; and, for
notebooks, the same rows' per-request latencies and server batch sizes as records."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

from bench.stats import MS_PER_S

if TYPE_CHECKING:
    from bench.report import BenchReport
    from bench.rows import ResultRow

COLUMNS = (
    "scenario",
    "protocol",
    "endpoint",
    "backend",
    "model",
    "batching",
    "concurrency",
    "max_queue_size",
    "ok",
    "errors",
    "rejected",
    "skipped",
    "errors_by_status",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "req_per_s",
    "ratio_to_in_process_limit",
    "mean_batch",
    "queue_p50_ms_estimate",
    "queue_p99_ms_estimate",
)
"""The header, in order. Empty cells mean "not applicable" (e.g. no /metrics in-process)."""

KEY_COLUMNS = COLUMNS[:8]
"""The columns that say which row a record belongs to (scenario ... max_queue_size); every kind of
record starts with them, so that records of one report can be joined on them."""


DIGITS = {
    "p50_ms": 3,
    "p95_ms": 3,
    "p99_ms": 3,
    "max_ms": 3,
    "req_per_s": 2,
    "ratio_to_in_process_limit": 4,
    "mean_batch": 3,
    "queue_p50_ms_estimate": 3,
    "queue_p99_ms_estimate": 3,
}
"""Decimals of each float column, in the CSV and in `records` alike."""

Record = dict[str, str | int | float | None]


def _rounded(column: str, value: float | None) -> float | None:
    return None if value is None else round(value, DIGITS[column])


def records(report: BenchReport) -> list[Record]:
    """The report's rows as plain records, in the report's order: the CSV's columns (`COLUMNS`)
    with numbers as numbers (rounded as in the CSV) and None where the CSV cell is empty, so that
    `pandas.DataFrame(records(report))` is the CSV without a file."""
    found: list[Record] = []
    for row in report.rows:
        m = row.measurement
        s = m.summary()
        server = row.server
        record: Record = {
            **_key(row),
            "ok": m.completed,
            "errors": m.failed,
            "rejected": row.rejected,
            "skipped": m.skipped,
            "errors_by_status": "; ".join(f"{kind}: {count}" for kind, count in sorted(m.errors.items())),
            "p50_ms": s.p50_ms if s else None,
            "p95_ms": s.p95_ms if s else None,
            "p99_ms": s.p99_ms if s else None,
            "max_ms": s.max_ms if s else None,
            "req_per_s": m.throughput_rps,
            "ratio_to_in_process_limit": report.limit_ratio(row),
            "mean_batch": server.mean_batch if server else None,
            "queue_p50_ms_estimate": server.queue_ms(0.5) if server else None,
            "queue_p99_ms_estimate": server.queue_ms(0.99) if server else None,
        }
        for column in DIGITS:
            value = record[column]
            record[column] = _rounded(column, None if value is None else float(value))
        found.append(record)
    return found


def _key(row: ResultRow) -> Record:
    """The row's `KEY_COLUMNS`, as in `records`."""
    return {
        "scenario": row.scenario,
        "protocol": row.mode,
        "endpoint": row.described_target,
        "backend": row.runtime,
        "model": row.model,
        "batching": row.batching,
        "concurrency": row.concurrency,
        "max_queue_size": row.overload_queue_size,
    }


def latency_records(report: BenchReport) -> list[Record]:
    """One record per measured request that succeeded, in the report's order: the row's
    `KEY_COLUMNS` and `latency_ms` (warm-up requests are never measured, failures never timed),
    for histograms: `pandas.DataFrame(latency_records(report))`."""
    found: list[Record] = []
    for row in report.rows:
        key = _key(row)
        found += [{**key, "latency_ms": value * MS_PER_S} for value in row.measurement.latencies_s]
    return found


def batch_size_records(report: BenchReport) -> list[Record]:
    """One record per served row and batch-size bucket its server's /metrics counted during the
    row: the row's `KEY_COLUMNS`, `batch_size` (the bucket, e.g. `1` or `5-6`), `batch_size_max`
    (its upper bound, to sort by; None above the last bound) and `batches` (`predict_batch`
    calls). Rows without server figures (in-process, no metrics endpoint) have no records."""
    found: list[Record] = []
    for row in report.rows:
        if row.server is None:
            continue
        key = _key(row)
        for label, bound, count in row.server.batch_size.buckets():
            upper = None if math.isinf(bound) else int(bound)
            found.append({**key, "batch_size": label, "batch_size_max": upper, "batches": count})
    return found


def _cell(column: str, value: str | int | float | None) -> str:
    if value is None:
        return ""
    if column in DIGITS:
        return f"{value:.{DIGITS[column]}f}"
    return str(value)


def csv_rows(report: BenchReport) -> list[dict[str, str]]:
    """The report's rows as CSV records (strings), in the report's order."""
    return [{column: _cell(column, record[column]) for column in COLUMNS} for record in records(report)]


def write_csv(report: BenchReport, path: Path) -> None:
    """Write `csv_rows(report)` with a header line to `path`."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(report))
