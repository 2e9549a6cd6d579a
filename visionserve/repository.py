"""The model repository: one folder per model, as the export step writes it.

```
<repository>/<name>/config.json   what the model expects and how it was made (ModelConfig)
<repository>/<name>/labels.txt    one class name per line
<repository>/<name>/1/model.onnx  ONNX graph, dynamic batch axis
<repository>/<name>/1/model.pt2   torch.export program (loads without unpickling code)
```
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from visionserve.errors import ConfigurationError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
Backend = Literal["onnx", "torch"]


class InputSpec(BaseModel):
    """The model's image input and the preprocessing it was trained with."""

    model_config = ConfigDict(extra="forbid")

    name: str = "input"
    size: tuple[int, int] = (224, 224)
    """Height and width fed to the model (the center crop, or the letterbox)."""
    fit: Literal["center_crop", "letterbox"] = "center_crop"
    """How the photo becomes `size`: `center_crop` (classifiers: the shorter side resized to
    `resize`, then the centre cut out) or `letterbox` (detectors: the whole photo scaled to fit,
    aspect ratio kept, the rest padded with `pad_value`)."""
    resize: int = 256
    """center_crop: the shorter side is resized to this before the center crop."""
    pad_value: int = Field(default=114, ge=0, le=255)
    """letterbox: the grey level of the padding (114, as YOLO models were trained)."""
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean, in units of pixel/255."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel standard deviation, in units of pixel/255."""
    layout: Literal["NCHW"] = "NCHW"
    color: Literal["RGB"] = "RGB"

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        height, width = self.size
        if height < 1 or width < 1:
            raise ValueError(f"input.size must be positive, got {self.size}")
        if self.fit == "center_crop" and self.resize < max(height, width):
            raise ValueError(
                f"input.resize ({self.resize}) must be at least the crop size {self.size}: "
                "the center crop is taken from the resized image"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"input.std must be positive, got {self.std}")
        return self


class OutputSpec(BaseModel):
    """The model's output: one row of scores per image (classification), or one row per anchor
    of each image (detection)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "logits"
    kind: Literal["logits", "probabilities", "boxes"] = "logits"
    """`logits` get a softmax in postprocessing; `probabilities` are used as they are; `boxes`
    (detection): float32 (N, anchors, 4 + classes), each anchor's box centre, width and height in
    input pixels, then its class probabilities, then `landmarks` (x, y) points in input pixels."""
    classes: int = Field(ge=1)
    landmarks: int = Field(default=0, ge=0, le=68)
    """`boxes` only: points per box after the class scores (a face detector's 5: eyes, nose tip,
    mouth corners); 0 for a plain detector."""


class DetectionDefaults(BaseModel):
    """A detector's postprocessing defaults; a request may change each (`score_threshold`,
    `iou_threshold`, `max_detections` up to this one, `classes`)."""

    model_config = ConfigDict(extra="forbid")

    score_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    """Boxes scoring below this are dropped."""
    iou_threshold: float = Field(default=0.45, ge=0.0, le=1.0)
    """Non-maximum suppression: a box overlapping a better one of its class by more than this
    (intersection over union) is dropped."""
    max_detections: int = Field(default=100, ge=1, le=10_000)
    """Most boxes answered per image; also the cap a request may ask for, and the K of the Open
    Inference Protocol's fixed-shape outputs ([-1, K, 4] boxes)."""


class Artefact(BaseModel):
    """One runtime's file, relative to the model folder, with its checksum."""

    model_config = ConfigDict(extra="allow")

    path: str
    sha256: str | None = None


class ModelConfig(BaseModel):
    """`config.json`: everything a runtime and the pre/postprocessing need to serve a model."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    version: int = 1
    task: Literal["classification", "detection"] = "classification"
    input: InputSpec
    output: OutputSpec
    detection: DetectionDefaults | None = None
    """Detection only: postprocessing defaults (absent: the defaults above)."""
    labels: str = "labels.txt"
    max_batch_size: int = Field(default=32, ge=1)
    """Largest batch the artefacts accept (and the batcher forms)."""
    max_queue_delay_us: int = Field(default=0, ge=0)
    """How long the batcher waits for more requests after the first of a batch; 0 = take what is
    waiting now (Triton's advice: batches still form under load, from requests that queued while
    the previous batch ran)."""
    max_queue_size: int = Field(default=128, ge=1)
    """Requests waiting for the runtime before new ones are refused (503 / UNAVAILABLE)."""
    instances: int = Field(default=1, ge=1, le=64)
    """Runtime instances, each computing its own batch at the same time (VISION_INSTANCES)."""
    threads: int | None = Field(default=None, ge=1)
    """Intra-op threads per instance (VISION_THREADS); default: the cores shared among the
    instances on CPU, 1 on CUDA."""
    artefacts: dict[Backend, Artefact]
    provenance: dict[str, object] = Field(default_factory=dict)
    parity: dict[str, object] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _task_fits(self) -> ModelConfig:
        detector = self.task == "detection"
        if detector != (self.output.kind == "boxes"):
            raise ValueError(
                f"task {self.task!r} does not fit output.kind {self.output.kind!r}: a detection model "
                "outputs `boxes`, a classification model `logits` or `probabilities`"
            )
        if detector != (self.input.fit == "letterbox"):
            raise ValueError(
                f"task {self.task!r} does not fit input.fit {self.input.fit!r}: detection models take "
                "a `letterbox`, classification models a `center_crop`"
            )
        if self.output.landmarks and not detector:
            raise ValueError("output.landmarks applies to detection models (output.kind `boxes`)")
        if detector and self.detection is None:
            self.detection = DetectionDefaults()
        return self


class FaceStages(BaseModel):
    """The models a face_expression pipeline runs, by name in the same repository."""

    model_config = ConfigDict(extra="forbid")

    detector: str
    """A detection model with landmarks (label `face`), e.g. `retinaface_mnet025`."""
    classifier: str
    """A classification model over the seven expressions, fed face crops, e.g. `mini_xception`."""


class FaceDefaults(BaseModel):
    """A face_expression pipeline's defaults; a request may change the first three."""

    model_config = ConfigDict(extra="forbid")

    score_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    """Faces the detector scores below this are dropped."""
    min_face_size: float = Field(default=0.0, ge=0.0)
    """Faces whose box is smaller than this many pixels (its shorter side) are dropped."""
    max_faces: int = Field(default=32, ge=1, le=1000)
    """Most faces answered per image (the largest scores first); also the cap a request may ask
    for, and the K of the Open Inference Protocol's fixed-shape outputs."""
    margin: float = Field(default=0.2, ge=0.0, le=2.0)
    """Each face crop is the box's longer side grown by this fraction, as a square around the
    box's centre (clipped to the photo)."""


class PipelineConfig(BaseModel):
    """`config.json` of a pipeline: a model made of other models of the repository (no artefact
    of its own)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    version: int = 1
    task: Literal["face_expression"] = "face_expression"
    stages: FaceStages
    faces: FaceDefaults = Field(default_factory=FaceDefaults)
    provenance: dict[str, object] = Field(default_factory=dict)


PIPELINE_TASKS = ("face_expression",)
FACE_EXPRESSIONS = ("neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise")
"""Seed 003's `Expression` fields, in its order: a face_expression pipeline's labels."""
"""Tasks whose config.json names stages instead of artefacts."""


@dataclass(frozen=True)
class PipelineEntry:
    """A pipeline found in the repository: its folder and config."""

    root: Path
    config: PipelineConfig

    @property
    def name(self) -> str:
        """The pipeline's name (its folder name)."""
        return self.config.name

    @property
    def labels(self) -> tuple[str, ...]:
        """The expressions it answers, in seed 003's order."""
        return FACE_EXPRESSIONS


@dataclass(frozen=True)
class ModelEntry:
    """A model found in the repository: its folder, config and labels."""

    root: Path
    config: ModelConfig
    labels: tuple[str, ...]

    @property
    def name(self) -> str:
        """The model's name (its folder name)."""
        return self.config.name

    def artefact_path(self, backend: Backend) -> Path:
        """The file a runtime loads, verified against the checksum in config.json."""
        artefact = self.config.artefacts.get(backend)
        if artefact is None:
            raise ConfigurationError(
                f"model {self.name!r} has no {backend} artefact (it has: "
                f"{', '.join(self.config.artefacts) or 'none'}); re-run the export step",
            )
        path = (self.root / artefact.path).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ConfigurationError(
                f"{self.root / CONFIG_FILE}: artefact path {artefact.path!r} leaves the model folder",
            )
        if not path.is_file():
            raise ConfigurationError(
                f"{path} is missing; re-run the export step for model {self.name!r}",
            )
        if artefact.sha256 and file_sha256(path) != artefact.sha256:
            raise ConfigurationError(
                f"{path} does not match the sha256 recorded in {self.root / CONFIG_FILE}; "
                "the file changed after export: re-run the export step",
            )
        return path


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ModelRepository:
    """Reads model folders under one root; every service and the export step share it."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def names(self) -> list[str]:
        """Models present (folders with a config.json), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{CONFIG_FILE}"))

    def _read(self, name: str) -> tuple[Path, dict[str, object]]:
        folder = self.root / name
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            present = ", ".join(self.names()) or "none"
            raise ConfigurationError(
                f"no model {name!r} in repository {self.root} (models present: {present}); "
                "export one with `python -m export` or set VISION_MODEL_REPOSITORY",
            )
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{config_path} is not valid: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigurationError(f"{config_path} is not valid: a JSON object is expected")
        return folder, raw

    def is_pipeline(self, name: str) -> bool:
        """Whether `name` is a pipeline (its config.json names stages, not artefacts)."""
        return self._read(name)[1].get("task") in PIPELINE_TASKS

    def get_pipeline(self, name: str) -> PipelineEntry:
        """Load one pipeline's config."""
        folder, raw = self._read(name)
        try:
            config = PipelineConfig.model_validate(raw)
        except ValidationError as exc:
            raise ConfigurationError(f"{folder / CONFIG_FILE} is not valid: {exc}") from exc
        return PipelineEntry(root=folder, config=config)

    def get(self, name: str) -> ModelEntry:
        """Load one model's config and labels; a clear error says what is wrong and how to fix it."""
        folder, raw = self._read(name)
        config_path = folder / CONFIG_FILE
        if raw.get("task") in PIPELINE_TASKS:
            raise ConfigurationError(
                f"{config_path}: model {name!r} is a pipeline, not a model with artefacts"
            )
        try:
            config = ModelConfig.model_validate(raw)
        except ValidationError as exc:
            raise ConfigurationError(f"{config_path} is not valid: {exc}") from exc
        labels_path = folder / config.labels
        if not labels_path.is_file():
            raise ConfigurationError(f"{labels_path} is missing (named by {config_path})")
        labels = tuple(line.strip() for line in labels_path.read_text().splitlines() if line.strip())
        if len(labels) != config.output.classes:
            raise ConfigurationError(
                f"{labels_path} has {len(labels)} labels but {config_path} declares "
                f"{config.output.classes} classes",
            )
        return ModelEntry(root=folder, config=config, labels=labels)
