"""The HTTP app's error handlers: every error is JSON, in the project's shape (`{"error": {"code",
"message"}}`) or, under `/v2`, the Open Inference Protocol's (`{"error": "<message>"}`)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from visionserve.errors import GENERIC_INTERNAL_MESSAGE, ErrorCode, VisionError
from visionserve.http.limits import is_v2_path
from visionserve.http.requests import CLIENT_CLOSED_REQUEST, ClientGone
from visionserve.schemas import ErrorResponse

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Bad input: invalid base64, not an image, corrupt image, a parameter out of range or "
        "not one of the model's task",
        404: "Unknown model",
        413: "Body or image over the configured limits (the message names the setting)",
        422: "The request does not match the schema",
        503: "The model is not loaded yet, the server is at capacity, or it is shutting down (see "
        "Retry-After)",
        504: "The request's deadline (X-Request-Timeout, VISION_REQUEST_TIMEOUT_S) passed while it "
        "was queued; it was not computed",
    }.items()
}
"""The OpenAPI `responses` of the inference routes."""


def error_body(request: Request, code: ErrorCode, message: str) -> dict[str, Any]:
    """The error JSON in the shape of the request's protocol."""
    if is_v2_path(request.url.path):
        return {"error": message}
    return {"error": {"code": code.value, "message": message}}


def vision_error_json(error: VisionError, *, v2: bool) -> JSONResponse:
    """The answer to a `VisionError`: its status, `Retry-After` when it may be retried, the error
    JSON in the project's shape or (`v2`) the Open Inference Protocol's. The route's handler and the
    refusal decided before the framework (`visionserve.http.refusal`) both answer with it."""
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
    body: dict[str, Any] = (
        {"error": error.message} if v2 else {"error": {"code": error.code.value, "message": error.message}}
    )
    return JSONResponse(body, status_code=error.status.http, headers=headers)


def _error_json(error: VisionError, request: Request) -> JSONResponse:
    return vision_error_json(error, v2=is_v2_path(request.url.path))


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            continue
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request does not match the schema"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error as JSON; count clients that left mid-body."""

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
        # NOTE: gone mid-body: the request never reached a model, so it is counted here as dropped
        # before it was computed; one gone later is counted by its model's pipeline, if at all.
        model = getattr(request.state, "model", "")
        request.app.state.registry.metrics.rejected.labels("cancelled", model).inc()
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(VisionError)
    async def vision_error(request: Request, exc: VisionError) -> JSONResponse:
        return _error_json(exc, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            error_body(request, ErrorCode.INVALID_ARGUMENT, _validation_message(exc)), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_ARGUMENT)
        if exc.status_code >= 500:
            code = ErrorCode.INTERNAL
        return JSONResponse(
            error_body(request, code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            error_body(request, ErrorCode.INTERNAL, GENERIC_INTERNAL_MESSAGE), status_code=500
        )
