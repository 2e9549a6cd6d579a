"""The report's face_expression sections: faces/s on the group image (in-process and served) and
the classifier stage per face with one face and with many (`face_stage`); their JSON too."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.face_stage import METHOD_DIRECT, METHOD_REGISTRY, StageCost
from bench.rows import ResultRow
from bench.summaries import DASH, PIPELINE_LIMIT, ms

if TYPE_CHECKING:
    from bench.report import BenchReport


def faces_in(report: BenchReport, runtime: str, model: str, image: str) -> int | None:
    """The faces the pipeline found in `image` (None: not measured)."""
    for cost in report.face_stages:
        if (cost.runtime, cost.model, cost.image) == (runtime, model, image):
            return cost.faces
    return None


def image_rows(report: BenchReport) -> list[ResultRow]:
    """The rows of one image whose faces are known (in-process, then served)."""
    return [
        row
        for row in report.rows
        if row.image and faces_in(report, row.runtime, row.model, row.image) is not None
    ]


def pairs(report: BenchReport) -> list[tuple[StageCost, StageCost]]:
    """(one face, many faces) of each runtime and pipeline: the stage costs to compare."""
    found = []
    keys = dict.fromkeys((cost.runtime, cost.model) for cost in report.face_stages)
    for runtime, model in keys:
        costs = sorted(
            (c for c in report.face_stages if (c.runtime, c.model) == (runtime, model) and c.faces > 0),
            key=lambda c: c.faces,
        )
        if len(costs) >= 2 and costs[0].faces < costs[-1].faces:
            found.append((costs[0], costs[-1]))
    return found


def ratio(many: float | None, one: float | None) -> float | None:
    """Per-face cost with many faces as a fraction of its one-face cost."""
    return None if many is None or one is None or one <= 0 else many / one


def faces_table(report: BenchReport) -> list[str]:
    """Faces/s of every row that sent the group image only."""
    rows = image_rows(report)
    if not rows:
        return []
    lines = [
        "Faces per second on one image of many faces (every request the same image; in-process = "
        "the registry's pipeline, no protocol):",
        "",
        "| runtime | model | mode | measured | batching | conc. | faces in image | img/s | faces/s "
        "| p50 ms | p99 ms | detector mean batch |",
        "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        faces = faces_in(report, row.runtime, row.model, row.image) or 0
        m = row.measurement
        s = m.summary()
        mean_batch = row.server.mean_batch if row.server is not None else None
        cells = [
            row.runtime,
            row.model,
            row.mode,
            row.described_target,
            row.batching or DASH,
            str(row.concurrency),
            str(faces),
            f"{m.throughput_rps:.1f}",
            f"{m.throughput_rps * faces:.1f}",
            *([ms(s.p50_ms), ms(s.p99_ms)] if s is not None else [DASH, DASH]),
            DASH if mean_batch is None else f"{mean_batch:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def stage_table(report: BenchReport) -> list[str]:
    """The classifier stage (crop + classify) per image, both methods, and per face."""
    if not report.face_stages:
        return []
    lines = [
        "Classifier stage of face_expression (crop + classify), in-process, per image and per face:",
        f"through the registry = {METHOD_REGISTRY}; direct = {METHOD_DIRECT}.",
        "",
        "| runtime | model | image | faces | pairs | pipeline p50 ms | detector alone p50 ms | stage ms "
        "(registry) | per face ms (registry) | stage ms (direct) | per face ms (direct) "
        "| classifier mean batch |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cost in report.face_stages:
        data = cost.to_dict()
        cells = [
            cost.runtime,
            cost.model,
            cost.image,
            str(cost.faces),
            str(data["pairs"]),
            *(
                ms(_number(data[key]))
                for key in (
                    "pipeline_p50_ms",
                    "detector_p50_ms",
                    "stage_ms_through_registry",
                    "per_face_ms_through_registry",
                    "stage_ms_direct",
                    "per_face_ms_direct",
                )
            ),
            DASH if cost.classifier_mean_batch is None else f"{cost.classifier_mean_batch:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for one, many in pairs(report):
        registry = ratio(many.per_face(many.registry_ms), one.per_face(one.registry_ms))
        direct = ratio(many.per_face(many.direct_ms), one.per_face(one.direct_ms))
        lines.append(
            f"- {one.runtime}, {one.model}: per face with {many.faces} faces vs {one.faces}: "
            f"{_times(registry)} through the registry, {_times(direct)} direct (the target: ≤ 0.5×)"
        )
    return lines


def faces_dict(report: BenchReport) -> dict[str, object]:
    """The JSON's `faces`: the stage costs and the faces/s rows."""
    rates = []
    for row in image_rows(report):
        faces = faces_in(report, row.runtime, row.model, row.image) or 0
        summary = row.measurement.summary()
        rates.append(
            {
                "runtime": row.runtime,
                "model": row.model,
                "mode": row.mode,
                "target": row.target,
                "image": row.image,
                "batching": row.batching,
                "concurrency": row.concurrency,
                "faces_in_image": faces,
                "images_per_s": round(row.measurement.throughput_rps, 2),
                "faces_per_s": round(row.measurement.throughput_rps * faces, 2),
                "p50_ms": None if summary is None else round(summary.p50_ms, 4),
                "p99_ms": None if summary is None else round(summary.p99_ms, 4),
            }
        )
    return {
        "pipeline_in_process_limit": PIPELINE_LIMIT if report.face_stages else None,
        "classifier_stage": [cost.to_dict() for cost in report.face_stages],
        "faces_per_s": rates,
    }


def _number(value: object) -> float | None:
    return value if isinstance(value, float | int) else None


def _times(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}×"
