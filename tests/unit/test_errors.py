"""The error codes and their protocol statuses (visionserve/errors.py)."""

from __future__ import annotations

import pytest

from visionserve.errors import STATUS_TABLE, ErrorCode, ProtocolStatus, VisionError

# The members of grpc.StatusCode, by name (grpcio need not be installed for these tests).
GRPC_STATUS_NAMES = frozenset(
    [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ]
)
# gRPC codes that blame the client (a 4xx must map to one of these, never to INTERNAL/UNKNOWN/OK).
GRPC_CLIENT_ERRORS = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "UNAUTHENTICATED",
        "CANCELLED",
    }
)


def test_every_code_has_a_status() -> None:
    assert set(STATUS_TABLE) == set(ErrorCode)
    assert all(isinstance(status, ProtocolStatus) for status in STATUS_TABLE.values())


@pytest.mark.parametrize("code", list(ErrorCode))
def test_status_is_sane(code: ErrorCode) -> None:
    status = STATUS_TABLE[code]
    assert 400 <= status.http <= 599, f"{code}: an error must be a 4xx or 5xx, got {status.http}"
    assert status.grpc in GRPC_STATUS_NAMES, f"{code}: {status.grpc!r} is not a grpc.StatusCode name"
    assert status.grpc != "OK"
    if status.http < 500:
        assert status.grpc in GRPC_CLIENT_ERRORS, f"{code}: a {status.http} must map to a client error"
    if status.http == 503:
        assert status.grpc == "UNAVAILABLE"
    if status.http == 413:
        assert status.grpc == "RESOURCE_EXHAUSTED"
    if status.http == 500:
        assert status.grpc == "INTERNAL"


@pytest.mark.parametrize(
    ("code", "http", "grpc"),
    [
        (ErrorCode.INVALID_BASE64, 400, "INVALID_ARGUMENT"),
        (ErrorCode.INVALID_IMAGE, 400, "INVALID_ARGUMENT"),
        (ErrorCode.IMAGE_TOO_LARGE, 413, "RESOURCE_EXHAUSTED"),
        (ErrorCode.PAYLOAD_TOO_LARGE, 413, "RESOURCE_EXHAUSTED"),
        (ErrorCode.MODEL_NOT_FOUND, 404, "NOT_FOUND"),
        (ErrorCode.NOT_READY, 503, "UNAVAILABLE"),
        (ErrorCode.INTERNAL, 500, "INTERNAL"),
    ],
)
def test_key_statuses(code: ErrorCode, http: int, grpc: str) -> None:
    assert STATUS_TABLE[code] == ProtocolStatus(http, grpc)


def test_codes_are_lowercase_snake_case_strings() -> None:
    for code in ErrorCode:
        assert code.value == code.name.lower()
        assert str(code) == code.value  # StrEnum: sent as-is in JSON


def test_vision_error_body_and_status() -> None:
    error = VisionError(ErrorCode.INVALID_IMAGE, "not an image")
    assert error.to_dict() == {"error": {"code": "invalid_image", "message": "not an image"}}
    assert error.status.http == 400
    assert error.retry_after_s is None
    assert str(error) == "not an image"
    assert "invalid_image" in repr(error)


def test_vision_error_retry_after() -> None:
    error = VisionError(ErrorCode.NOT_READY, "loading", retry_after_s=5)
    assert error.retry_after_s == 5
    assert error.status == ProtocolStatus(503, "UNAVAILABLE")
