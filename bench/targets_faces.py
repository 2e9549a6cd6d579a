"""Issue 14's targets for a face_expression pipeline, checked against a run's rows (ONNX Runtime,
where the rows exist):

- concurrency 16, HTTP JSON and gRPC unary: req/s at least 0.85 of the pipeline's in-process
  limit (the registry's pipeline driven by N concurrent coroutines, no protocol; the best N);
- the classifier stage (crop + classify) per face with 8 faces in one image at most half its cost
  with one face (batching across faces works), measured through the registry (`face_stage`).

Like `targets`, figures to quote, never assertions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.faces_report import pairs, ratio
from bench.grpc_load import UNARY
from bench.rows import GRPC, HTTP
from bench.subjects import PIPELINE_TASK
from bench.targets import JSON_TARGET, LEVEL, RUNTIME, TargetCheck, find_row, ratio_check

if TYPE_CHECKING:
    from bench.report import BenchReport

SERVED_GOAL = 0.85
PER_FACE_GOAL = 0.5


def check_face_targets(report: BenchReport) -> list[TargetCheck]:
    """Each pipeline's served throughput against its limit, then its classifier stage per face."""
    checks: list[TargetCheck] = []
    for model in report.models_of(PIPELINE_TASK):
        batchings = sorted(
            {row.batching for row in report.rows if row.model == model and row.batching not in (None, "none")}  # type: ignore[misc]
        )
        for batching in batchings:
            label = f"{model}, batching {batching}"
            for mode, target, name in ((HTTP, JSON_TARGET, "HTTP JSON"), (GRPC, UNARY, "gRPC unary")):
                row = find_row(report, mode, target, LEVEL, batching, model=model)
                if row is not None:
                    checks += ratio_check(report, row, SERVED_GOAL, f"c={LEVEL} {name} throughput", label)
    for one, many in pairs(report):
        if one.runtime != RUNTIME:
            continue
        per_one, per_many = one.per_face(one.registry_ms), many.per_face(many.registry_ms)
        if per_one is None or per_many is None:
            continue
        name = f"classifier stage per face, {many.faces} faces vs {one.faces}"
        label = f"{one.model}, in-process (through the registry)"
        goal = f"≤ {PER_FACE_GOAL:g}×"
        fraction = ratio(per_many, per_one)
        if fraction is None:  # the one-face stage is lost in the noise of the pairs
            measured = f"not measurable: the one-face stage measured {per_one:.2f} ms (noise; more pairs)"
            checks.append(TargetCheck(name, label, measured, goal, False))
            continue
        checks.append(
            TargetCheck(
                name,
                label,
                f"{per_many:.2f} vs {per_one:.2f} ms per face = {fraction:.2f}×",
                goal,
                fraction <= PER_FACE_GOAL,
                margin=f"{PER_FACE_GOAL - fraction:+.3f}×",
            )
        )
    return checks
