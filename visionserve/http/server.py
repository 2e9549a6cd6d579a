"""Run the HTTP service: the one entrypoint behind `fastapi_onnx` and `fastapi_pt`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import sys
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visionserve.errors import ConfigurationError
from visionserve.http.app import create_app
from visionserve.http.refusal import EarlyRefusal
from visionserve.http.timeouts import connection_limit, slow_client_protocol
from visionserve.serving.lifecycle import ServiceState
from visionserve.serving.registry import ModelRegistry, registry_from_settings
from visionserve.settings import ModelSettings, SecuritySettings, ServerSettings, from_env
from visionserve.signals import ignore_stop_signals

logger = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    """Log to stderr with timestamps; uvicorn's loggers go through the same handler."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on `host:port` (IPv6 when the host is), inheritable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # NOTE: IPPROTO_TCP named explicitly: asyncio's default loop turns Nagle's algorithm off
    # (TCP_NODELAY) only on sockets whose `proto` says TCP. Left at 0, every answer of uvicorn on
    # that loop (the process that serves HTTP beside gRPC) waited ~40 ms for the client's
    # delayed ACK (GET /health/live p50 44 ms instead of 0.6 ms); uvloop sets it regardless.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def banner(host: str, port: int, registry: ModelRegistry, *, tls: bool = False, key: bool = False) -> str:
    """What the HTTP process prints once it listens: where, and how to call it."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"{'https' if tls else 'http'}://{shown}:{port}"
    curl = "curl --cacert ca.pem" if tls else "curl"
    auth = ' -H "Authorization: Bearer $VISION_API_KEY"' if key else ""
    models = ", ".join(f"{m.name} ({m.task.name})" for m in registry)
    return (
        f"\nvisionserve HTTP API ({registry.backend}) on {base}\n"
        f"  models: {models}; default {registry.default_name} ({base}/models)\n"
        f"  docs:   {base}/docs\n"
        f"  ready:  {curl} {base}/health/ready\n"
        f"  try:    {curl}{auth} -F file=@photo.jpg '{base}/predict/file?topk=5'\n"
        + ("  auth:   API key on (VISION_API_KEY); health checks need none\n" if key else "")
        + "  stop:   Ctrl-C\n"
    )


def uvicorn_config(
    app: ASGIApp, registry: ModelRegistry, settings: ServerSettings, security: SecuritySettings
) -> uvicorn.Config:
    """uvicorn's configuration for the app: logging, keep-alive, header and body read timeouts,
    the cap on open connections, graceful shutdown, TLS, `Connection: close` on every answer
    once shutdown has begun, and the refusals answered before the app (`create_app`'s
    `EarlyRefusal`, unless VISION_EARLY_REFUSAL is off)."""
    max_connections = settings.resolved_max_connections()
    if settings.max_connections is not None:
        _check_open_file_limit(max_connections)
    early: EarlyRefusal | None = None
    if settings.early_refusal:
        early = getattr(getattr(app, "state", None), "early_refusal", None)
    return uvicorn.Config(
        CloseWhileDraining(app, registry),
        http=slow_client_protocol(
            settings.header_timeout_s, settings.body_timeout_s, registry.metrics, early_refusal=early
        ),
        limit_concurrency=connection_limit(max_connections),
        log_config=None,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # NOTE: a float works (call_later)
        lifespan="on",
        ssl_certfile=security.tls_cert_file,
        ssl_keyfile=security.tls_key_file,
    )


def _check_open_file_limit(max_connections: int) -> None:
    """Warn when VISION_MAX_CONNECTIONS cannot be reached: each connection takes a file descriptor."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and (max_connections == 0 or max_connections > soft - 64):
        logger.warning(
            "VISION_MAX_CONNECTIONS=%d but the open-file limit is %d (ulimit -n): connections past it "
            "are refused by the operating system; raise the limit or lower the setting",
            max_connections,
            soft,
        )


def serve(backend: str) -> int:
    """Start the HTTP service for `backend` with settings from the environment; return an exit code."""
    try:
        server_settings = from_env(ServerSettings)
        model_settings = from_env(ModelSettings, backend=backend)
        security = from_env(SecuritySettings)
        api_key = security.resolved_api_key()
    except ConfigurationError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(server_settings.log_level)
    try:
        registry = registry_from_settings(model_settings, server_settings)
        sock = bind(server_settings.host, server_settings.port)
    except (ConfigurationError, OSError) as exc:
        logger.error("cannot start: %s", exc)
        return 2

    failed: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    try:
        app = create_app(server_settings, registry, on_fatal=on_fatal, api_key=api_key)
    except ConfigurationError as exc:
        logger.error("cannot start: %s", exc)
        return 2
    config = uvicorn_config(app, registry, server_settings, security)
    server = _DrainingServer(config, registry, server_settings.shutdown_delay_s)
    port = sock.getsockname()[1]
    try:
        config.load()  # NOTE: reads the certificate now, so a bad one stops the start with its reason
    except (OSError, ValueError) as exc:
        logger.error("cannot start: VISION_TLS_CERT_FILE/VISION_TLS_KEY_FILE: %s", exc)
        return 2
    print(banner(server_settings.host, port, registry, tls=security.tls, key=bool(api_key)), flush=True)
    # NOTE: on SIGINT/SIGTERM `_DrainingServer` drains, then uvicorn shuts down gracefully; uvicorn
    # re-raises a second signal so that the previous handler runs; these handlers turn that into a
    # clean exit (status 0, no traceback).
    signal.signal(signal.SIGTERM, _Stop())
    with contextlib.suppress(KeyboardInterrupt, _StopSignal):
        server.run(sockets=[sock])
    logger.info("stopped")
    ignore_stop_signals()
    return 1 if failed else 0


class _StopSignal(Exception):  # noqa: N818 - a signal, not an error
    pass


class _Stop:
    """SIGTERM after uvicorn's own handling: end `server.run` once; later signals are ignored (a
    second exception raised during the shutdown would escape with a traceback)."""

    def __init__(self) -> None:
        self.raised = False

    def __call__(self, signum: int, frame: object) -> None:
        if not self.raised:
            self.raised = True
            raise _StopSignal


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain step on the first SIGTERM/SIGINT.

    At once: readiness 503 "stopping" (`ModelRegistry.begin_shutdown`); requests are still
    served for `delay_s` (VISION_SHUTDOWN_DELAY_S). Then: new inference requests are refused
    (503 "shutting down") and uvicorn's own graceful shutdown runs: the port closes, idle
    connections close, in-flight requests get VISION_GRACEFUL_SHUTDOWN_S to finish. A second
    signal skips what is left of the delay; a third SIGINT is uvicorn's forced exit.
    """

    def __init__(self, config: uvicorn.Config, registry: ModelRegistry, delay_s: float):
        super().__init__(config)
        self.registry = registry
        self.delay_s = delay_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The SIGINT/SIGTERM handler uvicorn installs (it runs between two bytecodes of the event
        loop's thread: it only schedules work on the loop)."""
        if self._loop is None:  # not started yet: uvicorn's own handling
            super().handle_exit(sig, frame)
            return
        if self._draining:
            self._loop.call_soon_threadsafe(self.registry.refuse_new_requests)
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        assert self._loop is not None
        delay = self.delay_s if self.registry.ready else 0.0  # never ready: nothing routes here
        self.registry.begin_shutdown()
        if delay > 0:
            logger.info(
                "shutting down: readiness 503, still serving for %.1f s (VISION_SHUTDOWN_DELAY_S)", delay
            )
        self._loop.call_later(delay, self._stop_serving)

    def _stop_serving(self) -> None:
        self.registry.refuse_new_requests()
        logger.info(
            "shutting down: refusing new requests, finishing in-flight ones (grace %.0f s)",
            self.config.timeout_graceful_shutdown or 0,
        )
        self.should_exit = True


class CloseWhileDraining:
    """ASGI wrapper: once shutdown has begun, every answer carries `Connection: close`, so that
    keep-alive clients and load balancers open their next connection elsewhere rather than reuse
    this one until it is closed under them (a request racing that close would be lost)."""

    def __init__(self, app: ASGIApp, registry: ModelRegistry):
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.registry.state is ServiceState.STOPPING:
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing_send)
