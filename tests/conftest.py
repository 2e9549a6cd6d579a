"""Shared fixtures: fake model entries, apps under test, the real exported model, real photos."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.fixtures import FakeRuntime, app_of, write_fake_entry
from visionserve.photos import packaged_photo
from visionserve.repository import ModelEntry, ModelRepository, PipelineEntry
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "efficientnet_lite0"
DETECTOR = "yolo11n"
FACE_MODELS = ("retinaface_mnet025", "mini_xception", "face_expression")
"""The face detector, the expression classifier and the pipeline over them (in export order)."""


@pytest.fixture(autouse=True)
def _no_vision_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their settings explicitly; a developer's VISION_* variables must not leak in."""
    for key in list(os.environ):
        if key.startswith("VISION_") and key != "VISION_TEST_MODEL_REPOSITORY":
            monkeypatch.delenv(key)


@pytest.fixture
def fake_entry(tmp_path: Path) -> ModelEntry:
    """A 10-class, 32x32 model entry without artefacts, for the fake runtimes."""
    return write_fake_entry(tmp_path / "repo")


def wait_ready(client: TestClient, timeout_s: float = 120.0) -> None:
    """Poll /health/ready until 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get("/health/ready")
        if response.status_code == 200:
            return
        if response.json().get("status") == "failed":
            raise AssertionError(f"the model failed to load: {response.json()}")
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout_s} s: {client.get('/health/ready').json()}")


@pytest.fixture
def app_client() -> Iterator[Callable[..., TestClient]]:
    """Factory: `app_client(runtime, *more_runtimes, ready=True, **settings)` -> a TestClient with
    lifespan running, serving the runtimes' models (the first is the default)."""
    clients: list[TestClient] = []

    def make(
        runtime: ModelRuntime, *more: ModelRuntime, ready: bool = True, **settings: object
    ) -> TestClient:
        app = app_of(ServerSettings(**settings), runtime, *more)  # type: ignore[arg-type]
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        if ready:
            wait_ready(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def fake_client(fake_entry: ModelEntry, app_client: Callable[..., TestClient]) -> TestClient:
    """A ready app over FakeRuntime."""
    return app_client(FakeRuntime(fake_entry))


@pytest.fixture(scope="session")
def real_repository() -> Path:
    """The model repository holding the real exported default model.

    `make test` exports it first (cached); when pytest runs alone and it is missing, it is
    exported here, once.
    """
    root = Path(os.environ.get("VISION_TEST_MODEL_REPOSITORY", ROOT / "model_repository"))
    if not root.is_absolute():
        root = ROOT / root
    if not (root / DEFAULT_MODEL / "config.json").is_file():
        from export.cli import main as export_main

        assert export_main(["--repository", str(root), "--force"]) == 0
    return root


@pytest.fixture(scope="session")
def real_entry(real_repository: Path) -> ModelEntry:
    """The real default model's entry."""
    return ModelRepository(real_repository).get(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def real_detector(real_repository: Path) -> ModelEntry:
    """The real embedded detector's entry (YOLO11n at 640), exported beside the default model by
    `make test`; exported here, once, when pytest runs alone and it is missing."""
    if not (real_repository / DETECTOR / "config.json").is_file():
        from export.cli import main as export_main

        assert export_main(["--model", DETECTOR, "--repository", str(real_repository), "--force"]) == 0
    return ModelRepository(real_repository).get(DETECTOR)


@pytest.fixture(scope="session")
def real_faces(real_repository: Path) -> tuple[ModelEntry, ModelEntry, PipelineEntry]:
    """The real face detector and expression classifier, and the face_expression pipeline over
    them, exported beside the default model by `make test`; exported here, once, when pytest runs
    alone and they are missing."""
    for name in FACE_MODELS:
        if not (real_repository / name / "config.json").is_file():
            from export.cli import main as export_main

            assert export_main(["--model", name, "--repository", str(real_repository), "--force"]) == 0
    repository = ModelRepository(real_repository)
    detector, classifier, pipeline = FACE_MODELS
    return repository.get(detector), repository.get(classifier), repository.get_pipeline(pipeline)


def photo_bytes(name: str) -> bytes:
    """The bytes of a real photo shipped in scikit-image / scikit-learn (e.g. 'chelsea.png')."""
    return packaged_photo(name).read_bytes()


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    """Encode a Pillow image to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()
