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


def _number(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def csv_rows(report: BenchReport) -> list[dict[str, str]]:
    """The report's rows as CSV records (strings), in the report's order."""
    records = []
    for row in report.rows:
        m = row.measurement
        s = m.summary()
        server = row.server
        records.append(
            {
                "scenario": row.scenario,
                "protocol": row.mode,
                "endpoint": row.target,
                "backend": row.runtime,
                "batching": row.batching or "",
                "concurrency": str(row.concurrency),
                "max_queue_size": "" if row.overload_queue_size is None else str(row.overload_queue_size),
                "ok": str(m.completed),
                "errors": str(m.failed),
                "rejected": str(row.rejected),
                "errors_by_status": "; ".join(f"{kind}: {count}" for kind, count in sorted(m.errors.items())),
                "p50_ms": _number(s.p50_ms if s else None),
                "p95_ms": _number(s.p95_ms if s else None),
                "p99_ms": _number(s.p99_ms if s else None),
                "max_ms": _number(s.max_ms if s else None),
                "req_per_s": _number(m.throughput_rps, 2),
                "ratio_to_in_process_limit": _number(report.limit_ratio(row), 4),
                "mean_batch": _number(server.mean_batch if server else None),
                "queue_p50_ms_estimate": _number(server.queue_ms(0.5) if server else None),
                "queue_p99_ms_estimate": _number(server.queue_ms(0.99) if server else None),
            }
        )
    return records


def write_csv(report: BenchReport, path: Path) -> None:
    """Write `csv_rows(report)` with a header line to `path`."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(report))
