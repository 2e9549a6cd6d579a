"""tritonclient.grpc, unmodified, against the real `GrpcServer` (127.0.0.1:0) serving the real
exported model, on real photos.

The client runs in a child process (tests/integration/tritonclient_grpc_calls.py), once for the
module, and prints what it saw: tritonclient.grpc and visionserve's own V2 stubs cannot share a
process (both register `inference.*` in protobuf's default descriptor pool). The server, and the
project's own gRPC API to compare predictions with, are here.

The issue's list, and where it is covered:
- is_server_live/ready, is_model_ready              test_health_and_readiness
- get_model_metadata, get_model_config, statistics   test_metadata_config_and_statistics
- infer with BYTES and FP32 input                    test_encoded_images_*, test_preprocessed_tensor_*
- classification extension                           test_classification_*
- async_infer, stream_infer with several requests    test_async_infer_*, test_stream_infer_*
- the bad-input cases                                test_bad_input_*
- predictions equal the project's own API's          `own_api` (visionserve.v1 Predict, same server)
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from tests.conftest import ROOT, photo_bytes
from tests.integration.v2_servers import GrpcServing, grpc_serving
from visionserve.photos import packaged_photo
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import ModelEntry
from visionserve.runtimes.onnx import OnnxRuntime
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.real_model

MODEL = "efficientnet_lite0"
PHOTOS = ("chelsea.png", "coffee.png", "flower.jpg")
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
TOP1 = {"chelsea.png": CATS, "coffee.png": {"espresso"}, "flower.jpg": {"daisy"}}
TENSOR_PHOTOS = ("chelsea.png", "coffee.png")


@pytest.fixture(scope="module")
def served(real_entry: ModelEntry) -> Iterator[GrpcServing]:
    with grpc_serving(OnnxRuntime(real_entry, threads=2)) as serving:
        yield serving


@pytest.fixture(scope="module")
def own_api(served: GrpcServing) -> dict[str, list[pb.Prediction]]:
    """The project's own gRPC API's top 5 for each photo, from the same server."""

    async def ask() -> dict[str, list[pb.Prediction]]:
        async with grpc.aio.insecure_channel(served.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            return {
                name: list((await stub.Predict(pb.PredictRequest(image=photo_bytes(name), topk=5))).topk)
                for name in PHOTOS
            }

    return asyncio.run(ask())


@pytest.fixture(scope="module")
def seen(
    served: GrpcServing, real_entry: ModelEntry, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """What tritonclient.grpc saw, calling the server from its own process."""
    folder = tmp_path_factory.mktemp("tritonclient")
    preprocessor = ImagePreprocessor(real_entry.config.input, max_image_pixels=40_000_000)
    np.save(folder / "tensor.npy", np.stack([preprocessor(photo_bytes(name)) for name in TENSOR_PHOTOS]))
    calls = {
        "photos": {name: str(packaged_photo(name)) for name in PHOTOS},
        "tensor": str(folder / "tensor.npy"),
    }
    (folder / "calls.json").write_text(json.dumps(calls))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.tritonclient_grpc_calls",
            served.target,
            MODEL,
            str(folder / "calls.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, f"the tritonclient process failed:\n{result.stdout}\n{result.stderr}"
    seen: dict[str, Any] = json.loads(result.stdout)
    return seen


def assert_matches_own_api(
    top5: dict[str, list[Any]], name: str, own_api: dict[str, list[pb.Prediction]]
) -> None:
    expected = own_api[name]
    assert top5["index"] == [p.index for p in expected], name
    assert top5["prob"] == pytest.approx([p.prob for p in expected], abs=1e-4)
    assert expected[0].label in TOP1[name]


def test_health_and_readiness(seen: dict[str, Any]) -> None:
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["model_ready_versions"] == [True, False]
    assert seen["unknown_model_ready"] is False


def test_metadata_config_and_statistics(seen: dict[str, Any]) -> None:
    assert seen["server_metadata"]["name"] == "visionserve"
    assert "classification" in seen["server_metadata"]["extensions"]
    metadata = seen["model_metadata"]
    assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]] == [
        ("input", "FP32", [-1, 3, 224, 224]),
        ("image", "BYTES", [-1]),
    ]
    assert [(t["name"], [int(d) for d in t["shape"]]) for t in metadata["outputs"]] == [
        ("logits", [-1, 1000]),
        ("probabilities", [-1, 1000]),
    ]
    config = seen["model_config"]["config"]
    assert config["name"] == MODEL and config["max_batch_size"] == 32
    assert [(i["name"], i["data_type"]) for i in config["input"]] == [
        ("input", "TYPE_FP32"),
        ("image", "TYPE_STRING"),
    ]
    assert [int(d) for d in config["input"][0]["dims"]] == [3, 224, 224]
    assert "dynamic_batching" in config
    (stats,) = seen["statistics"]["model_stats"]
    assert stats["name"] == MODEL and int(stats["inference_count"]) > 0


def test_encoded_images_match_the_own_api(seen: dict[str, Any], own_api: dict) -> None:
    images = seen["images"]
    assert images["id"] == "photos"
    assert images["shapes"] == [[3, 1000], [3, 1000]]
    for name in PHOTOS:
        assert_matches_own_api(images["top5"][name], name, own_api)
    assert images["logits_argmax"] == [images["top5"][name]["index"][0] for name in PHOTOS]


def test_preprocessed_tensor_matches_the_own_api(seen: dict[str, Any], own_api: dict) -> None:
    for top5, name in zip(seen["tensor"], TENSOR_PHOTOS, strict=True):
        assert_matches_own_api(top5, name, own_api)


def test_classification_gives_value_index_label(seen: dict[str, Any], own_api: dict) -> None:
    for name in PHOTOS:
        parsed = [entry.split(":", 2) for entry in seen["classification"][name]]
        assert [(int(i), label) for _, i, label in parsed] == [(p.index, p.label) for p in own_api[name]]


def test_async_infer_answers_each_request_with_its_own_photo(seen: dict[str, Any], own_api: dict) -> None:
    assert sorted(answer["name"] for answer in seen["async"]) == sorted(PHOTOS * 2)
    for answer in seen["async"]:
        assert answer["error"] is None
        assert_matches_own_api(answer, answer["name"], own_api)


def test_stream_infer_answers_in_order_and_goes_on_after_a_bad_request(
    seen: dict[str, Any], own_api: dict
) -> None:
    answers = seen["stream"]
    assert len(answers) == 2 * len(PHOTOS) + 1
    bad = answers[len(PHOTOS)]
    assert "image[0]: the data is not an image" in bad["error"]
    good = answers[: len(PHOTOS)] + answers[len(PHOTOS) + 1 :]
    assert [a["id"] for a in good] == [str(i) for i in range(len(answers)) if i != len(PHOTOS)]
    for answer, name in zip(good, PHOTOS * 2, strict=True):
        assert_matches_own_api(answer, name, own_api)


@pytest.mark.parametrize(
    ("case", "status", "fragment"),
    [
        ("unknown input name", "INVALID_ARGUMENT", "unknown input 'pixels'"),
        ("wrong datatype", "INVALID_ARGUMENT", "input 'input' must be FP32; got 'FP16'"),
        ("wrong rank", "INVALID_ARGUMENT", "has rank 3"),
        ("fewer bytes than the shape", "INVALID_ARGUMENT", "needs 1,204,224 bytes; 602,112 were sent"),
        ("more bytes than the shape", "INVALID_ARGUMENT", "needs 602,112 bytes; 1,204,224 were sent"),
        ("negative dimension", "INVALID_ARGUMENT", "negative dimension"),
        ("huge dimension", "INVALID_ARGUMENT", "at dimension 3"),
        (
            "batch above max_batch_size",
            "INVALID_ARGUMENT",
            "a batch of 33 is over this model's max_batch_size 32",
        ),
        ("two inputs", "INVALID_ARGUMENT", "send exactly one"),
        ("bytes that are not an image", "INVALID_ARGUMENT", "image[1]: the data is not an image"),
        ("classification out of range", "INVALID_ARGUMENT", "between 1 and 1000"),
        ("unknown model", "NOT_FOUND", "'resnet50' is not served here"),
        ("metadata of an unknown model", "NOT_FOUND", "'resnet50' is not served here"),
    ],
)
def test_bad_input_is_refused_naming_the_problem(
    seen: dict[str, Any], case: str, status: str, fragment: str
) -> None:
    error = seen["errors"][case]
    assert error is not None, f"{case}: accepted"
    assert error["status"] == f"StatusCode.{status}", error
    assert fragment in error["message"], error


def test_the_calls_were_counted_with_their_method_and_status(
    seen: dict[str, Any], served: GrpcServing
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    counted = {
        (sample.labels["endpoint"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(served.metrics())
        for sample in family.samples
        if sample.name == "visionserve_requests_total" and sample.labels["protocol"] == "grpc"
    }
    service = "/inference.GRPCInferenceService"
    assert counted[(f"{service}/ModelInfer", "OK")] >= 3
    assert counted[(f"{service}/ModelInfer", "INVALID_ARGUMENT")] >= 10
    assert counted[(f"{service}/ModelStreamInfer", "OK")] == 1
    assert counted[(f"{service}/ModelConfig", "OK")] == 1
