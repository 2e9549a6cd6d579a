"""`Task`: what a kind of model adds around "arrays in, arrays out".

A task owns a model's input spec and preprocessing (bytes -> one input tensor, plus what
postprocessing needs to know about the photo), the request parameters it accepts, the check of
the runtime's output, and the postprocessing into a typed result. Runtimes, the batcher and the
protocol layers are the same for every task; protocol encoders dispatch on the result's type.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import numpy as np

from visionserve.errors import ErrorCode, VisionError
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import ModelEntry

ParamsT = TypeVar("ParamsT")
OutputT = TypeVar("OutputT")

PARAMETERS_BY_TASK: dict[str, tuple[str, ...]] = {
    "classification": ("topk",),
    "detection": ("score_threshold", "iou_threshold", "max_detections", "classes"),
    "face_expression": ("score_threshold", "min_face_size", "max_faces"),
}
"""The request parameters of each task, as every protocol names them."""
ALL_PARAMETERS = tuple(dict.fromkeys(name for names in PARAMETERS_BY_TASK.values() for name in names))


def invalid(message: str) -> VisionError:
    """A 400 / INVALID_ARGUMENT with `message`."""
    return VisionError(ErrorCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class Prepared:
    """One decoded, preprocessed image: the model's input row and what postprocessing needs to
    know about the photo (None for a task that needs nothing)."""

    tensor: np.ndarray
    meta: object = None


class Task(abc.ABC, Generic[ParamsT, OutputT]):
    """The task-specific steps of one served model. Thread-safe: `preprocess` and `postprocess`
    run on worker threads and hold only read-only state."""

    name: ClassVar[str]
    postprocess_off_loop: ClassVar[bool] = False
    """True when postprocessing costs enough to run in a worker thread rather than on the loop."""

    def __init__(self, entry: ModelEntry, *, max_image_pixels: int):
        self.entry = entry
        self.preprocessor = ImagePreprocessor(entry.config.input, max_image_pixels=max_image_pixels)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The request parameters this task takes."""
        return PARAMETERS_BY_TASK[self.name]

    def parameters(self, raw: Mapping[str, object]) -> ParamsT:
        """A request's parameters (None values: not given) -> checked parameters, or a 400 that
        names the parameter, the task and what is accepted."""
        return self.check_parameters(given_parameters(raw, self.name, self.entry.name))

    @abc.abstractmethod
    def check_parameters(self, given: Mapping[str, object]) -> ParamsT:
        """The parameters given (all of them this task's) -> checked, with the defaults."""

    @abc.abstractmethod
    def preprocess(self, data: bytes) -> Prepared:
        """Encoded image bytes -> the model's input row (and the photo's facts)."""

    def tensor_meta(self) -> object:
        """The `meta` of a row the client preprocessed itself (V2 FP32 input)."""
        return None

    @abc.abstractmethod
    def check_output(self, outputs: np.ndarray, batch: int) -> None:
        """Raise if the runtime's output for a batch of `batch` is not what this task expects."""

    @abc.abstractmethod
    def postprocess(self, row: np.ndarray, meta: object, params: ParamsT) -> OutputT:
        """One image's output row -> the task's typed result."""

    def describe(self) -> dict[str, object]:
        """Task facts for GET /models."""
        config = self.entry.config
        return {
            "task": self.name,
            "input_size": config.input.size,
            "labels_count": len(self.entry.labels),
            "parameters": list(self.parameter_names),
        }


def given_parameters(raw: Mapping[str, object], task: str, model: str) -> dict[str, object]:
    """The parameters a request gives (None values: not given), all of them `task`'s, or a 400
    that names the parameter, the model, its task and what the task takes."""
    names = PARAMETERS_BY_TASK[task]
    given = {key: value for key, value in raw.items() if value is not None}
    for key in given:
        if key not in names:
            raise invalid(
                f"parameter `{key}` does not apply to model {model!r}, a {task} model; it takes: "
                f"{', '.join(names)}"
            )
    return given


def number(given: Mapping[str, object], key: str, default: float, low: float, high: float) -> float:
    """A numeric parameter within [low, high], or its default; a 400 otherwise."""
    value = given.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"`{key}` must be a number between {low:g} and {high:g}; got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise invalid(f"`{key}` must be between {low:g} and {high:g}; got {value!r}")
    return float(value)


def integer(given: Mapping[str, object], key: str, default: int, low: int, high: int, *, why: str) -> int:
    """An integer parameter within [low, high] (`why` says where the bounds come from)."""
    value = given.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"`{key}` must be a whole number between {low} and {high}; got {value!r}")
    if not low <= value <= high:
        raise invalid(f"`{key}` must be between {low} and {high} ({why}); got {value}")
    return value
