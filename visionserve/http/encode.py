"""Task results -> the HTTP API's JSON answers: one encoder per result type, chosen in one place."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from visionserve.schemas import (
    Box,
    Detection,
    DetectionResponse,
    Expression,
    Face,
    FacesResponse,
    ImageSize,
    Prediction,
    PredictResponse,
)
from visionserve.serving.pipeline import InferenceResult
from visionserve.tasks import detection as detection_task
from visionserve.tasks.classification import Classification
from visionserve.tasks.detection import Detections
from visionserve.tasks.faces import Faces


def _classification(output: Classification, model: str, latency_ms: float) -> dict[str, Any]:
    top = output.predictions[0]
    return PredictResponse(
        prediction=top.label,
        probability=top.prob,
        topk=[Prediction(label=p.label, prob=p.prob, index=p.index) for p in output.predictions],
        model=model,
        latency_ms=latency_ms,
    ).model_dump(mode="json")


def _box(box: detection_task.Box) -> Box:
    return Box(x1=box.x1, y1=box.y1, x2=box.x2, y2=box.y2)


def _detections(output: Detections, model: str, latency_ms: float) -> dict[str, Any]:
    return DetectionResponse(
        model=model,
        detections=[
            Detection(
                label=d.label,
                index=d.index,
                score=d.score,
                box=_box(d.box),
                landmarks=list(d.landmarks) if d.landmarks else None,
            )
            for d in output.detections
        ],
        image=ImageSize(width=output.width, height=output.height),
        latency_ms=latency_ms,
    ).model_dump(mode="json", exclude_none=True)


def _faces(output: Faces, model: str, latency_ms: float) -> dict[str, Any]:
    return FacesResponse(
        model=model,
        faces=[
            Face(
                box=_box(f.box),
                score=f.score,
                landmarks=list(f.landmarks),
                expression=Expression(**f.expression),
                top=f.top,
            )
            for f in output.faces
        ],
        image=ImageSize(width=output.width, height=output.height),
        latency_ms=latency_ms,
    ).model_dump(mode="json")


_ENCODERS: dict[type, Callable[[Any, str, float], dict[str, Any]]] = {
    Classification: _classification,
    Detections: _detections,
    Faces: _faces,
}


def response_json(result: InferenceResult, started: float) -> JSONResponse:
    """The answer to a predict request: the task's JSON, `latency_ms` from `started`
    (time.perf_counter()), and `Server-Timing` splitting it into preprocessing and inference."""
    latency_ms = round((time.perf_counter() - started) * 1e3, 3)
    body = _ENCODERS[type(result.output)](result.output, result.model, latency_ms)
    timing = f"preprocess;dur={result.preprocess_ms:.3f}, inference;dur={result.inference_ms:.3f}"
    return JSONResponse(body, headers={"Server-Timing": timing})
