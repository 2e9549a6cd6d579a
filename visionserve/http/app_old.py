"""`create_app(settings, runtime)`: the FastAPI app every HTTP deployable serves."""

import asyncio
import base64
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from importlib import resources
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from visionserve import __version__
from visionserve.errors import GENERIC_INTERNAL_MESSAGE, ConfigurationError, ErrorCode, VisionError
from visionserve.http.auth import ApiKeyAuth, add_security_to_openapi
from visionserve.http.limits import BodySizeLimit, is_v2_path
from visionserve.http.observe import RequestMetrics
from visionserve.runtimes.base import ModelRuntime
from visionserve.schemas import (
    B64PredictRequest,
    ErrorResponse,
    HealthStatus,
    ModelInfo,
    ModelsResponse,
    Prediction,
    PredictRequest,
    PredictResponse,
)
from visionserve.service import InferenceResult, InferenceService
from visionserve.settings import ServerSettings

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Bad input: invalid base64, not an image, corrupt image, topk out of range",
        404: "Unknown model",
        413: "Body or image over the configured limits (the message names the setting)",
        422: "The request does not match the schema",
        503: "The model is not loaded yet, the server is at capacity, or it is shutting down (see "
        "Retry-After)",
        504: "The request's deadline (X-Request-Timeout, VISION_REQUEST_TIMEOUT_S) passed while it "
        "was queued; it was not computed",
    }.items()
}


def _example_image_base64() -> str:
    """A small real photo (a crop of scikit-image's chelsea.png) for the /docs examples."""
    data = resources.files("visionserve.data").joinpath("example.jpg").read_bytes()
    return base64.b64encode(data).decode("ascii")


def _error_body(request: Request, code: ErrorCode, message: str) -> dict[str, Any]:
    if is_v2_path(request.url.path):
        return {"error": message}
    return {"error": {"code": code.value, "message": message}}


def _error_json(error: VisionError, request: Request) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
    return JSONResponse(
        _error_body(request, error.code, error.message), status_code=error.status.http, headers=headers
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            continue
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request does not match the schema"


CLIENT_CLOSED_REQUEST = 499
"""Status recorded (visionserve_requests{status="499"}, nginx's convention) for a request whose
client went away before its answer; nobody receives it."""


class _ClientGone(Exception):  # noqa: N818 - a departure, not an error
    """The client disconnected while its request was in the service (queued, or computing)."""


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
        # NOTE: gone mid-body: the request never reached the service, so it is counted here as
        # dropped before it was computed; one gone later is counted by the service, if at all.
        request.app.state.service.metrics.rejected.labels("cancelled").inc()
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(VisionError)
    async def vision_error(request: Request, exc: VisionError) -> JSONResponse:
        return _error_json(exc, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            _error_body(request, ErrorCode.INVALID_ARGUMENT, _validation_message(exc)), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_ARGUMENT)
        if exc.status_code >= 500:
            code = ErrorCode.INTERNAL
        return JSONResponse(
            _error_body(request, code, str(exc.detail)),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            _error_body(request, ErrorCode.INTERNAL, GENERIC_INTERNAL_MESSAGE),
            status_code=500,
        )


ModelT = TypeVar("ModelT", bound=BaseModel)
ResultT = TypeVar("ResultT")


def _json_body(model: type[BaseModel], example: dict[str, object]) -> dict[str, Any]:
    """The OpenAPI requestBody of a JSON endpoint that parses its own body."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": model.model_json_schema(),
                    "examples": {"cat": {"summary": "A photo of a cat", "value": example}},
                }
            },
        }
    }


FILE_FIELD = "file"
"""The multipart form field /predict/file reads the image from."""

_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "title": "Body_predict_file_predict_file_post",
                    "type": "object",
                    "properties": {
                        FILE_FIELD: {
                            "title": "File",
                            "type": "string",
                            "contentMediaType": "application/octet-stream",
                            "description": "The image file (JPEG, PNG, WebP, GIF, BMP, TIFF).",
                        }
                    },
                    "required": [FILE_FIELD],
                }
            }
        },
    }
}
"""The OpenAPI requestBody of /predict/file, which parses its own form (as FastAPI declared it for
an `UploadFile` parameter, inline instead of a component)."""


async def _read_upload(request: Request) -> bytes:
    """The bytes of the form's `file` upload; errors are the same 422 as FastAPI's for an
    `UploadFile` parameter, a malformed multipart body Starlette's 400."""
    async with request.form() as form:
        upload = form.get(FILE_FIELD)
        if isinstance(upload, UploadFile):
            return await upload.read()
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


def _parse_json(model: type[ModelT], body: bytes) -> ModelT:
    """Parse and validate a JSON body; errors become the same 422 as FastAPI's own."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, ResultT]) -> ResultT:
    """Await `work`, cancelling it if the client disconnects first (then raise `_ClientGone`).

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
            raise _ClientGone from None
        raise
    finally:
        watcher.cancel()


TIMEOUT_HEADER = "X-Request-Timeout"
"""Request header: seconds the client will wait; still queued after that, the request is dropped."""


_TIMEOUT_PARAMETER = {
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


def _deadline(request: Request, arrived: float, setting_s: float | None) -> float | None:
    """The request's deadline on the monotonic clock: the shorter of the header's and the setting's."""
    timeouts = [setting_s] if setting_s is not None else []
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            seconds = float(header)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise VisionError(
                ErrorCode.INVALID_ARGUMENT,
                f"header {TIMEOUT_HEADER} must be a positive number of seconds (e.g. 2.5); got {header!r}",
            )
        timeouts.append(seconds)
    return arrived + min(timeouts) if timeouts else None


def _response(result: InferenceResult, started: float) -> JSONResponse:
    top = result.predictions[0]
    body = PredictResponse(
        prediction=top.label,
        probability=top.prob,
        topk=[Prediction(label=p.label, prob=p.prob, index=p.index) for p in result.predictions],
        model=result.model,
        latency_ms=round((time.perf_counter() - started) * 1e3, 3),
    )
    timing = f"preprocess;dur={result.preprocess_ms:.3f}, inference;dur={result.inference_ms:.3f}"
    return JSONResponse(body.model_dump(mode="json"), headers={"Server-Timing": timing})


def create_app(
    settings: ServerSettings,
    runtime: ModelRuntime,
    *,
    on_fatal: Callable[[BaseException], None] | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """Build the FastAPI app serving `runtime`'s model with `settings`.

    The model loads and warms up in the background once the app starts, so `/health/live`
    answers at once and `/health/ready` turns 200 when the model can serve. If loading fails,
    `on_fatal` is called with the error (the entrypoint exits); readiness stays 503. With
    `api_key`, every request but the health checks and the docs must present it (401 otherwise).
    """
    service = InferenceService.from_settings(runtime, settings)

    async def load_model() -> None:
        try:
            await service.start()
        except ConfigurationError as exc:
            logger.error("cannot serve model %s: %s", service.model.name, exc)
            if on_fatal:
                on_fatal(exc)
        except Exception as exc:
            logger.exception("loading model %s failed", service.model.name)
            if on_fatal:
                on_fatal(exc)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load_model())
        try:
            yield
        finally:
            if not loading.done():
                # the load in the runtime thread cannot be interrupted; stop() waits for it
                logger.info("shutting down while the model is still loading")
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await service.stop()

    app = FastAPI(
        title="visionserve",
        version=__version__,
        summary=f"Image classification with {runtime.model.name} on {runtime.backend} ({runtime.device})",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if api_key is not None:
        app.add_middleware(ApiKeyAuth, key=api_key)  # NOTE: outside BodySizeLimit: 401 before 413
    app.add_middleware(RequestMetrics, metrics=service.metrics)  # outermost: sees every answer
    _install_error_handlers(app)

    example = _example_image_base64()

    async def predict_json(
        request: Request, schema: type[PredictRequest] | type[B64PredictRequest], field: str
    ) -> JSONResponse:
        started = time.perf_counter()
        deadline = _deadline(request, time.monotonic(), settings.request_timeout_s)
        service.check_admission()  # NOTE: before the body is read and parsed
        body = _parse_json(schema, await request.body())
        work = service.predict(
            getattr(body, field), topk=body.topk, model=body.model, field=field, deadline=deadline
        )
        return _response(await _unless_disconnected(request, work), started)

    # NOTE: the JSON endpoints parse their body with pydantic's JSON parser (`model_validate_json`)
    # instead of FastAPI's json.loads + validation: 0.05 ms instead of 0.6 ms, on the event loop,
    # for a 240 KB image in base64. The OpenAPI body is declared by hand to match.
    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=_ERROR_RESPONSES,
        tags=["predict"],
        openapi_extra=_json_body(PredictRequest, {"image": example, "topk": 5}) | _TIMEOUT_PARAMETER,
    )
    async def predict(request: Request) -> JSONResponse:
        """Classify a base64-encoded image (JSON body `{"image": "<base64>", "topk": 5}`)."""
        return await predict_json(request, PredictRequest, "image")

    @app.post(
        "/predict/b64",
        response_model=PredictResponse,
        responses=_ERROR_RESPONSES,
        tags=["predict"],
        openapi_extra=_json_body(B64PredictRequest, {"image_base64": example, "topk": 5})
        | _TIMEOUT_PARAMETER,
    )
    async def predict_b64(request: Request) -> JSONResponse:
        """Classify a base64-encoded image (JSON body `{"image_base64": "<base64>", "topk": 5}`)."""
        return await predict_json(request, B64PredictRequest, "image_base64")

    @app.post(
        "/predict/file",
        response_model=PredictResponse,
        responses=_ERROR_RESPONSES,
        tags=["predict"],
        openapi_extra=_MULTIPART_BODY | _TIMEOUT_PARAMETER,
    )
    async def predict_file(
        request: Request,
        topk: Annotated[int | None, Query(ge=1, description="How many classes to return.")] = None,
        model: Annotated[str | None, Query(description="Model to use; default: the served model.")] = None,
    ) -> JSONResponse:
        """Classify an uploaded image file (multipart/form-data, field `file`)."""
        started = time.perf_counter()
        deadline = _deadline(request, time.monotonic(), settings.request_timeout_s)
        # NOTE: admission before the multipart body is read and parsed (FastAPI would parse an
        # `UploadFile` parameter before this function runs): a refusal costs the headers only.
        service.check_admission()
        image = await _read_upload(request)
        work = service.predict(image, topk=topk, model=model, deadline=deadline)
        return _response(await _unless_disconnected(request, work), started)

    @app.get("/health/live", response_model=HealthStatus, response_model_exclude_none=True, tags=["health"])
    async def live() -> HealthStatus:
        """200 while the process is up."""
        return HealthStatus(status="live")

    @app.get(
        "/health/ready",
        response_model=HealthStatus,
        responses={503: {"model": HealthStatus, "description": "Not ready yet, or shutting down"}},
        tags=["health"],
    )
    async def ready() -> JSONResponse:
        """200 once the model is loaded and warmed up; 503 before that and during shutdown."""
        if service.ready:
            return JSONResponse({"status": "ready"})
        # NOTE: the load error's text stays in the server log; it may hold internals.
        detail = (
            "the model failed to load; the server log says why"
            if service.failure
            else f"model {service.model.name!r} is {service.state.value}"
        )
        return JSONResponse({"status": service.state.value, "detail": detail}, status_code=503)

    @app.get("/models", response_model=ModelsResponse, tags=["models"])
    async def models() -> ModelsResponse:
        """The served model: name, task, input size, labels count, runtime and device."""
        return ModelsResponse(models=[ModelInfo.model_validate(service.describe())])

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics: requests, latency, queue time, batch size, compute time, queue
        depth, rejections."""
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    # NOTE: imported here, not at the top: the V2 routes reuse this module's deadline and
    # disconnect helpers, and a top-level import each way would be circular.
    from visionserve.v2.http import create_v2_router

    app.include_router(create_v2_router(service, settings))

    @app.get("/", include_in_schema=False)
    async def root() -> dict[str, str]:
        return {"name": "visionserve", "version": __version__, "docs": "/docs", "models": "/models"}

    if api_key is not None:
        describe = app.openapi

        def openapi_with_security() -> dict[str, Any]:
            if app.openapi_schema is None:
                app.openapi_schema = add_security_to_openapi(describe())
            return app.openapi_schema

        app.openapi = openapi_with_security  # type: ignore[method-assign]
    return app
