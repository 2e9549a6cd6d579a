"""Task results -> the HTTP API's JSON answers: one encoder per result type, chosen in one place."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from visionserve.schemas import Box, Detection, DetectionResponse, ImageSize, Prediction, PredictResponse
from visionserve.serving.pipeline import InferenceResult
from visionserve.tasks.classification import Classification
from visionserve.tasks.detection import Detections


def _classification(output: Classification, model: str, latency_ms: float) -> dict[str, Any]:
    top = output.predictions[0]
    return PredictResponse(
        prediction=top.label,
        probability=top.prob,
        topk=[Prediction(label=p.label, prob=p.prob, index=p.index) for p in output.predictions],
        model=model,
        latency_ms=latency_ms,
    ).model_dump(mode="json")


def _detections(output: Detections, model: str, latency_ms: float) -> dict[str, Any]:
    return DetectionResponse(
        model=model,
        detections=[
            Detection(
                label=d.label,
                index=d.index,
                score=d.score,
                box=Box(x1=d.box.x1, y1=d.box.y1, x2=d.box.x2, y2=d.box.y2),
            )
            for d in output.detections
        ],
        image=ImageSize(width=output.width, height=output.height),
        latency_ms=latency_ms,
    ).model_dump(mode="json")


_ENCODERS: dict[type, Callable[[Any, str, float], dict[str, Any]]] = {
    Classification: _classification,
    Detections: _detections,
}


def response_json(result: InferenceResult, started: float) -> JSONResponse:
    """The answer to a predict request: the task's JSON, `latency_ms` from `started`
    (time.perf_counter()), and `Server-Timing` splitting it into preprocessing and inference."""
    latency_ms = round((time.perf_counter() - started) * 1e3, 3)
    body = _ENCODERS[type(result.output)](result.output, result.model, latency_ms)
    timing = f"preprocess;dur={result.preprocess_ms:.3f}, inference;dur={result.inference_ms:.3f}"
    return JSONResponse(body, headers={"Server-Timing": timing})
