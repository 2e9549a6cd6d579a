"""The markdown report: header facts, then one table per kind of figure: latency and throughput
(here), the server's own figures (here), then the in-process limit, the streams, overload, the
stages, the targets and what serving adds (`summaries`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from bench import faces_report, summaries
from bench.rows import GRPC_STREAM, ResultRow

if TYPE_CHECKING:
    from bench.report import BenchReport

TITLE = "## visionserve benchmark: in-process pipeline vs served HTTP and gRPC"
DASH = summaries.DASH
ms = summaries.ms


def markdown(report: BenchReport) -> str:
    """The whole report as markdown."""
    rows = report.rows
    lines = [TITLE, ""]
    lines += _header_lines(report.machine, report.settings)
    if report.images:
        lines.append(f"- images sent (senders cycle through them): {', '.join(report.images)}")
    lines += [f"- {note}" for note in report.notes]
    lines += ["", *results_table(report)]
    notes = []
    if any(report.limit_ratio(row) is not None for row in rows):
        notes.append(
            "× limit: req/s as a fraction of the runtime's in-process limit (best thread layout, below)."
        )
    if any(row.server is not None for row in rows):
        notes.append(
            "mean batch and queue ms: the server's own figures from /metrics over the row; queue-time "
            "percentiles are estimates from the histogram buckets (1, 2.5, 5, 10, 20, 30, 50 ms, ...). "
            "A request that finds the server idle skips the queue and is not counted in queue time."
        )
    if any(row.mode == GRPC_STREAM for row in rows):
        notes.append(
            f"{GRPC_STREAM} rows: req/s is the frames computed per second of one call (ok: frames "
            "computed); back to back, a frame's latency runs from its write to its answer (waiting "
            "behind the frames ahead of it included); paced, from its capture to its answer."
        )
    if any(row.alone for row in rows):
        notes.append("served alone: the row's processes load that model only (the others: every model).")
    if notes:
        lines += ["", *notes]
    failures = _failure_lines(rows)
    if failures:
        lines += ["", "Failed requests by status (not in the latencies):", *failures]
    figures = _server_table(rows)
    if figures:
        lines += [
            "",
            "Server figures (GET /metrics before and after each row, subtracted; ms percentiles are "
            "bucket estimates):",
            "",
            *figures,
        ]
    for section in (
        summaries.limit_table(report),
        summaries.streams_table(report),
        faces_report.faces_table(report),
        faces_report.stage_table(report),
        summaries.overload_table(report),
        summaries.stages_table(rows),
        summaries.targets_table(report),
        summaries.overhead_table(report.overheads()),
    ):
        if section:
            lines += ["", *section]
    return "\n".join(lines) + "\n"


def _header_lines(machine: Mapping[str, str], settings: Mapping[str, object]) -> list[str]:
    lines = [f"- date: {machine.get('date', 'unknown')}"]
    cores = f"{machine.get('usable_cores', '?')} usable cores of {machine.get('logical_cpus', '?')}"
    lines.append(f"- machine: {machine.get('cpu', 'unknown CPU')}, {cores}, {machine.get('os', '')}".rstrip())
    if "gpu" in machine:
        lines.append(f"- GPU: {machine['gpu']}")
    skip = {"date", "cpu", "usable_cores", "logical_cpus", "os", "gpu"}
    versions = ", ".join(f"{name} {version}" for name, version in machine.items() if name not in skip)
    lines.append(f"- versions: {versions}")
    lines += [f"- {key.replace('_', ' ')}: {_setting(value)}" for key, value in settings.items()]
    return lines


def _setting(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


def results_table(report: BenchReport) -> list[str]:
    """Every row: latency percentiles, throughput, and where known its ratio to the in-process
    limit and the server's batch and queue figures."""
    lines = [
        "| runtime | model | mode | measured | batching | conc. | ok | failed | p50 ms | p95 ms | p99 ms "
        "| max ms | req/s | × limit | mean batch | queue p50 ms | queue p99 ms |",
        "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in report.rows:
        m = row.measurement
        s = m.summary()
        latency = [ms(s.p50_ms), ms(s.p95_ms), ms(s.p99_ms), ms(s.max_ms)] if s is not None else [DASH] * 4
        ratio = report.limit_ratio(row)
        mean_batch = row.server.mean_batch if row.server is not None else None
        queue = (
            [row.server.queue_ms(0.5), row.server.queue_ms(0.99)] if row.server is not None else [None, None]
        )
        target = row.described_target
        target += "" if row.overload_queue_size is None else ", overload"
        target += ", served alone" if row.alone else ""
        cells = [row.runtime, row.model or DASH, row.mode, target, row.batching or DASH, str(row.concurrency)]
        cells += [str(m.completed), str(m.failed), *latency, f"{m.throughput_rps:.1f}"]
        cells += [
            DASH if ratio is None else f"{ratio:.2f}",
            DASH if mean_batch is None else f"{mean_batch:.2f}",
        ]
        cells += [ms(q) for q in queue]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def row_name(row: ResultRow) -> str:
    """A row in words: runtime, model, mode, target, batching, concurrency."""
    parts = [row.runtime, *([row.model] if row.model else []), row.mode, row.described_target]
    if row.batching is not None:
        parts.append(f"batching {row.batching}")
    if row.overload_queue_size is not None:
        parts.append(f"overload (queue {row.overload_queue_size})")
    if row.alone:
        parts.append("served alone")
    parts.append(f"c={row.concurrency}")
    return " ".join(parts)


def _failure_lines(rows: list[ResultRow]) -> list[str]:
    lines = []
    for row in rows:
        if row.measurement.errors:
            kinds = ", ".join(f"{kind} ×{count}" for kind, count in sorted(row.measurement.errors.items()))
            lines.append(f"- {row_name(row)}: {kinds}")
    return lines


def _server_table(rows: list[ResultRow]) -> list[str]:
    scraped = [row for row in rows if row.server is not None and row.model_work]  # floors: no batches
    if not scraped:
        return []
    lines = [
        "| row | batches | mean batch | batch sizes (count) | queued | queue p50 ms | queue p99 ms "
        "| compute mean ms | compute p99 ms | rejected |",
        "|---|--:|--:|---|--:|--:|--:|--:|--:|---|",
    ]
    for row in scraped:
        f = row.server
        assert f is not None
        sizes = ", ".join(f"{size}: {count}" for size, count in f.batch_size.per_bucket().items()) or DASH
        compute_mean = f.compute_time_s.mean
        rejected = ", ".join(f"{reason} ×{count}" for reason, count in f.rejected.items()) or "0"
        cells = [
            row_name(row),
            str(f.batches),
            DASH if f.mean_batch is None else f"{f.mean_batch:.2f}",
            sizes,
            str(round(f.queue_time_s.count)),
            ms(f.queue_ms(0.5)),
            ms(f.queue_ms(0.99)),
            ms(None if compute_mean is None else compute_mean * 1e3),
            ms(f.compute_ms(0.99)),
            rejected,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
