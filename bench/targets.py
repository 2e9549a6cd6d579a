"""The issues' targets, checked against a run's rows (ONNX Runtime, where the rows exist).

The classifier's (issue 4, on the run's first classifier):

- concurrency 16, HTTP JSON: req/s at least 0.9 of the in-process limit, p99 ≤ 200 ms, no errors;
- concurrency 16, gRPC unary: req/s at least 0.95 of the in-process limit;
- concurrency 16, HTTP JSON vs the seed 004 baseline (`--baseline`): at least 1.1 times its req/s, lower p99;
- concurrency 1, HTTP JSON: p50 no worse than the baseline's;
- concurrency 1: batching on adds ≤ 0.5 ms to p50 compared with batching off;
- overload: rejections p99 < 5 ms, accepted p99 ≤ 200 ms, nothing lost.

The detectors' and of serving several models (issue 10): `targets_models`; the face_expression
pipeline's (issue 14): `targets_faces`.

A target whose rows the run did not measure is left out: the report lists what was checked. These
are the figures to quote, not assertions: timed tests do not assert them (a shared machine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.grpc_load import UNARY
from bench.http_load import json_request
from bench.rows import BASELINE, DEPLOYED, GRPC, GRPC_STREAM, HTTP, REJECTIONS, ResultRow

if TYPE_CHECKING:
    from bench.report import BenchReport

RUNTIME = "onnx"
LEVEL = 16
JSON_TARGET = json_request(b"").name


@dataclass(frozen=True)
class TargetCheck:
    """One target for one row (or pair of rows): what was measured, the goal, and whether it is met."""

    target: str
    row: str
    measured: str
    goal: str
    met: bool
    margin: str = ""
    """How far inside the goal (positive) or outside it (negative), in the goal's unit; empty
    where a target says only met or missed."""


def find_row(
    report: BenchReport,
    mode: str,
    target: str,
    level: int,
    batching: str | None,
    *,
    model: str | None = None,
    alone: bool = False,
) -> ResultRow | None:
    """The ONNX row of `mode`, `target`, `level` (and `batching`, `model` where given), served
    with every model loaded (or `alone`), not overload; None if the run has none."""
    for row in report.rows:
        if (
            row.runtime == RUNTIME
            and row.mode == mode
            and row.target == target
            and row.concurrency == level
            and row.overload_queue_size is None
            and row.alone == alone
            and not row.image
            and (batching is None or row.batching == batching)
            and (model is None or row.model == model)
        ):
            return row
    return None


def check_targets(report: BenchReport) -> list[TargetCheck]:
    """Every target this run's rows can answer: the classifier's, then the detectors' and the
    models' (`targets_models`)."""
    from bench.targets_faces import check_face_targets
    from bench.targets_models import check_model_targets

    return _classifier_targets(report) + check_model_targets(report) + check_face_targets(report)


def _classifier_targets(report: BenchReport) -> list[TargetCheck]:
    model = report.classifier()
    if model is None:
        return []

    def _find(
        report: BenchReport, mode: str, target: str, level: int, batching: str | None
    ) -> ResultRow | None:
        return find_row(report, mode, target, level, batching, model=model)

    checks: list[TargetCheck] = []
    modes = sorted({row.batching for row in report.rows if row.batching in ("on", "off", DEPLOYED)})
    baseline_16 = _find(report, BASELINE, report_baseline_target(report), LEVEL, None)
    baseline_1 = _find(report, BASELINE, report_baseline_target(report), 1, None)
    for mode in modes:
        label = f"{model}, batching {mode}" if model else f"batching {mode}"
        json_16 = _find(report, HTTP, JSON_TARGET, LEVEL, mode)
        if json_16 is not None:
            checks += ratio_check(report, json_16, 0.9, f"c={LEVEL} HTTP JSON throughput", label)
            tail = p99(json_16)
            if tail is not None:
                checks.append(
                    TargetCheck(f"c={LEVEL} HTTP JSON p99", label, f"{tail:.1f} ms", "≤ 200 ms", tail <= 200)
                )
            failed = json_16.measurement.failed
            checks.append(TargetCheck(f"c={LEVEL} HTTP JSON errors", label, str(failed), "0", failed == 0))
            if baseline_16 is not None:
                ours, theirs = json_16.measurement.throughput_rps, baseline_16.measurement.throughput_rps
                if theirs > 0:
                    checks.append(
                        TargetCheck(
                            f"c={LEVEL} HTTP JSON vs baseline throughput",
                            label,
                            f"{ours:.1f} vs {theirs:.1f} req/s ({ours / theirs:.2f}×)",
                            "≥ 1.1×",
                            ours >= 1.1 * theirs,
                        )
                    )
                mine, base = p99(json_16), p99(baseline_16)
                if mine is not None and base is not None:
                    checks.append(
                        TargetCheck(
                            f"c={LEVEL} HTTP JSON vs baseline p99",
                            label,
                            f"{mine:.1f} vs {base:.1f} ms",
                            "lower",
                            mine < base,
                        )
                    )
        grpc_16 = _find(report, GRPC, UNARY, LEVEL, mode)
        if grpc_16 is not None:
            checks += ratio_check(report, grpc_16, 0.95, f"c={LEVEL} gRPC unary throughput", label)
        json_1 = _find(report, HTTP, JSON_TARGET, 1, mode)
        if json_1 is not None and baseline_1 is not None:
            mine, base = p50(json_1), p50(baseline_1)
            if mine is not None and base is not None:
                checks.append(
                    TargetCheck(
                        "c=1 HTTP JSON p50 vs baseline",
                        label,
                        f"{mine:.2f} vs {base:.2f} ms",
                        "no worse",
                        mine <= base,
                    )
                )
    for mode_name, target in ((HTTP, JSON_TARGET), (GRPC, UNARY)):
        on, off = _find(report, mode_name, target, 1, "on"), _find(report, mode_name, target, 1, "off")
        if on is not None and off is not None:
            p50_on, p50_off = p50(on), p50(off)
            if p50_on is not None and p50_off is not None:
                checks.append(
                    TargetCheck(
                        f"c=1 {mode_name} {target}: batching on − off, p50",
                        "on vs off",
                        f"{p50_on - p50_off:+.2f} ms",
                        "≤ +0.5 ms",
                        p50_on - p50_off <= 0.5,
                    )
                )
    for row in report.overload_rows():
        if row.runtime != RUNTIME or row.model != model:
            continue
        batching = f" batching {row.batching}" if row.batching else ""
        label = f"{model + ', ' if model else ''}{row.mode}{batching}, c={row.concurrency}"
        refused = row.measurement.failures_summary(REJECTIONS)
        if refused is not None:
            checks.append(
                TargetCheck(
                    "overload: rejection p99", label, f"{refused.p99_ms:.2f} ms", "< 5 ms", refused.p99_ms < 5
                )
            )
        accepted = p99(row)
        if accepted is not None:
            checks.append(
                TargetCheck(
                    "overload: accepted p99", label, f"{accepted:.1f} ms", "≤ 200 ms", accepted <= 200
                )
            )
        checks.append(TargetCheck("overload: nothing lost", label, f"{row.lost} lost", "0", row.lost == 0))
    return checks


def report_baseline_target(report: BenchReport) -> str:
    """The baseline rows' target name in this report (empty when there are none)."""
    return next((row.target for row in report.rows if row.mode == BASELINE), "")


def ratio_check(report: BenchReport, row: ResultRow, goal: float, name: str, label: str) -> list[TargetCheck]:
    """`row`'s req/s against `goal` x its in-process limit (none without a limit)."""
    ratio = report.limit_ratio(row)
    if ratio is None:
        return []
    rate = row.measurement.throughput_rps
    unit = "frames/s" if row.mode == GRPC_STREAM else "req/s"
    return [
        TargetCheck(
            name,
            label,
            f"{rate:.1f} {unit} = {ratio:.2f} × limit",
            f"≥ {goal:g} × limit",
            ratio >= goal,
            margin=f"{ratio - goal:+.3f} × limit",
        )
    ]


def p50(row: ResultRow) -> float | None:
    summary = row.measurement.summary()
    return None if summary is None else summary.p50_ms


def p99(row: ResultRow) -> float | None:
    summary = row.measurement.summary()
    return None if summary is None else summary.p99_ms
