"""One process serving both protocols over one registry: the gRPC server and the HTTP app (uvicorn,
on the same event loop) share the models, their batchers and the compute budget, as Triton and
MLServer serve REST and gRPC from one process. `python -m grpc_server` runs this with
VISION_GRPC_SERVE_HTTP=true (what `make run` starts); Compose keeps a container per protocol.

Shutdown follows both protocols' rules at once: on SIGTERM/SIGINT readiness turns (HTTP 503
"stopping", gRPC NOT_SERVING) while requests are still served for VISION_SHUTDOWN_DELAY_S; then
both stop taking requests, in-flight ones finish (gRPC within VISION_GRPC_GRACE_S, HTTP within
VISION_GRACEFUL_SHUTDOWN_S), and the models are released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from grpc_server.server import GrpcServer, banner
from visionserve.errors import ConfigurationError
from visionserve.http.app import create_app
from visionserve.http.server import banner as http_banner
from visionserve.http.server import bind, uvicorn_config
from visionserve.serving.registry import ModelRegistry
from visionserve.settings import GrpcSettings, SecuritySettings, ServerSettings
from visionserve.signals import ignore_stop_signals

logger = logging.getLogger(__name__)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn on an event loop it does not own: the process's signals are this module's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_both(
    settings: GrpcSettings,
    server_settings: ServerSettings,
    registry: ModelRegistry,
    security: SecuritySettings,
) -> int:
    """Run gRPC and HTTP until SIGTERM/SIGINT; return the exit code (1 if a model failed to load,
    2 if the HTTP port cannot be bound or its certificate read)."""
    api_key = security.resolved_api_key()
    grpc_server = GrpcServer(settings, server_settings, registry, security, manage_registry=False)
    app = create_app(server_settings, registry, api_key=api_key, manage_registry=False)
    config = uvicorn_config(app, registry, server_settings, security)
    try:
        sock = bind(server_settings.host, server_settings.port)
        config.load()  # NOTE: reads the certificate now, so a bad one stops the start with its reason
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot serve HTTP on {server_settings.host}:{server_settings.port}: {exc}"
        ) from exc
    http = _EmbeddedUvicorn(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await grpc_server.start()
    loading = asyncio.create_task(registry.start())
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    print(banner(grpc_server, settings.host, port), flush=True)
    http_port = sock.getsockname()[1]
    print(
        http_banner(server_settings.host, http_port, registry, tls=security.tls, key=bool(api_key)),
        flush=True,
    )
    assert grpc_server.loaded is not None
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({grpc_server.loaded, stopping, http_task}, return_when=asyncio.FIRST_COMPLETED)
    failed = False
    loaded = grpc_server.loaded
    if loaded.done() and not loaded.cancelled() and loaded.exception():
        failure = loaded.exception()
        logger.error(
            "cannot serve the models: %s", failure, exc_info=not isinstance(failure, ConfigurationError)
        )
        failed = True
    elif http_task.done():
        logger.error("the HTTP server ended on its own: %s", http_task.exception())
        failed = True
    else:
        await asyncio.wait({stopping, http_task}, return_when=asyncio.FIRST_COMPLETED)
        delay = server_settings.shutdown_delay_s if registry.ready else 0.0
        await grpc_server.begin_shutdown()  # readiness turns on both protocols
        if delay > 0:
            logger.info("shutting down: not ready, serving %.1f s more (VISION_SHUTDOWN_DELAY_S)", delay)
            stop.clear()
            with contextlib.suppress(TimeoutError):  # a second signal ends the delay
                await asyncio.wait_for(stop.wait(), delay)
        logger.info("shutting down: refusing new requests, finishing in-flight ones")
    stopping.cancel()
    registry.refuse_new_requests()
    http.should_exit = True
    await asyncio.gather(grpc_server.stop(), http_task, return_exceptions=True)
    if not loading.done():
        loading.cancel()  # NOTE: the load in a runtime thread cannot be interrupted; stop() waits for it
    with contextlib.suppress(BaseException):
        await loading
    await registry.stop()
    logger.info("stopped")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    ignore_stop_signals()  # NOTE: before the loop closes and Python finalises (see there)
    return 1 if failed else 0
