"""The face_expression pipeline (seed 003) over the real exported face models, served beside the
real classifier: real photos and group images made of real faces, over HTTP, the project's gRPC
API (unary, batch, stream, live) and the Open Inference Protocol (unmodified tritonclient); the
parameters and bad input refused clearly; the faces of one image batched in the classifier."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import ROOT, encode, photo_bytes
from tests.integration.test_detection import iou
from tests.integration.v2_servers import GrpcServing, grpc_serving, http_serving
from visionserve.photos import packaged_photo
from visionserve.repository import ModelEntry, PipelineEntry
from visionserve.runtimes.onnx import OnnxRuntime
from visionserve.tasks.faces import EXPRESSIONS
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.real_model

PIPELINE = "face_expression"
FACE_DETECTOR = "retinaface_mnet025"
CLASSIFIER = "efficientnet_lite0"
ASTRONAUT_FACE = (178.0, 59.0, 273.0, 177.0)
"""Where Eileen Collins's face is in astronaut.png (512 x 512), measured by hand on a drawn box."""
FACE_REGION = (150, 30, 300, 210)
"""A cut of astronaut.png around her face, pasted into the group images."""
NO_FACES = ("coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg")

Served = tuple[ModelEntry, ModelEntry, ModelEntry, PipelineEntry]


@pytest.fixture(scope="module")
def served(real_entry: ModelEntry, real_faces: tuple[ModelEntry, ModelEntry, PipelineEntry]) -> Served:
    return (real_entry, *real_faces)


def runtimes_of(served: Served) -> list[OnnxRuntime]:
    """Fresh runtimes: the classifier (the default), the face detector, the expression classifier."""
    return [OnnxRuntime(entry, threads=1) for entry in served[:3]]


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[TestClient]:
    from tests.fixtures import app_of
    from visionserve.settings import ServerSettings

    app = app_of(ServerSettings(preprocess_workers=2), *runtimes_of(served), pipelines=[served[3]])
    with TestClient(app) as test_client:
        for _ in range(2000):
            if test_client.get("/health/ready").status_code == 200:
                break
            asyncio.run(asyncio.sleep(0.05))
        yield test_client


def group_image(
    placements: list[tuple[int, int, float, bool]], size: tuple[int, int] = (900, 520)
) -> tuple[bytes, list[tuple[float, ...]]]:
    """A canvas with the astronaut's face pasted at each (x, y, scale, mirrored), as PNG, and
    where each face then is (x1, y1, x2, y2)."""
    photo = Image.open(packaged_photo("astronaut.png")).convert("RGB")
    cut = photo.crop(FACE_REGION)
    canvas = Image.new("RGB", size, (96, 110, 120))
    expected = []
    fx1, fy1, fx2, fy2 = (
        ASTRONAUT_FACE[0] - FACE_REGION[0],
        ASTRONAUT_FACE[1] - FACE_REGION[1],
        ASTRONAUT_FACE[2] - FACE_REGION[0],
        ASTRONAUT_FACE[3] - FACE_REGION[1],
    )
    for x, y, scale, mirrored in placements:
        piece = cut.resize((round(cut.width * scale), round(cut.height * scale)), Image.Resampling.BILINEAR)
        if mirrored:
            piece = piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left, right = cut.width - fx2, cut.width - fx1
        else:
            left, right = fx1, fx2
        canvas.paste(piece, (x, y))
        expected.append((x + left * scale, y + fy1 * scale, x + right * scale, y + fy2 * scale))
    return encode(canvas), expected


GROUP = [(20, 40, 1.0, False), (240, 80, 0.8, True), (430, 20, 1.25, False), (700, 260, 0.75, False)]


def boxes(faces: list[dict[str, Any]]) -> list[tuple[float, ...]]:
    return [(f["box"]["x1"], f["box"]["y1"], f["box"]["x2"], f["box"]["y2"]) for f in faces]


def assert_each_face_found(found: list[tuple[float, ...]], expected: list[tuple[float, ...]]) -> None:
    """One answer per face, each box over its face."""
    assert len(found) == len(expected), (found, expected)
    for where in expected:
        best = max(iou(box, where) for box in found)
        assert best > 0.6, (where, found)


# --- HTTP ---------------------------------------------------------------------------------------


def test_the_pipeline_is_listed_with_its_stages(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {CLASSIFIER, FACE_DETECTOR, "mini_xception", PIPELINE}
    pipeline = models[PIPELINE]
    assert pipeline["task"] == "face_expression" and pipeline["runtime"] == "pipeline"
    assert pipeline["stages"] == {"detector": FACE_DETECTOR, "classifier": "mini_xception"}
    assert pipeline["parameters"] == ["score_threshold", "min_face_size", "max_faces"]
    assert pipeline["faces"]["max_faces"] == 32 and pipeline["ready"]
    assert client.get(f"/models/{PIPELINE}").json()["labels"] == list(EXPRESSIONS)
    assert models[FACE_DETECTOR]["landmarks"] == 5
    assert client.get(f"/models/{PIPELINE}/ready").json() == {"status": "ready"}


def test_the_astronaut_has_one_happy_face_around_her_head(client: TestClient) -> None:
    response = client.post(f"/predict/file?model={PIPELINE}", files={"file": photo_bytes("astronaut.png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "task", "faces", "image", "latency_ms"}
    assert body["model"] == PIPELINE and body["task"] == "face_expression"
    assert body["image"] == {"width": 512, "height": 512}
    (face,) = body["faces"]
    assert iou(boxes([face])[0], ASTRONAUT_FACE) > 0.8, face["box"]
    assert set(face["expression"]) == set(EXPRESSIONS)
    assert face["top"] == "happiness" == max(face["expression"], key=face["expression"].get)
    assert abs(sum(face["expression"].values()) - 1.0) < 1e-3
    assert face["score"] > 0.9
    left_eye, right_eye, nose, mouth_left, mouth_right = face["landmarks"]
    box = face["box"]
    for x, y in face["landmarks"]:
        assert box["x1"] <= x <= box["x2"] and box["y1"] <= y <= box["y2"]
    assert left_eye[0] < right_eye[0] and max(left_eye[1], right_eye[1]) < nose[1] < min(
        mouth_left[1], mouth_right[1]
    )


@pytest.mark.parametrize("photo", NO_FACES)
def test_a_photo_without_faces_is_an_empty_list(client: TestClient, photo: str) -> None:
    response = client.post(f"/predict/file?model={PIPELINE}", files={"file": photo_bytes(photo)})
    assert response.status_code == 200, response.text
    assert response.json()["faces"] == []


def test_a_group_image_has_one_result_per_face_in_one_classifier_batch(client: TestClient) -> None:
    image, expected = group_image(GROUP)
    classifier = client.app.state.registry.get("mini_xception")  # type: ignore[attr-defined]
    before = dict(classifier.batcher.batch_sizes)
    body = client.post("/predict", json={"model": PIPELINE, "image": base64.b64encode(image).decode()}).json()
    assert_each_face_found(boxes(body["faces"]), expected)
    assert all(face["top"] == "happiness" for face in body["faces"]), [f["expression"] for f in body["faces"]]
    grown = {size: n - before.get(size, 0) for size, n in classifier.batcher.batch_sizes.items()}
    assert grown.get(len(GROUP), 0) >= 1, f"the crops were not one batch: {grown}"


def test_the_face_parameters(client: TestClient) -> None:
    image, expected = group_image(GROUP)
    url = f"/predict/file?model={PIPELINE}"

    def faces(query: str) -> list[dict[str, Any]]:
        response = client.post(url + query, files={"file": image})
        assert response.status_code == 200, response.text
        return list(response.json()["faces"])

    every = faces("")
    two = faces("&max_faces=2")
    assert boxes(two) == boxes(every)[:2]
    smallest = min(b[3] - b[1] for b in expected)
    assert len(faces(f"&min_face_size={smallest + 20:.0f}")) < len(every)
    assert faces("&score_threshold=1.0") == []


def test_a_tiny_image_and_a_face_cut_by_the_edge(client: TestClient) -> None:
    tiny = encode(Image.new("RGB", (6, 5), (200, 180, 160)))
    response = client.post(f"/predict/file?model={PIPELINE}", files={"file": tiny})
    assert response.status_code == 200 and response.json()["faces"] == []
    # the face's square crop (grown by the margin) reaches past the top-left corner: clipped
    image, expected = group_image([(-22, -25, 1.0, False)], size=(320, 320))
    response = client.post(f"/predict/file?model={PIPELINE}", files={"file": image})
    assert response.status_code == 200, response.text
    (face,) = response.json()["faces"]
    assert iou(boxes([face])[0], expected[0]) > 0.6 and face["box"]["x1"] >= 0


def test_a_large_jpeg_answers_in_its_own_pixels(client: TestClient) -> None:
    """A 2048 x 2048 JPEG is decoded at a reduced scale; the boxes are still in its pixels."""
    big = Image.open(packaged_photo("astronaut.png")).convert("RGB").resize((2048, 2048))
    response = client.post(f"/predict/file?model={PIPELINE}", files={"file": encode(big, "JPEG", quality=92)})
    body = response.json()
    assert body["image"] == {"width": 2048, "height": 2048}
    (face,) = body["faces"]
    assert iou(boxes([face])[0], tuple(v * 4 for v in ASTRONAUT_FACE)) > 0.8


def test_the_face_detector_alone_answers_faces_with_landmarks(client: TestClient) -> None:
    body = client.post(
        f"/predict/file?model={FACE_DETECTOR}", files={"file": photo_bytes("astronaut.png")}
    ).json()
    (face,) = body["detections"]
    assert face["label"] == "face" and len(face["landmarks"]) == 5
    assert iou(boxes([face])[0], ASTRONAUT_FACE) > 0.8
    cat = client.post(f"/predict/file?model={CLASSIFIER}", files={"file": photo_bytes("chelsea.png")}).json()
    assert "landmarks" not in json.dumps(cat)


@pytest.mark.parametrize(
    ("query", "status", "words"),
    [
        ("max_faces=0", 422, ["max_faces"]),
        ("max_faces=33", 400, ["max_faces", "between 1 and 32"]),
        ("min_face_size=-1", 422, ["min_face_size"]),
        ("min_face_size=1e12", 400, ["min_face_size", "between 0 and"]),
        ("score_threshold=1.5", 422, ["score_threshold"]),
        ("topk=3", 400, ["topk", "face_expression model", "max_faces"]),
        ("classes=person", 400, ["classes", "face_expression model"]),
    ],
)
def test_bad_face_parameters_are_refused_clearly(
    client: TestClient, query: str, status: int, words: list[str]
) -> None:
    response = client.post(
        f"/predict/file?model={PIPELINE}&{query}", files={"file": photo_bytes("astronaut.png")}
    )
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, message
    assert (
        client.post(f"/predict/file?model={PIPELINE}", files={"file": photo_bytes("coffee.png")}).status_code
        == 200
    )


def test_a_face_parameter_sent_to_another_task_is_refused(client: TestClient) -> None:
    response = client.post(
        f"/predict/file?model={FACE_DETECTOR}&max_faces=2", files={"file": photo_bytes("astronaut.png")}
    )
    assert response.status_code == 400 and "detection model" in response.json()["error"]["message"]
    response = client.post("/predict", json={"image": "aGVsbG8=", "min_face_size": 3})
    assert response.status_code == 400 and "classification model" in response.json()["error"]["message"]


def test_not_an_image_is_refused_and_the_pipeline_goes_on(client: TestClient) -> None:
    response = client.post(f"/predict/file?model={PIPELINE}", files={"file": b"GIF89a but not really"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image"
    assert (
        len(
            client.post(
                f"/predict/file?model={PIPELINE}", files={"file": photo_bytes("astronaut.png")}
            ).json()["faces"]
        )
        == 1
    )


# --- gRPC (the project's API) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_served(served: Served) -> Iterator[GrpcServing]:
    with grpc_serving(*runtimes_of(served), pipelines=[served[3]]) as serving:
        yield serving


def grpc_call(serving: GrpcServing, call: Callable[[pb_grpc.InferenceStub], Any]) -> Any:
    with grpc.insecure_channel(serving.target) as channel:
        return call(pb_grpc.InferenceStub(channel))


def face_boxes(faces: Any) -> list[tuple[float, ...]]:
    return [(f.box.x1, f.box.y1, f.box.x2, f.box.y2) for f in faces]


def test_grpc_predict_answers_typed_faces(grpc_served: GrpcServing) -> None:
    reply = grpc_call(
        grpc_served,
        lambda stub: stub.Predict(pb.PredictRequest(image=photo_bytes("astronaut.png"), model=PIPELINE)),
    )
    assert (
        reply.task == "face_expression"
        and reply.model == PIPELINE
        and not reply.topk
        and not reply.detections
    )
    (face,) = reply.faces
    assert iou(face_boxes([face])[0], ASTRONAUT_FACE) > 0.8
    assert face.top == "happiness" and face.expression.happiness > 0.5 and len(face.landmarks) == 5
    assert [f.name for f in pb.Expression.DESCRIPTOR.fields] == list(EXPRESSIONS)
    image, _ = group_image(GROUP)
    two = grpc_call(
        grpc_served, lambda stub: stub.Predict(pb.PredictRequest(image=image, model=PIPELINE, max_faces=2))
    )
    assert len(two.faces) == 2


def test_grpc_batch_and_bad_parameters(grpc_served: GrpcServing) -> None:
    images = [photo_bytes("astronaut.png"), b"not an image", photo_bytes("coffee.png")]
    reply = grpc_call(
        grpc_served, lambda stub: stub.PredictBatch(pb.PredictBatchRequest(images=images, model=PIPELINE))
    )
    face, bad, empty = reply.results
    assert len(face.result.faces) == 1 and bad.error.code == "invalid_image" and not empty.result.faces
    for request, words in [
        (pb.PredictRequest(model=PIPELINE, max_faces=0), ["max_faces", "between 1 and 32"]),
        (pb.PredictRequest(model=PIPELINE, min_face_size=-2), ["min_face_size"]),
        (pb.PredictRequest(model=PIPELINE, score_threshold=2), ["score_threshold"]),
        (pb.PredictRequest(model=PIPELINE, topk=2), ["topk", "face_expression model"]),
    ]:
        request.image = photo_bytes("astronaut.png")
        with pytest.raises(grpc.RpcError) as caught:
            grpc_call(grpc_served, lambda stub, r=request: stub.Predict(r))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for word in words:
            assert word in (caught.value.details() or ""), caught.value.details()


def video() -> list[tuple[list[tuple[float, ...]], bytes]]:
    """Frames: the astronaut, a two-face group, a photo without faces, with where the faces are."""
    group, where = group_image(GROUP[:2])
    return [([ASTRONAUT_FACE], photo_bytes("astronaut.png")), (where, group), ([], photo_bytes("coffee.png"))]


def test_grpc_stream_answers_every_frame_with_its_faces(grpc_served: GrpcServing) -> None:
    clip = video() * 2
    frames = [pb.Frame(image=data, frame_id=i, model=PIPELINE) for i, (_, data) in enumerate(clip)]
    answers = grpc_call(grpc_served, lambda stub: list(stub.PredictStream(iter(frames))))
    assert [a.frame_id for a in answers] == list(range(len(frames)))
    for answer, (where, _) in zip(answers, clip, strict=True):
        assert answer.task == "face_expression" and not answer.skipped
        assert_each_face_found(face_boxes(answer.faces), where)


async def _live(serving: GrpcServing, frames: list[pb.Frame]) -> list[pb.FramePrediction]:
    async with grpc.aio.insecure_channel(serving.target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def sent() -> AsyncIterator[pb.Frame]:
            for frame in frames:
                yield frame

        return [answer async for answer in stub.PredictLive(sent())]


def test_grpc_live_skips_stale_frames_and_computes_the_newest(grpc_served: GrpcServing) -> None:
    clip = video() * 8
    frames = [pb.Frame(image=data, frame_id=i, model=PIPELINE) for i, (_, data) in enumerate(clip)]
    answers = asyncio.run(_live(grpc_served, frames))
    assert [a.frame_id for a in answers] == list(range(len(frames)))
    computed = [a for a in answers if not a.skipped]
    assert computed and answers[-1] in computed and len(computed) < len(frames)
    for answer in computed:
        assert_each_face_found(face_boxes(answer.faces), clip[answer.frame_id][0])


# --- the Open Inference Protocol, with unmodified tritonclient ------------------------------------


@pytest.fixture(scope="module")
def v2_http(served: Served) -> Iterator[str]:
    with http_serving(*runtimes_of(served), pipelines=[served[3]]) as serving:
        yield serving.url


def test_tritonclient_http_gets_fixed_shape_faces(v2_http: str) -> None:
    triton = httpclient.InferenceServerClient(v2_http)
    assert triton.is_model_ready(PIPELINE)
    metadata = triton.get_model_metadata(PIPELINE)
    assert metadata["platform"] == "ensemble"
    assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [("image", "BYTES")]
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("boxes", "FP32", [-1, 32, 4]),
        ("scores", "FP32", [-1, 32]),
        ("expressions", "FP32", [-1, 32, 7]),
        ("landmarks", "FP32", [-1, 32, 10]),
        ("num_faces", "INT32", [-1, 1]),
    ]
    group, where = group_image(GROUP)
    images = np.array([photo_bytes("astronaut.png"), photo_bytes("coffee.png"), group], dtype=np.object_)
    tensor = httpclient.InferInput("image", [3], "BYTES")
    tensor.set_data_from_numpy(images)
    result = triton.infer(PIPELINE, [tensor])
    found = result.as_numpy("num_faces")[:, 0].tolist()
    assert found == [1, 0, len(GROUP)]
    expressions = result.as_numpy("expressions")
    assert EXPRESSIONS[int(np.argmax(expressions[0, 0]))] == "happiness"
    assert not expressions[1].any() and not expressions[0, 1:].any()
    assert iou(tuple(result.as_numpy("boxes")[0, 0]), ASTRONAUT_FACE) > 0.8
    assert_each_face_found([tuple(b) for b in result.as_numpy("boxes")[2, : len(GROUP)]], where)
    # a preprocessed tensor cannot go in: the pipeline crops faces out of the photo
    pixels = httpclient.InferInput("input", [1, 3, 64, 64], "FP32")
    pixels.set_data_from_numpy(np.zeros((1, 3, 64, 64), dtype=np.float32))
    with pytest.raises(Exception, match="unknown input 'input'"):
        triton.infer(PIPELINE, [pixels])
    triton.close()


def test_tritonclient_grpc_gets_faces(grpc_served: GrpcServing) -> None:
    """tritonclient.grpc runs in a child process (its stubs clash with ours in one process)."""
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.tritonclient_grpc_detect",
            grpc_served.target,
            PIPELINE,
            str(packaged_photo("astronaut.png")),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    answer = json.loads(child.stdout)
    outputs = answer["outputs"]
    assert outputs["num_faces"]["data"] == [1] and outputs["expressions"]["shape"] == [1, 32, 7]
    assert iou(tuple(outputs["boxes"]["data"][:4]), ASTRONAUT_FACE) > 0.8
    assert EXPRESSIONS[int(np.argmax(outputs["expressions"]["data"][:7]))] == "happiness"
    assert {m["name"] for m in answer["index"]} == {CLASSIFIER, FACE_DETECTOR, "mini_xception", PIPELINE}


def test_the_expressions_carry_seed_003_s_names_in_its_order() -> None:
    """The pydantic model, the protobuf message and the V2 output share seed 003's order."""
    from visionserve import schemas

    assert (
        list(schemas.Expression.model_fields)
        == list(EXPRESSIONS)
        == [f.name for f in pb.Expression.DESCRIPTOR.fields]
    )


def test_the_grpc_client_cli_prints_each_face(
    grpc_served: GrpcServing, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from grpc_server.client import main as client_main

    image, _ = group_image(GROUP[:2])
    (tmp_path / "group.png").write_bytes(image)
    argv = [
        str(tmp_path / "group.png"),
        "--target",
        grpc_served.target,
        "--model",
        PIPELINE,
        "--max-faces",
        "1",
    ]
    assert client_main(argv) == 0
    out = capsys.readouterr().out
    assert "happiness:" in out and out.count("happiness:") == 1, out
