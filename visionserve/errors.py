"""One error type for the whole service, and one table mapping its codes to protocol statuses.

The core raises `VisionError`; each front door (HTTP now, gRPC later) translates it with
`STATUS_TABLE`. This module imports neither FastAPI nor grpc: gRPC statuses are named by their
`grpc.StatusCode` member name and resolved by the gRPC layer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorCode(enum.StrEnum):
    """Machine-readable error codes, sent to clients as `error.code`."""

    INVALID_ARGUMENT = "invalid_argument"
    INVALID_BASE64 = "invalid_base64"
    INVALID_IMAGE = "invalid_image"
    IMAGE_TOO_LARGE = "image_too_large"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNAUTHENTICATED = "unauthenticated"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_READY = "not_ready"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


@dataclass(frozen=True)
class ProtocolStatus:
    """How one error code is answered on each protocol."""

    http: int
    grpc: str  # a `grpc.StatusCode` member name


STATUS_TABLE: dict[ErrorCode, ProtocolStatus] = {
    ErrorCode.INVALID_ARGUMENT: ProtocolStatus(400, "INVALID_ARGUMENT"),
    ErrorCode.INVALID_BASE64: ProtocolStatus(400, "INVALID_ARGUMENT"),
    ErrorCode.INVALID_IMAGE: ProtocolStatus(400, "INVALID_ARGUMENT"),
    ErrorCode.IMAGE_TOO_LARGE: ProtocolStatus(413, "RESOURCE_EXHAUSTED"),
    ErrorCode.PAYLOAD_TOO_LARGE: ProtocolStatus(413, "RESOURCE_EXHAUSTED"),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: ProtocolStatus(415, "INVALID_ARGUMENT"),
    ErrorCode.UNAUTHENTICATED: ProtocolStatus(401, "UNAUTHENTICATED"),
    ErrorCode.NOT_FOUND: ProtocolStatus(404, "NOT_FOUND"),
    ErrorCode.MODEL_NOT_FOUND: ProtocolStatus(404, "NOT_FOUND"),
    ErrorCode.METHOD_NOT_ALLOWED: ProtocolStatus(405, "UNIMPLEMENTED"),
    ErrorCode.NOT_READY: ProtocolStatus(503, "UNAVAILABLE"),
    ErrorCode.OVERLOADED: ProtocolStatus(503, "UNAVAILABLE"),
    ErrorCode.DEADLINE_EXCEEDED: ProtocolStatus(504, "DEADLINE_EXCEEDED"),
    ErrorCode.INTERNAL: ProtocolStatus(500, "INTERNAL"),
}

GENERIC_INTERNAL_MESSAGE = "internal error; the server log has the details"


class VisionError(Exception):
    """An error with a code and a message a client can act on.

    `retry_after_s` is set on errors a client may retry (not ready, overloaded).
    """

    def __init__(self, code: ErrorCode, message: str, *, retry_after_s: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def status(self) -> ProtocolStatus:
        """The protocol statuses for this error's code."""
        return STATUS_TABLE[self.code]

    def to_dict(self) -> dict[str, dict[str, str]]:
        """The JSON error body: `{"error": {"code", "message"}}`."""
        return {"error": {"code": self.code.value, "message": self.message}}

    def __repr__(self) -> str:
        return f"VisionError({self.code.value!r}, {self.message!r})"


class ConfigurationError(Exception):
    """The service cannot start as configured (missing model, bad setting, missing provider).

    Raised at start-up, never answered to a client; the message says what to change.
    """
