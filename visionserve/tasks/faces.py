"""Faces and their expressions (seed 003): the typed result of a `face_expression` pipeline.

Seed 003 names the seven expressions and their order (`Expression`: neutral, anger, disgust, fear,
happiness, sadness, surprise); the HTTP JSON, the own gRPC API, the seed's own `Pipeline` service
and the Open Inference Protocol's `expressions` output all use that order.
"""

from __future__ import annotations

from dataclasses import dataclass

from visionserve.tasks.detection import Box, Point

EXPRESSIONS = ("neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise")
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
