"""`create_app(settings, registry)`: the FastAPI app every HTTP deployable serves.

The app serves every model of the registry it is given; it owns none of them. Routes: the
project's own (`visionserve.http.predict`), health, models and metrics (`visionserve.http.status`)
and the Open Inference Protocol's (`visionserve.v2.http`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI

from visionserve import __version__
from visionserve.errors import ConfigurationError
from visionserve.http.auth import ApiKeyAuth, add_security_to_openapi
from visionserve.http.docs import install_docs
from visionserve.http.errors import install_error_handlers
from visionserve.http.limits import BodySizeLimit
from visionserve.http.observe import RequestMetrics
from visionserve.http.predict import create_predict_router
from visionserve.http.refusal import EarlyRefusal
from visionserve.http.status import create_status_router
from visionserve.serving.registry import ModelRegistry
from visionserve.settings import ServerSettings
from visionserve.v2.http import create_v2_router

logger = logging.getLogger(__name__)


def create_app(
    settings: ServerSettings,
    registry: ModelRegistry,
    *,
    on_fatal: Callable[[BaseException], None] | None = None,
    api_key: str | None = None,
    manage_registry: bool = True,
) -> FastAPI:
    """Build the FastAPI app serving `registry`'s models with `settings`.

    With `manage_registry` (the default) the app's lifespan loads the models in the background once
    it starts, so `/health/live` answers at once and `/health/ready` turns 200 when every model can
    serve, and stops them when it ends; if loading fails, `on_fatal` is called with the error (the
    entrypoint exits) and readiness stays 503. Without it, whoever built the registry starts and
    stops it (a process serving HTTP and gRPC over one registry). With `api_key`, every request
    but the health checks and the docs must present it (401 otherwise).
    """

    async def load_models() -> None:
        try:
            await registry.start()
        except ConfigurationError as exc:
            logger.error("cannot serve the models: %s", exc)
            if on_fatal:
                on_fatal(exc)
        except Exception as exc:
            logger.exception("loading the models failed")
            if on_fatal:
                on_fatal(exc)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not manage_registry:
            yield
            return
        loading = asyncio.create_task(load_models())
        try:
            yield
        finally:
            if not loading.done():
                # the load in a runtime thread cannot be interrupted; stop() waits for it
                logger.info("shutting down while the models are still loading")
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await registry.stop()

    summary = f"{len(registry)} model(s) on {registry.backend} ({registry.device}): " + ", ".join(
        f"{model.name} ({model.task.name})" for model in registry
    )
    # /docs and /redoc come from install_docs: their files served from here, never from a CDN
    app = FastAPI(
        title="visionserve",
        version=__version__,
        summary=summary,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.registry = registry
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if api_key is not None:
        app.add_middleware(ApiKeyAuth, key=api_key)  # NOTE: outside BodySizeLimit: 401 before 413
    install_docs(app)  # NOTE: its files' middleware outside ApiKeyAuth: open, as /docs is
    app.add_middleware(RequestMetrics, metrics=registry.metrics)  # outermost: sees every answer
    install_error_handlers(app)
    app.include_router(create_predict_router(registry, settings))
    app.include_router(create_status_router(registry))
    app.include_router(create_v2_router(registry, settings))
    # NOTE: answered by the server's HTTP protocol, before this app (`uvicorn_config`); what it
    # refuses is what the routes above refuse before reading a body, with their answer
    app.state.early_refusal = EarlyRefusal(registry, settings, api_key=api_key)

    if api_key is not None:
        describe = app.openapi

        def openapi_with_security() -> dict[str, Any]:
            if app.openapi_schema is None:
                app.openapi_schema = add_security_to_openapi(describe())
            return app.openapi_schema

        app.openapi = openapi_with_security  # type: ignore[method-assign]
    return app
