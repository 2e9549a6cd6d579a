"""Faces and their expressions (seed 003): the typed result of a `face_expression` pipeline.

Seed 003 names the seven expressions and their order (`Expression`: neutral, anger, disgust, fear,
happiness, sadness, surprise); the HTTP JSON, the own gRPC API, the seed's own `Pipeline` service
and the Open Inference Protocol's `expressions` output all use that order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from visionserve.repository import FACE_EXPRESSIONS, PipelineEntry
from visionserve.tasks.base import PARAMETERS_BY_TASK, given_parameters, integer, number
from visionserve.tasks.detection import Box, Point

EXPRESSIONS = FACE_EXPRESSIONS
"""Seed 003's `Expression` fields, in its order."""


@dataclass(frozen=True)
class FaceParams:
    """Per-request: the detector's score threshold, the smallest face kept (pixels, the box's
    shorter side), the most faces answered."""

    score_threshold: float
    min_face_size: float
    max_faces: int


@dataclass(frozen=True)
class Face:
    """One face: its box and score from the detector, its five landmarks (eyes, nose tip, mouth
    corners; photo pixels), its expression probabilities by seed 003's names, and the top one."""

    box: Box
    score: float
    landmarks: tuple[Point, ...]
    expression: dict[str, float]
    top: str


@dataclass(frozen=True)
class Faces:
    """One image's faces, highest detector score first, and the photo's size."""

    faces: list[Face]
    width: int
    height: int


class FaceExpressionTask:
    """The request parameters and facts of a face_expression pipeline (its stages do the rest: the
    detector's task decodes and letterboxes, the classifier's normalises the crops)."""

    name = "face_expression"

    def __init__(self, entry: PipelineEntry, *, max_image_pixels: int):
        self.entry = entry
        self.defaults = entry.config.faces
        self.max_image_pixels = max_image_pixels

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The request parameters this task takes."""
        return PARAMETERS_BY_TASK[self.name]

    def parameters(self, raw: Mapping[str, object]) -> FaceParams:
        """A request's parameters (None: not given) -> checked, or a 400 naming what is wrong."""
        given = given_parameters(raw, self.name, self.entry.name)
        defaults = self.defaults
        # NOTE: the longest side an accepted image can have; a face larger than that cannot exist
        largest = float(self.max_image_pixels)
        cap = defaults.max_faces
        return FaceParams(
            score_threshold=number(given, "score_threshold", defaults.score_threshold, 0.0, 1.0),
            min_face_size=number(given, "min_face_size", defaults.min_face_size, 0.0, largest),
            max_faces=integer(given, "max_faces", cap, 1, cap, why=f"the cap of model {self.entry.name!r}"),
        )

    def describe(self) -> dict[str, object]:
        """Task facts for GET /models."""
        config = self.entry.config
        return {
            "task": self.name,
            "stages": config.stages.model_dump(),
            "faces": self.defaults.model_dump(),
            "labels_count": len(EXPRESSIONS),
            "parameters": list(self.parameter_names),
        }
