"""`bench.csv`: one line per result row, the columns a notebook plots or filters on."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from visionserve.bench.report import BenchReport

COLUMNS = (
    "scenario",
    "protocol",
    "endpoint",
    "backend",
    "batching",
    "concurrency",
    "max_queue_size",
    "ok",
    "errors",
    "rejected",
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
            "scenario": row.scenario,
            "protocol": row.mode,
            "endpoint": row.target,
            "backend": row.runtime,
            "batching": row.batching,
            "concurrency": row.concurrency,
            "max_queue_size": row.overload_queue_size,
            "ok": m.completed,
            "errors": m.failed,
            "rejected": row.rejected,
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
