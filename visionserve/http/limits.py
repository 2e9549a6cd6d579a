"""Request body size limit, enforced before the body is read (pure ASGI middleware)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visionserve.errors import ErrorCode, VisionError


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes the limit.

    An HTTPException, so that FastAPI's body parsing re-raises it as it is (it turns other
    exceptions into a generic 400) and the app's handler answers it with the error shape.
    """

    def __init__(self, message: str):
        super().__init__(status_code=413, detail=message)


def is_v2_path(path: str) -> bool:
    """Open Inference Protocol routes answer errors as that protocol does: `{"error": "<message>"}`."""
    return path == "/v2" or path.startswith("/v2/")


def error_response(
    error: VisionError, path: str, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[Message, Message]:
    """The two ASGI messages of an error answer, in the error shape of `path`'s protocol."""
    shape = {"error": error.message} if is_v2_path(path) else error.to_dict()
    body = json.dumps(shape).encode()
    start: Message = {
        "type": "http.response.start",
        "status": error.status.http,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *(headers or []),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


class BodySizeLimit:
    """Answer 413 to bodies over `max_bytes`, naming the setting to raise.

    A declared `Content-Length` over the limit is refused before a byte is read; a chunked body
    is counted as it streams and refused when it passes the limit.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, setting: str = "VISION_MAX_REQUEST_BYTES"):
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting

    def _too_large(self, size: int | None) -> VisionError:
        what = f"{size:,} bytes" if size is not None else f"more than {self.max_bytes:,} bytes"
        return VisionError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the request body is {what}; the limit is {self.max_bytes:,} bytes (setting {self.setting})",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    error = VisionError(
                        ErrorCode.INVALID_ARGUMENT, "the Content-Length header is not a number"
                    )
                    await self._send_error(send, error, scope["path"])
                    return
                if declared > self.max_bytes:
                    await self._send_error(send, self._too_large(declared), scope["path"])
                    return
                break

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self._too_large(None).message)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._send_error(send, self._too_large(None), scope["path"])

    @staticmethod
    async def _send_error(send: Send, error: VisionError, path: str) -> None:
        start, body = error_response(error, path)
        await send(start)
        await send(body)
