"""visionserve.v1 messages <-> the core: a request's task parameters, and task results as protobuf
fields (one encoder per result type, chosen in one place)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from visionserve.serving.pipeline import InferenceResult
from visionserve.tasks.classification import Classification
from visionserve.tasks.detection import Detections, Point
from visionserve.tasks.faces import Faces
from visionserve.v1 import inference_pb2 as pb


def task_parameters(message: Any) -> dict[str, object]:
    """The task parameters a `PredictRequest`, `PredictBatchRequest` or `Frame` carries (proto3:
    `topk` 0 and empty `classes` mean not given; the thresholds and `max_detections` are optional
    fields, so 0 is a value)."""
    return {
        "topk": message.topk or None,
        "score_threshold": message.score_threshold if message.HasField("score_threshold") else None,
        "iou_threshold": message.iou_threshold if message.HasField("iou_threshold") else None,
        "max_detections": message.max_detections if message.HasField("max_detections") else None,
        "classes": list(message.classes) or None,
        "min_face_size": message.min_face_size if message.HasField("min_face_size") else None,
        "max_faces": message.max_faces if message.HasField("max_faces") else None,
    }


def _classification(output: Classification) -> dict[str, Any]:
    top = output.predictions[0]
    return {
        "topk": [pb.Prediction(label=p.label, prob=p.prob, index=p.index) for p in output.predictions],
        "prediction": top.label,
        "probability": top.prob,
    }


def _detections(output: Detections) -> dict[str, Any]:
    return {
        "detections": [
            pb.Detection(
                label=d.label,
                index=d.index,
                score=d.score,
                box=pb.Box(x1=d.box.x1, y1=d.box.y1, x2=d.box.x2, y2=d.box.y2),
                landmarks=_points(d.landmarks),
            )
            for d in output.detections
        ],
        "image": pb.ImageSize(width=output.width, height=output.height),
    }


def _points(points: tuple[Point, ...]) -> list[pb.Point]:
    return [pb.Point(x=x, y=y) for x, y in points]


def _faces(output: Faces) -> dict[str, Any]:
    return {
        "faces": [
            pb.Face(
                box=pb.Box(x1=f.box.x1, y1=f.box.y1, x2=f.box.x2, y2=f.box.y2),
                score=f.score,
                landmarks=_points(f.landmarks),
                expression=pb.Expression(**f.expression),
                top=f.top,
            )
            for f in output.faces
        ],
        "image": pb.ImageSize(width=output.width, height=output.height),
    }


_ENCODERS: dict[type, Callable[[Any], dict[str, Any]]] = {
    Classification: _classification,
    Detections: _detections,
    Faces: _faces,
}


def result_fields(result: InferenceResult) -> dict[str, Any]:
    """The task's fields of an answer (`topk`/`prediction`/`probability`, or `detections`/`image`)."""
    return _ENCODERS[type(result.output)](result.output)


def to_response(result: InferenceResult) -> pb.PredictResponse:
    """A core result -> `PredictResponse` (the same fields as the HTTP API's JSON)."""
    return pb.PredictResponse(
        model=result.model, task=result.task, latency_ms=result.total_ms, **result_fields(result)
    )


def to_frame(frame_id: int, result: InferenceResult, latency_ms: float) -> pb.FramePrediction:
    """A core result -> a stream's `FramePrediction` (without `prediction`/`probability`: a frame
    answers `topk`)."""
    fields = result_fields(result)
    fields.pop("prediction", None)
    fields.pop("probability", None)
    return pb.FramePrediction(
        frame_id=frame_id, model=result.model, task=result.task, latency_ms=latency_ms, **fields
    )
