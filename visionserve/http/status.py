"""Routes about the server rather than an image: liveness, readiness (of the server and of each
model), the models served, Prometheus metrics and the root."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from visionserve import __version__
from visionserve.http.errors import ERROR_RESPONSES
from visionserve.schemas import HealthStatus, ModelDetail, ModelInfo, ModelsResponse
from visionserve.serving.registry import AnyModel, ModelRegistry


def _not_ready(model: AnyModel) -> JSONResponse:
    # NOTE: the load error's text stays in the server log; it may hold internals.
    detail = (
        f"model {model.name!r} failed to load; the server log says why"
        if model.lifecycle.failure
        else f"model {model.name!r} is {model.state.value}"
    )
    return JSONResponse({"status": model.state.value, "detail": detail}, status_code=503)


def create_status_router(registry: ModelRegistry) -> APIRouter:
    """Health, readiness, models and metrics of `registry`."""
    router = APIRouter()

    @router.get(
        "/health/live", response_model=HealthStatus, response_model_exclude_none=True, tags=["health"]
    )
    async def live() -> HealthStatus:
        """200 while the process is up."""
        return HealthStatus(status="live")

    @router.get(
        "/health/ready",
        response_model=HealthStatus,
        responses={503: {"model": HealthStatus, "description": "Not ready yet, or shutting down"}},
        tags=["health"],
    )
    async def ready() -> JSONResponse:
        """200 once every model is loaded and warmed up; 503 before that and during shutdown."""
        body = registry.readiness()
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @router.get("/models", response_model=ModelsResponse, tags=["models"])
    async def models() -> ModelsResponse:
        """Every model served, the default first: task, input, labels count, parameters, runtime,
        device, batching and readiness."""
        return ModelsResponse(
            models=[ModelInfo.model_validate(registry.describe(model)) for model in registry]
        )

    @router.get("/models/{name}", response_model=ModelDetail, responses=ERROR_RESPONSES, tags=["models"])
    async def model_detail(name: str) -> ModelDetail:
        """One model's facts and its class labels."""
        model = registry.get(name)
        return ModelDetail.model_validate(registry.describe(model) | {"labels": list(model.entry.labels)})

    @router.get(
        "/models/{name}/ready",
        response_model=HealthStatus,
        responses={
            404: ERROR_RESPONSES[404],
            422: ERROR_RESPONSES[422],
            503: {"model": HealthStatus, "description": "The model is not ready yet, or shutting down"},
        },
        tags=["health"],
    )
    async def model_ready(name: str) -> JSONResponse:
        """200 once this model is loaded and warmed up; 503 before that and during shutdown."""
        model = registry.get(name)
        return JSONResponse({"status": "ready"}) if model.ready else _not_ready(model)

    @router.get("/metrics", tags=["health"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics, labelled by model: requests, latency, queue time, batch size, compute
        time, queue depth, rejections, compute-budget waits, and the process's own."""
        body, content_type = registry.metrics.render()
        return Response(body, media_type=content_type)

    @router.get("/", include_in_schema=False)
    async def root() -> dict[str, str]:
        return {"name": "visionserve", "version": __version__, "docs": "/docs", "models": "/models"}

    return router
