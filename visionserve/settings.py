"""Settings, read from the environment (prefix `VISION_`) by entrypoints and passed in.

Nothing here is instantiated at import time: entrypoints build the settings they need, so a test
can build an app with other settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from visionserve.cpu import available_cpus
from visionserve.errors import ConfigurationError

MiB = 1024 * 1024
SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def from_env(cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """Build `cls` from the environment (and `overrides`); a bad value raises ConfigurationError
    naming the environment variable, the value given and what is accepted."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix") or "")
        problems = [_problem(cls, prefix, error) for error in exc.errors()]
        raise ConfigurationError("invalid settings: " + "; ".join(problems)) from None


def _problem(cls: type[BaseSettings], prefix: str, error: Any) -> str:
    """One settings error as a line naming the variable; the values of secrets are never shown."""
    if not error["loc"]:  # a check across several settings: its message names them
        return str(error["msg"]).removeprefix("Value error, ")
    field = str(error["loc"][0])
    name = prefix + "_".join(str(part) for part in error["loc"]).upper()
    info = cls.model_fields.get(field)
    if info is not None and "SecretStr" in str(info.annotation):
        return f"{name}: {error['msg']}"
    return f"{name}={error.get('input')!r}: {error['msg']}"


class ServerSettings(BaseSettings):
    """The HTTP front door: where it listens and what it accepts."""

    model_config = SettingsConfigDict(env_prefix="VISION_", extra="ignore")

    host: str = "127.0.0.1"
    """Interface to bind (`0.0.0.0` in a container)."""

    port: int = Field(default=8000, ge=0, le=65535)
    """HTTP port; 0 picks a free one (tests)."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the service's own loggers and uvicorn's."""

    max_request_bytes: int = Field(default=20 * MiB, ge=1024)
    """Largest request body accepted (bytes); larger bodies get 413 naming this setting."""

    max_image_pixels: int = Field(default=40_000_000, ge=1, le=89_478_485)
    """Largest image (width x height) decoded; checked from the header, before decoding, so a
    small file that declares a huge image (a decompression bomb) costs nothing. At most Pillow's
    own limit (89,478,485 pixels)."""

    default_topk: int = Field(default=5, ge=1)
    """Classes returned when a request does not say `topk`."""

    preprocess_workers: int | None = Field(default=None, ge=1)
    """Threads that decode and preprocess images; default: the cores this process may use."""

    max_batch_size: int | None = Field(default=None, ge=1)
    """Overrides the model's `max_batch_size` (config.json); at most that value, which the
    exported artefacts were made for."""

    max_queue_delay_us: int | None = Field(default=None, ge=0, le=10_000_000)
    """Overrides the model's `max_queue_delay_us` (config.json; default 0)."""

    max_queue_size: int | None = Field(default=None, ge=1)
    """Overrides the model's `max_queue_size` (config.json; default 128)."""

    request_timeout_s: float | None = Field(default=None, gt=0)
    """Deadline of every HTTP inference request, from its arrival: one still queued for the model
    then is dropped, never computed, and answered 504. A client can ask for a shorter one with the
    `X-Request-Timeout` header (seconds). Default: none (only the header's)."""

    access_log: bool = False
    """Log one line per HTTP request (uvicorn's access log)."""

    keep_alive_s: float = Field(default=75.0, gt=0)
    """How long an idle keep-alive connection stays open. Longer than the idle timeout of the
    load balancers usually in front (60 s), so that they, not the server, close idle connections."""

    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    """How long a client has to send a request's line and headers: from the connection's start
    (after TLS) for its first request, from its first byte for later ones. Late: 408 and the
    connection closed. Bounds what a client that connects and sends nothing, or trickles its
    headers (slowloris), can hold."""

    body_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """How long a client has to send a whole request body, from the end of its headers (a deadline
    for the whole body, not between chunks: a byte a second would reset that forever; time the
    server itself is not reading does not count). Late: 408 and the connection closed. At 60 s a
    body of the largest default size (20 MiB) needs about 2.8 Mbit/s; raise it for large uploads
    over slow links."""

    early_refusal: bool = True
    """Answer an inference request that its model would refuse before reading its body (queue
    full, model not ready: 503) from the HTTP protocol as soon as its headers are in, without
    FastAPI: the same answer and metrics, for a fraction of the event loop's time (a flood of
    instant retries stays cheap). Off: the route answers it, as before."""

    gc_freeze: bool = True
    """Once every model has loaded and warmed up, collect the young garbage and freeze the heap
    (`gc.freeze()`): the objects made at start (modules, frameworks, models: ~80 k here) leave the
    cyclic garbage collector's view, so a full collection under load, which stops every Python
    thread, takes ~0.5 ms instead of 40-80 ms (measured: docs/benchmarks.md, "Garbage
    collection"). Unfrozen when the models stop. Off: Python's default."""

    max_connections: int | None = Field(default=None, ge=0, le=1_000_000)
    """Open HTTP connections, idle keep-alive ones included, beyond which requests are answered
    503 (`Connection: close`); 0: no cap; unset: the process's open-file limit (`ulimit -n`, which
    every connection uses one of) less 256 for the models, logs and the gRPC side. A cap turns a
    flood of slow connections into refusals for everyone until the timeouts clear it (measured:
    docs/reliability.md), so by default it bites only where descriptors would run out anyway."""

    def resolved_max_connections(self) -> int:
        """`max_connections`, or the default from the open-file limit (0: no cap)."""
        if self.max_connections is not None:
            return self.max_connections
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return 0
        return max(64, int(soft) - 256)

    graceful_shutdown_s: float = Field(default=30.0, ge=0)
    """On SIGTERM/Ctrl-C, how long in-flight requests may take to finish."""

    shutdown_delay_s: float = Field(default=0.0, ge=0, le=300)
    """On SIGTERM/Ctrl-C, how long to keep serving before stopping (HTTP and gRPC processes).
    Readiness turns 503 "stopping" / gRPC health NOT_SERVING at once; requests that still arrive
    during the delay are answered (over HTTP with `Connection: close`); then new requests are
    refused (503 / UNAVAILABLE "shutting down", or the port is closed) and in-flight ones get
    `graceful_shutdown_s` (gRPC: `VISION_GRPC_GRACE_S`) to finish. Default 0: stop at once, right
    for a local run and Compose, where nothing routes to a stopping container. On Kubernetes set
    about 5-10 s: endpoints are removed a few seconds after the pod is told to stop, and requests
    routed to it meanwhile would otherwise be refused; keep terminationGracePeriodSeconds above
    this delay plus the grace."""

    def resolved_preprocess_workers(self) -> int:
        """Preprocessing threads to use: the setting, or the usable cores (see `cpu.ThreadLayout`
        for why the pool is not shrunk by the runtime's threads)."""
        return self.preprocess_workers or available_cpus()

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class ModelSettings(BaseSettings):
    """Which model is served, by which runtime, on which device, with how many threads."""

    model_config = SettingsConfigDict(env_prefix="VISION_", extra="ignore", protected_namespaces=())

    model_repository: Path = Path("model_repository")
    """Folder holding one sub-folder per model (`<name>/config.json`), as written by `export`."""

    model_name: str = "efficientnet_lite0"
    """The default model (a sub-folder of the repository): what the seed-compatible endpoints
    (`/predict`, gRPC `Predict`, ...) use when a request names no model."""

    models: str | None = None
    """The models to serve, comma-separated (e.g. `efficientnet_lite0,yolo11n`); default: every
    model in the repository. The default model (`model_name`) must be one of them."""

    backend: Literal["onnx", "torch"] = "onnx"
    """Runtime: ONNX Runtime or PyTorch. The `fastapi_onnx` / `fastapi_pt` deployables fix it."""

    device: Literal["cpu", "cuda"] = "cpu"
    """Where inference runs. `cuda` fails at start, saying what is missing, when it cannot."""

    threads: int | None = Field(default=None, ge=1)
    """Intra-op threads of each runtime instance; overrides the model's `threads` (config.json).
    Default: on CPU the cores this process may use (affinity and cgroup quota) shared among the
    instances, on CUDA 1. Instances x threads may not exceed the cores."""

    instances: int | None = Field(default=None, ge=1, le=64)
    """Runtime instances computing batches at the same time; overrides the model's `instances`
    (config.json; default 1). ONNX: one session each; PyTorch: one module called from each."""

    layout: Literal["auto", "adaptive", "fixed"] = "auto"
    """How the runtime's sessions share the cores. `auto` (the default): on ONNX Runtime on CPU,
    where neither VISION_THREADS nor VISION_INSTANCES nor the model's config.json (`threads`, or
    `instances` above 1) sets a layout, the adaptive one: a wide session of every core for a lone
    request and narrow sessions side by side under load (2 cores: 1x2 and 2x1), switched per batch
    by the compute budget; otherwise the fixed layout those settings give, as before. `fixed`:
    always the fixed layout (default 1 instance x every core). `adaptive`: the adaptive layout on
    ONNX Runtime on CPU even where `auto` would not; VISION_THREADS then sets the wide session's
    threads and VISION_INSTANCES the number of narrow sessions. GET /models and the start-up log
    say which layout runs and why."""

    torch_compile: bool = True
    """PyTorch runtime only: compile the model with `torch.compile` (inductor, frozen weights)
    during warm-up. About 2x faster on CPU here; warm-up takes tens of seconds longer."""

    onnx_allow_spinning: bool = False
    """ONNX Runtime only: let idle intra-op threads spin. Spinning burns a core while idle and
    hurts under concurrency on small machines; turn on for lowest single-client latency."""

    @field_validator("model_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or "/" in value or "\\" in value or value.startswith("."):
            raise ValueError(
                f"model_name must be a plain folder name inside the model repository, got {value!r}; "
                "set VISION_MODEL_NAME to e.g. 'efficientnet_lite0'"
            )
        return value

    @field_validator("models")
    @classmethod
    def _model_list(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        names = [name.strip() for name in value.split(",")]
        for name in names:
            cls._plain_name(name)
        if len(set(names)) != len(names):
            raise ValueError(f"names a model twice: {value!r}")
        return ",".join(names)

    def model_names(self) -> list[str] | None:
        """The names in `models`, or None for every model in the repository."""
        return self.models.split(",") if self.models else None

    def resolved_threads(self) -> int:
        """Intra-op threads per instance from these settings alone: the setting, or on CPU the
        usable cores shared among the instances, on CUDA 1. (A model's config.json may also set
        threads and instances; `visionserve.runtimes.thread_layout` weighs it too.)"""
        if self.threads:
            return self.threads
        return 1 if self.device == "cuda" else max(1, available_cpus() // (self.instances or 1))


class GrpcSettings(BaseSettings):
    """The gRPC front door: where it listens, message limits, streaming read-ahead, shutdown."""

    model_config = SettingsConfigDict(env_prefix="VISION_GRPC_", extra="ignore")

    host: str = "127.0.0.1"
    """Interface to bind (`0.0.0.0` in a container)."""

    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one (tests)."""

    max_message_bytes: int = Field(default=32 * MiB, ge=1024, le=1024 * MiB)
    """Largest request or response message; a larger request fails with RESOURCE_EXHAUSTED naming
    this setting (gRPC's own default, 4 MiB, is too small for large photos)."""

    stream_read_ahead: int = Field(default=8, ge=1, le=1024)
    """Frames of a `PredictStream` read and in flight before the server waits for the client to
    take answers (flow control: a fast sender cannot make the server buffer an unbounded stream)."""

    live_in_flight: int = Field(default=2, ge=1, le=64)
    """`PredictLive` (live video): frames of one stream computed at once; a newer frame waits for
    one of them and supersedes the frame that was waiting (answered `skipped`). 2 overlaps one
    frame's decoding with another's inference; the latency stays bounded by about this many
    frames' compute."""

    grace_s: float = Field(default=10.0, ge=0)
    """On SIGTERM/SIGINT, how long in-flight calls may take to finish before they are cancelled."""

    serve_http: bool = False
    """Serve the HTTP API from this process too (VISION_HOST, VISION_PORT and the other server
    settings), over the same models, batchers and compute budget: one copy of each model, no two
    processes competing for the cores. `make run` starts the APIs this way."""

    metrics: bool = True
    """Serve the gRPC process's Prometheus metrics over HTTP (`GET /metrics`, same names as the
    HTTP API's), on `metrics_port` of `host`, with `GET /health/ready` and `/health/live` beside
    them for load balancers that cannot send a gRPC health check (HAProxy: docs/reliability.md)."""

    metrics_port: int = Field(default=8002, ge=0, le=65535)
    """Port of the gRPC process's metrics endpoint; 0 picks a free one (announced at start)."""

    max_connections: int = Field(default=1000, ge=0, le=1_000_000)
    """Open connections (HTTP/2) the server accepts; more are closed at once (gRPC core's
    `grpc.max_allowed_incoming_connections`). 0: no cap. Keep it under `ulimit -n`."""

    max_concurrent_streams: int = Field(default=256, ge=1, le=1_000_000)
    """Calls one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS, gRPC
    core's `grpc.max_concurrent_streams`); a client's further calls wait on its side for one to end.
    256, not HTTP/2's recommended minimum of 100: the server counts a call a little after the client
    saw it end, and at 100, 64 callers retrying refusals at once on one channel got a few calls reset
    (RST_STREAM REFUSED_STREAM: UNAVAILABLE with no `retry-after`; 10-12 of ~600 in 1 run of 4-6);
    none at 256 in 8 runs. Core's own default is unlimited."""

    handshake_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    """How long a new connection has for its handshake (TLS, and the HTTP/2 preface and settings)
    before it is closed (`grpc.server_handshake_timeout_ms`; core's default 120 s)."""

    max_connection_idle_s: float = Field(default=300.0, ge=0, le=86400)
    """A connection with no call for this long is sent GOAWAY and closed
    (`grpc.max_connection_idle_ms`); clients reconnect when they next call. 0: never."""

    max_connection_age_s: float = Field(default=0.0, ge=0, le=86400 * 7)
    """A connection older than this is sent GOAWAY, so that clients reconnect and spread over
    replicas that were added (`grpc.max_connection_age_ms`); its calls get
    `max_connection_age_grace_s` to finish. 0 (the default): never, since a live video stream may
    last hours; behind a connection-level load balancer, e.g. 300."""

    max_connection_age_grace_s: float = Field(default=30.0, ge=0, le=86400)
    """Time the calls of a connection past `max_connection_age_s` get before it is closed
    (`grpc.max_connection_age_grace_ms`)."""

    keepalive_time_s: float = Field(default=60.0, ge=1, le=86400)
    """While calls are open, the server pings a connection silent for this long, to find clients
    that vanished without closing it (`grpc.keepalive_time_ms`; core's default 2 h)."""

    keepalive_timeout_s: float = Field(default=20.0, ge=1, le=3600)
    """A ping unanswered for this long closes the connection and fails its calls
    (`grpc.keepalive_timeout_ms`)."""


MIN_API_KEY_CHARS = 16
_NEW_KEY_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class SecuritySettings(BaseSettings):
    """Who may call the APIs and how they reach them: an optional API key and optional TLS.

    Read by the HTTP and the gRPC processes alike (the same variables for both). Both are off by
    default, for local use on 127.0.0.1; docs/security.md says when to turn them on.
    """

    model_config = SettingsConfigDict(env_prefix="VISION_", extra="ignore")

    api_key: SecretStr | None = None
    """Turns the API key on: every request except the health checks must present it, over HTTP
    as `Authorization: Bearer <key>` or `X-API-Key: <key>`, over gRPC as the same metadata
    (`authorization` / `x-api-key`). At least 16 characters. Empty: off."""

    api_key_file: Path | None = None
    """The key read from a file instead (a Docker/Kubernetes secret); surrounding whitespace is
    ignored. Not together with `api_key`."""

    tls_cert_file: Path | None = None
    """PEM certificate chain of the server; with `tls_key_file` turns on TLS (HTTPS, and TLS on
    the gRPC port and the gRPC process's metrics endpoint)."""

    tls_key_file: Path | None = None
    """PEM private key matching `tls_cert_file`."""

    @field_validator("api_key", "api_key_file", "tls_cert_file", "tls_key_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_API_KEY_CHARS:
            raise ValueError(f"an API key must have at least {MIN_API_KEY_CHARS} characters; {_NEW_KEY_HINT}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SecuritySettings:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set VISION_API_KEY or VISION_API_KEY_FILE, not both")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both VISION_TLS_CERT_FILE and VISION_TLS_KEY_FILE (or neither)")
        for name, path in (
            ("VISION_API_KEY_FILE", self.api_key_file),
            ("VISION_TLS_CERT_FILE", self.tls_cert_file),
            ("VISION_TLS_KEY_FILE", self.tls_key_file),
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"{name}={str(path)!r} is not a readable file")
        return self

    def resolved_api_key(self) -> str | None:
        """The key in force (from `api_key` or `api_key_file`), or None when the key is off."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_file is None:
            return None
        try:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(
                f"cannot read VISION_API_KEY_FILE={str(self.api_key_file)!r}: {exc}"
            ) from None
        if len(key) < MIN_API_KEY_CHARS:
            raise ConfigurationError(
                f"the key in VISION_API_KEY_FILE={str(self.api_key_file)!r} has fewer than "
                f"{MIN_API_KEY_CHARS} characters; {_NEW_KEY_HINT}"
            )
        return key

    @property
    def tls(self) -> bool:
        """True when TLS is on."""
        return self.tls_cert_file is not None
