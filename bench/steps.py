"""A model's steps around `predict_batch`, run in-process exactly as the server runs them: the
task's `preprocess` (decode + centre crop or letterbox) and `postprocess` (top-k or NMS) with the
parameters a request that names none gets, plus what every request the harness sends says.

The stage timer (`inprocess`) times decoding apart from the rest of preprocessing. The served
task does both in one call, so `TaskSteps` splits it for the tasks whose two halves it knows
(classification: `ImagePreprocessor.preprocess`; detection: `boxes.letterbox`), and checks once,
on a real image, that the halves give exactly what the task's own `preprocess` gives; where they
do not (or for another task), decoding is timed together with preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from visionserve.repository import ModelEntry
from visionserve.tasks import Prepared, Task, create_task
from visionserve.tasks.boxes import letterbox
from visionserve.tasks.classification import ClassificationTask
from visionserve.tasks.detection import DetectionTask

TOPK = 5
"""Classes a classification request asks for (the harness's every request, in-process too)."""

Decode = Callable[[bytes], Image.Image]
Shape = Callable[[Image.Image], Prepared]


def request_parameters(task: str) -> dict[str, object]:
    """The task parameters every request of the harness carries: `topk` for a classifier; none for
    a detector (the model's own thresholds and cap, as a client that sets none gets)."""
    return {"topk": TOPK} if task == "classification" else {}


def describe_steps(task: str) -> str:
    """The in-process pipeline of a task, in words."""
    if task == "detection":
        return "decode + letterbox + predict_batch + NMS"
    if task == "classification":
        return "decode + crop + predict_batch + top-k"
    return "decode + preprocess + predict_batch + postprocess"


@dataclass(frozen=True)
class TaskSteps:
    """The steps of one model: `prepare` (bytes -> Prepared), `finish` (an output row -> the task's
    result), and `split` (decode, then the rest) where the two halves are known."""

    task: Task[object, object]
    params: object
    split: tuple[Decode, Shape] | None

    @classmethod
    def of(cls, entry: ModelEntry, *, max_image_pixels: int) -> TaskSteps:
        """The steps of `entry`'s task, built as the server builds them."""
        task = create_task(entry, max_image_pixels=max_image_pixels, default_topk=TOPK)
        params = task.parameters(request_parameters(task.name))
        return cls(task=task, params=params, split=_halves(task))

    @property
    def name(self) -> str:
        """The task's name (`classification`, `detection`)."""
        return self.task.name

    def prepare(self, data: bytes) -> Prepared:
        """Decode and preprocess, as the served task does."""
        return self.task.preprocess(data)

    def finish(self, row: np.ndarray, meta: object) -> object:
        """Postprocess one output row with the requests' parameters."""
        return self.task.postprocess(row, meta, self.params)

    def checked(self, data: bytes) -> TaskSteps:
        """These steps, without the split if its halves do not give what `prepare` gives on `data`
        (raises what `prepare` raises on a bad image)."""
        whole = self.prepare(data)
        if self.split is None:
            return self
        decode, shape = self.split
        halves = shape(decode(data))
        same = whole.tensor.shape == halves.tensor.shape and np.array_equal(whole.tensor, halves.tensor)
        return self if same and whole.meta == halves.meta else TaskSteps(self.task, self.params, None)


def _halves(task: Task[object, object]) -> tuple[Decode, Shape] | None:
    preprocessor = task.preprocessor
    if isinstance(task, ClassificationTask):
        return preprocessor.decode, lambda image: Prepared(preprocessor.preprocess(image))
    if isinstance(task, DetectionTask):
        spec = task.entry.config.input

        def shape(image: Image.Image) -> Prepared:
            tensor, placement = letterbox(image, spec.size, spec.pad_value)
            return Prepared(tensor, placement)

        return preprocessor.decode, shape
    return None


def parameters_text(params: Mapping[str, object]) -> str:
    """`topk=5`, or `the model's defaults` when a request sets none."""
    return ", ".join(f"{key}={value}" for key, value in params.items()) or "the model's defaults"
