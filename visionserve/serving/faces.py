"""`FaceExpressionModel`: a two-stage pipeline served as one model (seed 003).

bytes -> decode + letterbox (shared pool) -> the face detector's batcher -> boxes and landmarks ->
a square crop around each face (shared pool) -> the expression classifier's batcher, every crop
its own item -> the seven expression probabilities per face.

The stages are models of the same registry, with their own batchers: the crops of every face of
every concurrent request meet in the classifier's batcher, so a group photo, a frame with several
faces or many clients at once become one batch. Triton needs an ensemble or a BLS model for this.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from visionserve.errors import ConfigurationError, ErrorCode, VisionError
from visionserve.payloads import decode_base64
from visionserve.postprocessing import softmax
from visionserve.repository import PipelineEntry
from visionserve.serving.admission import Admission
from visionserve.serving.lifecycle import Lifecycle, ServiceState
from visionserve.serving.model import ServedModel, warmup_image
from visionserve.serving.pipeline import InferenceResult, submit_each, with_item_name
from visionserve.tasks.boxes import Letterbox
from visionserve.tasks.classification import ClassificationTask
from visionserve.tasks.detection import Box, Detection, DetectionParams, DetectionTask
from visionserve.tasks.faces import EXPRESSIONS, Face, FaceExpressionTask, FaceParams, Faces

logger = logging.getLogger(__name__)

_RESAMPLE = Image.Resampling.BILINEAR


@dataclass(frozen=True)
class _Decoded:
    """A decoded photo on its way through the pipeline: the decoded image (for the crops), the
    detector's input row, and where the image lies in it, in decoded and in photo pixels."""

    image: Image.Image
    tensor: np.ndarray
    placement: Letterbox
    photo: Letterbox
    """The same placement against the photo's own pixels (what the answer's boxes are in)."""

    @property
    def scale(self) -> float:
        """Photo pixels per decoded pixel (1 unless a large JPEG was decoded at a reduced scale)."""
        return self.photo.width / max(self.image.width, 1)


class FaceExpressionModel:
    """Serves a face_expression pipeline over two models of the registry. Coroutines run on one
    event loop. It has the front doors' view of a `ServedModel` (`predict`, `infer_images`,
    `parameters`, `check_admission`, readiness, `describe`) and no runtime of its own."""

    def __init__(
        self,
        entry: PipelineEntry,
        *,
        detector: ServedModel,
        classifier: ServedModel,
        preprocess_pool: Executor,
        max_image_pixels: int,
    ):
        self.entry = entry
        self.name = entry.name
        self.detector = detector
        self.classifier = classifier
        self.task = FaceExpressionTask(entry, max_image_pixels=max_image_pixels)
        self.lifecycle = Lifecycle(self.name)
        self.metrics = detector.metrics
        self._pool = preprocess_pool
        self._detector_task = self._check_detector(detector)
        self._classifier_task, self._order = self._check_classifier(classifier)
        self._detector_defaults = self._detector_task.defaults

    def _check_detector(self, model: ServedModel) -> DetectionTask:
        task = model.task
        if not isinstance(task, DetectionTask) or task.landmarks < 2:
            raise ConfigurationError(
                f"pipeline {self.name!r}: stage detector {model.name!r} must be a detection model with "
                "landmarks (e.g. retinaface_mnet025)"
            )
        return task

    def _check_classifier(self, model: ServedModel) -> tuple[ClassificationTask, np.ndarray]:
        task = model.task
        labels = model.entry.labels
        if not isinstance(task, ClassificationTask) or sorted(labels) != sorted(EXPRESSIONS):
            raise ConfigurationError(
                f"pipeline {self.name!r}: stage classifier {model.name!r} must be a classification model "
                f"over the seven expressions {', '.join(EXPRESSIONS)} (its labels: {', '.join(labels[:8])})"
            )
        # the classifier's columns in seed 003's order
        return task, np.asarray([labels.index(name) for name in EXPRESSIONS], dtype=np.intp)

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def state(self) -> ServiceState:
        """Where this pipeline is in its life."""
        return self.lifecycle.state

    @property
    def ready(self) -> bool:
        """Warmed up and both stages ready, until shutdown begins."""
        return self.lifecycle.ready and self.detector.ready and self.classifier.ready

    @property
    def admission(self) -> Admission:
        """Images enter through the detector: its queue is the pipeline's."""
        return self.detector.admission

    @property
    def stages(self) -> tuple[ServedModel, ServedModel]:
        """The models this pipeline runs."""
        return (self.detector, self.classifier)

    async def start(self) -> None:
        """Once both stages are loaded: one photo through the whole pipeline (the crop path's
        one-off costs), then ready."""
        self.lifecycle.loading()
        started = time.perf_counter()
        try:
            for stage in self.stages:
                stage.check_ready()
            await self._faces(warmup_image(), self.task.parameters({}), "image", None)
        except BaseException as exc:
            self.lifecycle.failed(exc)
            raise
        if self.lifecycle.loaded():
            logger.info(
                "model %s (%s: %s -> %s) ready in %.1f s",
                self.name,
                self.task.name,
                self.detector.name,
                self.classifier.name,
                time.perf_counter() - started,
            )

    async def stop(self) -> None:
        """Stop taking requests (the stages stop on their own, after every pipeline)."""
        self.lifecycle.refuse_new_requests()
        self.lifecycle.stopped()

    def check_ready(self) -> None:
        """Raise NOT_READY unless this pipeline and both its stages take requests."""
        self.lifecycle.check_ready()
        for stage in self.stages:
            stage.check_ready()

    def check_admission(self) -> None:
        """Raise what a request would meet before any work (not ready, no room)."""
        self.check_ready()
        self.detector.admission.check()
        self.classifier.admission.check()

    def parameters(self, raw: Mapping[str, object]) -> FaceParams:
        """The request's parameters, checked (a 400 names what is wrong)."""
        return self.task.parameters(raw)

    def describe(self) -> dict[str, object]:
        """Facts for GET /models: the task's, and the detector's input, queue and device (the
        pipeline's own runtime is its stages')."""
        detector = self.detector.describe()
        keys = ("input_size", "max_batch_size", "max_queue_delay_us", "max_queue_size", "device")
        return (
            self.task.describe()
            | {key: detector[key] for key in keys}
            | {
                "name": self.name,
                "version": self.entry.config.version,
                "runtime": "pipeline",
                "instances": 0,
                "threads": 0,
                "ready": self.ready,
                "state": self.state.value,
            }
        )

    # --- inference --------------------------------------------------------------------------------

    async def predict(
        self,
        image: bytes | str,
        raw_params: Mapping[str, object] | None = None,
        *,
        field: str = "image",
        deadline: float | None = None,
    ) -> InferenceResult:
        """One encoded image -> its faces: parameters checked, then readiness, then both stages."""
        params = self.parameters(raw_params or {})
        self.check_ready()
        started = time.perf_counter()
        output, preprocess_s = await self._faces(image, params, field, deadline)
        total_ms = (time.perf_counter() - started) * 1e3
        return InferenceResult(
            model=self.name,
            task=self.task.name,
            output=output,
            preprocess_ms=preprocess_s * 1e3,
            inference_ms=total_ms - preprocess_s * 1e3,
            total_ms=total_ms,
        )

    async def infer_images(
        self,
        images: Sequence[bytes | str],
        params: object,
        *,
        field: str = "image",
        deadline: float | None = None,
    ) -> list[object]:
        """N encoded images -> N `Faces` (checked `params`); a bad one fails the call, naming
        `field[i]`. The images run through the stages together."""
        assert isinstance(params, FaceParams)
        self.check_ready()
        self.admission.check_count(len(images))
        self.admission.check_room(len(images))
        outcomes = await asyncio.gather(
            *(self._faces(image, params, f"{field}[{i}]", deadline) for i, image in enumerate(images)),
            return_exceptions=True,
        )
        results: list[object] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            results.append(outcome[0])
        return results

    async def infer_tensor(
        self, batch: np.ndarray, params: object, *, deadline: float | None = None
    ) -> list[object]:
        """A pipeline crops faces out of the photo itself: it takes encoded images only."""
        raise VisionError(
            ErrorCode.INVALID_ARGUMENT,
            f"model {self.name!r} is a pipeline that crops faces out of the photo: send the encoded "
            "image (the BYTES input `image`), not a preprocessed tensor",
        )

    async def _faces(
        self, image: bytes | str, params: FaceParams, field: str, deadline: float | None
    ) -> tuple[Faces, float]:
        """Both stages for one image: its faces, and the seconds spent decoding it."""
        loop = asyncio.get_running_loop()
        admission = self.detector.admission
        admission.check_room()
        started = time.perf_counter()
        with admission.preparing_items():
            decoded = await loop.run_in_executor(self._pool, self._decode, image, field)
        decoded_s = time.perf_counter() - started
        row = await self.detector.batcher.submit(decoded.tensor, deadline=deadline)
        found, crops = await loop.run_in_executor(self._pool, self._crops, decoded, row, params)
        if not found:
            return Faces([], decoded.photo.width, decoded.photo.height), decoded_s
        self.classifier.admission.check_room(len(crops))
        probabilities = await self._classify(crops, deadline)
        faces = [
            _face(detection, decoded, scores[self._order])
            for detection, scores in zip(found, probabilities, strict=True)
        ]
        return Faces(faces, decoded.photo.width, decoded.photo.height), decoded_s

    async def _classify(self, crops: list[np.ndarray], deadline: float | None) -> list[np.ndarray]:
        """Every crop its own item in the classifier's batcher; probabilities per crop. If one
        fails (queue full, deadline), the others are dropped uncomputed."""
        rows = await submit_each(self.classifier.batcher, crops, deadline)
        kind = self.classifier.entry.config.output.kind
        return [softmax(row[np.newaxis])[0] if kind == "logits" else np.asarray(row) for row in rows]

    # --- steps on the shared pool -----------------------------------------------------------------

    def _decode(self, image: bytes | str, field: str) -> _Decoded:
        data = decode_base64(image, field=field) if isinstance(image, str) else image
        try:
            return _Decoded(*self._detector_task.letterboxed(data))
        except VisionError as exc:
            if field == "image":
                raise
            named = with_item_name(field, exc)
            if named is exc:
                raise
            raise named from None

    def _crops(
        self, decoded: _Decoded, row: np.ndarray, params: FaceParams
    ) -> tuple[list[Detection], list[np.ndarray]]:
        """The detector's output -> the faces kept (decoded pixels) and a crop of each, ready for
        the classifier: square around the face, grown by the margin, clipped to the photo."""
        defaults = self._detector_defaults
        detector_params = DetectionParams(
            score_threshold=params.score_threshold,
            iou_threshold=defaults.iou_threshold,
            max_detections=defaults.max_detections,
            classes=None,
        )
        found = self._detector_task.postprocess(row, decoded.placement, detector_params).detections
        # min_face_size is in the photo's pixels; the boxes here are in decoded pixels
        minimum = params.min_face_size / decoded.scale
        kept = [d for d in found if min(d.box.x2 - d.box.x1, d.box.y2 - d.box.y1) >= minimum]
        kept = kept[: params.max_faces]
        margin = self.entry.config.faces.margin
        size = self._classifier_task.entry.config.input.size
        preprocessor = self._classifier_task.preprocessor
        crops = [preprocessor.normalize(crop_face(decoded.image, d.box, margin, size)) for d in kept]
        return kept, crops


def crop_face(image: Image.Image, box: Box, margin: float, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3): the square around `box` grown by `margin` (of its longer side), clipped to
    the photo, resized to `size` (height, width) in one resampling pass."""
    side = max(box.x2 - box.x1, box.y2 - box.y1, 1.0) * (1.0 + margin)
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    width, height = image.size
    left, top = max(0.0, cx - side / 2), max(0.0, cy - side / 2)
    right, bottom = min(float(width), cx + side / 2), min(float(height), cy + side / 2)
    if right - left < 1 or bottom - top < 1:  # a degenerate box on the photo's edge
        left, top = min(left, width - 1.0), min(top, height - 1.0)
        right, bottom = left + 1.0, top + 1.0
    crop = image.resize((size[1], size[0]), _RESAMPLE, box=(left, top, right, bottom))
    return np.asarray(crop)


def _face(detection: Detection, decoded: _Decoded, probabilities: np.ndarray) -> Face:
    """A detection in decoded pixels and its expression -> a `Face` in the photo's pixels."""
    scale = decoded.scale
    box = detection.box
    expression = {name: round(float(p), 6) for name, p in zip(EXPRESSIONS, probabilities, strict=True)}
    return Face(
        box=Box(*(round(v * scale, 2) for v in (box.x1, box.y1, box.x2, box.y2))),
        score=detection.score,
        landmarks=tuple((round(x * scale, 2), round(y * scale, 2)) for x, y in detection.landmarks),
        expression=expression,
        top=EXPRESSIONS[int(np.argmax(probabilities))],
    )
