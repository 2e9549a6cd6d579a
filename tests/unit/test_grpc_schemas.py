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
        if item == schemas.Point:  # [x, y] in JSON, Point {x, y} over gRPC
            assert field.message_type.name == "Point", where
            assert [f.name for f in field.message_type.fields] == ["x", "y"], where
            return
        if item in SCALARS:
            assert field.type in SCALARS[item], where
            return
        assert field.type == FieldDescriptor.TYPE_MESSAGE, where
        assert field.message_type.name == item.__name__, where
        return
    assert not is_repeated(field), where
    if model is schemas.PredictRequest and name == "image":
        # HTTP carries the image as base64 text in JSON; gRPC as bytes: the same image
        assert field.type == FieldDescriptor.TYPE_BYTES, where
        return
    if typing.get_origin(annotation) is typing.Literal:  # e.g. `task`: a fixed string
        annotation = type(typing.get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        assert field.type == FieldDescriptor.TYPE_MESSAGE, where
        assert field.message_type.name == annotation.__name__, where
        return
    assert field.type in SCALARS[annotation], where


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (schemas.Prediction, pb.Prediction),
        (schemas.PredictRequest, pb.PredictRequest),
        (schemas.Box, pb.Box),
        (schemas.Detection, pb.Detection),
        (schemas.ImageSize, pb.ImageSize),
        (schemas.ErrorDetail, pb.Error),
        (schemas.Expression, pb.Expression),
        (schemas.Face, pb.Face),
    ],
    ids=[
        "Prediction",
        "PredictRequest",
        "Box",
        "Detection",
        "ImageSize",
        "ErrorDetail-Error",
        "Expression",
        "Face",
    ],
)
def test_same_fields_with_the_same_names_and_kinds(model: type[BaseModel], message: type[typing.Any]) -> None:
    fields = proto_fields(message.DESCRIPTOR)
    assert set(model.model_fields) == set(fields), (
        f"{model.__name__} has {sorted(model.model_fields)}, proto {message.DESCRIPTOR.full_name} has "
        f"{sorted(fields)}: keep visionserve/schemas.py and protos/ in step"
    )
    for name, field in fields.items():
        assert_same_kind(model, name, field)


def test_every_task_answer_is_a_part_of_the_one_response_message() -> None:
    """Over gRPC one `PredictResponse` carries any task's answer: each HTTP answer's fields are in
    it with the same names and kinds, and it has no field that no HTTP answer has."""
    fields = proto_fields(pb.PredictResponse.DESCRIPTOR)
    answers = (schemas.PredictResponse, schemas.DetectionResponse, schemas.FacesResponse)
    for model in answers:
        assert set(model.model_fields) <= set(fields), (model.__name__, sorted(fields))
        for name in model.model_fields:
            assert_same_kind(model, name, fields[name])
    assert set(fields) == set().union(*(model.model_fields for model in answers))
    assert typing.get_args(schemas.AnyPredictResponse) == answers


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
    assert frame_answer["detections"].message_type is pb.Detection.DESCRIPTOR
    assert frame_answer["image"].message_type is pb.ImageSize.DESCRIPTOR
    assert frame_answer["faces"].message_type is pb.Face.DESCRIPTOR
    parameters = set(schemas.TaskParameters.model_fields)  # model + every task's parameters
    batch_request = proto_fields(pb.PredictBatchRequest.DESCRIPTOR)
    assert set(batch_request) == {"images"} | parameters
    assert set(proto_fields(pb.Frame.DESCRIPTOR)) == {"image", "frame_id"} | parameters
    request = proto_fields(pb.PredictRequest.DESCRIPTOR)
    for name in parameters:
        for message in (pb.PredictBatchRequest, pb.Frame):
            same = proto_fields(message.DESCRIPTOR)[name]
            assert (same.type, same.has_presence, is_repeated(same)) == (
                request[name].type,
                request[name].has_presence,
                is_repeated(request[name]),
            ), name


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
    parsed = schemas.PredictResponse.model_validate(
        {k: as_dict[k] for k in schemas.PredictResponse.model_fields if k != "task"}
    )
    assert parsed.prediction == "tabby" and [p.index for p in parsed.topk] == [281, 287]
    detected = pb.PredictResponse(
        model="yolo11n",
        task="detection",
        detections=[pb.Detection(label="cat", index=15, score=0.8, box=pb.Box(x1=1, y1=2, x2=300, y2=200))],
        image=pb.ImageSize(width=451, height=300),
        latency_ms=20.0,
    )
    as_dict = MessageToDict(detected, preserving_proto_field_name=True)
    answer = schemas.DetectionResponse.model_validate(
        {k: as_dict[k] for k in schemas.DetectionResponse.model_fields}
    )
    assert answer.detections[0].box.x2 == 300 and answer.image.width == 451


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
