"""The HTTP API's messages (pydantic). The gRPC messages carry the same names and meanings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PredictRequest(BaseModel):
    """`POST /predict`: one base64-encoded image (the seeds' `{"image": ...}`), optional top-k."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    image: str = Field(description="The encoded image (JPEG, PNG, WebP, GIF, BMP or TIFF), base64.")
    topk: int | None = Field(
        default=None, ge=1, description="How many classes to return (default: the server's, 5)."
    )
    model: str | None = Field(default=None, description="Model to use; default: the served model.")


class B64PredictRequest(BaseModel):
    """`POST /predict/b64`: the seed's field names for the same request."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    image_base64: str = Field(description="The encoded image, base64.")
    topk: int | None = Field(default=None, ge=1, description="How many classes to return.")
    model: str | None = Field(default=None, description="Model to use; default: the served model.")


class Prediction(BaseModel):
    """One class: its label, probability and index in the model's output."""

    label: str
    prob: float = Field(ge=0.0, le=1.0)
    index: int = Field(ge=0)


class PredictResponse(BaseModel):
    """The answer to every predict endpoint.

    `prediction`/`probability` are the top class (seed 004's fields); `topk` the top-k classes,
    most probable first (seed 000's field).
    """

    model_config = ConfigDict(protected_namespaces=())

    prediction: str
    probability: float = Field(ge=0.0, le=1.0)
    topk: list[Prediction]
    model: str
    latency_ms: float = Field(description="Server time from request to answer, in milliseconds.")


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
    input_size: tuple[int, int] = Field(description="Height and width fed to the model.")
    labels_count: int
    max_batch_size: int = Field(
        description="Largest batch the batcher forms (config.json, or VISION_MAX_BATCH_SIZE; 1 = off)."
    )
    max_queue_delay_us: int = Field(description="How long a batch waits for more after its first.")
    max_queue_size: int = Field(description="Requests waiting before new ones get 503 / UNAVAILABLE.")
    runtime: str
    device: str
    instances: int = Field(description="Runtime instances computing batches at the same time.")
    threads: int = Field(description="Intra-op threads of each instance.")
    preprocess_workers: int = Field(description="Threads decoding and preprocessing images.")
    ready: bool


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
