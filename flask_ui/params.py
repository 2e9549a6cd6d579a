"""What a form asks of a model, checked before anything is sent: which model (one the API serves),
a detector's or a face model's settings, and the video page's sampling and mode.

Numbers are only parsed here; their ranges are the API's to judge (its message says what is
allowed, and the page shows it as it is), so the UI never disagrees with the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from flask_ui.errors import Problem, UIError
from flask_ui.results import CLASSIFICATION, DETECTION, FACE_EXPRESSION, ModelInfo

MAX_EVERY = 1000
MAX_FIELD = 500
"""Longest value of a text field that is passed on (longer ones are refused, not cut)."""
MODES = ("stream", "live")
FORM_FIELDS = (
    "model",
    "score_threshold",
    "iou_threshold",
    "max_detections",
    "classes",
    "face_score_threshold",
    "min_face_size",
    "max_faces",
    "every",
    "mode",
)
"""Fields whose values are shown again in the form after a post (the choice is kept). A face
model's score threshold has its own field (`face_score_threshold`, sent as `score_threshold`):
without JavaScript both fieldsets show and post, and each keeps its own value."""


@dataclass(frozen=True)
class DetectionParams:
    """A detector's settings for one request; None / empty: the model's own."""

    score_threshold: float | None = None
    iou_threshold: float | None = None
    max_detections: int | None = None
    classes: tuple[str, ...] = ()

    def query(self) -> dict[str, str | list[str]]:
        """As query parameters of `POST /predict/file`."""
        query: dict[str, str | list[str]] = {}
        if self.score_threshold is not None:
            query["score_threshold"] = repr(self.score_threshold)
        if self.iou_threshold is not None:
            query["iou_threshold"] = repr(self.iou_threshold)
        if self.max_detections is not None:
            query["max_detections"] = str(self.max_detections)
        if self.classes:
            query["classes"] = list(self.classes)
        return query


@dataclass(frozen=True)
class FaceParams:
    """A face_expression model's settings for one request; None: the model's own."""

    score_threshold: float | None = None
    min_face_size: float | None = None
    max_faces: int | None = None

    def query(self) -> dict[str, str | list[str]]:
        """As query parameters of `POST /predict/file`."""
        query: dict[str, str | list[str]] = {}
        if self.score_threshold is not None:
            query["score_threshold"] = repr(self.score_threshold)
        if self.min_face_size is not None:
            query["min_face_size"] = repr(self.min_face_size)
        if self.max_faces is not None:
            query["max_faces"] = str(self.max_faces)
        return query


TaskParams = DetectionParams | FaceParams
"""The settings of a model's task (a classifier's `topk` is the UI's own choice)."""


def _field(form: Mapping[str, str], name: str) -> str:
    value = (form.get(name) or "").strip()
    if len(value) > MAX_FIELD:
        raise UIError(
            Problem.BAD_INPUT,
            f"The {name.replace('_', ' ')} field is too long",
            f"Use at most {MAX_FIELD} characters.",
        )
    return value


def _number(form: Mapping[str, str], name: str, words: str) -> float | None:
    raw = _field(form, name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UIError(Problem.BAD_INPUT, f"The {words} must be a number", f"Got {raw[:20]!r}; e.g. 0.5.")
    return value


def _whole(form: Mapping[str, str], name: str, words: str, example: str) -> int | None:
    raw = _field(form, name)
    if raw and not (raw.isascii() and raw.isdigit()):  # NOTE: "²".isdigit(), and int() refuses it
        raise UIError(
            Problem.BAD_INPUT, f"The {words} must be a whole number", f"Got {raw[:20]!r}; e.g. {example}."
        )
    return int(raw) if raw else None


def detection_params(form: Mapping[str, str]) -> DetectionParams:
    """The detector's settings from a form (fields `score_threshold`, `iou_threshold`,
    `max_detections`, `classes`: comma-separated labels); empty fields are left to the model."""
    max_detections = _whole(form, "max_detections", "most boxes", "20")
    classes = tuple(label.strip() for label in _field(form, "classes").split(",") if label.strip())
    return DetectionParams(
        score_threshold=_number(form, "score_threshold", "score threshold"),
        iou_threshold=_number(form, "iou_threshold", "overlap (IoU) threshold"),
        max_detections=max_detections,
        classes=classes,
    )


def face_params(form: Mapping[str, str]) -> FaceParams:
    """A face model's settings from a form (fields `face_score_threshold`, `min_face_size` in
    pixels, `max_faces`); empty fields are left to the model."""
    return FaceParams(
        score_threshold=_number(form, "face_score_threshold", "face score threshold"),
        min_face_size=_number(form, "min_face_size", "smallest face size"),
        max_faces=_whole(form, "max_faces", "most faces", "10"),
    )


def task_params(
    form: Mapping[str, str], model: ModelInfo | None, *, topk: int
) -> tuple[int | None, TaskParams | None]:
    """What to send to `model` besides the image: a classifier's `topk`, or the settings of a
    detector or a face model from `form` (each task is sent its own only: the API refuses another
    task's). When the API's model list is unknown (`model` None), the settings that were filled
    in are sent, and the API says if they do not apply."""
    if model is None:
        detection, faces = detection_params(form), face_params(form)
        if detection != DetectionParams():
            return None, detection
        return None, faces if faces != FaceParams() else None
    if model.task == DETECTION:
        return None, detection_params(form)
    if model.task == FACE_EXPRESSION:
        return None, face_params(form)
    return (topk, None) if model.task == CLASSIFICATION else (None, None)


def choose_model(models: list[ModelInfo] | None, requested: str) -> ModelInfo | None:
    """The served model named `requested` (empty: the default one). None when the API's list is
    unknown (the API then judges the name itself); UIError when it serves no such model."""
    requested = requested.strip()
    if models is None:
        return None
    if not requested:
        return next((m for m in models if m.default), models[0] if models else None)
    for model in models:
        if model.name == requested:
            return model
    served = ", ".join(f"{m.name} ({m.task})" for m in models) or "none"
    raise UIError(
        Problem.BAD_INPUT,
        "There is no such model",
        f"No model is named {requested[:80]!r}. The API serves: {served}. Choose one of them.",
    )


def every(form: Mapping[str, str]) -> int:
    """`every`: send every Nth frame (1..MAX_EVERY)."""
    raw = (form.get("every") or "1").strip() or "1"
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_EVERY:
        raise UIError(
            Problem.BAD_INPUT,
            "'Every Nth frame' must be a whole number",
            f"Use 1 (every frame) up to {MAX_EVERY}; got {raw[:20]!r}.",
        )
    return int(raw)


def live_mode(form: Mapping[str, str]) -> bool:
    """`mode`: "stream" (every frame answered, in order) or "live" (frames paced at the clip's
    own rate; the server skips those it cannot keep up with)."""
    mode = (form.get("mode") or "stream").strip()
    if mode not in MODES:
        raise UIError(Problem.BAD_INPUT, "Unknown video mode", f"Use 'stream' or 'live'; got {mode[:20]!r}.")
    return mode == "live"


def form_values(form: Mapping[str, str]) -> dict[str, str]:
    """The posted values to show again in the form (bounded; escaped by the templates)."""
    return {name: (form.get(name) or "")[:MAX_FIELD] for name in FORM_FIELDS}
