"""Image classification: centre crop -> scores per class -> the top-k classes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from visionserve.postprocessing import ClassScore, postprocess
from visionserve.repository import ModelEntry
from visionserve.tasks.base import Prepared, Task, integer


@dataclass(frozen=True)
class ClassificationParams:
    """How many classes to answer."""

    topk: int


@dataclass(frozen=True)
class Classification:
    """One image's classes, most probable first, and the model's own scores (for protocols that
    answer tensors)."""

    predictions: list[ClassScore]
    scores: np.ndarray


class ClassificationTask(Task[ClassificationParams, Classification]):
    """Centre crop and normalise; softmax (for a model that outputs logits) and top-k."""

    name = "classification"

    def __init__(self, entry: ModelEntry, *, max_image_pixels: int, default_topk: int = 5):
        super().__init__(entry, max_image_pixels=max_image_pixels)
        self.classes = entry.config.output.classes
        # NOTE: a model with fewer classes than the server's default answers all of them
        self.default_topk = min(default_topk, self.classes)

    def check_parameters(self, given: Mapping[str, object]) -> ClassificationParams:
        """`topk` between 1 and the model's classes (default: the server's, VISION_DEFAULT_TOPK)."""
        why = f"the classes of model {self.entry.name!r}"
        return ClassificationParams(integer(given, "topk", self.default_topk, 1, self.classes, why=why))

    def preprocess(self, data: bytes) -> Prepared:
        """Decode, shorter side to `resize`, centre crop, normalise: float32 (3, H, W)."""
        return Prepared(self.preprocessor(data))

    def check_output(self, outputs: np.ndarray, batch: int) -> None:
        """One row of `classes` scores per image."""
        if outputs.ndim != 2 or outputs.shape != (batch, self.classes):
            raise ValueError(f"expected ({batch}, {self.classes}) scores, got {outputs.shape}")

    def postprocess(self, row: np.ndarray, meta: object, params: ClassificationParams) -> Classification:
        """Scores -> probabilities -> the top `topk` classes."""
        kind = self.entry.config.output.kind
        (predictions,) = postprocess(row[np.newaxis], params.topk, self.entry.labels, kind=kind)
        return Classification(predictions, row)
