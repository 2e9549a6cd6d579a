"""Issue 10's targets, checked against a run's rows (ONNX Runtime, where the rows exist):

- each detector, concurrency 16, HTTP JSON and gRPC unary: req/s at least 0.9 of its in-process
  limit (decode + letterbox + predict_batch + NMS, best thread layout);
- each detector, one stream: frames/s at least 0.9 of its in-process limit, in order (frames back
  to back) and live (frames computed per second, against the limit or the camera's rate,
  whichever is lower: a live stream cannot compute more frames than the camera makes);
- serving several models: the first classifier's req/s at concurrency 16 with every model loaded
  (the others idle) at least 0.95 of its req/s served alone, HTTP JSON and gRPC unary.

Like `targets`, figures to quote, never assertions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.grpc_load import LIVE, STREAM, UNARY
from bench.rows import GRPC, GRPC_STREAM, HTTP, ResultRow
from bench.targets import JSON_TARGET, LEVEL, RUNTIME, TargetCheck, find_row, ratio_check

if TYPE_CHECKING:
    from bench.report import BenchReport

SERVED_GOAL = 0.9
STREAM_GOAL = 0.9
COSERVING_GOAL = 0.95


def check_model_targets(report: BenchReport) -> list[TargetCheck]:
    """The detectors' targets, then the cost of serving the models together."""
    checks: list[TargetCheck] = []
    for model in report.models_of("detection"):
        checks += _detector(report, model)
    classifier = report.classifier()
    if classifier is not None:
        checks += _coserving(report, classifier)
    return checks


def _batchings(report: BenchReport, model: str) -> list[str]:
    return sorted(
        {row.batching for row in report.rows if row.model == model and row.batching not in (None, "none")}  # type: ignore[misc]
    )


def _detector(report: BenchReport, model: str) -> list[TargetCheck]:
    checks: list[TargetCheck] = []
    for batching in _batchings(report, model):
        label = f"{model}, batching {batching}"
        for mode, target, name in ((HTTP, JSON_TARGET, "HTTP JSON"), (GRPC, UNARY, "gRPC unary")):
            row = find_row(report, mode, target, LEVEL, batching, model=model)
            if row is not None:
                checks += ratio_check(report, row, SERVED_GOAL, f"c={LEVEL} {name} throughput", label)
        stream = _stream_row(report, model, batching, STREAM)
        if stream is not None:
            checks += ratio_check(report, stream, STREAM_GOAL, "stream frames/s (in order)", label)
        live = _stream_row(report, model, batching, LIVE)
        if live is not None:
            checks += _live(report, live, label)
    return checks


def _stream_row(report: BenchReport, model: str, batching: str, kind: str) -> ResultRow | None:
    """The stream row of `kind`: `STREAM` (back to back) or `LIVE` (whatever its rate)."""
    for row in report.rows:
        target = row.target if kind == STREAM else row.target.split(" (", maxsplit=1)[0]
        if (
            row.runtime == RUNTIME
            and row.mode == GRPC_STREAM
            and row.model == model
            and row.batching == batching
            and target == (kind if kind == STREAM else kind.split(" (", maxsplit=1)[0])
        ):
            return row
    return None


def _live(report: BenchReport, row: ResultRow, label: str) -> list[TargetCheck]:
    limit = report.limits().get((row.runtime, row.model))
    if limit is None:
        return []
    rate = limit.measurement.images_per_s
    camera = report.stream_fps
    bound = min(rate, camera) if camera else rate
    computed = row.measurement.throughput_rps
    if bound <= 0:
        return []
    measured = (
        f"{computed:.1f} frames/s computed = {computed / bound:.2f} × min(limit {rate:.1f}, "
        f"camera {camera or 0:g})"
    )
    return [
        TargetCheck(
            "stream frames/s (live)",
            label,
            measured,
            f"≥ {STREAM_GOAL:g} × min(limit, camera)",
            computed >= STREAM_GOAL * bound,
        )
    ]


def _coserving(report: BenchReport, model: str) -> list[TargetCheck]:
    checks: list[TargetCheck] = []
    for batching in _batchings(report, model):
        for mode, target, name in ((HTTP, JSON_TARGET, "HTTP JSON"), (GRPC, UNARY, "gRPC unary")):
            together = find_row(report, mode, target, LEVEL, batching, model=model)
            alone = find_row(report, mode, target, LEVEL, batching, model=model, alone=True)
            if together is None or alone is None:
                continue
            ours, theirs = together.measurement.throughput_rps, alone.measurement.throughput_rps
            if theirs <= 0:
                continue
            others = len(report.models()) - 1
            checks.append(
                TargetCheck(
                    f"c={LEVEL} {name}: {model} with {others} more model(s) loaded vs alone",
                    f"{model}, batching {batching}",
                    f"{ours:.1f} vs {theirs:.1f} req/s ({ours / theirs:.2f}×)",
                    f"≥ {COSERVING_GOAL:g}× (costs ≤ 5 %)",
                    ours >= COSERVING_GOAL * theirs,
                )
            )
    return checks
