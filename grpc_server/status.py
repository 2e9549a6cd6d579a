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
