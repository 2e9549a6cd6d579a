"""The Open Inference Protocol codec and signature: every validation rule, without sockets.

Each refusal is a 400 / INVALID_ARGUMENT whose message names the input and what to fix.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import FAKE_CLASSES, write_fake_entry
from visionserve.errors import ErrorCode, VisionError
from visionserve.postprocessing import softmax
from visionserve.v2.codec import (
    ImageBatch,
    InputTensor,
    TensorBatch,
    pack_bytes,
    parse_inputs,
    unpack_bytes,
)
from visionserve.v2.outputs import (
    RequestedOutput,
    build_outputs,
    check_outputs,
    classification_strings,
    default_outputs,
    requested_output,
)
from visionserve.v2.signature import Signature

SIZE = 32
SHAPE = [1, 3, SIZE, SIZE]
BYTES_PER_IMAGE = 3 * SIZE * SIZE * 4


@pytest.fixture
def signature(tmp_path: Path) -> Signature:
    """The fake model (10 classes, 32x32 input) served in batches of at most 8."""
    return Signature.of(write_fake_entry(tmp_path), backend="onnx", max_batch_size=8, max_queue_delay_us=0)


def tensor_input(
    shape: object = SHAPE, data: object = None, name: object = "input", datatype: object = "FP32"
):
    if data is None and isinstance(shape, list):
        data = np.arange(int(np.prod(shape)), dtype="<f4").tobytes()
    return InputTensor(name, datatype, shape, data)  # type: ignore[arg-type]


def refused(signature: Signature, *tensors: InputTensor) -> str:
    with pytest.raises(VisionError) as caught:
        parse_inputs(signature, tensors)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert caught.value.status.http == 400 and caught.value.status.grpc == "INVALID_ARGUMENT"
    return caught.value.message


# --- signature ----------------------------------------------------------------------------------


def test_metadata_declares_both_inputs_and_both_outputs(signature: Signature) -> None:
    assert signature.metadata() == {
        "name": "fake",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, FAKE_CLASSES]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, FAKE_CLASSES]},
        ],
    }
    assert signature.server_metadata()["extensions"] == [
        "binary_tensor_data",
        "classification",
        "model_configuration",
        "statistics",
    ]


def test_config_leaves_out_the_batch_dimension(signature: Signature) -> None:
    config = signature.config()
    assert config["max_batch_size"] == 8
    tensor, image = config["input"]  # type: ignore[misc]
    assert tensor == {
        "name": "input",
        "data_type": "TYPE_FP32",
        "format": "FORMAT_NCHW",
        "dims": [3, SIZE, SIZE],
        "optional": True,
    }
    assert image["data_type"] == "TYPE_STRING" and image["dims"] == [1] and image["reshape"] == {"shape": []}
    assert [o["dims"] for o in config["output"]] == [[FAKE_CLASSES], [FAKE_CLASSES]]  # type: ignore[attr-defined]
    assert config["dynamic_batching"] == {
        "preferred_batch_size": [8],
        "max_queue_delay_microseconds": 0,
        "preserve_ordering": False,
    }


def test_a_model_that_outputs_probabilities_has_one_output_and_names_do_not_collide(tmp_path: Path) -> None:
    entry = write_fake_entry(
        tmp_path,
        input={"name": "image", "size": [32, 32], "resize": 36},
        output={"classes": 3, "kind": "probabilities", "name": "probabilities"},
        classes=3,
    )
    signature = Signature.of(entry, backend="torch", max_batch_size=4, max_queue_delay_us=100)
    assert [spec.name for spec in signature.outputs] == ["probabilities"]
    assert [spec.name for spec in signature.inputs] == ["image", "image_bytes"]
    assert signature.platform == "pytorch_torch_export"


def test_unknown_model_or_version_is_not_found(signature: Signature) -> None:
    signature.check_model("fake")
    signature.check_model("fake", "1")
    signature.check_model("fake", "")
    for name, version, fragment in (
        ("other", None, "'other' is not served here"),
        ("fake", "2", "no version '2'"),
    ):
        with pytest.raises(VisionError) as caught:
            signature.check_model(name, version)
        assert caught.value.code is ErrorCode.MODEL_NOT_FOUND and caught.value.status.http == 404
        assert fragment in caught.value.message


# --- preprocessed FP32 input ------------------------------------------------------------------------


def test_fp32_from_raw_bytes_is_a_copy_in_the_declared_shape(signature: Signature) -> None:
    raw = bytearray(np.arange(2 * BYTES_PER_IMAGE // 4, dtype="<f4").tobytes())
    parsed = parse_inputs(signature, [tensor_input([2, 3, SIZE, SIZE], raw)])
    assert isinstance(parsed, TensorBatch)
    assert parsed.array.shape == (2, 3, SIZE, SIZE) and parsed.array.dtype == np.float32
    assert parsed.array.flags.c_contiguous
    raw[:4] = struct.pack("<f", 99.0)  # the client's buffer changing later changes nothing
    assert parsed.array[0, 0, 0, 0] == 0.0
    assert parsed.array[1, 2, SIZE - 1, SIZE - 1] == 2 * 3 * SIZE * SIZE - 1


@pytest.mark.parametrize("nested", [False, True])
def test_fp32_from_a_json_list_flat_or_nested(signature: Signature, nested: bool) -> None:
    values = np.linspace(-1, 1, 3 * SIZE * SIZE, dtype=np.float32).reshape(SHAPE)
    data = values.tolist() if nested else values.ravel().tolist()
    parsed = parse_inputs(signature, [tensor_input(SHAPE, data)])
    assert isinstance(parsed, TensorBatch)
    np.testing.assert_array_equal(parsed.array, values)


@pytest.mark.parametrize("delta", [-4, -1, 1, 4, BYTES_PER_IMAGE])
def test_fp32_byte_count_must_match_the_shape_exactly(signature: Signature, delta: int) -> None:
    data = b"\x00" * (BYTES_PER_IMAGE + delta)
    message = refused(signature, tensor_input(SHAPE, data))
    assert f"needs {BYTES_PER_IMAGE:,} bytes; {BYTES_PER_IMAGE + delta:,} were sent" in message


def test_fp32_element_count_must_match_the_shape(signature: Signature) -> None:
    message = refused(signature, tensor_input(SHAPE, [0.0] * (3 * SIZE * SIZE - 1)))
    assert "needs 3,072 elements; 3,071 were sent" in message


@pytest.mark.parametrize("data", [["a"] * 3072, [[0.0, 1.0], [2.0]], [{"x": 1}] * 3072])
def test_fp32_data_must_be_numbers(signature: Signature, data: list[object]) -> None:
    message = refused(signature, tensor_input(SHAPE, data))
    assert "input 'input'" in message and ("numbers" in message or "elements" in message)


def test_fp32_nan_and_infinity_are_refused(signature: Signature) -> None:
    values = np.zeros(SHAPE, dtype="<f4")
    values[0, 1, 2, 3] = np.nan
    assert "NaN or infinity" in refused(signature, tensor_input(SHAPE, values.tobytes()))
    values[0, 1, 2, 3] = np.inf
    assert "NaN or infinity" in refused(signature, tensor_input(SHAPE, values.tobytes()))


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ([3, SIZE, SIZE], "has rank 3; expected [-1, 3, 32, 32]"),
        ([1, 1, 3, SIZE, SIZE], "has rank 5"),
        ([1, 4, SIZE, SIZE], "has 4 at dimension 1"),
        ([1, 3, SIZE, SIZE + 1], "has 33 at dimension 3"),
        ([1, 3, 2**40, SIZE], "at dimension 2"),
        ([1, -3, SIZE, SIZE], "negative dimension"),
        ([-1, 3, SIZE, SIZE], "negative dimension"),
        ([0, 3, SIZE, SIZE], "the batch is empty"),
        ([9, 3, SIZE, SIZE], "a batch of 9 is over this model's max_batch_size 8"),
        ([2**62, 3, SIZE, SIZE], "over this model's max_batch_size 8"),
        ("1,3,32,32", "shape must be a list of integers"),
        ([1, 3, 32.0, SIZE], "shape must be a list of integers"),
        ([True, 3, SIZE, SIZE], "shape must be a list of integers"),
    ],
)
def test_shape_rules(signature: Signature, shape: object, fragment: str) -> None:
    message = refused(signature, tensor_input(shape, b"\x00" * BYTES_PER_IMAGE))
    assert fragment in message and "input 'input'" in message


def test_unknown_input_names_what_the_model_takes(signature: Signature) -> None:
    message = refused(signature, tensor_input(name="pixels"))
    assert "unknown input 'pixels'" in message
    assert "'input' (FP32 [-1, 3, 32, 32]) or 'image' (BYTES [-1])" in message


@pytest.mark.parametrize("datatype", ["FP16", "FP64", "UINT8", "BYTES", "fp32", None])
def test_wrong_datatype(signature: Signature, datatype: object) -> None:
    assert f"input 'input' must be FP32; got {datatype!r}" in refused(
        signature, tensor_input(datatype=datatype)
    )


def test_one_input_exactly(signature: Signature) -> None:
    assert "the request has no inputs" in refused(signature)
    image = InputTensor("image", "BYTES", [1], [b"x"])
    message = refused(signature, tensor_input(), image)
    assert "has 2 inputs ['input', 'image']; send exactly one" in message
    assert "has 2 inputs" in refused(signature, tensor_input(), tensor_input())


def test_an_input_without_data(signature: Signature) -> None:
    assert "input 'input' carries no data" in refused(signature, InputTensor("input", "FP32", SHAPE, None))


# --- encoded images (BYTES) -------------------------------------------------------------------------


def test_pack_and_unpack_bytes_round_trip() -> None:
    elements = [b"", b"a", b"\x00" * 300]
    raw = pack_bytes(elements)
    assert raw[:4] == b"\x00\x00\x00\x00" and raw[4:8] == struct.pack("<I", 1)
    assert unpack_bytes(raw, name="image", expected=3) == elements


@pytest.mark.parametrize(
    ("raw", "expected", "fragment"),
    [
        (pack_bytes([b"ab", b"cd"]), 1, "more than the 1 element(s)"),
        (pack_bytes([b"ab"]) + b"\x01\x00", 2, "element 1 is cut short: 2 byte(s) left"),
        (struct.pack("<I", 10) + b"abc", 1, "element 0 declares 10 bytes but only 3 remain"),
        (pack_bytes([b"ab"]), 2, "declares 2 element(s) but its raw data holds 1"),
        (b"", 1, "declares 1 element(s) but its raw data holds 0"),
    ],
)
def test_unpack_bytes_refuses_malformed_data(raw: bytes, expected: int, fragment: str) -> None:
    with pytest.raises(VisionError) as caught:
        unpack_bytes(raw, name="image", expected=expected)
    assert fragment in caught.value.message and caught.value.code is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("shape", [[2], [2, 1]])
def test_images_from_raw_bytes_as_n_or_n_by_1(signature: Signature, shape: list[int]) -> None:
    parsed = parse_inputs(signature, [InputTensor("image", "BYTES", shape, pack_bytes([b"one", b"two"]))])
    assert parsed == ImageBatch([b"one", b"two"])


def test_images_from_a_list_bytes_or_base64_text(signature: Signature) -> None:
    parsed = parse_inputs(signature, [InputTensor("image", "BYTES", [3], [b"raw", "YmFzZTY0", ["nested"]])])
    assert parsed == ImageBatch([b"raw", "YmFzZTY0", "nested"])


@pytest.mark.parametrize(
    ("shape", "data", "fragment"),
    [
        ([2], [b"a"], "declares 2 image(s) but 1 were sent"),
        ([1], [123], "element 0 is int; each element is one encoded image"),
        ([1, 2], [b"a", b"b"], "has 2 at dimension 1"),
        ([1, 1, 1], [b"a"], "has rank 3"),
        ([9], [b"a"] * 9, "a batch of 9 is over"),
        ([0], [], "the batch is empty"),
    ],
)
def test_image_rules(signature: Signature, shape: list[int], data: list[object], fragment: str) -> None:
    assert fragment in refused(signature, InputTensor("image", "BYTES", shape, data))


# --- outputs ------------------------------------------------------------------------------------


def test_requested_outputs_are_checked(signature: Signature) -> None:
    assert requested_output(signature, "logits") == RequestedOutput("logits")
    assert requested_output(signature, "probabilities", {"classification": 3, "binary_data": True}) == (
        RequestedOutput("probabilities", 3, True)
    )
    cases = [
        ("scores", {}, "unknown output 'scores'; this model has 'logits', 'probabilities'"),
        ("logits", {"classification": FAKE_CLASSES + 1}, "classification must be between 1 and 10"),
        ("logits", {"classification": -1}, "classification must be between 1 and 10"),
        ("logits", {"classification": True}, "classification must be an integer"),
        ("logits", {"classification": "3"}, "classification must be an integer"),
        ("logits", {"binary_data": "yes"}, "binary_data must be true or false"),
    ]
    for name, parameters, fragment in cases:
        with pytest.raises(VisionError) as caught:
            requested_output(signature, name, parameters)
        assert fragment in caught.value.message
    with pytest.raises(VisionError, match="requested more than once"):
        check_outputs([RequestedOutput("logits"), RequestedOutput("logits", 2)])
    assert [o.name for o in default_outputs(signature)] == ["logits", "probabilities"]


def test_outputs_are_the_scores_and_their_softmax(signature: Signature) -> None:
    scores = np.random.default_rng(3).normal(size=(2, FAKE_CLASSES)).astype(np.float32)
    logits, probabilities = build_outputs(signature, scores, default_outputs(signature))
    assert (logits.name, logits.datatype, logits.shape) == ("logits", "FP32", (2, FAKE_CLASSES))
    np.testing.assert_array_equal(np.frombuffer(logits.raw(), "<f4").reshape(2, -1), scores)
    np.testing.assert_allclose(np.frombuffer(probabilities.raw(), "<f4").reshape(2, -1), softmax(scores))
    assert probabilities.json_data() == pytest.approx(softmax(scores).ravel().tolist())


def test_classification_strings_are_value_index_label_most_probable_first() -> None:
    labels = ("a", "b", "c", "d")
    values = np.array([[0.1, 0.4, 0.4, 0.1], [1.0, 0.0, 3.0, 2.0]], dtype=np.float32)
    assert classification_strings(values, 2, labels) == [
        b"0.400000:1:b",  # ties: the lower index first
        b"0.400000:2:c",
        b"3.000000:2:c",
        b"2.000000:3:d",
    ]


def test_classification_output_is_bytes_n_by_k(signature: Signature) -> None:
    scores = np.tile(np.arange(FAKE_CLASSES, dtype=np.float32), (2, 1))
    (output,) = build_outputs(signature, scores, [RequestedOutput("logits", 3)])
    assert (output.datatype, output.shape) == ("BYTES", (2, 3))
    assert output.json_data()[:3] == ["9.000000:9:class_9", "8.000000:8:class_8", "7.000000:7:class_7"]
    assert unpack_bytes(output.raw(), name="logits", expected=6)[0] == b"9.000000:9:class_9"
