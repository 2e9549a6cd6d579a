"""The classifier stage of a face_expression pipeline, per face: with one face in the image and
with many (`face_images.group_image`), measured in-process two ways.

The stage is crop + classify: from the detector's answer to the faces' expressions (a square crop
of each face, normalised, through the classifier, probabilities per face).

- Through the registry (the figure the target is held to): the whole pipeline
  (`FaceExpressionModel.predict`) and the detector model alone (its `ServedModel.predict`, the
  same decode, letterbox, batcher and NMS) on the same image, one request at a time, taking turns;
  the stage is the median of the pairs' differences, so that it holds everything the second stage
  costs a request as the server runs it: the crops on the shared pool, the classifier's batcher
  (all of an image's faces as items of one batch when they fit), the hand-offs between threads.
- Directly: the crops of the faces the detector found (found once, untimed), normalised and
  stacked, then one `predict_batch` of the classifier's runtime (in chunks of its max batch) and
  the probabilities, in the calling thread: the stage's compute without the hand-offs.

Either way, per face = the stage's time / the faces in the image. The classifier's mean batch
during the pipeline's requests (its batch-size metric) says whether the faces were batched.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry

from bench.images import BenchImage
from bench.layouts import use_threads
from visionserve.postprocessing import softmax
from visionserve.serving.faces import FaceExpressionModel, crop_face
from visionserve.tasks.boxes import letterbox
from visionserve.tasks.classification import ClassificationTask
from visionserve.tasks.detection import Box, DetectionParams, DetectionTask

METHOD_REGISTRY = (
    "pipeline − detector alone, same image, one request at a time, taking turns (median of the "
    "pairs' differences)"
)
METHOD_DIRECT = "crops + one predict_batch of every face + probabilities, in one thread (p50)"


def batch_counts(registry: CollectorRegistry, model: str) -> tuple[float, float]:
    """(`predict_batch` calls, images in them) of `model` so far, from a `Metrics` registry."""
    labels = {"model": model}
    calls = registry.get_sample_value("visionserve_batch_size_count", labels) or 0.0
    items = registry.get_sample_value("visionserve_batch_size_sum", labels) or 0.0
    return calls, items


class CropAndClassify:
    """The classifier stage of one image, timed directly: the faces the pipeline's detector finds
    in it (found once, with the pipeline's default parameters), then, per run, their crops and one
    batch through the classifier's runtime."""

    def __init__(self, pipeline: FaceExpressionModel, image: BenchImage):
        detector, classifier = pipeline.detector, pipeline.classifier
        if not isinstance(detector.task, DetectionTask) or not isinstance(
            classifier.task, ClassificationTask
        ):
            raise TypeError(f"{pipeline.name}: a face detector and a classifier are expected as stages")
        task = detector.task
        self.photo, _ = task.preprocessor.decode_sized(image.data)
        spec = task.entry.config.input
        tensor, placement = letterbox(self.photo, spec.size, spec.pad_value)
        use_threads(detector.runtime)
        row = detector.runtime.predict_batch(tensor[np.newaxis])[0]
        params = pipeline.parameters({})
        found = task.postprocess(
            row,
            placement,
            DetectionParams(
                score_threshold=params.score_threshold,
                iou_threshold=task.defaults.iou_threshold,
                max_detections=task.defaults.max_detections,
                classes=None,
            ),
        ).detections
        self.boxes: list[Box] = [d.box for d in found][: params.max_faces]
        self.runtime = classifier.runtime
        self.preprocessor = classifier.task.preprocessor
        self.size = classifier.entry.config.input.size
        self.logits = classifier.entry.config.output.kind == "logits"
        self.margin = pipeline.entry.config.faces.margin
        self.max_batch = classifier.batcher.max_batch_size

    @property
    def faces(self) -> int:
        """The faces found in the image."""
        return len(self.boxes)

    def run_once(self) -> float:
        """One pass of the stage over every face; its duration in seconds (0 without faces)."""
        if not self.boxes:
            return 0.0
        use_threads(self.runtime)
        started = time.perf_counter()
        crops = [
            self.preprocessor.normalize(crop_face(self.photo, box, self.margin, self.size))
            for box in self.boxes
        ]
        for start in range(0, len(crops), self.max_batch):
            rows = self.runtime.predict_batch(np.stack(crops[start : start + self.max_batch]))
            if self.logits:
                softmax(rows)
        return time.perf_counter() - started


@dataclass
class StageSamples:
    """One image's samples, gathered over the rounds."""

    image: str
    faces: int
    pipeline_s: list[float] = field(default_factory=list)
    detector_s: list[float] = field(default_factory=list)
    direct_s: list[float] = field(default_factory=list)
    classifier_batches: float = 0.0
    classifier_items: float = 0.0


@dataclass(frozen=True)
class StageCost:
    """The classifier stage of one image of one runtime and pipeline: the samples of both
    methods (seconds) and the classifier's batches during the pipeline's requests."""

    runtime: str
    model: str
    image: str
    faces: int
    pipeline_s: tuple[float, ...]
    detector_s: tuple[float, ...]
    direct_s: tuple[float, ...]
    classifier_batches: int
    classifier_items: int

    @classmethod
    def of(cls, runtime: str, model: str, samples: StageSamples) -> StageCost:
        """The figures of `samples`."""
        return cls(
            runtime=runtime,
            model=model,
            image=samples.image,
            faces=samples.faces,
            pipeline_s=tuple(samples.pipeline_s),
            detector_s=tuple(samples.detector_s),
            direct_s=tuple(samples.direct_s),
            classifier_batches=round(samples.classifier_batches),
            classifier_items=round(samples.classifier_items),
        )

    @property
    def registry_ms(self) -> float | None:
        """The stage through the registry: the median of (pipeline - detector) over the pairs."""
        pairs = [p - d for p, d in zip(self.pipeline_s, self.detector_s, strict=False)]
        return statistics.median(pairs) * 1e3 if pairs else None

    @property
    def direct_ms(self) -> float | None:
        """The stage timed directly: its p50."""
        return statistics.median(self.direct_s) * 1e3 if self.direct_s else None

    def per_face(self, total_ms: float | None) -> float | None:
        """`total_ms` over the image's faces (None without faces)."""
        return None if total_ms is None or self.faces < 1 else total_ms / self.faces

    @property
    def classifier_mean_batch(self) -> float | None:
        """Faces per classifier `predict_batch` call during the pipeline's requests."""
        return self.classifier_items / self.classifier_batches if self.classifier_batches else None

    def to_dict(self) -> dict[str, object]:
        """Plain data for JSON (milliseconds)."""

        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        def p50(values: tuple[float, ...]) -> float | None:
            return statistics.median(values) * 1e3 if values else None

        return {
            "runtime": self.runtime,
            "model": self.model,
            "image": self.image,
            "faces": self.faces,
            "pairs": min(len(self.pipeline_s), len(self.detector_s)),
            "pipeline_p50_ms": rounded(p50(self.pipeline_s)),
            "detector_p50_ms": rounded(p50(self.detector_s)),
            "stage_ms_through_registry": rounded(self.registry_ms),
            "per_face_ms_through_registry": rounded(self.per_face(self.registry_ms)),
            "direct_passes": len(self.direct_s),
            "stage_ms_direct": rounded(self.direct_ms),
            "per_face_ms_direct": rounded(self.per_face(self.direct_ms)),
            "classifier_batches": self.classifier_batches,
            "classifier_mean_batch": rounded(self.classifier_mean_batch),
            "method_through_registry": METHOD_REGISTRY,
            "method_direct": METHOD_DIRECT,
        }
