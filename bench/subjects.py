"""The models a run measures, each with what its rows need: its task's steps and request
parameters, the images it is sent, and (where this machine has it) what its in-process rows run.

A classifier is sent the packaged photos as 600 px JPEGs, a detector the frames of the clip
(`clip`), unless `--images` or `--image` says otherwise; its in-process limit, stages, closed-loop
rows and streams all use the same images, so that served and in-process figures compare.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from bench.clip import make_clip
from bench.images import BenchImage, default_images
from bench.layouts import Layout
from bench.steps import TaskSteps, request_parameters
from visionserve.errors import VisionError
from visionserve.repository import ModelEntry
from visionserve.settings import ModelSettings


def runtime_label(settings: ModelSettings) -> str:
    """`onnx`, `torch compiled` or `torch eager`."""
    if settings.backend == "torch":
        return "torch compiled" if settings.torch_compile else "torch eager"
    return settings.backend


@dataclass(frozen=True)
class InProcess:
    """What the in-process rows of a runtime need: the local model entry and its task's steps,
    the runtime's settings (torch: eager as well as compiled, unless `torch_eager` is off), the
    layouts of the in-process limit (empty: none) and its maximum batch size."""

    entry: ModelEntry
    steps: TaskSteps
    settings: ModelSettings
    layouts: tuple[Layout, ...]
    max_batch: int
    torch_eager: bool = True

    def variants(self) -> list[ModelSettings]:
        """The runtime settings whose stages are timed: the settings, and torch eager beside
        torch compiled."""
        found = [self.settings]
        if self.settings.backend == "torch" and self.settings.torch_compile and self.torch_eager:
            found.append(self.settings.model_copy(update={"torch_compile": False}))
        return found


@dataclass(frozen=True)
class BenchModel:
    """One model of the run: its name and task, what every request for it carries, the images it
    is sent, and its in-process rows (None: not measured here)."""

    name: str
    task: str
    images: list[BenchImage]
    in_process: InProcess | None = None
    params: Mapping[str, object] = field(default_factory=dict)
    """The task parameters every request carries (`steps.request_parameters`)."""

    @classmethod
    def of(cls, name: str, task: str, images: list[BenchImage], in_process: InProcess | None) -> BenchModel:
        """A model of the run, with the requests' parameters of its task."""
        return cls(name, task, images, in_process, request_parameters(task))

    @property
    def datas(self) -> list[bytes]:
        """The images' encoded bytes, in order."""
        return [image.data for image in self.images]


class ImageSets:
    """The run's image sets, each made once, on first use: the photos and the clip."""

    def __init__(self, choice: str, image: BenchImage | None = None):
        self.choice = choice
        self.image = image
        self._made: dict[str, list[BenchImage]] = {}

    def kind(self, task: str) -> str:
        """`file`, `photos` or `clip`: what a model of `task` is sent."""
        if self.image is not None:
            return "file"
        if self.choice != "auto":
            return self.choice
        return "clip" if task == "detection" else "photos"

    def for_task(self, task: str) -> list[BenchImage]:
        """The images a model of `task` is sent."""
        kind = self.kind(task)
        if kind == "file":
            assert self.image is not None
            return [self.image]
        if kind not in self._made:
            self._made[kind] = make_clip() if kind == "clip" else default_images()
        return self._made[kind]


def check_images(images: list[BenchImage], steps: TaskSteps) -> TaskSteps:
    """ValueError naming the first image the model's preprocessing refuses; the steps, checked
    on the first image (`TaskSteps.checked`)."""
    checked = steps
    for number, image in enumerate(images):
        try:
            if number == 0:
                checked = steps.checked(image.data)
            else:
                steps.prepare(image.data)
        except VisionError as exc:
            raise ValueError(f"{image.name} cannot be benchmarked: {exc.message}") from exc
    return checked
