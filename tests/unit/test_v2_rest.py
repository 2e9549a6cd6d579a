"""The Open Inference Protocol's HTTP body (JSON, binary tensor extension, compression), without a
server: every rule about where the JSON ends, how the binary part is split between inputs, and what
a compressed body may inflate to."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import FAKE_CLASSES, write_fake_entry
from visionserve.errors import ErrorCode, VisionError
from visionserve.v2.codec import ImageBatch, TensorBatch, pack_bytes
from visionserve.v2.outputs import RequestedOutput, build_outputs
from visionserve.v2.rest import HEADER_LENGTH, decompress, encode_response, parse_request
from visionserve.v2.signature import Signature

SHAPE = [1, 3, 32, 32]
TENSOR = np.linspace(-2, 2, 3 * 32 * 32, dtype="<f4").reshape(SHAPE)


@pytest.fixture
def signature(tmp_path: Path) -> Signature:
    return Signature.of(write_fake_entry(tmp_path), backend="onnx", max_batch_size=8, max_queue_delay_us=0)


def binary_body(header: dict[str, object], *blobs: bytes) -> tuple[bytes, str]:
    """A body of the binary tensor extension and its Inference-Header-Content-Length."""
    text = json.dumps(header).encode()
    return text + b"".join(blobs), str(len(text))


def tensor_header(size: int, **extra: object) -> dict[str, object]:
    return {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": SHAPE, "parameters": {"binary_data_size": size}}
        ],
        **extra,
    }


def refused(signature: Signature, body: bytes, header_length: str | None = None) -> str:
    with pytest.raises(VisionError) as caught:
        parse_request(signature, body, header_length)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT, caught.value
    return caught.value.message


# --- parsing ------------------------------------------------------------------------------------


def test_json_only_request(signature: Signature) -> None:
    body = json.dumps(
        {
            "id": "r1",
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": SHAPE, "data": TENSOR.ravel().tolist()}
            ],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
            "parameters": {"timeout": 2_500_000, "priority": 1},
        }
    ).encode()
    request = parse_request(signature, body, None)
    assert request.id == "r1" and request.timeout_s == 2.5 and request.binary_output is False
    assert isinstance(request.model_input, TensorBatch)
    np.testing.assert_array_equal(request.model_input.array, TENSOR)
    assert request.outputs == [RequestedOutput("probabilities", 2)]


def test_binary_request_every_output_by_default(signature: Signature) -> None:
    raw = TENSOR.tobytes()
    body, length = binary_body(tensor_header(len(raw), parameters={"binary_data_output": True}), raw)
    request = parse_request(signature, body, length)
    assert isinstance(request.model_input, TensorBatch)
    np.testing.assert_array_equal(request.model_input.array, TENSOR)
    assert [o.name for o in request.outputs] == ["logits", "probabilities"]
    assert request.binary_output is True


def test_binary_images_split_by_binary_data_size(signature: Signature) -> None:
    raw = pack_bytes([b"first", b"second"])
    header = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}
        ]
    }
    body, length = binary_body(header, raw)
    assert parse_request(signature, body, length).model_input == ImageBatch([b"first", b"second"])


@pytest.mark.parametrize("delta", [-1, 1])
def test_binary_part_must_hold_exactly_what_the_inputs_declare(signature: Signature, delta: int) -> None:
    raw = TENSOR.tobytes()
    # the declared size is right for the shape, the body holds a byte more or less
    body, length = binary_body(tensor_header(len(raw)), raw[:delta] if delta < 0 else raw + b"\x00")
    message = refused(signature, body, length)
    assert "runs past the end of the body" in message or "add up to" in message


def test_binary_data_size_that_disagrees_with_the_shape(signature: Signature) -> None:
    raw = TENSOR.tobytes()[:-4]
    body, length = binary_body(tensor_header(len(raw)), raw)
    assert "needs 12,288 bytes; 12,284 were sent" in refused(signature, body, length)


@pytest.mark.parametrize(
    ("length", "fragment"),
    [
        ("abc", "must be a number of bytes"),
        ("0", "is 0 but the body is"),
        ("999999", "is 999,999 but the body"),
    ],
)
def test_header_length_must_point_inside_the_body(signature: Signature, length: str, fragment: str) -> None:
    body, _ = binary_body(tensor_header(12288), TENSOR.tobytes())
    assert fragment in refused(signature, body, length)


def test_binary_data_without_the_header_length_is_not_json(signature: Signature) -> None:
    body, _ = binary_body(tensor_header(12288), TENSOR.tobytes())
    assert "the request's JSON is not valid" in refused(signature, body, None)


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ([], "the request must be a JSON object"),
        ({"inputs": {}}, "`inputs` must be a list"),
        ({"inputs": [1]}, "inputs[0] must be a JSON object"),
        (
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": SHAPE, "data": "abc"}]},
            "`data` must be a list",
        ),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": SHAPE}]}, "carries no data"),
        ({"inputs": [], "outputs": {}}, "the request has no inputs"),
        ({"id": 7, "inputs": []}, "`id` must be a string"),
        ({"parameters": [], "inputs": []}, "request parameters must be a JSON object"),
        ({"parameters": {"binary_data_output": 1}, "inputs": []}, "binary_data_output must be true or false"),
        ({"parameters": {"timeout": -5}, "inputs": []}, "timeout must be a positive number of microseconds"),
    ],
)
def test_malformed_json_documents(signature: Signature, document: object, fragment: str) -> None:
    assert fragment in refused(signature, json.dumps(document).encode())


def test_outputs_must_be_a_list_of_known_names(signature: Signature) -> None:
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]
    assert "`outputs` must be a list" in refused(
        signature, json.dumps({"inputs": inputs, "outputs": {"name": "logits"}}).encode()
    )
    assert "unknown output 'scores'" in refused(
        signature, json.dumps({"inputs": inputs, "outputs": [{"name": "scores"}]}).encode()
    )


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"binary_data_size": -1}, "must be a byte count"),
        ({"binary_data_size": True}, "must be a byte count"),
    ],
)
def test_binary_data_size_must_be_a_byte_count(
    signature: Signature, parameters: object, fragment: str
) -> None:
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": SHAPE, "parameters": parameters}]}
    body, length = binary_body(header, b"x")
    assert fragment in refused(signature, body, length)


def test_data_and_binary_data_size_together(signature: Signature) -> None:
    header = tensor_header(12288)
    header["inputs"][0]["data"] = [0.0]  # type: ignore[index]
    body, length = binary_body(header, TENSOR.tobytes())
    assert "has both `data` and binary_data_size" in refused(signature, body, length)


def test_two_binary_inputs_are_refused_without_shifting_data(signature: Signature) -> None:
    raw = TENSOR.tobytes()
    header = tensor_header(len(raw))
    header["inputs"] = header["inputs"] * 2  # type: ignore[operator]
    body, length = binary_body(header, raw, raw)
    assert "has 2 inputs" in refused(signature, body, length)


# --- compression --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-15)),
        (None, lambda data: data),
        ("identity", lambda data: data),
    ],
)
def test_decompress(encoding: str | None, compress: object) -> None:
    data = b"{}" * 1000
    assert decompress(compress(data), encoding, limit=len(data)) == data  # type: ignore[operator]


def test_a_zip_bomb_is_refused_at_the_limit_without_inflating_it() -> None:
    bomb = gzip.compress(b"\x00" * (64 * 1024 * 1024))  # 64 MiB of zeros in ~64 KB
    assert len(bomb) < 100_000
    with pytest.raises(VisionError) as caught:
        decompress(bomb, "gzip", limit=1024 * 1024)
    assert caught.value.code is ErrorCode.PAYLOAD_TOO_LARGE and caught.value.status.http == 413
    assert "decompresses to more than 1,048,576 bytes" in caught.value.message
    assert "VISION_MAX_REQUEST_BYTES" in caught.value.message


def test_corrupt_truncated_and_unknown_encodings() -> None:
    with pytest.raises(VisionError, match="not valid gzip data"):
        decompress(b"not gzip at all", "gzip", limit=1000)
    with pytest.raises(VisionError, match="truncated"):
        decompress(gzip.compress(b"x" * 1000)[:-12], "gzip", limit=10_000)
    with pytest.raises(VisionError) as caught:
        decompress(b"data", "br", limit=1000)
    assert (
        caught.value.code is ErrorCode.UNSUPPORTED_MEDIA_TYPE and "send gzip, deflate" in caught.value.message
    )


# --- responses ----------------------------------------------------------------------------------


def test_json_response(signature: Signature) -> None:
    request = parse_request(
        signature,
        json.dumps(
            {
                "id": "abc",
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}],
                "outputs": [
                    {"name": "logits"},
                    {"name": "probabilities", "parameters": {"classification": 2}},
                ],
            }
        ).encode(),
        None,
    )
    scores = np.arange(FAKE_CLASSES, dtype=np.float32)[np.newaxis]
    body, headers = encode_response(signature, request, build_outputs(signature, scores, request.outputs))
    assert headers == {"Content-Type": "application/json"}
    document = json.loads(body)
    assert document["model_name"] == "fake" and document["model_version"] == "1" and document["id"] == "abc"
    logits, classes = document["outputs"]
    assert logits == {
        "name": "logits",
        "datatype": "FP32",
        "shape": [1, FAKE_CLASSES],
        "data": list(range(10)),
    }
    assert classes["datatype"] == "BYTES" and classes["shape"] == [1, 2]
    assert classes["data"][0].endswith(":9:class_9")


def test_binary_response_blobs_follow_the_json_in_output_order(signature: Signature) -> None:
    raw = TENSOR.tobytes()
    header = tensor_header(
        len(raw),
        outputs=[
            {"name": "probabilities", "parameters": {"binary_data": True}},
            {"name": "logits", "parameters": {"binary_data": False, "classification": 1}},
            {"name": "logits", "parameters": {"binary_data": True}},
        ],
    )
    body, length = binary_body(header, raw)
    with pytest.raises(VisionError, match="more than once"):
        parse_request(signature, body, length)
    header["outputs"] = header["outputs"][:2]  # type: ignore[index]
    body, length = binary_body(header, raw)
    request = parse_request(signature, body, length)
    scores = np.random.default_rng(0).normal(size=(1, FAKE_CLASSES)).astype(np.float32)
    content, headers = encode_response(signature, request, build_outputs(signature, scores, request.outputs))
    assert headers["Content-Type"] == "application/octet-stream"
    json_length = int(headers[HEADER_LENGTH])
    document = json.loads(content[:json_length])
    probabilities, top = document["outputs"]
    assert (
        probabilities["parameters"] == {"binary_data_size": 4 * FAKE_CLASSES} and "data" not in probabilities
    )
    assert top["data"][0].split(":")[1] == str(int(np.argmax(scores)))
    blob = content[json_length:]
    assert len(blob) == 4 * FAKE_CLASSES
    np.testing.assert_allclose(np.frombuffer(blob, "<f4").sum(), 1.0, rtol=1e-5)
