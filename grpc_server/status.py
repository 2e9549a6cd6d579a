"""Core errors -> gRPC status codes, through the core's one table."""

from __future__ import annotations

import logging

import grpc

from visionserve.errors import GENERIC_INTERNAL_MESSAGE, STATUS_TABLE, ErrorCode, VisionError
from visionserve.v1 import inference_pb2 as pb

logger = logging.getLogger(__name__)

MAX_DETAILS_BYTES = 1024
"""Longest status message sent (UTF-8 bytes). It travels, percent-encoded, in the `grpc-message`
trailer, which clients cap (grpc: 8 KiB soft, 16 KiB hard): a message that quotes a long name from
the request reached the client as RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"
instead of its own status."""


def shortened(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """`message` if it fits in `limit` UTF-8 bytes, else its start and its end (where the advice
    usually is) with what was cut between them."""
    data = message.encode()
    if len(data) <= limit:
        return message
    keep = (limit - 40) // 2
    head, tail = data[:keep].decode(errors="ignore"), data[-keep:].decode(errors="ignore")
    return f"{head} [... {len(data) - 2 * keep:,} bytes cut ...] {tail}"


def grpc_code(code: ErrorCode) -> grpc.StatusCode:
    """The gRPC status for a core error code (STATUS_TABLE names it)."""
    return getattr(grpc.StatusCode, STATUS_TABLE[code].grpc)  # type: ignore[no-any-return]


def error_message(exc: BaseException) -> pb.Error:
    """An `Error` entry for a batch slot or a stream frame; internals never leak."""
    if isinstance(exc, VisionError):
        return pb.Error(code=exc.code.value, message=exc.message)
    logger.error("unexpected error on one item", exc_info=exc)
    return pb.Error(code=ErrorCode.INTERNAL.value, message=GENERIC_INTERNAL_MESSAGE)


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:  # type: ignore[type-arg]
    """End the call with the status for `exc` (a generic INTERNAL for anything unexpected)."""
    if isinstance(exc, VisionError):
        if exc.retry_after_s:
            context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
        await context.abort(grpc_code(exc.code), shortened(exc.message))
    logger.error("unexpected error in a call", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, GENERIC_INTERNAL_MESSAGE)


SIZE_SETTING = "VISION_GRPC_MAX_MESSAGE_BYTES"


def check_message_size(message: object, limit: int) -> None:
    """Refuse a request message over the limit (PAYLOAD_TOO_LARGE naming the setting).

    NOTE: the transport accepts up to twice the limit (see `GrpcServer`) so that this check, not
    gRPC core, refuses a message just over it, with a message a client can act on.
    """
    size = message.ByteSize()  # type: ignore[attr-defined]
    if size > limit:
        raise VisionError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the message is {size:,} bytes; the limit is {limit:,} bytes (setting {SIZE_SETTING})",
        )


def check_response_size(response: object, limit: int, hint: str) -> None:
    """Refuse an answer over the limit with a message naming the setting (PAYLOAD_TOO_LARGE).

    NOTE: the server sends at most VISION_GRPC_MAX_MESSAGE_BYTES too; without this check, an answer
    over it (many small images with a large topk) ends the call with gRPC core's RESOURCE_EXHAUSTED
    "Sent message larger than max", which names nothing a client can change.
    """
    size = response.ByteSize()  # type: ignore[attr-defined]
    if size > limit:
        raise VisionError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the response would be {size:,} bytes; the limit is {limit:,} bytes (setting "
            f"{SIZE_SETTING}): {hint}",
        )
