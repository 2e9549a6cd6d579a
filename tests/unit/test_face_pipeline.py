"""The face_expression pipeline's wiring, with fake stages: what the registry accepts as stages,
VISION_MODELS naming only the pipeline, the square crops (clipped at the photo's edges), the
parameters and their bounds, and the faces mapped back to the photo."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import encode, wait_ready
from tests.fixtures import FakeRuntime, app_of, write_fake_detector, write_fake_entry
from visionserve.errors import ConfigurationError, VisionError
from visionserve.repository import FACE_EXPRESSIONS, ModelEntry, ModelRepository, PipelineEntry
from visionserve.runtimes import models_from_settings
from visionserve.serving.faces import crop_face
from visionserve.settings import ModelSettings, ServerSettings
from visionserve.tasks.detection import Box

FILE_ORDER = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
"""The expression classifier's own output order (the pipeline answers in seed 003's)."""


def write_face_detector(repository: Path, size: int = 64) -> ModelEntry:
    folder = repository / "faces"
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "name": "faces",
        "task": "detection",
        "input": {
            "name": "images",
            "size": [size, size],
            "fit": "letterbox",
            "mean": [0] * 3,
            "std": [1] * 3,
        },
        "output": {"name": "predictions", "kind": "boxes", "classes": 1, "landmarks": 5},
        "detection": {"score_threshold": 0.5, "iou_threshold": 0.4, "max_detections": 10},
        "artefacts": {"onnx": {"path": "1/model.onnx"}},
        "max_batch_size": 8,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "labels.txt").write_text("face\n")
    return ModelRepository(repository).get("faces")


def write_expressions(repository: Path) -> ModelEntry:
    entry = write_fake_entry(
        repository, "moods", classes=7, size=16, output={"classes": 7, "kind": "probabilities"}
    )
    (entry.root / "labels.txt").write_text("\n".join(FILE_ORDER) + "\n")
    return ModelRepository(repository).get("moods")


def write_pipeline(repository: Path, detector: str = "faces", classifier: str = "moods") -> PipelineEntry:
    folder = repository / "moodfaces"
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "name": "moodfaces",
        "task": "face_expression",
        "stages": {"detector": detector, "classifier": classifier},
        "faces": {"max_faces": 3},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return ModelRepository(repository).get_pipeline("moodfaces")


class FakeFaceDetector(FakeRuntime):
    """Two faces per image, in input pixels: one centred (score 0.9), one near the left edge
    (score 0.7, half as big), each with five landmarks inside its box."""

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.shape)
        self.threads_seen.add(threading.current_thread().name)
        count, _, height, width = batch.shape
        out = np.zeros((count, 3, 4 + 1 + 10), dtype=np.float32)
        for row, (cx, cy, side, score) in enumerate(
            [(width / 2, height / 2, width / 4, 0.9), (width / 8, height / 2, width / 8, 0.7)]
        ):
            out[:, row, :5] = (cx, cy, side, side, score)
            out[:, row, 5:] = [
                cx - side / 4,
                cy - side / 4,
                cx + side / 4,
                cy - side / 4,
                cx,
                cy,
                cx - side / 4,
                cy + side / 4,
                cx + side / 4,
                cy + side / 4,
            ]
        return out


class FakeMoods(FakeRuntime):
    """Happiness (in the file's order, column 3) for every crop; records the batch shapes."""

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.shape)
        out = np.full((len(batch), 7), 0.05, dtype=np.float32)
        out[:, FILE_ORDER.index("happiness")] = 0.7
        return out


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    write_fake_entry(tmp_path, "fake")
    write_face_detector(tmp_path)
    write_expressions(tmp_path)
    write_pipeline(tmp_path)
    return tmp_path


@pytest.fixture
def client(repository: Path) -> Iterator[TestClient]:
    repo = ModelRepository(repository)
    runtimes = [
        FakeRuntime(repo.get("fake")),
        FakeFaceDetector(repo.get("faces")),
        FakeMoods(repo.get("moods")),
    ]
    app = app_of(ServerSettings(), *runtimes, pipelines=[repo.get_pipeline("moodfaces")])
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


def test_vision_models_naming_a_pipeline_serves_its_stages_too(repository: Path) -> None:
    settings = ModelSettings(
        model_repository=repository, model_name="moodfaces", models="moodfaces", backend="onnx"
    )
    runtimes, pipelines = models_from_settings(settings)
    assert [r.model.name for r in runtimes] == ["faces", "moods"]
    assert [p.name for p in pipelines] == ["moodfaces"]
    with pytest.raises(ConfigurationError, match="is a pipeline"):
        ModelRepository(repository).get("moodfaces")


def test_the_stages_must_fit(repository: Path) -> None:
    from tests.fixtures import registry_of

    repo = ModelRepository(repository)
    write_fake_detector(repository, "plain")
    write_pipeline(repository, detector="plain")
    with pytest.raises(ConfigurationError, match="landmarks"):
        registry_of(
            FakeRuntime(repo.get("fake")),
            FakeRuntime(repo.get("plain")),
            FakeMoods(repo.get("moods")),
            pipelines=[repo.get_pipeline("moodfaces")],
        )
    write_pipeline(repository, classifier="fake")
    with pytest.raises(ConfigurationError, match="seven expressions"):
        registry_of(
            FakeRuntime(repo.get("fake")),
            FakeFaceDetector(repo.get("faces")),
            pipelines=[repo.get_pipeline("moodfaces")],
        )
    write_pipeline(repository, classifier="missing")
    with pytest.raises(ConfigurationError, match=r"'missing'.*not served"):
        registry_of(
            FakeRuntime(repo.get("fake")),
            FakeFaceDetector(repo.get("faces")),
            pipelines=[repo.get_pipeline("moodfaces")],
        )


def test_faces_come_back_in_the_photo_s_pixels_in_seed_order(client: TestClient) -> None:
    photo = encode(Image.new("RGB", (256, 128), (120, 130, 140)))
    body = client.post("/predict/file?model=moodfaces", files={"file": photo}).json()
    assert body["image"] == {"width": 256, "height": 128}
    centre, corner = body["faces"]
    # the 64 x 64 letterbox holds the 256 x 128 photo at scale 1/4, 16 px of padding on top
    assert centre["box"] == {"x1": 96.0, "y1": 32.0, "x2": 160.0, "y2": 96.0}
    assert centre["score"] == pytest.approx(0.9) and corner["score"] == pytest.approx(0.7)
    assert list(centre["expression"]) == list(FACE_EXPRESSIONS) and centre["top"] == "happiness"
    assert centre["expression"]["happiness"] == pytest.approx(0.7)
    assert centre["landmarks"][2] == [128.0, 64.0]


def test_the_parameters_and_their_bounds(client: TestClient) -> None:
    photo = encode(Image.new("RGB", (256, 128), (120, 130, 140)))
    url = "/predict/file?model=moodfaces"
    assert len(client.post(url + "&max_faces=1", files={"file": photo}).json()["faces"]) == 1
    assert len(client.post(url + "&score_threshold=0.8", files={"file": photo}).json()["faces"]) == 1
    # the corner face is 32 px wide in the photo, the centred one 64
    assert len(client.post(url + "&min_face_size=33", files={"file": photo}).json()["faces"]) == 1
    assert len(client.post(url + "&min_face_size=32", files={"file": photo}).json()["faces"]) == 2
    too_many = client.post(url + "&max_faces=4", files={"file": photo})
    assert too_many.status_code == 400 and "between 1 and 3" in too_many.json()["error"]["message"]
    huge = client.post(url + "&min_face_size=1e9", files={"file": photo})
    assert huge.status_code == 400 and "min_face_size" in huge.json()["error"]["message"]


def test_the_crops_of_one_image_are_one_classifier_batch(client: TestClient) -> None:
    moods = client.app.state.registry.get("moods").runtime  # type: ignore[attr-defined]
    moods.batches.clear()
    client.post("/predict/file?model=moodfaces", files={"file": encode(Image.new("RGB", (90, 90)))})
    assert moods.batches == [(2, 3, 16, 16)]


def test_a_crop_is_square_around_the_face_and_clipped_at_the_edges() -> None:
    ramp = np.tile(np.arange(200, dtype=np.uint8), (100, 1))
    photo = Image.fromarray(np.stack([ramp] * 3, axis=-1))  # 200 x 100, pixel value = column
    inside = crop_face(photo, Box(90, 40, 110, 60), 0.5, (10, 10))
    assert inside.shape == (10, 10, 3)
    assert 84 <= inside[0, 0, 0] <= 88 and 111 <= inside[0, -1, 0] <= 115  # columns 85..115
    corner = crop_face(photo, Box(0, 0, 30, 30), 1.0, (8, 8))  # the square reaches past the corner
    assert corner.shape == (8, 8, 3) and corner[0, 0, 0] <= 4 and corner[0, -1, 0] >= 40  # columns 0..45
    edge = crop_face(photo, Box(199.5, 99.5, 200, 100), 0.0, (4, 4))  # a sliver at the far corner
    assert edge.shape == (4, 4, 3)


def test_a_pipeline_takes_no_preprocessed_tensor(client: TestClient) -> None:
    import asyncio

    model = client.app.state.registry.get("moodfaces")  # type: ignore[attr-defined]
    with pytest.raises(VisionError, match="encoded image"):
        asyncio.run(model.infer_tensor(np.zeros((1, 3, 64, 64), np.float32), model.parameters({})))
