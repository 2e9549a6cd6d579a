"""The live (camera) page's server side: one camera frame in, its answer out, as JSON.

The browser (`static/live.js`) captures a frame from the camera, posts it to `POST /live/frame`
and draws the answer over the live video. It keeps at most two frames in flight and, when a slot
frees, captures the camera's newest frame: frames the model has no time for are never sent, so
the overlay never lags behind the camera by more than the frames in flight (docs/ui.md).

NOTE: one plain request per frame, not a stream: the UI keeps no state per viewer (no session,
no open gRPC stream, no thread held between frames), so a page that goes away leaves at most its
frames in flight, each bounded by VISION_UI_REQUEST_TIMEOUT_S. waitress (WSGI) cannot carry a
WebSocket, and a browser cannot stream a request body over HTTP/1.1, so the server's
PredictLive stream would need a session: a frame upload per request plus a long-lived answer
stream per viewer, both to be cleaned up when the viewer vanishes.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from flask_ui.client import ApiClient
from flask_ui.overlay import drawing
from flask_ui.results import DetectionPrediction, FacesPrediction, ModelInfo, Prediction

LIVE_TOPK = 3
"""Classes a classifier answers per camera frame (the top one is drawn over the video)."""
MODELS_TTL_S = 5.0
"""How long the served models' list is reused between frames (one `GET /models` per frame
would cost the API as much as a classifier's frame)."""


class ModelCache:
    """The API's served models, looked up at most every `ttl_s` seconds (an unknown list, the API
    being down, is not kept: the next frame asks again). Thread-safe."""

    def __init__(self, api: ApiClient, ttl_s: float = MODELS_TTL_S):
        self._api = api
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._models: list[ModelInfo] | None = None
        self._fetched = 0.0

    def get(self) -> list[ModelInfo] | None:
        """The served models (None: the API cannot say now)."""
        with self._lock:
            if self._models is not None and time.monotonic() - self._fetched < self._ttl_s:
                return self._models
        models = self._api.models()
        with self._lock:
            if models is not None:
                self._models, self._fetched = models, time.monotonic()
        return models


def live_answer(result: Prediction) -> dict[str, Any]:
    """One frame's answer as the live page draws it: the task's shapes or classes (as the video
    page's events carry them), the model, the API's own time and the UI's round trip to it."""
    answer: dict[str, Any] = {
        "task": result.task,
        "model": result.model,
        "server_ms": round(result.server_ms, 1),
        "api_ms": round(result.round_trip_ms, 1),
    }
    if isinstance(result, DetectionPrediction | FacesPrediction):
        detections = result.detections if isinstance(result, DetectionPrediction) else []
        faces = result.faces if isinstance(result, FacesPrediction) else []
        return answer | drawing(
            result.task, width=result.width, height=result.height, detections=detections, faces=faces
        )
    return answer | drawing(result.task, topk=result.topk)
