"""Object detection: letterbox -> boxes and class scores per anchor -> thresholds, class-aware
non-maximum suppression, boxes in the photo's own pixels."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from visionserve.repository import DetectionDefaults, ModelEntry
from visionserve.tasks.base import Prepared, Task, integer, invalid, number
from visionserve.tasks.boxes import Letterbox, letterbox, select_detections

_CLASSES_SHOWN = 8


@dataclass(frozen=True)
class DetectionParams:
    """Per-request postprocessing: thresholds, how many boxes, which classes (None: all)."""

    score_threshold: float
    iou_threshold: float
    max_detections: int
    classes: np.ndarray | None


@dataclass(frozen=True)
class Box:
    """Corners in the photo's pixels: left, top, right, bottom (seed 003's x1, y1, x2, y2)."""

    x1: float
    y1: float
    x2: float
    y2: float


Point = tuple[float, float]
"""x, y in the photo's pixels."""


@dataclass(frozen=True)
class Detection:
    """One object: its class (label and index), score and box (and, from a face detector, its
    landmarks: eyes, nose tip, mouth corners)."""

    label: str
    index: int
    score: float
    box: Box
    landmarks: tuple[Point, ...] = ()


@dataclass(frozen=True)
class Detections:
    """One image's objects, highest score first, and the photo's size (boxes are in its pixels)."""

    detections: list[Detection]
    width: int
    height: int


def in_photo_pixels(placement: Letterbox, decoded: tuple[int, int], original: tuple[int, int]) -> Letterbox:
    """The letterbox of an image decoded at a reduced scale (a large JPEG), restated against the
    photo's own pixels, so that boxes are answered in those."""
    if decoded == original:
        return placement
    return dataclasses.replace(
        placement, scale=placement.scale * decoded[0] / original[0], width=original[0], height=original[1]
    )


class DetectionTask(Task[DetectionParams, Detections]):
    """Letterbox to the model's input; decode, filter and suppress its boxes; map them back."""

    name = "detection"
    postprocess_off_loop = True

    def __init__(self, entry: ModelEntry, *, max_image_pixels: int):
        super().__init__(entry, max_image_pixels=max_image_pixels)
        self.defaults = entry.config.detection or DetectionDefaults()
        self.classes = entry.config.output.classes
        self.landmarks = entry.config.output.landmarks
        self.columns = 4 + self.classes + 2 * self.landmarks
        self._index = {label: i for i, label in enumerate(entry.labels)}
        height, width = entry.config.input.size
        self._input_box = Letterbox(scale=1.0, pad_x=0.0, pad_y=0.0, width=width, height=height)

    def check_parameters(self, given: Mapping[str, object]) -> DetectionParams:
        """Thresholds within [0, 1], `max_detections` within [1, the model's], `classes` by label."""
        defaults = self.defaults
        cap = defaults.max_detections
        return DetectionParams(
            score_threshold=number(given, "score_threshold", defaults.score_threshold, 0.0, 1.0),
            iou_threshold=number(given, "iou_threshold", defaults.iou_threshold, 0.0, 1.0),
            max_detections=integer(
                given, "max_detections", cap, 1, cap, why=f"the cap of model {self.entry.name!r}"
            ),
            classes=self._class_filter(given.get("classes")),
        )

    def _class_filter(self, value: object) -> np.ndarray | None:
        if value is None:
            return None
        if isinstance(value, str):
            names: Sequence[object] = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, list | tuple):
            names = value
        else:
            raise invalid(f"`classes` must be a list of class names; got {value!r}")
        if not names:
            raise invalid("`classes` is empty: name at least one class, or leave it out for all")
        indices = []
        for name in names:
            index = self._index.get(name) if isinstance(name, str) else None
            if index is None:
                shown = ", ".join(repr(label) for label in self.entry.labels[:_CLASSES_SHOWN])
                raise invalid(
                    f"`classes`: model {self.entry.name!r} has no class {name!r}; its classes include "
                    f"{shown}, ... ({len(self.entry.labels)} in all: GET /models/{self.entry.name} "
                    "lists them)"
                )
            indices.append(index)
        return np.unique(np.asarray(indices, dtype=np.int64))

    def preprocess(self, data: bytes) -> Prepared:
        """Decode, letterbox: float32 (3, H, W) in [0, 1], and where the photo lies in it."""
        _, tensor, _, photo = self.letterboxed(data)
        return Prepared(tensor, photo)

    def letterboxed(self, data: bytes) -> tuple[Image.Image, np.ndarray, Letterbox, Letterbox]:
        """Decode and letterbox: the decoded image (a large JPEG at a reduced scale), the input
        row, and where the image lies in it, against the decoded pixels and the photo's own."""
        image, original = self.preprocessor.decode_sized(data)
        spec = self.entry.config.input
        tensor, placement = letterbox(image, spec.size, spec.pad_value)
        return image, tensor, placement, in_photo_pixels(placement, image.size, original)

    def tensor_meta(self) -> object:
        """A client-preprocessed input: boxes stay in the input tensor's pixels."""
        return self._input_box

    def check_output(self, outputs: np.ndarray, batch: int) -> None:
        """(batch, anchors, 4 + classes + 2 x landmarks)."""
        if outputs.ndim != 3 or outputs.shape[0] != batch or outputs.shape[2] != self.columns:
            raise ValueError(f"expected ({batch}, anchors, {self.columns}) boxes, got {outputs.shape}")

    def postprocess(self, row: np.ndarray, meta: object, params: DetectionParams) -> Detections:
        """Thresholds, class-aware NMS, the best `max_detections`, boxes in the photo's pixels."""
        assert isinstance(meta, Letterbox)
        boxes, scores, classes, anchors = select_detections(
            row,
            score_threshold=params.score_threshold,
            iou_threshold=params.iou_threshold,
            max_detections=params.max_detections,
            class_filter=params.classes,
            classes=self.classes,
        )
        boxes = meta.to_original(boxes)
        points: list[tuple[Point, ...]] = [()] * len(boxes)
        if self.landmarks:
            start = 4 + self.classes
            marks = meta.points_to_original(row[anchors, start:].reshape(len(anchors), self.landmarks, 2))
            points = [tuple((round(float(x), 2), round(float(y), 2)) for x, y in face) for face in marks]
        labels = self.entry.labels
        found = [
            Detection(
                label=labels[int(index)],
                index=int(index),
                score=float(score),
                box=Box(*(round(float(v), 2) for v in box)),
                landmarks=marks_of,
            )
            for box, score, index, marks_of in zip(boxes, scores, classes, points, strict=True)
        ]
        return Detections(found, meta.width, meta.height)

    def describe(self) -> dict[str, object]:
        """Task facts, with the postprocessing defaults (and the landmarks per box, if any)."""
        facts = super().describe() | {"detection": self.defaults.model_dump()}
        if self.landmarks:
            facts["landmarks"] = self.landmarks
        return facts
