"""What every HTTP route does with a request, written once: its deadline, its JSON or multipart
body, and waiting for its answer unless the client goes away. Shared by the project's own routes
and the Open Inference Protocol's (`visionserve.v2.http`)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Coroutine
from importlib import resources
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from visionserve.deadlines import deadline_after, positive_seconds
from visionserve.errors import ErrorCode, VisionError

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)
ResultT = TypeVar("ResultT")

CLIENT_CLOSED_REQUEST = 499
"""Status recorded (visionserve_requests{status="499"}, nginx's convention) for a request whose
client went away before its answer; nobody receives it."""

TIMEOUT_HEADER = "X-Request-Timeout"
"""Request header: seconds the client will wait; still queued after that, the request is dropped."""

TIMEOUT_PARAMETER: dict[str, Any] = {
    "parameters": [
        {
            "name": TIMEOUT_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0},
            "description": "Seconds you will wait for the answer. A request still queued for the "
            "model after that is dropped and answered 504 (the server's VISION_REQUEST_TIMEOUT_S, "
            "if set and shorter, applies too).",
        }
    ]
}
"""The OpenAPI declaration of the timeout header, for every inference route."""

FILE_FIELD = "file"
"""The multipart form field /predict/file reads the image from."""


class ClientGone(Exception):  # noqa: N818 - a departure, not an error
    """The client disconnected while its request was in the service (queued, or computing)."""


def example_image_base64() -> str:
    """A small real photo (a crop of scikit-image's chelsea.png) for the /docs examples."""
    data = resources.files("visionserve.data").joinpath("example.jpg").read_bytes()
    return base64.b64encode(data).decode("ascii")


def deadline(request: Request, arrived: float, setting_s: float | None) -> float | None:
    """The request's deadline on the monotonic clock: the shorter of the header's and the setting's."""
    header = request.headers.get(TIMEOUT_HEADER)
    header_s = None if header is None else positive_seconds(header, what=f"header {TIMEOUT_HEADER}")
    return deadline_after(arrived, setting_s, header_s)


def parse_json(model: type[ModelT], body: bytes) -> ModelT:
    """Parse and validate a JSON body; errors become the same 422 as FastAPI's own."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def read_upload(request: Request) -> bytes:
    """The bytes of the form's `file` upload; errors are the same 422 as FastAPI's for an
    `UploadFile` parameter, a malformed multipart body Starlette's 400."""
    try:
        async with request.form() as form:
            upload = form.get(FILE_FIELD)
            if isinstance(upload, UploadFile):
                return await upload.read()
    except OSError as exc:
        # Starlette keeps a file part over 1 MB in a temporary file: with no writable temporary
        # directory (a read-only root without a /tmp tmpfs), a full disk or a bad TMPDIR that
        # fails here, for every large upload. The server's fault, said so (500), and logged.
        logger.error("could not buffer an upload on disk: %s (TMPDIR=%s)", exc, os.environ.get("TMPDIR"))
        raise VisionError(
            ErrorCode.INTERNAL,
            f"the server could not buffer this upload on disk ({exc.strerror or exc}): uploads over "
            "1 MB need a writable temporary directory (TMPDIR, /tmp); smaller uploads and the JSON "
            "endpoints do not. The server log has the details.",
        ) from None
    if upload is None:
        error = {"type": "missing", "loc": ("body", FILE_FIELD), "msg": "Field required", "input": None}
    else:
        error = {
            "type": "value_error",
            "loc": ("body", FILE_FIELD),
            "msg": f"Value error, Expected UploadFile, received: {type(upload)}",
            "input": upload,
        }
    raise RequestValidationError([error])


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, ResultT]) -> ResultT:
    """Await `work`, cancelling it if the client disconnects first (then raise `ClientGone`).

    NOTE: once the body is read, the ASGI `receive` waits until the client goes away; a request
    that is cancelled while it waits in the batcher's queue is dropped there, never computed.
    """
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone = True
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if gone and current is not None and not current.cancelling():
            # NOTE: a normal end for this request, not a server error (uvicorn would log the
            # CancelledError as "Exception in ASGI application", with a traceback)
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


def name_model(request: Request, model: str) -> None:
    """Record the model a request was for (the `model` label of its request metrics)."""
    request.state.model = model
