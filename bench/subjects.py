"""The models a run measures, each with what its rows need: its task's steps and request
parameters, the images it is sent, and (where this machine has it) what its in-process rows run.

A classifier is sent the packaged photos as 600 px JPEGs, a detector the frames of the clip
(`clip`), a face_expression pipeline the photos and a group image of 8 faces (`face_images`),
unless `--images` or `--image` says otherwise; its in-process limit, stages, closed-loop rows and
streams all use the same images, so that served and in-process figures compare.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from bench.clip import make_clip
from bench.face_images import face_photos
from bench.images import BenchImage, default_images
from bench.layouts import Layout
from bench.steps import TaskSteps, request_parameters
from visionserve.errors import VisionError
from visionserve.repository import ModelEntry, PipelineEntry
from visionserve.settings import ModelSettings, ServerSettings

PIPELINE_TASK = "face_expression"
"""The task of a pipeline model (its config.json names stages, not artefacts)."""


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
class InProcessPipeline:
    """What the in-process rows of a pipeline need (`pipeline_rows`): its entry, the settings the
    served processes build their registry with, the concurrency levels of its in-process limit
    (empty: none) and of its faces/s rows, the detector's maximum batch, and the images with one
    face and with many."""

    entry: PipelineEntry
    settings: ModelSettings
    server: ServerSettings
    levels: tuple[int, ...]
    face_levels: tuple[int, ...]
    max_batch: int
    one_face: BenchImage
    many_faces: BenchImage

    @property
    def detector(self) -> str:
        """The detector stage's name: the pipeline's images go through its batcher."""
        return self.entry.config.stages.detector


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
    pipeline: InProcessPipeline | None = None
    """A pipeline's in-process rows (None: not a pipeline, or not measured here)."""
    many_faces: BenchImage | None = None
    """A pipeline's group image: also sent alone, at the run's highest concurrency (faces/s)."""
    metrics_model: str = ""
    """Whose samples of the servers' /metrics a row of this model reads (empty: its own); a
    pipeline's are its detector's, the batcher its images go through."""

    @classmethod
    def of(
        cls,
        name: str,
        task: str,
        images: list[BenchImage],
        in_process: InProcess | None,
        pipeline: InProcessPipeline | None = None,
    ) -> BenchModel:
        """A model of the run, with the requests' parameters of its task (a pipeline: its
        in-process rows, group image and detector's metrics)."""
        if pipeline is None:
            return cls(name, task, images, in_process, request_parameters(task))
        return cls(
            name,
            task,
            images,
            None,
            request_parameters(task),
            pipeline=pipeline,
            many_faces=pipeline.many_faces,
            metrics_model=pipeline.detector,
        )

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
        """`file`, `photos`, `clip` or `faces` (the photos and the group image): what a model of
        `task` is sent."""
        if self.image is not None:
            return "file"
        if self.choice != "auto":
            return self.choice
        return {"detection": "clip", PIPELINE_TASK: "faces"}.get(task, "photos")

    def for_task(self, task: str) -> list[BenchImage]:
        """The images a model of `task` is sent."""
        kind = self.kind(task)
        if kind == "file":
            assert self.image is not None
            return [self.image]
        if kind not in self._made:
            makers = {"clip": make_clip, "faces": face_photos}
            self._made[kind] = makers.get(kind, default_images)()
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
