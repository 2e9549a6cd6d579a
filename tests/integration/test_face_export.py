"""The face models exported as they are served: `python -m export --model face_expression` into an
empty repository exports RetinaFace and Mini-Xception first, verified, then the pipeline config;
served through ONNX Runtime, they find the face where it is on real photos and read its smile."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from export.cli import main as export_main
from visionserve.photos import packaged_photo
from visionserve.repository import ModelEntry, ModelRepository
from visionserve.runtimes.onnx import OnnxRuntime
from visionserve.tasks import create_task
from visionserve.tasks.classification import Classification
from visionserve.tasks.detection import Detection, Detections
from visionserve.tasks.faces import EXPRESSIONS

pytestmark = pytest.mark.real_model

ASTRONAUT_FACE = (180, 68, 266, 186)
"""Hand-measured on astronaut.png (x1, y1, x2, y2): cheek to cheek, hairline to chin."""
NO_FACE = ("coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg")
MARGIN = 0.2


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faces") / "repo"
    assert export_main(["--model", "face_expression", "--repository", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def detector(repository: Path) -> Iterator[tuple[ModelEntry, OnnxRuntime]]:
    entry = ModelRepository(repository).get("retinaface_mnet025")
    runtime = OnnxRuntime(entry, threads=2)
    runtime.load()
    yield entry, runtime
    runtime.close()


def _faces(detector: tuple[ModelEntry, OnnxRuntime], data: bytes) -> Detections:
    entry, runtime = detector
    task = create_task(entry, max_image_pixels=10**8)
    prepared = task.preprocess(data)
    found = task.postprocess(
        runtime.predict_batch(prepared.tensor[np.newaxis])[0], prepared.meta, task.parameters({})
    )
    assert isinstance(found, Detections)
    return found


def _iou(box: Detection, other: tuple[int, int, int, int]) -> float:
    a = (box.box.x1, box.box.y1, box.box.x2, box.box.y2)
    width = max(0.0, min(a[2], other[2]) - max(a[0], other[0]))
    height = max(0.0, min(a[3], other[3]) - max(a[1], other[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (other[2] - other[0]) * (other[3] - other[1])
    return width * height / (area - width * height)


def test_both_models_pass_parity_and_say_what_they_are(repository: Path) -> None:
    models = ModelRepository(repository)
    detector = models.get("retinaface_mnet025").config
    assert (
        detector.task == "detection" and detector.input.name == "images" and detector.input.size == (640, 640)
    )
    assert detector.input.fit == "letterbox" and detector.input.pad_value == 117
    assert (detector.output.name, detector.output.kind, detector.output.classes) == (
        "predictions",
        "boxes",
        1,
    )
    assert detector.output.landmarks == 5 and detector.max_batch_size == 4
    assert detector.detection is not None and detector.detection.model_dump() == {
        "score_threshold": 0.5,
        "iou_threshold": 0.4,
        "max_detections": 100,
    }
    assert detector.parity["passed"] and detector.parity["same_objects"]
    assert detector.parity["max_landmark_diff_px"] <= 1.0  # type: ignore[operator]
    assert models.get("retinaface_mnet025").labels == ("face",)

    classifier = models.get("mini_xception")
    config = classifier.config
    assert config.task == "classification" and config.input.name == "input" and config.input.size == (64, 64)
    assert (config.output.name, config.output.kind, config.output.classes) == (
        "probabilities",
        "probabilities",
        7,
    )
    assert config.max_batch_size == 64 and config.parity["passed"]
    assert classifier.labels == ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
    for entry in (models.get("retinaface_mnet025"), classifier):
        assert entry.config.provenance["license"] == "MIT"
        assert entry.artefact_path("onnx").is_file() and entry.artefact_path("torch").is_file()


def test_the_pipeline_config_validates_and_names_its_stages(repository: Path) -> None:
    pipeline = ModelRepository(repository).get_pipeline("face_expression").config
    assert pipeline.task == "face_expression"
    assert (pipeline.stages.detector, pipeline.stages.classifier) == ("retinaface_mnet025", "mini_xception")
    assert pipeline.faces.margin == MARGIN and pipeline.faces.max_faces == 32
    assert not list((repository / "face_expression").glob("*/model.*"))


def test_the_astronaut_has_one_face_where_her_face_is(detector: tuple[ModelEntry, OnnxRuntime]) -> None:
    found = _faces(detector, packaged_photo("astronaut.png").read_bytes())
    assert len(found.detections) == 1
    face = found.detections[0]
    assert face.label == "face" and face.score > 0.9
    assert _iou(face, ASTRONAUT_FACE) > 0.7
    (left_eye, right_eye, nose, mouth_left, mouth_right) = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < nose[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    for x, y in face.landmarks:
        assert face.box.x1 < x < face.box.x2 and face.box.y1 < y < face.box.y2


@pytest.mark.parametrize("photo", NO_FACE)
def test_no_face_where_there_is_none(detector: tuple[ModelEntry, OnnxRuntime], photo: str) -> None:
    assert _faces(detector, packaged_photo(photo).read_bytes()).detections == []


def test_the_cameraman_is_found_too(detector: tuple[ModelEntry, OnnxRuntime]) -> None:
    """A second real face (scikit-image's camera.png, grey, three-quarter profile)."""
    camera = Path(skimage.__file__).parent / "data" / "camera.png"
    found = _faces(detector, camera.read_bytes())
    assert len(found.detections) == 1
    cameraman = (195, 128, 256, 194)  # hand-measured: ear to nose tip, hairline to chin
    assert _iou(found.detections[0], cameraman) > 0.5


def _face_crop(photo: Path, face: Detection) -> bytes:
    """The face box grown by the margin, as a square around its centre (as the pipeline crops)."""
    box = face.box
    half = max(box.x2 - box.x1, box.y2 - box.y1) * (1 + MARGIN) / 2
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    square = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    crop = Image.open(photo).convert("RGB").crop(square)
    buffer = io.BytesIO()
    crop.save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_astronaut_smiles(repository: Path, detector: tuple[ModelEntry, OnnxRuntime]) -> None:
    photo = packaged_photo("astronaut.png")
    (face,) = _faces(detector, photo.read_bytes()).detections
    entry = ModelRepository(repository).get("mini_xception")
    task = create_task(entry, max_image_pixels=10**8)
    runtime = OnnxRuntime(entry, threads=1)
    runtime.load()
    try:
        prepared = task.preprocess(_face_crop(photo, face))
        probabilities = runtime.predict_batch(prepared.tensor[np.newaxis])
    finally:
        runtime.close()
    assert probabilities.shape == (1, 7) and abs(float(probabilities.sum()) - 1.0) < 1e-5
    result = task.postprocess(probabilities[0], prepared.meta, task.parameters({"topk": 7}))
    assert isinstance(result, Classification)
    assert result.predictions[0].label == "happiness" and result.predictions[0].prob > 0.9
    assert {p.label for p in result.predictions} == set(EXPRESSIONS)
