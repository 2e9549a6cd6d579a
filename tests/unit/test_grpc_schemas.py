"""The HTTP API's pydantic schemas and the gRPC API's protobuf messages describe the same things with
the same names (seed 003's point), and every core error code is one the gRPC layer can send."""

from __future__ import annotations

import types
import typing

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from pydantic import BaseModel

from grpc_server import status
from visionserve import schemas
from visionserve.errors import GENERIC_INTERNAL_MESSAGE, STATUS_TABLE, ErrorCode, VisionError
from visionserve.v1 import inference_pb2 as pb

# pydantic annotation -> the protobuf scalar types that carry it
SCALARS: dict[object, set[int]] = {
    str: {FieldDescriptor.TYPE_STRING},
    bytes: {FieldDescriptor.TYPE_BYTES},
    int: {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64},
    float: {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE},
}


def proto_fields(message: Descriptor) -> dict[str, FieldDescriptor]:
    return {field.name: field for field in message.fields}


def is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)  # protobuf >= 7 (`label` is gone)


def assert_same_kind(model: type[BaseModel], name: str, field: FieldDescriptor) -> None:
    """The pydantic field and the proto field carry the same kind of value."""
    annotation = typing.get_type_hints(model)[name]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = args  # `X | None`: proto3 scalars are optional by their default value
        args = list(typing.get_args(annotation))
    where = f"{model.__name__}.{name} ({annotation}) vs proto {field.full_name}"
    if typing.get_origin(annotation) is list:
        assert is_repeated(field), where
        (item,) = args
        assert field.type == FieldDescriptor.TYPE_MESSAGE, where
        assert field.message_type.name == item.__name__, where
        return
    assert not is_repeated(field), where
    if model is schemas.PredictRequest and name == "image":
        # HTTP carries the image as base64 text in JSON; gRPC as bytes: the same image
        assert field.type == FieldDescriptor.TYPE_BYTES, where
        return
    assert field.type in SCALARS[annotation], where


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (schemas.Prediction, pb.Prediction),
        (schemas.PredictResponse, pb.PredictResponse),
        (schemas.PredictRequest, pb.PredictRequest),
        (schemas.ErrorDetail, pb.Error),
    ],
    ids=["Prediction", "PredictResponse", "PredictRequest", "ErrorDetail-Error"],
)
def test_same_fields_with_the_same_names_and_kinds(model: type[BaseModel], message: type[typing.Any]) -> None:
    fields = proto_fields(message.DESCRIPTOR)
    assert set(model.model_fields) == set(fields), (
        f"{model.__name__} has {sorted(model.model_fields)}, proto {message.DESCRIPTOR.full_name} has "
        f"{sorted(fields)}: keep visionserve/schemas.py and protos/ in step"
    )
    for name, field in fields.items():
        assert_same_kind(model, name, field)


def test_batch_and_stream_messages_reuse_the_same_pieces() -> None:
    """A batch slot holds a PredictResponse or an Error; a frame's answer the same Prediction and
    Error, and a request's fields carry the same names as PredictRequest's."""
    slot = pb.BatchResult.DESCRIPTOR
    assert [f.name for f in slot.oneofs_by_name["outcome"].fields] == ["result", "error"]
    assert slot.fields_by_name["result"].message_type is pb.PredictResponse.DESCRIPTOR
    assert slot.fields_by_name["error"].message_type is pb.Error.DESCRIPTOR
    frame_answer = pb.FramePrediction.DESCRIPTOR.fields_by_name
    assert frame_answer["topk"].message_type is pb.Prediction.DESCRIPTOR
    assert frame_answer["error"].message_type is pb.Error.DESCRIPTOR
    assert {"latency_ms"} <= set(frame_answer) and "latency_ms" in schemas.PredictResponse.model_fields
    batch_request = proto_fields(pb.PredictBatchRequest.DESCRIPTOR)
    assert set(batch_request) == {"images", "topk", "model"}
    assert {"topk", "model"} <= set(schemas.PredictRequest.model_fields)
    assert "topk" in proto_fields(pb.Frame.DESCRIPTOR)


def test_a_grpc_response_fits_the_http_schema() -> None:
    """The same answer, filled in as protobuf, validates as the HTTP API's PredictResponse."""
    message = pb.PredictResponse(
        topk=[
            pb.Prediction(label="tabby", prob=0.75, index=281),
            pb.Prediction(label="lynx", prob=0.25, index=287),
        ],
        model="efficientnet_lite0",
        prediction="tabby",
        probability=0.75,
        latency_ms=12.5,
    )
    from google.protobuf.json_format import MessageToDict

    as_dict = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    parsed = schemas.PredictResponse.model_validate(as_dict)
    assert parsed.prediction == "tabby" and [p.index for p in parsed.topk] == [281, 287]


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_maps_to_a_grpc_status(code: ErrorCode) -> None:
    assert code in STATUS_TABLE
    grpc_status = status.grpc_code(code)
    assert isinstance(grpc_status, grpc.StatusCode)
    assert grpc_status is not grpc.StatusCode.OK
    assert grpc_status.name == STATUS_TABLE[code].grpc
    entry = status.error_message(VisionError(code, "what went wrong"))
    assert entry == pb.Error(code=code.value, message="what went wrong")


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (ErrorCode.INVALID_IMAGE, grpc.StatusCode.INVALID_ARGUMENT),
        (ErrorCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT),  # e.g. bad topk
        (ErrorCode.IMAGE_TOO_LARGE, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ErrorCode.PAYLOAD_TOO_LARGE, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ErrorCode.NOT_READY, grpc.StatusCode.UNAVAILABLE),
        (ErrorCode.OVERLOADED, grpc.StatusCode.UNAVAILABLE),
        (ErrorCode.MODEL_NOT_FOUND, grpc.StatusCode.NOT_FOUND),
        (ErrorCode.DEADLINE_EXCEEDED, grpc.StatusCode.DEADLINE_EXCEEDED),
        (ErrorCode.INTERNAL, grpc.StatusCode.INTERNAL),
    ],
)
def test_the_statuses_the_grpc_api_promises(code: ErrorCode, expected: grpc.StatusCode) -> None:
    assert status.grpc_code(code) is expected


def test_an_unexpected_error_becomes_a_generic_entry() -> None:
    entry = status.error_message(RuntimeError("secret internal detail at 0xdeadbeef"))
    assert entry == pb.Error(code=ErrorCode.INTERNAL.value, message=GENERIC_INTERNAL_MESSAGE)
    assert "0xdeadbeef" not in GENERIC_INTERNAL_MESSAGE
