"""The HTTP API's messages (pydantic). The gRPC messages carry the same names and meanings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TaskParameters(BaseModel):
    """The per-request parameters of every task; a request sends those of its model's task only
    (another task's is a 400 naming the task)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(
        default=None,
        description="Model to use (GET /models lists them); default: the server's default model.",
    )
    topk: int | None = Field(
        default=None,
        ge=1,
        description="Classification: how many classes to return (default: the server's, 5).",
    )
    score_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Detection: drop boxes scoring below this (default: the model's).",
    )
    iou_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Detection: non-maximum suppression overlap (IoU) above which the weaker box of a "
        "class is dropped (default: the model's).",
    )
    max_detections: int | None = Field(
        default=None, ge=1, description="Detection: most boxes to return (default and cap: the model's)."
    )
    classes: list[str] | None = Field(
        default=None, description='Detection: only these classes, by label (e.g. ["person", "car"]).'
    )
    min_face_size: float | None = Field(
        default=None,
        ge=0.0,
        description="face_expression: drop faces whose box's shorter side is below this many pixels "
        "(default 0).",
    )
    max_faces: int | None = Field(
        default=None,
        ge=1,
        description="face_expression: most faces to return (default and cap: the model's).",
    )

    def task_parameters(self) -> dict[str, object]:
        """The task parameters given (model and image aside)."""
        return {name: getattr(self, name) for name in TASK_PARAMETER_FIELDS}


TASK_PARAMETER_FIELDS = (
    "topk",
    "score_threshold",
    "iou_threshold",
    "max_detections",
    "classes",
    "min_face_size",
    "max_faces",
)
"""The fields of `TaskParameters` that the model's task checks (visionserve.tasks names them too)."""


class PredictRequest(TaskParameters):
    """`POST /predict`: one base64-encoded image (the seeds' `{"image": ...}`) and the task's
    parameters (e.g. `topk`)."""

    image: str = Field(description="The encoded image (JPEG, PNG, WebP, GIF, BMP or TIFF), base64.")


class B64PredictRequest(TaskParameters):
    """`POST /predict/b64`: the seed's field names for the same request."""

    image_base64: str = Field(description="The encoded image, base64.")


class Prediction(BaseModel):
    """One class: its label, probability and index in the model's output."""

    label: str
    prob: float = Field(ge=0.0, le=1.0)
    index: int = Field(ge=0)


class PredictResponse(BaseModel):
    """A classification model's answer.

    `prediction`/`probability` are the top class (seed 004's fields); `topk` the top-k classes,
    most probable first (seed 000's field).
    """

    model_config = ConfigDict(protected_namespaces=())

    prediction: str
    probability: float = Field(ge=0.0, le=1.0)
    topk: list[Prediction]
    model: str
    task: Literal["classification"] = "classification"
    latency_ms: float = Field(description="Server time from request to answer, in milliseconds.")


class Box(BaseModel):
    """A box's corners in the photo's own pixels (seed 003's names): left, top, right, bottom."""

    x1: float
    y1: float
    x2: float
    y2: float


Point = tuple[float, float]
"""x, y in the photo's pixels (`[x, y]` in JSON; `Point {x, y}` over gRPC)."""


class Detection(BaseModel):
    """One object: its class's label and index, its score and its box; a face detector's boxes
    also carry five landmarks (eyes, nose tip, mouth corners)."""

    label: str
    index: int = Field(ge=0)
    score: float = Field(ge=0.0, le=1.0)
    box: Box
    landmarks: list[Point] | None = Field(
        default=None, description="A face detector's five [x, y] points; absent for other detectors."
    )


class ImageSize(BaseModel):
    """The photo's size in pixels (after its EXIF orientation): what the boxes refer to."""

    width: int
    height: int


class DetectionResponse(BaseModel):
    """A detection model's answer: the objects found, highest score first (empty when none)."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    task: Literal["detection"] = "detection"
    detections: list[Detection]
    image: ImageSize
    latency_ms: float = Field(description="Server time from request to answer, in milliseconds.")


class Expression(BaseModel):
    """Seed 003's seven expressions, as probabilities that sum to 1."""

    neutral: float = 0
    anger: float = 0
    disgust: float = 0
    fear: float = 0
    happiness: float = 0
    sadness: float = 0
    surprise: float = 0


class Face(BaseModel):
    """One face: its box and detector score, five landmarks, its expression and the top one's name."""

    box: Box
    score: float = Field(ge=0.0, le=1.0)
    landmarks: list[Point]
    expression: Expression
    top: str = Field(description="The most probable expression's name.")


class FacesResponse(BaseModel):
    """A face_expression pipeline's answer: one entry per face, highest detector score first (empty
    when there is none)."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    task: Literal["face_expression"] = "face_expression"
    faces: list[Face]
    image: ImageSize
    latency_ms: float = Field(description="Server time from request to answer, in milliseconds.")


AnyPredictResponse = PredictResponse | DetectionResponse | FacesResponse
"""What a predict endpoint answers, by the model's task."""


class HealthStatus(BaseModel):
    """Liveness/readiness answer."""

    status: str
    detail: str | None = None


class ModelInfo(BaseModel):
    """What `GET /models` says about a served model."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: int
    task: str
    default: bool = Field(description="The model used when a request names none (VISION_MODEL_NAME).")
    input_size: tuple[int, int] = Field(description="Height and width fed to the model.")
    labels_count: int
    parameters: list[str] = Field(description="The request parameters of the model's task.")
    detection: dict[str, float | int] | None = Field(
        default=None, description="Detection: the postprocessing defaults (thresholds, max detections)."
    )
    landmarks: int | None = Field(
        default=None, description="Detection: points per box (a face detector's 5)."
    )
    stages: dict[str, str] | None = Field(
        default=None, description="A pipeline: the models it runs (face_expression: detector, classifier)."
    )
    faces: dict[str, float | int] | None = Field(
        default=None,
        description="face_expression: its defaults (score_threshold, min_face_size, max_faces, margin).",
    )
    max_batch_size: int = Field(
        description="Largest batch the batcher forms (config.json, or VISION_MAX_BATCH_SIZE; 1 = off)."
    )
    max_queue_delay_us: int = Field(description="How long a batch waits for more after its first.")
    max_queue_size: int = Field(description="Requests waiting before new ones get 503 / UNAVAILABLE.")
    runtime: str
    compiled: bool | None = Field(
        default=None,
        description="PyTorch: true when the model runs compiled (torch.compile), false when eager "
        "(VISION_TORCH_COMPILE=false, or no C++ compiler found); null for other runtimes.",
    )
    device: str
    instances: int = Field(
        description="Runtime instances computing batches at the same time (0: a pipeline, see its stages)."
    )
    threads: int = Field(description="Intra-op threads of each instance.")
    layout: str | None = Field(
        default=None,
        description="How the runtime's sessions share the cores (sessions x intra-op threads): "
        "`fixed: 1x2`, or `adaptive: 1x2 for a lone request, 2x1 under load` (a wide session when "
        "nothing else computes, narrow ones side by side otherwise; then `instances` is the narrow "
        "sessions, the most computing at once, and `threads` the wide session's); null: a pipeline.",
    )
    layout_reason: str | None = Field(
        default=None, description="Why this layout (the default, VISION_LAYOUT, or the settings that fix it)."
    )
    sessions: list[dict[str, str | int]] | None = Field(
        default=None, description="The runtime's sessions by kind (fixed, wide, narrow): count and threads."
    )
    preprocess_workers: int = Field(
        description="Threads decoding and preprocessing images (shared by the models)."
    )
    ready: bool
    state: str = Field(description="created, loading, ready, failed, stopping or stopped.")


class ModelDetail(ModelInfo):
    """`GET /models/{name}`: a model's facts and its class labels, in output order."""

    labels: list[str]


class ModelsResponse(BaseModel):
    """`GET /models`."""

    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    """What went wrong: a stable code and a message a person can act on."""

    code: str
    message: str


class ErrorResponse(BaseModel):
    """Every error answer: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


class V2ErrorResponse(BaseModel):
    """Every error answer under `/v2`, in the Open Inference Protocol's shape: `{"error": "<message>"}`."""

    error: str
