"""The Open Inference Protocol's HTTP routes (`/v2/...`), served by the same FastAPI app and port as
the project's own API, over the same model registry and batchers.

Health and readiness answer with their status code (200, or 503 / 404), as Triton's do; errors
are `{"error": "<message>"}` (the app's error handlers answer every `/v2` path in that shape).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

# NOTE: the project API's own request helpers, so that a V2 request has exactly its deadline
# (X-Request-Timeout, VISION_REQUEST_TIMEOUT_S) and disconnect handling.
from visionserve.http.requests import (
    TIMEOUT_PARAMETER,
    deadline,
    example_image_base64,
    name_model,
    unless_disconnected,
)
from visionserve.schemas import V2ErrorResponse
from visionserve.serving.registry import ModelRegistry
from visionserve.settings import ServerSettings
from visionserve.v2.codec import DATATYPES, ImageBatch, invalid
from visionserve.v2.models import V2Models
from visionserve.v2.outputs import outputs_for
from visionserve.v2.rest import HEADER_LENGTH, InferRequest, decompress, encode_response, parse_request
from visionserve.v2.signature import Signature
from visionserve.v2.signature import server_metadata as v2_server_metadata
from visionserve.v2.statistics import model_statistics

PREFIX = "/v2"
_INLINE_BYTES = 64 * 1024
"""Bodies up to this size are decoded on the event loop; larger ones (a preprocessed FP32 tensor in
JSON is ~1.5 MB) in a worker thread, so that parsing them does not stall other requests."""

_ERROR_DESCRIPTIONS = {
    400: "Bad input: the message says what is wrong (JSON, tensors, binary sizes, images, parameters)",
    404: "The model, or the model version, is not served here",
    413: "The body (decompressed) or an image is over the configured limits (the message names the setting)",
    415: "The Content-Encoding is not gzip, deflate or identity",
    422: "The request does not match the schema",
    503: "The model is not loaded yet, or the server is at capacity (see Retry-After)",
    504: "The request's deadline (X-Request-Timeout, the `timeout` parameter, "
    "VISION_REQUEST_TIMEOUT_S) passed while it was queued; it was not computed",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route's error statuses, in the protocol's error shape.

    NOTE: a route with parameters lists 422 too, or FastAPI documents its own 422 body
    (`{"detail": [...]}`), which this API never sends.
    """
    return {
        status: {"model": V2ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses
    }


_INFER_RESPONSES = _errors(400, 404, 413, 415, 422, 503, 504) | {
    200: {
        "description": "The outputs: JSON, or with binary outputs the JSON then the tensors (the "
        f"{HEADER_LENGTH} header gives the JSON's length)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}

_INFER_HEADERS = [
    {
        "name": HEADER_LENGTH,
        "in": "header",
        "required": False,
        "schema": {"type": "integer", "minimum": 1},
        "description": "With binary tensors after the JSON: the JSON part's length in bytes.",
    },
    {
        "name": "Content-Encoding",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "enum": ["gzip", "deflate", "identity"]},
        "description": "The body's compression; the size limit applies to the decompressed body.",
    },
]
"""The request headers the infer route reads, besides X-Request-Timeout."""

_INFER_REQUEST_SCHEMA: dict[str, object] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_output": {"type": "boolean"},
                "timeout": {"type": "integer", "exclusiveMinimum": 0, "description": "Microseconds."},
                "score_threshold": {"type": "number", "description": "Detection: lowest score kept."},
                "iou_threshold": {"type": "number", "description": "Detection: NMS overlap threshold."},
                "max_detections": {"type": "integer", "description": "Detection: most boxes kept."},
                "classes": {"type": "string", "description": "Detection: comma-separated labels."},
            },
        },
        "inputs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "datatype", "shape"],
                "properties": {
                    "name": {"type": "string"},
                    "datatype": {"type": "string", "enum": list(DATATYPES)},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "data": {"type": "array"},
                    "parameters": {
                        "type": "object",
                        "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                    },
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
        },
    },
}
"""The JSON request of the infer route, as far as a JSON schema can say it; the model's signature
(input names, datatypes, shapes) is checked by the route and answered 400."""


def _infer_body(signature: Signature) -> dict[str, object]:
    """The OpenAPI requestBody of the infer route (which reads its own body): a JSON example that
    works when executed from /docs, and the binary extension's content type."""
    top3 = {"parameters": {"classification": 3}} if signature.task == "classification" else {}
    example = {
        "id": "docs",
        "inputs": [
            {
                "name": signature.image_input.name,
                "datatype": "BYTES",
                "shape": [1],
                "data": [example_image_base64()],
            }
        ],
        "outputs": [{"name": signature.outputs[-1].name, **top3}],
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": _INFER_REQUEST_SCHEMA,
                    "examples": {
                        "cat": {"summary": "A photo (base64) and its top 3 classes", "value": example}
                    },
                },
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"The binary tensor extension: the JSON, then the tensors; the "
                    f"{HEADER_LENGTH} header gives the JSON's length",
                },
            },
        }
    }


def create_v2_router(registry: ModelRegistry, settings: ServerSettings) -> APIRouter:
    """The `/v2` routes for every model of `registry`: health, server and model metadata, model
    configuration, statistics, the repository index, and inference (JSON and binary tensors,
    gzip/deflate bodies)."""
    router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol (KServe V2)"])
    models = V2Models(registry)
    limit = settings.max_request_bytes

    @router.get("")
    async def server_metadata() -> dict[str, object]:
        """Server name, version and the protocol extensions it supports."""
        return v2_server_metadata()

    @router.get("/health/live")
    async def server_live() -> dict[str, bool]:
        """200 while the process is up."""
        return {"live": True}

    @router.get("/health/ready", responses=_errors(503))
    async def server_ready() -> dict[str, bool]:
        """200 once every model can serve; 503 while one loads, after one failed, and during
        shutdown."""
        registry.check_ready()
        return {"ready": True}

    @router.post("/repository/index")
    async def repository_index(request: Request) -> list[dict[str, str]]:
        """Every model served, with its version and state (`READY`, `LOADING`, `UNAVAILABLE`,
        `UNLOADING`); a body `{"ready": true}` lists only the ready ones."""
        body = await request.body()
        ready_only = False
        if body.strip():
            try:
                document = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise invalid('the body must be JSON, e.g. {"ready": true}') from None
            value = document.get("ready", False) if isinstance(document, dict) else None
            if not isinstance(value, bool):
                raise invalid(f"`ready` must be true or false, got {value!r}")
            ready_only = value
        return models.repository_index(ready_only=ready_only)

    @router.get("/models/stats")
    async def all_statistics() -> dict[str, object]:
        """Statistics of every model served."""
        return model_statistics(registry)

    @router.get("/models/{model_name}", responses=_errors(404, 422))
    @router.get("/models/{model_name}/versions/{model_version}", responses=_errors(404, 422))
    async def model_metadata(model_name: str, model_version: str | None = None) -> dict[str, object]:
        """The model's versions, platform, inputs and outputs (-1: the batch dimension)."""
        _, signature = models.get(model_name, model_version)
        return signature.metadata()

    @router.get("/models/{model_name}/ready", responses=_errors(404, 422, 503))
    @router.get("/models/{model_name}/versions/{model_version}/ready", responses=_errors(404, 422, 503))
    async def model_ready(model_name: str, model_version: str | None = None) -> dict[str, object]:
        """200 when the model can serve; 404 for a model not served here; 503 while not ready."""
        served, _ = models.get(model_name, model_version)
        served.check_ready()
        return {"name": model_name, "ready": True}

    @router.get("/models/{model_name}/config", responses=_errors(404, 422))
    @router.get("/models/{model_name}/versions/{model_version}/config", responses=_errors(404, 422))
    async def model_config(model_name: str, model_version: str | None = None) -> dict[str, object]:
        """Triton's model configuration (name, platform, max_batch_size, inputs, outputs, dynamic
        batching): what perf_analyzer and Triton's clients read."""
        _, signature = models.get(model_name, model_version)
        return signature.config()

    @router.get("/models/{model_name}/stats", responses=_errors(404, 422))
    @router.get("/models/{model_name}/versions/{model_version}/stats", responses=_errors(404, 422))
    async def statistics(model_name: str, model_version: str | None = None) -> dict[str, object]:
        """Images and batches computed, time queued and computing, batch sizes, requests dropped."""
        served, _ = models.get(model_name, model_version)
        return model_statistics([served])

    def decode(
        signature: Signature, body: bytes, encoding: str | None, header_length: str | None
    ) -> InferRequest:
        return parse_request(signature, decompress(body, encoding, limit=limit), header_length)

    openapi = _infer_body(models.signatures[registry.default_name]) | {
        "parameters": TIMEOUT_PARAMETER["parameters"] + _INFER_HEADERS
    }

    @router.post("/models/{model_name}/infer", openapi_extra=openapi, responses=_INFER_RESPONSES)
    @router.post(
        "/models/{model_name}/versions/{model_version}/infer",
        openapi_extra=openapi,
        responses=_INFER_RESPONSES,
    )
    async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
        """Inference: JSON tensors, or the binary tensor extension (`Inference-Header-Content-Length`
        and `binary_data_size`); gzip or deflate bodies. Send one input: the model's own (FP32
        [N, 3, H, W], preprocessed) or `image` (BYTES [N], encoded images; base64 text in JSON).
        A detector takes the request parameters `score_threshold`, `iou_threshold`,
        `max_detections` and `classes` (comma-separated labels)."""
        arrived = time.monotonic()
        served, signature = models.get(model_name, model_version)
        name_model(request, served.name)
        when = deadline(request, arrived, settings.request_timeout_s)
        served.check_admission()  # NOTE: before the body is read, as the project's own API does
        body = await request.body()
        encoding = request.headers.get("content-encoding")
        header_length = request.headers.get(HEADER_LENGTH)
        if len(body) > _INLINE_BYTES or encoding:
            parsed = await asyncio.to_thread(decode, signature, body, encoding, header_length)
        else:
            parsed = decode(signature, body, encoding, header_length)
        if parsed.timeout_s is not None:
            when = min(when if when is not None else math.inf, arrived + parsed.timeout_s)
        params = served.parameters(parsed.parameters)
        model_input = parsed.model_input
        if isinstance(model_input, ImageBatch):
            work = served.infer_images(
                model_input.images, params, field=signature.image_input.name, deadline=when
            )
        else:
            work = served.infer_tensor(model_input.array, params, deadline=when)
        results = await unless_disconnected(request, work)
        content, headers = encode_response(signature, parsed, outputs_for(signature, results, parsed.outputs))
        return Response(content, headers=headers)

    return router
