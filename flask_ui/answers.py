"""The HTTP API's JSON as the pages use it: `/predict/file`'s answer (a classifier's classes, a
detector's boxes, a face_expression pipeline's faces) and `/models`' entries.

Raises KeyError, TypeError or ValueError on a body that is not the API's; the caller says so.
"""

from __future__ import annotations

from typing import Any

from flask_ui.results import (
    DETECTION,
    FACE_EXPRESSION,
    Box,
    ClassScore,
    Detection,
    DetectionDefaults,
    DetectionPrediction,
    Face,
    FaceDefaults,
    FacesPrediction,
    ImagePrediction,
    ModelInfo,
    Point,
    Prediction,
)


def prediction(body: dict[str, Any], round_trip_ms: float) -> Prediction:
    """The answer of /predict/file as the model's task has it (an answer without `task` comes
    from a classifier-only API)."""
    task = body.get("task")
    if task == DETECTION:
        return DetectionPrediction(
            detections=[detection(d) for d in body["detections"]],
            width=int(body["image"]["width"]),
            height=int(body["image"]["height"]),
            model=str(body["model"]),
            server_ms=float(body["latency_ms"]),
            round_trip_ms=round_trip_ms,
        )
    if task == FACE_EXPRESSION:
        return FacesPrediction(
            faces=[face(f) for f in body["faces"]],
            width=int(body["image"]["width"]),
            height=int(body["image"]["height"]),
            model=str(body["model"]),
            server_ms=float(body["latency_ms"]),
            round_trip_ms=round_trip_ms,
        )
    return ImagePrediction(
        topk=[ClassScore(str(p["label"]), float(p["prob"]), int(p["index"])) for p in body["topk"]],
        model=str(body["model"]),
        server_ms=float(body["latency_ms"]),
        round_trip_ms=round_trip_ms,
    )


def _box(box: dict[str, Any]) -> Box:
    return Box(float(box["x1"]), float(box["y1"]), float(box["x2"]), float(box["y2"]))


def _points(points: list[Any] | None) -> tuple[Point, ...]:
    return tuple((float(x), float(y)) for x, y in points or ())


def detection(entry: dict[str, Any]) -> Detection:
    """One entry of a detector's `detections` (a face detector's with its `landmarks`)."""
    return Detection(
        label=str(entry["label"]),
        index=int(entry["index"]),
        score=float(entry["score"]),
        box=_box(entry["box"]),
        landmarks=_points(entry.get("landmarks")),
    )


def face(entry: dict[str, Any]) -> Face:
    """One entry of a face_expression answer's `faces`."""
    expression = {str(name): float(prob) for name, prob in dict(entry["expression"]).items()}
    top = str(entry.get("top") or max(expression, key=expression.__getitem__))
    return Face(
        box=_box(entry["box"]),
        score=float(entry["score"]),
        landmarks=_points(entry.get("landmarks")),
        expression=expression,
        top=top,
    )


def _number(values: dict[str, Any], key: str) -> float | None:
    value = values.get(key)
    return float(value) if isinstance(value, int | float) else None


def model_info(entry: dict[str, Any]) -> ModelInfo:
    """One entry of `GET /models` (an API from before tasks lists a classifier without `task`)."""
    defaults = entry.get("detection") or {}
    faces = entry.get("faces") or {}
    max_faces = _number(faces, "max_faces")
    return ModelInfo(
        name=str(entry["name"]),
        task=str(entry.get("task") or "classification"),
        runtime=str(entry["runtime"]),
        device=str(entry["device"]),
        ready=bool(entry.get("ready", False)),
        default=bool(entry.get("default", False)),
        parameters=tuple(str(p) for p in entry.get("parameters") or ()),
        detection=DetectionDefaults(
            score_threshold=float(defaults["score_threshold"]),
            iou_threshold=float(defaults["iou_threshold"]),
            max_detections=int(defaults["max_detections"]),
        )
        if {"score_threshold", "iou_threshold", "max_detections"} <= set(defaults)
        else None,
        faces=FaceDefaults(
            score_threshold=_number(faces, "score_threshold"),
            min_face_size=_number(faces, "min_face_size"),
            max_faces=int(max_faces) if max_faces is not None else None,
        )
        if faces
        else None,
    )
