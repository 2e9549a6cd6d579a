"""The grpc.aio server: visionserve.v1.Inference, the Open Inference Protocol's
inference.GRPCInferenceService (KServe V2), the seed articles' own services (classify.Classifier,
InferenceServer, Pipeline: grpc_server/seed_services.py), standard health checking and reflection.

`python -m grpc_server` serves the models of the VISION_* settings' repository on VISION_GRPC_PORT
(default 50051). Health is NOT_SERVING until every model is loaded and warmed, SERVING after, and
NOT_SERVING again from the moment shutdown begins; SIGTERM/SIGINT refuse new calls, give
in-flight calls VISION_GRPC_GRACE_S to finish, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from grpc_server.auth import ApiKeyInterceptor, require_key
from grpc_server.interceptors import LoggingInterceptor
from grpc_server.messages import MessageCheckInterceptor
from grpc_server.seed_services import (
    SEED_SERVICES,
    add_seed_services,
    seed_method_models,
    served_seed_services,
)
from grpc_server.servicer import InferenceServicer
from grpc_server.v2_servicer import V2InferenceServicer
from visionserve.errors import ConfigurationError
from visionserve.http.server import configure_logging
from visionserve.security import server_ssl_context
from visionserve.serving.registry import ModelRegistry, registry_from_settings
from visionserve.settings import GrpcSettings, ModelSettings, SecuritySettings, ServerSettings, from_env
from visionserve.signals import ignore_stop_signals
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc
from visionserve.v2 import grpc_service_pb2 as v2_pb
from visionserve.v2 import grpc_service_pb2_grpc as v2_pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
V2_SERVICE_NAME = v2_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _QuietHandler(WSGIRequestHandler):
    """No line per scrape on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def with_health(app: Any, registry: ModelRegistry) -> Any:
    """`app` (the metrics endpoint) plus `GET /health/live` and `GET /health/ready`, answered like
    the HTTP API's (200 `ready`; 503 with the state and why), never behind the API key.

    For whatever cannot speak gRPC health: a load balancer's HTTP check (HAProxy cannot send the
    binary gRPC health request), a script. Readiness is the registry's, which is exactly what gRPC
    health says: SERVING once every model is warm, NOT_SERVING from the moment shutdown begins.
    """

    def routed(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path not in ("/health/live", "/health/ready"):
            return app(environ, start_response)
        body = {"status": "live"} if path == "/health/live" else registry.readiness()
        status = "200 OK" if body["status"] in ("live", "ready") else "503 Service Unavailable"
        data = json.dumps(body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        start_response(status, headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [data]

    return routed


class _MetricsServer6(ThreadingWSGIServer):
    """The metrics endpoint on an IPv6 address (e.g. `::`)."""

    address_family = socket.AF_INET6


def connection_options(settings: GrpcSettings) -> list[tuple[str, int]]:
    """gRPC core's channel arguments for slow, idle and surplus clients (see GrpcSettings)."""

    def ms(seconds: float) -> int:
        return min(round(seconds * 1000), 2**31 - 1)  # NOTE: C ints

    options = [
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.server_handshake_timeout_ms", ms(settings.handshake_timeout_s)),
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_s)),
        # NOTE: the server's keep-alive pings go on through a long call that sends no data (a
        # paused live stream); core's default stops them after 2 pings without data
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if settings.max_connections:
        options.append(("grpc.max_allowed_incoming_connections", settings.max_connections))
    if settings.max_connection_idle_s:
        options.append(("grpc.max_connection_idle_ms", ms(settings.max_connection_idle_s)))
    if settings.max_connection_age_s:
        options.append(("grpc.max_connection_age_ms", ms(settings.max_connection_age_s)))
        options.append(("grpc.max_connection_age_grace_ms", ms(settings.max_connection_age_grace_s)))
    return options


class GrpcServer:
    """The registry's models served over gRPC: build with settings and a registry, `start()`,
    `stop()`.

    `port` is the bound port once started (useful with port 0). `loaded` completes when every model
    is ready (or raises what made loading fail). With `manage_registry` (the default) this server
    loads the models and releases them when it stops; without it, whoever built the registry does
    (a process serving HTTP and gRPC over one registry), and this server only follows its
    readiness.
    """

    def __init__(
        self,
        settings: GrpcSettings,
        server_settings: ServerSettings,
        registry: ModelRegistry,
        security: SecuritySettings | None = None,
        *,
        manage_registry: bool = True,
    ):
        self.settings = settings
        self.security = security or SecuritySettings(api_key=None, tls_cert_file=None, tls_key_file=None)
        self.api_key = self.security.resolved_api_key()
        self.registry = registry
        self.manage_registry = manage_registry
        limit = settings.max_message_bytes
        # NOTE: the transport accepts up to twice the limit so that the servicer, not gRPC core,
        # refuses messages just over it, with a message naming the setting; beyond that, core
        # refuses them (also RESOURCE_EXHAUSTED) before they take memory.
        self.server = grpc.aio.server(
            interceptors=[
                LoggingInterceptor(
                    registry.metrics,
                    access_log=server_settings.access_log,
                    default_model=registry.default_name,
                    method_models=seed_method_models(registry),
                ),
                *([ApiKeyInterceptor(self.api_key)] if self.api_key else []),
                MessageCheckInterceptor(),  # NOTE: last: requests that do not parse -> INVALID_ARGUMENT
            ],
            options=[
                # NOTE: gRPC channel arguments are C ints: 2x the largest setting (1 GiB) overflows
                ("grpc.max_receive_message_length", min(2 * limit, 2**31 - 1)),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                *connection_options(settings),
            ],
        )
        self.servicer = InferenceServicer(
            registry,
            max_message_bytes=limit,
            stream_read_ahead=settings.stream_read_ahead,
            live_in_flight=settings.live_in_flight,
        )
        pb_grpc.add_InferenceServicer_to_server(self.servicer, self.server)
        self.v2_servicer = V2InferenceServicer(
            registry, max_message_bytes=limit, stream_read_ahead=settings.stream_read_ahead
        )
        v2_pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.v2_servicer, self.server)
        add_seed_services(self.server, registry, max_message_bytes=limit)
        # NOTE: a seed service whose model is not served is listed (it answers NOT_FOUND saying
        # how to serve it) but has no health status (Check answers NOT_FOUND for it)
        self.health_services = (SERVICE_NAME, V2_SERVICE_NAME, *served_seed_services(registry))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, V2_SERVICE_NAME, *SEED_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: WSGIServer | None = None
        self.loaded: asyncio.Task[None] | None = None

    async def _set_health(self, status: int) -> None:
        for name in (health.OVERALL_HEALTH, *self.health_services):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Bind, start answering (NOT_SERVING), load the model in the background; return the port."""
        address = f"{self.settings.host}:{self.settings.port}"
        if self.security.tls:
            assert self.security.tls_cert_file is not None and self.security.tls_key_file is not None
            credentials = grpc.ssl_server_credentials(
                [(self.security.tls_key_file.read_bytes(), self.security.tls_cert_file.read_bytes())]
            )
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise ConfigurationError(f"cannot bind gRPC to {self.settings.host}:{self.settings.port}")
        await self._set_health(NOT_SERVING)
        if self.settings.metrics:
            self._start_metrics()
        await self.server.start()
        self.loaded = asyncio.create_task(self._load())
        return self.port

    def _start_metrics(self) -> None:
        """GET /metrics over HTTP (HTTPS with TLS on; the API key when on), in a daemon thread
        (Prometheus cannot scrape gRPC); /health/live and /health/ready beside it (no key)."""
        host, port = self.settings.host, self.settings.metrics_port
        app = make_wsgi_app(self.registry.metrics.registry)
        if self.api_key:
            app = require_key(app, self.api_key)
        app = with_health(app, self.registry)
        try:
            server_class = _MetricsServer6 if ":" in host else ThreadingWSGIServer
            self._metrics_server = make_server(
                host.strip("[]"), port, app, server_class, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve gRPC metrics on {host}:{port} ({exc.strerror}); set "
                "VISION_GRPC_METRICS_PORT to a free port (0 picks one) or VISION_GRPC_METRICS=false"
            ) from exc
        if self.security.tls:
            assert self.security.tls_cert_file is not None and self.security.tls_key_file is not None
            context = server_ssl_context(self.security.tls_cert_file, self.security.tls_key_file)
            # NOTE: the handshake happens in the request's own thread, not in accept(): a client that
            # connects and never speaks TLS cannot stall the endpoint.
            self._metrics_server.socket = context.wrap_socket(
                self._metrics_server.socket, server_side=True, do_handshake_on_connect=False
            )
        threading.Thread(target=self._metrics_server.serve_forever, name="metrics", daemon=True).start()
        self.metrics_port = int(self._metrics_server.server_address[1])

    async def _load(self) -> None:
        if self.manage_registry:
            await self.registry.start()
        else:
            await self.registry.wait_loaded()
        if self.registry.ready:
            await self._set_health(SERVING)

    async def begin_shutdown(self) -> None:
        """Shutdown's first step: health NOT_SERVING for every service (for good); calls that still
        arrive are served (the drain delay, VISION_SHUTDOWN_DELAY_S)."""
        await self.health.enter_graceful_shutdown()
        self.registry.begin_shutdown()

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight calls finish, release the models
        (when this server manages them)."""
        grace = self.settings.grace_s if grace_s is None else grace_s
        await self.begin_shutdown()
        self.registry.refuse_new_requests()  # calls racing the transport's stop: UNAVAILABLE
        if self.loaded is not None and not self.loaded.done():
            self.loaded.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.loaded
        await self.server.stop(grace)
        if self.manage_registry:
            await self.registry.stop()
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
            self._metrics_server = None


async def serve(
    settings: GrpcSettings,
    server_settings: ServerSettings,
    registry: ModelRegistry,
    security: SecuritySettings | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; return the exit code (1 if a model failed to load)."""
    grpc_server = GrpcServer(settings, server_settings, registry, security)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await grpc_server.start()
    print(banner(grpc_server, settings.host, port), flush=True)
    assert grpc_server.loaded is not None
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({grpc_server.loaded, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failed = False
    if grpc_server.loaded.done() and not grpc_server.loaded.cancelled() and grpc_server.loaded.exception():
        exc = grpc_server.loaded.exception()
        logger.error("cannot serve the models: %s", exc, exc_info=not isinstance(exc, ConfigurationError))
        failed = True
    else:
        await stopping
        delay = server_settings.shutdown_delay_s if registry.ready else 0.0
        if delay > 0:
            await grpc_server.begin_shutdown()
            logger.info("shutting down: NOT_SERVING, serving %.1f s more (VISION_SHUTDOWN_DELAY_S)", delay)
            stop.clear()
            with contextlib.suppress(TimeoutError):  # a second signal ends the delay
                await asyncio.wait_for(stop.wait(), delay)
        logger.info("shutting down: NOT_SERVING, finishing in-flight calls (grace %.0f s)", settings.grace_s)
    stopping.cancel()
    await grpc_server.stop()
    logger.info("stopped")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    ignore_stop_signals()  # NOTE: before the loop closes and Python finalises (see there)
    return 1 if failed else 0


def banner(grpc_server: GrpcServer, host: str, port: int) -> str:
    """What the process prints once it listens: where, how to call it, and its metrics."""
    registry = grpc_server.registry
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
    tls = grpc_server.security.tls
    grpcurl = "grpcurl -cacert ca.pem" if tls else "grpcurl -plaintext"
    auth = ' -H "authorization: Bearer $VISION_API_KEY"' if grpc_server.api_key else ""
    client = " --tls-ca ca.pem" if tls else ""
    models = ", ".join(f"{m.name} ({m.task.name})" for m in registry)
    text = (
        f"\nvisionserve gRPC API ({registry.backend}) on {shown}:{port}\n"
        f"  models: {models}; default {registry.default_name}\n"
        + ("  TLS:    on (VISION_TLS_CERT_FILE)\n" if tls else "")
        + ("  auth:   API key on (VISION_API_KEY); health checks need none\n" if auth else "")
        + f"  list:   {grpcurl}{auth} {shown}:{port} list\n"
        f"  health: {grpcurl} {shown}:{port} grpc.health.v1.Health/Check\n"
        f"  try:    python -m grpc_server.client photo.jpg --target {shown}:{port}{client}\n"
        "  V2:     inference.GRPCInferenceService (Open Inference Protocol; docs/v2.md)\n"
        "  seeds:  classify.Classifier, InferenceServer, Pipeline (the seed articles' own; docs/grpc.md)\n"
        "  stop:   Ctrl-C\n"
    )
    if grpc_server.metrics_port:
        scheme = "https" if tls else "http"
        text += f"visionserve gRPC metrics on {scheme}://{shown}:{grpc_server.metrics_port}/metrics\n"
    return text


def main() -> int:
    """`python -m grpc_server`: settings from the environment; exit 0 after a clean shutdown."""
    try:
        settings = from_env(GrpcSettings)
        server_settings = from_env(ServerSettings)
        model_settings = from_env(ModelSettings)
        security = from_env(SecuritySettings)
        security.resolved_api_key()  # NOTE: an unreadable key file stops the start here, with its reason
    except ConfigurationError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(server_settings.log_level)
    try:
        registry = registry_from_settings(model_settings, server_settings)
        if settings.serve_http:
            from grpc_server.combined import serve_both

            return asyncio.run(serve_both(settings, server_settings, registry, security))
        return asyncio.run(serve(settings, server_settings, registry, security))
    except ConfigurationError as exc:
        logger.error("cannot start: %s", exc)
        return 2
