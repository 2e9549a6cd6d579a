"""The project's own inference routes (`/predict`, `/predict/b64`, `/predict/file`): one image in,
the named model's answer out (the default model when none is named)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from visionserve.errors import ErrorCode, VisionError
from visionserve.http.encode import response_json
from visionserve.http.errors import ERROR_RESPONSES
from visionserve.http.requests import (
    FILE_FIELD,
    TIMEOUT_PARAMETER,
    deadline,
    example_image_base64,
    name_model,
    parse_json,
    read_upload,
    unless_disconnected,
)
from visionserve.schemas import AnyPredictResponse, B64PredictRequest, PredictRequest, TaskParameters
from visionserve.serving.registry import AnyModel, ModelRegistry
from visionserve.settings import ServerSettings

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

_MODEL_QUERY = Query(
    description="Model to use (GET /models lists them); default: the server's default model. On the "
    "JSON routes it may be given here instead of in the body, which lets an overloaded server refuse "
    "the request before reading its body."
)


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


def _classes(values: list[str] | None) -> list[str] | None:
    """`?classes=person,car` and `?classes=person&classes=car` alike."""
    if values is None:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def create_predict_router(registry: ModelRegistry, settings: ServerSettings) -> APIRouter:
    """The predict routes over `registry`'s models."""
    router = APIRouter(tags=["predict"])
    example = example_image_base64()

    def early_admission(request: Request, query_model: str | None) -> None:
        """Before the body is read: refuse what can be refused for the price of the headers.

        NOTE: a JSON body may name its model; when the query does not, only a one-model server
        knows which model's queue to check before reading it. Otherwise readiness and room are
        checked once the body has named the model.

        NOTE: the server's HTTP protocol answers these refusals itself, before this app, when the
        headers suffice (`visionserve.http.refusal`: the same answer and counts); what a route
        checks before admission (here: the X-Request-Timeout header, the model's name) is checked
        there too: a check added before admission here and not there would be skipped for the
        requests refused there (tests/integration/test_early_refusal.py compares the two)."""
        if query_model or len(registry) == 1:
            model = registry.get(query_model)
            name_model(request, model.name)  # a client gone mid-body is counted against it
            model.check_admission()

    def model_for(query_model: str | None, body_model: str | None) -> AnyModel:
        if query_model and body_model and query_model != body_model:
            raise VisionError(
                ErrorCode.INVALID_ARGUMENT,
                f"the query names model {query_model!r} and the body {body_model!r}; name one",
            )
        return registry.get(body_model or query_model)

    async def predict_json(
        request: Request, schema: type[TaskParameters], field: str, query_model: str | None
    ) -> JSONResponse:
        started = time.perf_counter()
        when = deadline(request, time.monotonic(), settings.request_timeout_s)
        early_admission(request, query_model)
        body = parse_json(schema, await request.body())
        served = model_for(query_model, body.model)
        name_model(request, served.name)
        work = served.predict(getattr(body, field), body.task_parameters(), field=field, deadline=when)
        return response_json(await unless_disconnected(request, work), started)

    # NOTE: the JSON endpoints parse their body with pydantic's JSON parser (`model_validate_json`)
    # instead of FastAPI's json.loads + validation: 0.05 ms instead of 0.6 ms, on the event loop,
    # for a 240 KB image in base64. The OpenAPI body is declared by hand to match.
    @router.post(
        "/predict",
        response_model=AnyPredictResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=_json_body(PredictRequest, {"image": example, "topk": 5}) | TIMEOUT_PARAMETER,
    )
    async def predict(request: Request, model: Annotated[str | None, _MODEL_QUERY] = None) -> JSONResponse:
        """Run a model on a base64-encoded image (JSON body `{"image": "<base64>", "topk": 5}`; a
        detector takes `score_threshold`, `iou_threshold`, `max_detections`, `classes`; a
        face_expression pipeline `score_threshold`, `min_face_size`, `max_faces`)."""
        return await predict_json(request, PredictRequest, "image", model)

    @router.post(
        "/predict/b64",
        response_model=AnyPredictResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=_json_body(B64PredictRequest, {"image_base64": example, "topk": 5}) | TIMEOUT_PARAMETER,
    )
    async def predict_b64(
        request: Request, model: Annotated[str | None, _MODEL_QUERY] = None
    ) -> JSONResponse:
        """Run a model on a base64-encoded image (JSON body `{"image_base64": "<base64>"}`)."""
        return await predict_json(request, B64PredictRequest, "image_base64", model)

    @router.post(
        "/predict/file",
        response_model=AnyPredictResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=_MULTIPART_BODY | TIMEOUT_PARAMETER,
    )
    async def predict_file(
        request: Request,
        *,
        model: Annotated[str | None, _MODEL_QUERY] = None,
        topk: Annotated[int | None, Query(ge=1, description="Classification: classes to return.")] = None,
        score_threshold: Annotated[
            float | None, Query(ge=0.0, le=1.0, description="Detection: lowest score kept.")
        ] = None,
        iou_threshold: Annotated[
            float | None, Query(ge=0.0, le=1.0, description="Detection: NMS overlap threshold.")
        ] = None,
        max_detections: Annotated[
            int | None, Query(ge=1, description="Detection: most boxes returned.")
        ] = None,
        classes: Annotated[
            list[str] | None,
            Query(description="Detection: only these classes (repeat it, or comma-separate them)."),
        ] = None,
        min_face_size: Annotated[
            float | None, Query(ge=0.0, description="face_expression: smallest face kept, in pixels.")
        ] = None,
        max_faces: Annotated[
            int | None, Query(ge=1, description="face_expression: most faces returned.")
        ] = None,
    ) -> JSONResponse:
        """Run a model on an uploaded image file (multipart/form-data, field `file`)."""
        started = time.perf_counter()
        when = deadline(request, time.monotonic(), settings.request_timeout_s)
        served = registry.get(model)
        name_model(request, served.name)
        parameters = {
            "topk": topk,
            "score_threshold": score_threshold,
            "iou_threshold": iou_threshold,
            "max_detections": max_detections,
            "classes": _classes(classes),
            "min_face_size": min_face_size,
            "max_faces": max_faces,
        }
        # NOTE: admission before the multipart body is read and parsed (FastAPI would parse an
        # `UploadFile` parameter before this function runs): a refusal costs the headers only.
        served.check_admission()
        image = await read_upload(request)
        work = served.predict(image, parameters, deadline=when)
        return response_json(await unless_disconnected(request, work), started)

    return router
