"""The markdown report: header facts, then one table per kind of figure (latency and throughput,
the server's own figures, the in-process limit, overload, stages, serving overhead)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from bench.rows import GRPC_STREAM, REJECTIONS, ResultRow
from bench.stats import summarize
from bench.targets import check_targets

if TYPE_CHECKING:
    from bench.report import BenchReport, Overhead

TITLE = "## visionserve benchmark: in-process pipeline vs served HTTP and gRPC"
DASH = "–"


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
            f"{GRPC_STREAM} rows: req/s is frames/s of one PredictStream call, frames sent back to back; "
            "a frame's latency runs from its write to its answer, so it includes waiting behind the "
            "frames ahead of it."
        )
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
    limit = _limit_table(report)
    if limit:
        lines += ["", *limit]
    overload = _overload_table(report)
    if overload:
        lines += ["", *overload]
    stages = _stages_table(rows)
    if stages:
        lines += ["", "In-process stages, p50 ms (batch 1, one image after another):", "", *stages]
    targets = _targets_table(report)
    if targets:
        lines += ["", *targets]
    overheads = report.overheads()
    if overheads:
        lines += [
            "",
            "What serving adds at concurrency 1 (served p50 − in-process p50 of the same runtime):",
            "",
            *_overhead_table(overheads),
        ]
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


def ms(value: float | None) -> str:
    """A latency cell: two decimals, or a dash."""
    return DASH if value is None else f"{value:.2f}"


def results_table(report: BenchReport) -> list[str]:
    """Every row: latency percentiles, throughput, and where known its ratio to the in-process
    limit and the server's batch and queue figures."""
    lines = [
        "| runtime | mode | measured | batching | conc. | ok | failed | p50 ms | p95 ms | p99 ms | max ms "
        "| req/s | × limit | mean batch | queue p50 ms | queue p99 ms |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
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
        target = row.target if row.overload_queue_size is None else f"{row.target}, overload"
        cells = [row.runtime, row.mode, target, row.batching or DASH, str(row.concurrency)]
        cells += [str(m.completed), str(m.failed), *latency, f"{m.throughput_rps:.1f}"]
        cells += [
            DASH if ratio is None else f"{ratio:.2f}",
            DASH if mean_batch is None else f"{mean_batch:.2f}",
        ]
        cells += [ms(q) for q in queue]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def row_name(row: ResultRow) -> str:
    """A row in words: runtime, mode, target, batching, concurrency."""
    parts = [row.runtime, row.mode, row.target]
    if row.batching is not None:
        parts.append(f"batching {row.batching}")
    if row.overload_queue_size is not None:
        parts.append(f"overload (queue {row.overload_queue_size})")
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


def _limit_table(report: BenchReport) -> list[str]:
    if not report.layouts:
        return []
    limits = report.limits()
    lines = [
        "In-process limit: decode + preprocess + predict_batch, no network; W preprocessing threads "
        "feed one inference thread (T intra-op threads) that takes what is queued, up to the max "
        "batch size:",
        "",
        "| runtime | layout (W x T) | images | img/s | mean batch | max batch |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for row in report.layouts:
        m = row.measurement
        mark = " (best)" if limits.get(row.runtime) is row else ""
        cells = [
            row.runtime,
            f"{row.layout.label}: {row.layout.describe()}{mark}",
            str(m.images),
            f"{m.images_per_s:.1f}",
            DASH if m.mean_batch is None else f"{m.mean_batch:.2f}",
            str(row.max_batch_size),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for runtime, best in limits.items():
        lines.append(
            f"- in-process limit, {runtime}: {best.measurement.images_per_s:.1f} img/s "
            f"({best.layout.describe()})"
        )
    return lines


def _overload_table(report: BenchReport) -> list[str]:
    rows = report.overload_rows()
    if not rows:
        return []
    lines = [
        "Overload: more senders than the queue holds; refusals (HTTP 503 / gRPC UNAVAILABLE) must be "
        "immediate and every request answered (sent = accepted + rejected):",
        "",
        "| runtime | mode | batching | conc. | max queue | sent | accepted | rejected | server queue_full "
        "| lost | accepted p50 ms | accepted p99 ms | rejection p50 ms | rejection p99 ms |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        m = row.measurement
        accepted = m.summary()
        refused = m.failures_summary(REJECTIONS)
        cells = [
            row.runtime,
            row.mode,
            row.batching or DASH,
            str(row.concurrency),
            str(row.overload_queue_size),
            str(m.sent),
            str(m.completed),
            str(row.rejected),
            DASH if row.server is None else str(row.server.rejected.get("queue_full", 0)),
            str(row.lost),
            ms(accepted.p50_ms if accepted else None),
            ms(accepted.p99_ms if accepted else None),
            ms(refused.p50_ms if refused else None),
            ms(refused.p99_ms if refused else None),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if report.nothing_lost():
        lines.append("- nothing lost: every request sent was accepted or refused.")
    else:
        lost = sum(row.lost for row in rows)
        lines.append(
            f"- FAILED: {lost} requests were neither accepted nor refused (see the failures by "
            "status above): timeouts, transport errors or other statuses."
        )
    return lines


def _targets_table(report: BenchReport) -> list[str]:
    checks = check_targets(report)
    if not checks:
        return []
    lines = [
        "Against the issue's targets (ONNX Runtime; only those this run measured):",
        "",
        "| target | rows | measured | goal | |",
        "|---|---|---|---|---|",
    ]
    for check in checks:
        verdict = "met" if check.met else "**missed**"
        lines.append(f"| {check.target} | {check.row} | {check.measured} | {check.goal} | {verdict} |")
    return lines


def _stages_table(rows: list[ResultRow]) -> list[str]:
    staged = [row for row in rows if row.stages_s and row.measurement.latencies_s]
    if not staged:
        return []
    names = list(staged[0].stages_s)
    lines = [
        "| runtime | " + " | ".join(names) + " | total |",
        "|---|" + "--:|" * (len(names) + 1),
    ]
    for row in staged:
        cells = [
            ms(summarize(row.stages_s[name]).p50_ms) if row.stages_s.get(name) else DASH for name in names
        ]
        total = summarize(row.measurement.latencies_s).p50_ms
        lines.append(f"| {row.runtime} | " + " | ".join(cells) + f" | {ms(total)} |")
    return lines


def _overhead_table(overheads: list[Overhead]) -> list[str]:
    lines = [
        "| runtime | served | served p50 ms | in-process p50 ms | difference ms | goal |",
        "|---|---|--:|--:|--:|---|",
    ]
    for o in overheads:
        goal = DASH if o.target_ms is None else f"≤ {o.target_ms:g} ms: {'met' if o.met else 'missed'}"
        cells = [o.runtime, o.target, ms(o.served_p50_ms), ms(o.in_process_p50_ms)]
        lines.append("| " + " | ".join([*cells, f"{o.difference_ms:+.2f}", goal]) + " |")
    return lines
