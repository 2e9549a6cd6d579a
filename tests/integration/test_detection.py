"""The real detector (YOLO11n, exported) served beside the real classifier in one server: real
photos through HTTP, the project's gRPC API (unary, batch, stream, live) and the Open Inference
Protocol with unmodified tritonclient; boxes checked by position, bad input refused clearly."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient
from fastapi.testclient import TestClient

from tests.conftest import photo_bytes
from tests.integration.v2_servers import GrpcServing, grpc_serving, http_serving
from visionserve.repository import ModelEntry
from visionserve.runtimes.onnx import OnnxRuntime
from visionserve.tasks.boxes import letterbox
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.real_model

DETECTOR = "yolo11n"
CLASSIFIER = "efficientnet_lite0"
# Where the objects are in each photo (original pixels, x1 y1 x2 y2), measured by hand on drawn boxes.
EXPECTED = {
    "motorcycle_left.png": ("motorcycle", (115, 47, 683, 456)),
    "astronaut.png": ("person", (13, 16, 365, 511)),
    "coffee.png": ("cup", (170, 17, 414, 309)),
    "chelsea.png": ("cat", (1, 1, 406, 296)),
}


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two x1 y1 x2 y2 boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def assert_found(detections: list[dict[str, object]], photo: str) -> None:
    """The photo's object is among the detections, its box where it is in the photo."""
    label, where = EXPECTED[photo]
    boxes = [d for d in detections if d["label"] == label]
    assert boxes, f"no {label} in {photo}: {detections}"
    box = boxes[0]["box"]
    assert isinstance(box, dict)
    corners = (box["x1"], box["y1"], box["x2"], box["y2"])
    assert iou(corners, where) > 0.85, (photo, corners, where)


@pytest.fixture(scope="module")
def runtimes(real_entry: ModelEntry, real_detector: ModelEntry) -> Callable[[], list[OnnxRuntime]]:
    """Fresh runtimes of both real models (the classifier first: the default), 1 thread each."""
    return lambda: [OnnxRuntime(real_entry, threads=1), OnnxRuntime(real_detector, threads=1)]


@pytest.fixture(scope="module")
def client(runtimes: Callable[[], list[OnnxRuntime]]) -> Iterator[TestClient]:
    """The HTTP app over both models, ready."""
    from tests.fixtures import app_of
    from visionserve.settings import ServerSettings

    with TestClient(app_of(ServerSettings(preprocess_workers=2), *runtimes())) as test_client:
        for _ in range(2000):
            if test_client.get("/health/ready").status_code == 200:
                break
            asyncio.run(asyncio.sleep(0.05))
        yield test_client


# --- HTTP ---------------------------------------------------------------------------------------


def test_one_server_lists_both_models_with_their_tasks(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {CLASSIFIER, DETECTOR}
    assert models[CLASSIFIER]["task"] == "classification" and models[CLASSIFIER]["default"]
    detector = models[DETECTOR]
    assert detector["task"] == "detection" and not detector["default"]
    assert detector["input_size"] == [640, 640] and detector["labels_count"] == 80
    assert detector["parameters"] == ["score_threshold", "iou_threshold", "max_detections", "classes"]
    assert detector["detection"] == {"score_threshold": 0.25, "iou_threshold": 0.45, "max_detections": 100}
    detail = client.get(f"/models/{DETECTOR}").json()
    assert detail["labels"][:4] == ["person", "bicycle", "car", "motorcycle"]
    assert client.get(f"/models/{DETECTOR}/ready").json() == {"status": "ready"}
    assert client.get("/models/nope/ready").status_code == 404


@pytest.mark.parametrize("photo", list(EXPECTED))
def test_http_finds_each_photo_s_object_where_it_is(client: TestClient, photo: str) -> None:
    response = client.post(f"/predict/file?model={DETECTOR}", files={"file": (photo, photo_bytes(photo))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == DETECTOR and body["task"] == "detection"
    assert set(body) == {"model", "task", "detections", "image", "latency_ms"}
    assert_found(body["detections"], photo)
    scores = [d["score"] for d in body["detections"]]
    assert scores == sorted(scores, reverse=True)
    for d in body["detections"]:
        box = d["box"]
        assert 0 <= box["x1"] < box["x2"] <= body["image"]["width"]
        assert 0 <= box["y1"] < box["y2"] <= body["image"]["height"]


def test_http_json_names_the_model_and_filters_classes(client: TestClient) -> None:
    import base64

    image = base64.b64encode(photo_bytes("coffee.png")).decode()
    every = client.post("/predict", json={"image": image, "model": DETECTOR}).json()["detections"]
    assert {"cup", "spoon"} <= {d["label"] for d in every}
    cups = client.post("/predict", json={"image": image, "model": DETECTOR, "classes": ["cup"]}).json()
    assert [d["label"] for d in cups["detections"]] == ["cup"]
    one = client.post("/predict/b64", json={"image_base64": image, "model": DETECTOR, "max_detections": 1})
    assert len(one.json()["detections"]) == 1
    strict = client.post(
        f"/predict/file?model={DETECTOR}&score_threshold=0.99", files={"file": photo_bytes("coffee.png")}
    )
    assert strict.status_code == 200 and strict.json()["detections"] == []
    query = client.post(
        f"/predict/file?model={DETECTOR}&classes=cup,spoon", files={"file": photo_bytes("coffee.png")}
    )
    assert {d["label"] for d in query.json()["detections"]} == {"cup", "spoon"}


def test_a_photo_with_nothing_in_it_is_an_empty_list(client: TestClient) -> None:
    response = client.post(f"/predict/file?model={DETECTOR}", files={"file": photo_bytes("rocket.jpg")})
    assert response.status_code == 200 and response.json()["detections"] == []


def test_the_default_model_still_answers_the_seed_endpoints_unchanged(client: TestClient) -> None:
    body = client.post("/predict/file", files={"file": photo_bytes("chelsea.png")}).json()
    assert body["model"] == CLASSIFIER and body["task"] == "classification"
    assert set(body) == {"prediction", "probability", "topk", "model", "task", "latency_ms"}
    assert body["prediction"] in {"tabby", "tiger cat", "Egyptian cat"}


@pytest.mark.parametrize(
    ("query", "status", "words"),
    [
        ("score_threshold=1.5", 422, ["score_threshold"]),
        ("iou_threshold=-0.1", 422, ["iou_threshold"]),
        ("max_detections=0", 422, ["max_detections"]),
        ("max_detections=101", 400, ["max_detections", "between 1 and 100"]),
        ("classes=unicorn", 400, ["'unicorn'", "'person'", "80 in all"]),
        ("topk=3", 400, ["topk", "detection model", "score_threshold"]),
        ("model=nope&x=1", 404, ["'nope'", f"'{CLASSIFIER}'", f"'{DETECTOR}'"]),
    ],
)
def test_http_bad_detector_parameters_are_refused_clearly(
    client: TestClient, query: str, status: int, words: list[str]
) -> None:
    url = (
        f"/predict/file?{query}" if query.startswith("model=") else f"/predict/file?model={DETECTOR}&{query}"
    )
    response = client.post(url, files={"file": photo_bytes("coffee.png")})
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, message
    assert (
        client.post(f"/predict/file?model={DETECTOR}", files={"file": photo_bytes("coffee.png")}).status_code
        == 200
    )


def test_a_detector_parameter_sent_to_the_classifier_is_refused(client: TestClient) -> None:
    response = client.post("/predict", json={"image": "aGVsbG8=", "score_threshold": 0.5})
    assert response.status_code == 400
    assert "classification model" in response.json()["error"]["message"]


def test_metrics_carry_the_model_label(client: TestClient) -> None:
    client.post(f"/predict/file?model={DETECTOR}", files={"file": photo_bytes("chelsea.png")})
    text = client.get("/metrics").text
    assert f'visionserve_batch_size_count{{model="{DETECTOR}"}}' in text
    assert f'model="{CLASSIFIER}"' in text


# --- gRPC (the project's API) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_served(runtimes: Callable[[], list[OnnxRuntime]]) -> Iterator[GrpcServing]:
    with grpc_serving(*runtimes()) as served:
        yield served


def grpc_call(served: GrpcServing, call: Callable[[pb_grpc.InferenceStub], object]) -> object:
    with grpc.insecure_channel(served.target) as channel:
        return call(pb_grpc.InferenceStub(channel))


def as_dicts(detections: object) -> list[dict[str, object]]:
    from google.protobuf.json_format import MessageToDict

    return [MessageToDict(d, preserving_proto_field_name=True) for d in detections]  # type: ignore[attr-defined]


def test_grpc_predict_names_the_detector(grpc_served: GrpcServing) -> None:
    reply = grpc_call(
        grpc_served,
        lambda stub: stub.Predict(
            pb.PredictRequest(image=photo_bytes("motorcycle_left.png"), model=DETECTOR)
        ),
    )
    assert isinstance(reply, pb.PredictResponse)
    assert reply.task == "detection" and reply.model == DETECTOR and not reply.topk
    assert (reply.image.width, reply.image.height) == (741, 500)
    assert_found(as_dicts(reply.detections), "motorcycle_left.png")
    default = grpc_call(
        grpc_served, lambda stub: stub.Predict(pb.PredictRequest(image=photo_bytes("chelsea.png")))
    )
    assert isinstance(default, pb.PredictResponse) and default.task == "classification" and default.topk


def test_grpc_batch_answers_each_slot(grpc_served: GrpcServing) -> None:
    images = [photo_bytes("coffee.png"), b"not an image", photo_bytes("chelsea.png")]
    reply = grpc_call(
        grpc_served,
        lambda stub: stub.PredictBatch(
            pb.PredictBatchRequest(images=images, model=DETECTOR, score_threshold=0.3)
        ),
    )
    assert isinstance(reply, pb.PredictBatchResponse)
    first, bad, cat = reply.results
    assert_found(as_dicts(first.result.detections), "coffee.png")
    assert all(d.score >= 0.3 for d in first.result.detections)
    assert bad.error.code == "invalid_image"
    assert_found(as_dicts(cat.result.detections), "chelsea.png")


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (pb.PredictRequest(model=DETECTOR, score_threshold=1.5), ["score_threshold", "between 0 and 1"]),
        (pb.PredictRequest(model=DETECTOR, max_detections=0), ["max_detections"]),
        (pb.PredictRequest(model=DETECTOR, classes=["unicorn"]), ["'unicorn'"]),
        (pb.PredictRequest(model=DETECTOR, topk=3), ["topk", "detection model"]),
        (pb.PredictRequest(score_threshold=0.5), ["score_threshold", "classification model"]),
    ],
)
def test_grpc_bad_parameters_are_invalid_argument(
    grpc_served: GrpcServing, request_: pb.PredictRequest, words: list[str]
) -> None:
    request_.image = photo_bytes("coffee.png")
    with pytest.raises(grpc.RpcError) as caught:
        grpc_call(grpc_served, lambda stub: stub.Predict(request_))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in (caught.value.details() or ""), caught.value.details()


def test_grpc_unknown_model_is_not_found_and_lists_the_models(grpc_served: GrpcServing) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        grpc_call(grpc_served, lambda stub: stub.Predict(pb.PredictRequest(image=b"x", model="nope")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert DETECTOR in (caught.value.details() or "") and CLASSIFIER in (caught.value.details() or "")


def clip() -> list[tuple[str, bytes]]:
    """A 'video' of the real photos, in order."""
    return [(name, photo_bytes(name)) for name in EXPECTED]


def test_grpc_stream_answers_every_frame_in_order_with_its_boxes(grpc_served: GrpcServing) -> None:
    frames = [pb.Frame(image=data, frame_id=i, model=DETECTOR) for i, (_, data) in enumerate(clip() * 2)]
    answers = list(grpc_call(grpc_served, lambda stub: list(stub.PredictStream(iter(frames)))))  # type: ignore[call-overload]
    assert [a.frame_id for a in answers] == list(range(len(frames)))
    for answer, (name, _) in zip(answers, clip() * 2, strict=True):
        assert answer.task == "detection" and not answer.skipped
        assert_found(as_dicts(answer.detections), name)


async def _live(served: GrpcServing, frames: list[pb.Frame]) -> list[pb.FramePrediction]:
    async with grpc.aio.insecure_channel(served.target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def sent() -> AsyncIterator[pb.Frame]:
            for frame in frames:
                yield frame

        return [answer async for answer in stub.PredictLive(sent())]


def test_grpc_live_answers_every_frame_skipping_the_stale_ones(grpc_served: GrpcServing) -> None:
    """Frames sent all at once (far faster than the detector computes): every frame is answered,
    in order; most are skipped, never silently; the computed ones have their boxes; the last frame
    is computed (it is the newest when the model frees)."""
    frames = [pb.Frame(image=data, frame_id=i, model=DETECTOR) for i, (_, data) in enumerate(clip() * 10)]
    answers = asyncio.run(_live(grpc_served, frames))
    assert [a.frame_id for a in answers] == list(range(len(frames)))
    computed = [a for a in answers if not a.skipped]
    skipped = [a for a in answers if a.skipped]
    assert skipped and computed and answers[-1] in computed
    assert all(not a.detections and not a.HasField("error") for a in skipped)
    names = [name for name, _ in clip() * 10]
    for answer in computed:
        assert_found(as_dicts(answer.detections), names[answer.frame_id])


# --- the Open Inference Protocol, with unmodified tritonclient ------------------------------------


@pytest.fixture(scope="module")
def v2_http(runtimes: Callable[[], list[OnnxRuntime]]) -> Iterator[str]:
    with http_serving(*runtimes()) as served:
        yield served.url


def test_tritonclient_http_detects_with_fixed_shape_outputs(v2_http: str, real_detector: ModelEntry) -> None:
    triton = httpclient.InferenceServerClient(v2_http)
    assert triton.is_model_ready(DETECTOR) and triton.is_model_ready(CLASSIFIER)
    metadata = triton.get_model_metadata(DETECTOR)
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("boxes", "FP32", [-1, 100, 4]),
        ("scores", "FP32", [-1, 100]),
        ("classes", "INT32", [-1, 100]),
        ("num_detections", "INT32", [-1, 1]),
    ]
    index = {m["name"]: m["state"] for m in triton.get_model_repository_index()}
    assert index == {CLASSIFIER: "READY", DETECTOR: "READY"}
    images = np.array([photo_bytes("motorcycle_left.png"), photo_bytes("coffee.png")], dtype=np.object_)
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(images, binary_data=True)
    result = triton.infer(DETECTOR, [tensor], parameters={"score_threshold": 0.3})
    boxes, scores = result.as_numpy("boxes"), result.as_numpy("scores")
    classes, found = result.as_numpy("classes"), result.as_numpy("num_detections")
    assert boxes.shape == (2, 100, 4) and classes.dtype == np.int32 and found.shape == (2, 1)
    for row, photo in enumerate(("motorcycle_left.png", "coffee.png")):
        n = int(found[row, 0])
        assert 0 < n < 100 and not boxes[row, n:].any() and (scores[row, :n] >= 0.3).all()
        detections = [
            {
                "label": real_detector.labels[int(c)],
                "box": dict(zip(("x1", "y1", "x2", "y2"), map(float, b), strict=True)),
            }
            for c, b in zip(classes[row, :n], boxes[row, :n], strict=True)
        ]
        assert_found(detections, photo)
    triton.close()


def test_tritonclient_http_sends_a_preprocessed_tensor_and_gets_input_pixels(v2_http: str) -> None:
    from PIL import Image

    photo = Image.open(__import__("io").BytesIO(photo_bytes("chelsea.png"))).convert("RGB")
    tensor_data, _ = letterbox(photo, (640, 640))
    tensor = httpclient.InferInput("images", [1, 3, 640, 640], "FP32")
    tensor.set_data_from_numpy(tensor_data[np.newaxis], binary_data=True)
    triton = httpclient.InferenceServerClient(v2_http)
    result = triton.infer(DETECTOR, [tensor])
    n = int(result.as_numpy("num_detections")[0, 0])
    assert n >= 1 and result.as_numpy("classes")[0, 0] == 15  # cat
    x1, y1, x2, y2 = result.as_numpy("boxes")[0, 0]
    # the 451x300 photo is scaled by 640/451 into the letterbox, centred vertically
    assert x2 - x1 > 500 and 100 < y1 < 130 and y2 < 540
    triton.close()


def test_tritonclient_http_refuses_a_classification_of_a_detector_output(v2_http: str) -> None:
    from tritonclient.utils import InferenceServerException

    triton = httpclient.InferenceServerClient(v2_http)
    tensor = httpclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([photo_bytes("coffee.png")], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="classification"):
        triton.infer(DETECTOR, [tensor], outputs=[httpclient.InferRequestedOutput("boxes", class_count=3)])
    with pytest.raises(InferenceServerException, match="detection model"):
        triton.infer(DETECTOR, [tensor], parameters={"topk": 3})
    triton.close()


def test_tritonclient_grpc_detects(grpc_served: GrpcServing) -> None:
    """tritonclient.grpc runs in a child process (its stubs clash with ours in one process)."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    from visionserve.photos import packaged_photo

    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.tritonclient_grpc_detect",
            grpc_served.target,
            DETECTOR,
            str(packaged_photo("motorcycle_left.png")),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    answer = json.loads(child.stdout)
    assert answer["outputs"]["boxes"]["shape"] == [1, 100, 4]
    n = answer["outputs"]["num_detections"]["data"][0]
    classes = answer["outputs"]["classes"]["data"][:n]
    assert 3 in classes  # motorcycle
    first = classes.index(3)
    box = answer["outputs"]["boxes"]["data"][first * 4 : first * 4 + 4]
    assert iou(tuple(box), EXPECTED["motorcycle_left.png"][1]) > 0.85
    assert {m["name"] for m in answer["index"]} == {CLASSIFIER, DETECTOR}
    assert [o["name"] for o in answer["metadata"]["outputs"]] == [
        "boxes",
        "scores",
        "classes",
        "num_detections",
    ]
