"""The report's tables beyond the results: the in-process limit, the streams, overload, the
in-process stages, the targets and what serving adds at concurrency 1. Each returns its lines
(empty when the run has nothing for it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.rows import GRPC_STREAM, REJECTIONS, ResultRow
from bench.stats import summarize
from bench.targets import check_targets

if TYPE_CHECKING:
    from bench.report import BenchReport, Overhead

DASH = "–"

PIPELINE_LIMIT = (
    "a pipeline's (face_expression) in-process limit: the registry the servers build, started in "
    "the harness's process, its FaceExpressionModel.predict called by N concurrent coroutines in a "
    "closed loop on the same images (no HTTP, gRPC or their event loop), the c=N rows above; the "
    "best N. Its mean batch is the detector's."
)


def ms(value: float | None) -> str:
    """A latency cell: two decimals, or a dash."""
    return DASH if value is None else f"{value:.2f}"


def limit_table(report: BenchReport) -> list[str]:
    """Every layout of every model's in-process limit, and each model's best."""
    if not report.layouts:
        return []
    limits = report.limits()
    lines = [
        "In-process limit: decode + preprocess + predict_batch + postprocess, no network; W "
        "preprocessing threads (which also postprocess) feed one inference thread (T intra-op "
        "threads) that takes what is queued, up to the max batch size:",
        "",
        "| runtime | model | layout (W x T) | images | img/s | mean batch | max batch |",
        "|---|---|---|--:|--:|--:|--:|",
    ]
    for row in report.layouts:
        m = row.measurement
        mark = " (best)" if limits.get((row.runtime, row.model)) is row else ""
        cells = [
            row.runtime,
            row.model or DASH,
            f"{row.layout.label}: {row.layout.describe()}{mark}",
            str(m.images),
            f"{m.images_per_s:.1f}",
            DASH if m.mean_batch is None else f"{m.mean_batch:.2f}",
            str(row.max_batch_size),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if any(row.layout.concurrent for row in report.layouts):
        lines += [f"- {PIPELINE_LIMIT}"]
    for (runtime, model), best in limits.items():
        lines.append(
            f"- in-process limit, {runtime}{f', {model}' if model else ''}: "
            f"{best.measurement.images_per_s:.1f} img/s ({best.layout.describe()})"
        )
    return lines


def streams_table(report: BenchReport) -> list[str]:
    """One line per stream row: frames sent, computed, skipped; frames/s and its ratio to the
    in-process limit; per-frame latency."""
    rows = [row for row in report.rows if row.mode == GRPC_STREAM]
    if not rows:
        return []
    lines = [
        "Streams (one call per round; in order = PredictStream, live = PredictLive):",
        "",
        "| runtime | model | call | batching | frames sent | computed | skipped | failed | frames/s "
        "computed | × limit | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        m = row.measurement
        s = m.summary()
        ratio = report.limit_ratio(row)
        cells = [
            row.runtime,
            row.model or DASH,
            row.target,
            row.batching or DASH,
            str(m.sent),
            str(m.completed),
            str(m.skipped),
            str(m.failed),
            f"{m.throughput_rps:.1f}",
            DASH if ratio is None else f"{ratio:.2f}",
            *([ms(s.p50_ms), ms(s.p99_ms), ms(s.max_ms)] if s is not None else [DASH] * 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def overload_table(report: BenchReport) -> list[str]:
    rows = report.overload_rows()
    if not rows:
        return []
    lines = [
        "Overload: more senders than the queue holds; refusals (HTTP 503 / gRPC UNAVAILABLE) must be "
        "immediate and every request answered (sent = accepted + rejected):",
        "",
        "| runtime | model | mode | batching | conc. | max queue | sent | accepted | rejected | server "
        "queue_full | lost | accepted p50 ms | accepted p99 ms | rejection p50 ms | rejection p99 ms |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        m = row.measurement
        accepted = m.summary()
        refused = m.failures_summary(REJECTIONS)
        cells = [
            row.runtime,
            row.model or DASH,
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


def targets_table(report: BenchReport) -> list[str]:
    """Every target the run's rows answer, met or missed."""
    checks = check_targets(report)
    if not checks:
        return []
    lines = [
        "Against the issues' targets (ONNX Runtime; only those this run measured; margin: how far "
        "inside the goal (+) or outside it (−)):",
        "",
        "| target | rows | measured | goal | | margin |",
        "|---|---|---|---|---|---|",
    ]
    for check in checks:
        verdict = "met" if check.met else "**missed**"
        cells = [check.target, check.row, check.measured, check.goal, verdict, check.margin or DASH]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def stages_table(rows: list[ResultRow]) -> list[str]:
    """The in-process stages' p50 of every runtime and model."""
    staged = [row for row in rows if row.stages_s and row.measurement.latencies_s]
    if not staged:
        return []
    names = list(staged[0].stages_s)
    lines = [
        "In-process stages, p50 ms (batch 1, one image after another; preprocess = centre crop or "
        "letterbox, postprocess = top-k or NMS):",
        "",
        "| runtime | model | " + " | ".join(names) + " | total |",
        "|---|---|" + "--:|" * (len(names) + 1),
    ]
    for row in staged:
        cells = [
            ms(summarize(row.stages_s[name]).p50_ms) if row.stages_s.get(name) else DASH for name in names
        ]
        total = summarize(row.measurement.latencies_s).p50_ms
        lines.append(f"| {row.runtime} | {row.model or DASH} | " + " | ".join(cells) + f" | {ms(total)} |")
    return lines


def overhead_table(overheads: list[Overhead]) -> list[str]:
    """Served p50 minus in-process p50 at concurrency 1, per served row."""
    if not overheads:
        return []
    lines = [
        "What serving adds at concurrency 1 (served p50 − in-process p50 of the same runtime and model):",
        "",
        "| runtime | model | served | served p50 ms | in-process p50 ms | difference ms | goal |",
        "|---|---|---|--:|--:|--:|---|",
    ]
    for o in overheads:
        goal = DASH if o.target_ms is None else f"≤ {o.target_ms:g} ms: {'met' if o.met else 'missed'}"
        cells = [o.runtime, o.model or DASH, o.target, ms(o.served_p50_ms), ms(o.in_process_p50_ms)]
        lines.append("| " + " | ".join([*cells, f"{o.difference_ms:+.2f}", goal]) + " |")
    return lines
