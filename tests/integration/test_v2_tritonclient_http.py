"""tritonclient.http, unmodified, against the real HTTP app (uvicorn on 127.0.0.1:0) serving the real
exported model, on real photos: the Open Inference Protocol as its users will call it.

The issue's list, and where it is covered:
- is_server_live/ready, is_model_ready              test_health_and_readiness
- get_model_metadata, get_model_config, statistics   test_metadata_config_and_statistics
- infer with BYTES (JPEG/PNG) input                  test_encoded_images_*
- infer with FP32 input, binary and JSON             test_preprocessed_tensor_*
- classification extension                           test_classification_*
- async_infer                                        test_async_infer_*
- the bad-input cases                                test_bad_input_*, test_unknown_model_*
- predictions equal the project's own API's          every infer test compares with `own_api`
- a plain curl-style JSON request                    test_plain_json_request_*
- gzip request bodies                                test_gzip_request_*
- concurrent V2 requests batched, each its own answer tests/integration/test_v2_http.py (fake
                                                     runtime: the batch composition is known)
"""

from __future__ import annotations

import base64
import gzip
import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import photo_bytes
from tests.integration.v2_servers import HttpServing, http_serving
from visionserve.postprocessing import softmax
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import ModelEntry
from visionserve.runtimes.onnx import OnnxRuntime

pytestmark = pytest.mark.real_model

MODEL = "efficientnet_lite0"
PHOTOS = ("chelsea.png", "coffee.png", "flower.jpg")
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
TOP1 = {"chelsea.png": CATS, "coffee.png": {"espresso"}, "flower.jpg": {"daisy"}}


@pytest.fixture(scope="module")
def served(real_entry: ModelEntry) -> Iterator[HttpServing]:
    with http_serving(OnnxRuntime(real_entry, threads=2)) as serving:
        yield serving


@pytest.fixture(scope="module")
def client(served: HttpServing) -> Iterator[httpclient.InferenceServerClient]:
    triton = httpclient.InferenceServerClient(served.url, concurrency=4)
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def own_api(served: HttpServing) -> dict[str, list[dict[str, object]]]:
    """The project's own API's top 5 for each photo (POST /predict), to compare with."""
    answers = {}
    for name in PHOTOS:
        body = json.dumps({"image": base64.b64encode(photo_bytes(name)).decode(), "topk": 5}).encode()
        request = urllib.request.Request(
            f"http://{served.url}/predict", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            answers[name] = json.loads(reply.read())["topk"]
    return answers


def preprocessed(entry: ModelEntry, *names: str) -> np.ndarray:
    """The photos as the model's input: float32 (N, 3, 224, 224), preprocessed as the server would."""
    preprocessor = ImagePreprocessor(entry.config.input, max_image_pixels=40_000_000)
    return np.stack([preprocessor(photo_bytes(name)) for name in names])


def images_input(*names: str) -> httpclient.InferInput:
    """The photos' encoded bytes as the BYTES input (binary, as tritonclient sends BYTES)."""
    data = np.array([photo_bytes(name) for name in names], dtype=np.object_)
    tensor = httpclient.InferInput("image", [len(names)], "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def tensor_input(batch: np.ndarray, *, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


def assert_matches_own_api(probabilities: np.ndarray, names: tuple[str, ...], own_api: dict) -> None:
    """Each row's top 5 are the own API's classes for that photo, with the same probabilities."""
    assert probabilities.shape == (len(names), 1000)
    for row, name in zip(probabilities, names, strict=True):
        expected = own_api[name]
        top = np.argsort(-row, kind="stable")[:5]
        assert [int(i) for i in top] == [p["index"] for p in expected], name
        assert row[top] == pytest.approx([p["prob"] for p in expected], abs=1e-4)
        assert expected[0]["label"] in TOP1[name]


def test_health_and_readiness(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2")
    assert not client.is_model_ready("resnet50")


def test_metadata_config_and_statistics(client: httpclient.InferenceServerClient) -> None:
    server = client.get_server_metadata()
    assert server["name"] == "visionserve"
    assert {"binary_tensor_data", "classification", "model_configuration"} <= set(server["extensions"])
    metadata = client.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]},
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
    ]
    assert metadata["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 1000]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]},
    ]
    config = client.get_model_config(MODEL)
    assert config["max_batch_size"] == 32
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("input", "TYPE_FP32", [3, 224, 224]),
        ("image", "TYPE_STRING", [1]),
    ]
    assert "dynamic_batching" in config
    stats = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert stats["name"] == MODEL and stats["version"] == "1"
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("resnet50")
    assert caught.value.status() == "404" and "'resnet50' is not served here" in caught.value.message()


def test_encoded_images_in_one_request_match_the_own_api(
    client: httpclient.InferenceServerClient, own_api: dict
) -> None:
    result = client.infer(MODEL, [images_input(*PHOTOS)], request_id="photos")
    assert result.get_response()["id"] == "photos"
    logits, probabilities = result.as_numpy("logits"), result.as_numpy("probabilities")
    np.testing.assert_allclose(softmax(logits), probabilities, atol=1e-6)
    assert_matches_own_api(probabilities, PHOTOS, own_api)


@pytest.mark.parametrize("binary", [True, False])
def test_preprocessed_tensor_binary_or_json_matches_the_own_api(
    client: httpclient.InferenceServerClient, real_entry: ModelEntry, own_api: dict, binary: bool
) -> None:
    batch = preprocessed(real_entry, "chelsea.png", "coffee.png")
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
    result = client.infer(MODEL, [tensor_input(batch, binary=binary)], outputs=outputs)
    assert_matches_own_api(result.as_numpy("probabilities"), ("chelsea.png", "coffee.png"), own_api)


def test_classification_extension_gives_value_index_label(
    client: httpclient.InferenceServerClient, own_api: dict
) -> None:
    outputs = [httpclient.InferRequestedOutput("probabilities", class_count=5)]
    result = client.infer(MODEL, [images_input("chelsea.png", "coffee.png")], outputs=outputs)
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 5)
    for row, name in zip(classes, ("chelsea.png", "coffee.png"), strict=True):
        parsed = [entry.decode().split(":", 2) for entry in row]
        expected = own_api[name]
        assert [(int(index), label) for _, index, label in parsed] == [
            (p["index"], p["label"]) for p in expected
        ]
        assert [float(value) for value, _, _ in parsed] == pytest.approx(
            [p["prob"] for p in expected], abs=1e-4
        )


def test_async_infer_answers_each_request_with_its_own_photo(
    client: httpclient.InferenceServerClient, own_api: dict
) -> None:
    order = [*PHOTOS, *PHOTOS]
    pending = [
        client.async_infer(MODEL, [images_input(name)], request_id=str(i)) for i, name in enumerate(order)
    ]
    for i, (name, request) in enumerate(zip(order, pending, strict=True)):
        result = request.get_result(timeout=60)
        assert result.get_response()["id"] == str(i)
        assert_matches_own_api(result.as_numpy("probabilities"), (name,), own_api)


def test_gzip_request_bodies(client: httpclient.InferenceServerClient, own_api: dict) -> None:
    for algorithm in ("gzip", "deflate"):
        result = client.infer(MODEL, [images_input("coffee.png")], request_compression_algorithm=algorithm)
        assert_matches_own_api(result.as_numpy("probabilities"), ("coffee.png",), own_api)


def test_plain_json_request_as_curl_sends_it(served: HttpServing, own_api: dict) -> None:
    """No client library and no binary extension: JSON in, JSON out, the image as base64 text."""
    body = {
        "id": "curl",
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(photo_bytes("chelsea.png")).decode()],
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
    }
    request = urllib.request.Request(
        f"http://{served.url}/v2/models/{MODEL}/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.headers["Content-Type"] == "application/json"
        document = json.loads(reply.read())
    assert document["id"] == "curl" and document["model_name"] == MODEL
    (output,) = document["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 3]
    assert [entry.split(":", 2)[2] for entry in output["data"]] == [
        p["label"] for p in own_api["chelsea.png"][:3]
    ]


# --- bad input: each refused with 400 and a message naming the problem; the server keeps serving --


def _good_tensor(real_entry: ModelEntry) -> np.ndarray:
    return preprocessed(real_entry, "chelsea.png")


def _wrong_dtype(entry: ModelEntry) -> list[httpclient.InferInput]:
    tensor = httpclient.InferInput("input", [1, 3, 224, 224], "FP16")
    tensor.set_data_from_numpy(_good_tensor(entry).astype(np.float16))
    return [tensor]


def _reshaped(entry: ModelEntry, shape: list[int]) -> list[httpclient.InferInput]:
    """The right data, sent with a declared shape that does not describe it."""
    tensor = tensor_input(_good_tensor(entry))
    tensor.set_shape(shape)
    return [tensor]


def _more_bytes(entry: ModelEntry) -> list[httpclient.InferInput]:
    tensor = tensor_input(np.concatenate([_good_tensor(entry)] * 2))
    tensor.set_shape([1, 3, 224, 224])
    return [tensor]


def _named(entry: ModelEntry, name: str) -> list[httpclient.InferInput]:
    tensor = httpclient.InferInput(name, [1, 3, 224, 224], "FP32")
    tensor.set_data_from_numpy(_good_tensor(entry))
    return [tensor]


def _not_images(entry: ModelEntry) -> list[httpclient.InferInput]:
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([photo_bytes("coffee.png"), b"GIF89a not really"], dtype=np.object_))
    return [tensor]


def _too_many(entry: ModelEntry) -> list[httpclient.InferInput]:
    tensor = httpclient.InferInput("image", [33], "BYTES")
    tensor.set_data_from_numpy(np.array([photo_bytes("coffee.png")] * 33, dtype=np.object_))
    return [tensor]


BAD_INPUTS = {
    "unknown input name": (lambda e: _named(e, "pixels"), "unknown input 'pixels'"),
    "wrong datatype": (_wrong_dtype, "input 'input' must be FP32; got 'FP16'"),
    "wrong rank": (lambda e: _reshaped(e, [3, 224, 224]), "has rank 3"),
    "wrong dimension": (lambda e: _reshaped(e, [1, 3, 224, 223]), "has 223 at dimension 3"),
    "fewer bytes than the shape": (
        lambda e: _reshaped(e, [2, 3, 224, 224]),
        "needs 1,204,224 bytes; 602,112",
    ),
    "more bytes than the shape": (_more_bytes, "needs 602,112 bytes; 1,204,224 were sent"),
    "negative dimension": (lambda e: _reshaped(e, [-1, 3, 224, 224]), "negative dimension"),
    "huge dimension": (lambda e: _reshaped(e, [1, 3, 224, 2**40]), "at dimension 3"),
    "batch above max_batch_size": (_too_many, "a batch of 33 is over this model's max_batch_size 32"),
    "two inputs": (lambda e: [*_named(e, "input"), images_input("coffee.png")], "send exactly one"),
    "bytes that are not an image": (_not_images, "image[1]: the data is not an image"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_400_naming_the_problem(
    client: httpclient.InferenceServerClient, real_entry: ModelEntry, own_api: dict, case: str
) -> None:
    make, fragment = BAD_INPUTS[case]
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, make(real_entry))
    assert caught.value.status() == "400", caught.value
    assert fragment in caught.value.message(), caught.value.message()
    result = client.infer(MODEL, [images_input("chelsea.png")])  # still serving
    assert_matches_own_api(result.as_numpy("probabilities"), ("chelsea.png",), own_api)


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        (httpclient.InferRequestedOutput("probabilities", class_count=1001), "between 1 and 1000"),
        (httpclient.InferRequestedOutput("scores"), "unknown output 'scores'"),
    ],
)
def test_bad_output_request(client: httpclient.InferenceServerClient, output: object, fragment: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [images_input("coffee.png")], outputs=[output])
    assert caught.value.status() == "400" and fragment in caught.value.message()


def test_unknown_model_is_a_404(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("resnet50", [images_input("coffee.png")])
    assert (
        caught.value.status() == "404" and "this server serves 'efficientnet_lite0'" in caught.value.message()
    )


def test_errors_are_the_protocol_s_shape(served: HttpServing) -> None:
    status, body = served.get("/v2/models/resnet50")
    assert status == 404 and json.loads(body) == {
        "error": "model 'resnet50' is not served here; this server serves 'efficientnet_lite0'"
    }
    request = urllib.request.Request(
        f"http://{served.url}/v2/models/{MODEL}/infer",
        gzip.compress(b"{not json"),
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert json.loads(caught.value.read())["error"].startswith("the request's JSON is not valid")
