"""Many models in one server, over fakes: the registry's lookup and readiness, the compute budget
that the models' batches share, and a detector beside a classifier on every protocol's HTTP face
(the project's routes and the Open Inference Protocol's)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import encode
from tests.fixtures import (
    FakeDetectorRuntime,
    FakeRuntime,
    SlowRuntime,
    registry_of,
    write_fake_detector,
    write_fake_entry,
)
from visionserve.errors import ErrorCode, VisionError
from visionserve.repository import ModelEntry
from visionserve.serving.budget import ComputeBudget

RED_WIDE = encode(Image.new("RGB", (64, 32), (255, 0, 0)))  # letterboxed into 64x64: 16 px bands
RED_B64 = base64.b64encode(RED_WIDE).decode()


@pytest.fixture
def detector(tmp_path: Path) -> ModelEntry:
    return write_fake_detector(tmp_path / "repo")


@pytest.fixture
def both(fake_entry: ModelEntry, detector: ModelEntry, app_client: Callable[..., TestClient]) -> TestClient:
    """An app serving the fake classifier (the default) and the fake detector."""
    return app_client(FakeRuntime(fake_entry), FakeDetectorRuntime(detector), preprocess_workers=2)


# --- the registry -------------------------------------------------------------------------------


def test_an_unknown_model_lists_the_served_ones(fake_entry: ModelEntry, detector: ModelEntry) -> None:
    registry = registry_of(FakeRuntime(fake_entry), FakeDetectorRuntime(detector))
    assert registry.names == ["fake", "fakedet"] and registry.get(None).name == "fake"
    assert registry.get("").name == "fake" and registry.get("fakedet").task.name == "detection"
    with pytest.raises(VisionError) as caught:
        registry.get("resnet50")
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND
    assert caught.value.message == "model 'resnet50' is not served here; this server serves 'fake', 'fakedet'"
    registry.preprocess_pool.shutdown()


def test_the_default_model_comes_first_and_must_be_served(
    fake_entry: ModelEntry, detector: ModelEntry
) -> None:
    from visionserve.errors import ConfigurationError
    from visionserve.serving.registry import ModelRegistry
    from visionserve.settings import ServerSettings

    runtimes = [FakeRuntime(fake_entry), FakeDetectorRuntime(detector)]
    registry = ModelRegistry(runtimes, ServerSettings(), default="fakedet")
    assert registry.names == ["fakedet", "fake"] and registry.default.name == "fakedet"
    with pytest.raises(ConfigurationError, match=r"'resnet50' .*VISION_MODEL_NAME.* not among"):
        ModelRegistry(runtimes, ServerSettings(), default="resnet50")
    with pytest.raises(ConfigurationError, match="unique"):
        ModelRegistry([FakeRuntime(fake_entry), FakeRuntime(fake_entry)], ServerSettings())


def test_readiness_waits_for_every_model(
    fake_entry: ModelEntry, detector: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    slow = FakeDetectorRuntime(detector)
    original = slow.load
    release = threading.Event()

    def gated_load() -> None:
        assert release.wait(10)
        original()

    slow.load = gated_load  # type: ignore[method-assign]
    client = app_client(FakeRuntime(fake_entry), slow, ready=False)
    deadline = time.monotonic() + 5
    while client.get("/models/fake/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and "fakedet (loading)" in ready.json()["detail"]
    loading = {"status": "loading", "detail": "model 'fakedet' is loading"}
    assert client.get("/models/fakedet/ready").json() == loading
    assert client.get("/v2/health/ready").status_code == 503
    release.set()
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)


# --- the compute budget -------------------------------------------------------------------------


def test_the_budget_is_first_come_first_served_in_units() -> None:
    async def scenario() -> list[str]:
        budget = ComputeBudget(2)
        order: list[str] = []
        await budget.acquire(2, "a")  # the whole budget

        async def take(name: str, units: int) -> None:
            await budget.acquire(units, name)
            order.append(name)

        waiting = [asyncio.create_task(take("b", 2)), asyncio.create_task(take("c", 1))]
        await asyncio.sleep(0.01)
        assert order == [] and budget.waiting == 2
        budget.release(2)
        await asyncio.sleep(0.01)
        assert order == ["b"]  # c (1 unit) does not overtake b (2 units) that came first
        budget.release(2)
        await asyncio.gather(*waiting)
        assert budget.free == 1
        cancelled = asyncio.create_task(take("d", 2))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert budget.waiting == 0
        budget.release(1)
        assert budget.free == 2 and budget.clamp(16) == 2
        return order

    assert asyncio.run(scenario()) == ["b", "c"]


class _Timed(SlowRuntime):
    """Records when each batch ran, on a clock shared by every instance."""

    spans: ClassVar[list[tuple[str, float, float]]] = []

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        result = super().predict_batch(batch)
        self.spans.append((self.model.name, started, time.perf_counter()))
        return result


def test_two_busy_models_never_compute_at_once_on_the_whole_budget(tmp_path: Path) -> None:
    """Each model's runtime takes both cores (2 intra-op threads): their batches take turns, so
    2 x 2 threads never run at once, and both get served."""
    root = tmp_path / "repo"
    first = _Timed(write_fake_entry(root, "first"), batch_s=0.02)
    second = _Timed(write_fake_entry(root, "second"), batch_s=0.02)
    for runtime in (first, second):
        runtime.threads = 2
    _Timed.spans = []

    async def scenario() -> None:
        from visionserve.serving.registry import ModelRegistry
        from visionserve.settings import ServerSettings

        registry = ModelRegistry([first, second], ServerSettings(preprocess_workers=2), cores=2)
        await registry.start()
        image = encode(Image.new("RGB", (40, 30), (10, 120, 200)))
        calls = [registry.get(name).predict(image) for name in ("first", "second") * 8]
        await asyncio.gather(*calls)
        await registry.stop()

    asyncio.run(scenario())
    spans = sorted((span for span in _Timed.spans if span[2] - span[1] >= 0.015), key=lambda span: span[1])
    assert {name for name, _, _ in spans} == {"first", "second"}
    for (_, _, end), (_, start, _) in itertools.pairwise(spans):
        assert start >= end - 0.002, spans  # no two batches overlap


# --- a detector beside a classifier: HTTP -------------------------------------------------------


def test_models_lists_both_with_their_tasks(both: TestClient) -> None:
    listed = {m["name"]: m for m in both.get("/models").json()["models"]}
    assert listed["fake"]["task"] == "classification" and listed["fake"]["default"] is True
    assert listed["fakedet"]["task"] == "detection" and listed["fakedet"]["default"] is False
    assert listed["fakedet"]["detection"] == {
        "score_threshold": 0.25,
        "iou_threshold": 0.45,
        "max_detections": 5,
    }
    assert both.get("/models/fakedet").json()["labels"] == ["cat", "dog", "bird"]


def test_a_detection_maps_its_box_back_to_the_photo(both: TestClient) -> None:
    response = both.post("/predict/file?model=fakedet", files={"file": ("red.png", RED_WIDE)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "detection" and body["image"] == {"width": 64, "height": 32}
    (found,) = body["detections"]
    assert found["label"] == "cat" and found["index"] == 0
    # the middle 32x32 of the 64x64 letterbox, whose photo starts 16 px down: (16, 0)-(48, 32)
    assert found["box"] == {"x1": 16.0, "y1": 0.0, "x2": 48.0, "y2": 32.0}
    assert 0.7 < found["score"] < 0.75  # red, diluted by the grey bands


@pytest.mark.parametrize(
    ("parameters", "found"),
    [
        ({"score_threshold": 0.9}, []),
        ({"classes": ["dog"]}, []),  # the object is a cat: filtered out, not relabelled
        ({"classes": ["cat", "bird"]}, ["cat"]),
        ({"max_detections": 1, "iou_threshold": 0.0}, ["cat"]),
    ],
)
def test_parameters_change_what_is_found(
    both: TestClient, parameters: dict[str, object], found: list[str]
) -> None:
    body = {"image": RED_B64, "model": "fakedet", **parameters}
    response = both.post("/predict", json=body)
    assert response.status_code == 200, response.text
    assert [d["label"] for d in response.json()["detections"]] == found


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (
            {"model": "fakedet", "topk": 2},
            400,
            ["`topk` does not apply to model 'fakedet', a detection model"],
        ),
        ({"model": "fakedet", "max_detections": 6}, 400, ["between 1 and 5", "cap of model 'fakedet'"]),
        ({"model": "fakedet", "classes": ["unicorn"]}, 400, ["no class 'unicorn'", "'cat', 'dog', 'bird'"]),
        ({"model": "fakedet", "classes": []}, 400, ["`classes` is empty"]),
        ({"model": "fakedet", "score_threshold": 2}, 422, ["score_threshold"]),
        ({"iou_threshold": 0.5}, 400, ["a classification model", "it takes: topk"]),
        ({"model": "nope"}, 404, ["'nope'", "'fake', 'fakedet'"]),
    ],
)
def test_bad_parameters_are_refused_naming_the_task(
    both: TestClient, body: dict[str, object], status: int, words: list[str]
) -> None:
    response = both.post("/predict", json={"image": RED_B64, **body})
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, message
    assert both.post("/predict/file?model=fakedet", files={"file": RED_WIDE}).status_code == 200


def test_a_model_named_twice_differently_is_refused(both: TestClient) -> None:
    response = both.post("/predict?model=fake", json={"image": RED_B64, "model": "fakedet"})
    assert response.status_code == 400 and "name one" in response.json()["error"]["message"]
    query = both.post("/predict?model=fakedet", json={"image": RED_B64})
    assert query.json()["task"] == "detection"


def test_an_image_with_nothing_in_it_is_an_empty_list(both: TestClient) -> None:
    black = encode(Image.new("RGB", (20, 20), (0, 0, 0)))
    body = both.post("/predict/file?model=fakedet&score_threshold=0.5", files={"file": black}).json()
    assert body["detections"] == [] and body["image"] == {"width": 20, "height": 20}


def test_metrics_are_labelled_by_model(both: TestClient) -> None:
    both.post("/predict/file?model=fakedet", files={"file": RED_WIDE})
    both.post("/predict/file", files={"file": RED_WIDE})
    text = both.get("/metrics").text
    assert 'visionserve_batch_size_count{model="fakedet"} 1.0' in text
    assert 'visionserve_batch_size_count{model="fake"} 1.0' in text
    assert 'endpoint="/predict/file",model="fakedet",protocol="http",status="200"' in text
    assert 'visionserve_queue_depth{model="fakedet"} 0.0' in text


# --- a detector beside a classifier: the Open Inference Protocol ---------------------------------


def test_v2_detector_outputs_have_fixed_shapes(both: TestClient) -> None:
    metadata = both.get("/v2/models/fakedet").json()
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("boxes", "FP32", [-1, 5, 4]),
        ("scores", "FP32", [-1, 5]),
        ("classes", "INT32", [-1, 5]),
        ("num_detections", "INT32", [-1, 1]),
    ]
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        ("images", "FP32", [-1, 3, 64, 64]),
        ("image", "BYTES", [-1]),
    ]
    config = both.get("/v2/models/fakedet/config").json()
    assert [o["data_type"] for o in config["output"]] == [
        "TYPE_FP32",
        "TYPE_FP32",
        "TYPE_INT32",
        "TYPE_INT32",
    ]
    assert all("label_filename" not in o for o in config["output"])
    request = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [RED_B64] * 2}],
        "parameters": {"score_threshold": 0.5},
    }
    answer = both.post("/v2/models/fakedet/infer", json=request).json()
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["boxes"]["shape"] == [2, 5, 4] and outputs["num_detections"]["data"] == [1, 1]
    assert outputs["boxes"]["data"][:4] == [16.0, 0.0, 48.0, 32.0] and not any(outputs["boxes"]["data"][4:20])
    assert outputs["classes"]["datatype"] == "INT32" and outputs["classes"]["data"][:5] == [0, 0, 0, 0, 0]


def test_v2_preprocessed_input_answers_in_input_pixels(both: TestClient) -> None:
    tensor = np.zeros((1, 3, 64, 64), dtype=np.float32)
    tensor[0, 1] = 1.0  # green: a dog
    request = {
        "inputs": [
            {
                "name": "images",
                "datatype": "FP32",
                "shape": [1, 3, 64, 64],
                "data": tensor.reshape(-1).tolist(),
            }
        ]
    }
    answer = both.post("/v2/models/fakedet/infer", json=request).json()
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["boxes"]["data"][:4] == [16.0, 16.0, 48.0, 48.0] and outputs["classes"]["data"][0] == 1


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (
            {"outputs": [{"name": "boxes", "parameters": {"classification": 2}}]},
            ["classification parameter", "detection model"],
        ),
        ({"parameters": {"topk": 2}}, ["`topk` does not apply", "detection model"]),
        ({"parameters": {"classes": "cat,unicorn"}}, ["no class 'unicorn'"]),
        ({"parameters": {"max_detections": 9}}, ["between 1 and 5"]),
    ],
)
def test_v2_bad_detector_requests_are_400(
    both: TestClient, request_: dict[str, object], words: list[str]
) -> None:
    request = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [RED_B64]}],
        **request_,
    }
    response = both.post("/v2/models/fakedet/infer", json=request)
    assert response.status_code == 400, response.text
    for word in words:
        assert word in response.json()["error"], response.json()


def test_v2_topk_to_a_classifier_says_how_to_ask_for_classes(both: TestClient) -> None:
    request = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [RED_B64]}],
        "parameters": {"topk": 2},
    }
    response = both.post("/v2/models/fake/infer", json=request)
    assert response.status_code == 400 and '"classification": N' in response.json()["error"]


def test_v2_repository_index_lists_every_model(both: TestClient) -> None:
    assert both.post("/v2/repository/index").json() == [
        {"name": "fake", "version": "1", "state": "READY", "reason": ""},
        {"name": "fakedet", "version": "1", "state": "READY", "reason": ""},
    ]
    assert len(both.post("/v2/repository/index", json={"ready": True}).json()) == 2
    assert both.post("/v2/repository/index", content=b"{nope").status_code == 400
    assert both.post("/v2/repository/index", json={"ready": "yes"}).status_code == 400
    stats = both.get("/v2/models/stats").json()["model_stats"]
    assert [s["name"] for s in stats] == ["fake", "fakedet"]
