"""What one benchmark run measures and how hard: `BenchConfig`, with every default of the CLI.

Settings that the served processes read (`VISION_*`) reach them in three ways: the harness's own
options (`--backends`, `--threads`, `--device`, ...) through `model_env`; `--batching off`
(`VISION_MAX_BATCH_SIZE=1`) and `--overload` (`VISION_MAX_QUEUE_SIZE`); and `--server-env
KEY=VALUE` for anything else, so that a new server setting needs no harness change. Where a
`--server-env` variable is a setting the in-process measurement also uses (e.g.
`VISION_ONNX_ALLOW_SPINNING`, `VISION_MAX_BATCH_SIZE`), it applies there too, so that both sides
measure the same configuration.

With `url` and/or `grpc_target` (`--url`, `--grpc-target`) the harness starts no servers of the
project's API: it measures that deployment as it is (`deployment`, `external`). The options that
only configure servers it starts (`--batching off`, `--server-env`, `--overload`, more than one
of `--backends`, `--threads`, `--device`) are refused then, by `external_conflicts`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic_settings import BaseSettings

from bench.access import OPEN, Access
from bench.deployment import normalise_grpc_target, normalise_metrics_url, normalise_url
from bench.grpc_load import GRPC_ENDPOINTS
from bench.http_load import REQUESTS
from bench.layouts import Layout, default_layouts
from bench.servers import DEPLOYABLES
from visionserve.cpu import available_cpus
from visionserve.errors import ConfigurationError
from visionserve.repository import Backend
from visionserve.settings import GrpcSettings, ModelSettings, ServerSettings, from_env

SettingsT = TypeVar("SettingsT", bound=BaseSettings)

ENDPOINTS = [*REQUESTS, *GRPC_ENDPOINTS]
"""Every endpoint name the CLI knows: HTTP (`http_load.REQUESTS`), then gRPC (`grpc`, `stream`)."""

BATCHING_MODES = ("on", "off")
"""`on`: the server's batcher as configured; `off`: `VISION_MAX_BATCH_SIZE=1` (one image per batch)."""

OVERLOAD_ENDPOINTS = ("json", "file", "grpc")
"""The endpoints an overload run loads (HTTP JSON, HTTP multipart and gRPC unary), where they are
measured."""

HTTP_CLIENTS = {
    "raw": "minimal HTTP/1.1 client (bench.raw_http)",
    "httpx2": "httpx2 AsyncClient",
}
"""Client name -> description for reports."""

_ENV_KEY = re.compile(r"^VISION_[A-Z0-9_]+$")
RESERVED_ENV = {
    "VISION_HOST": "the harness makes every server listen on a free port of 127.0.0.1",
    "VISION_PORT": "the harness makes every server listen on a free port of 127.0.0.1",
    "VISION_GRPC_HOST": "the harness makes every server listen on a free port of 127.0.0.1",
    "VISION_GRPC_PORT": "the harness makes every server listen on a free port of 127.0.0.1",
    "VISION_GRPC_METRICS_PORT": "the harness reads the gRPC metrics from a free port it is told",
    "VISION_GRPC_METRICS": "the harness reads the server figures from the gRPC metrics endpoint",
    "VISION_BACKEND": "use --backends",
    "VISION_MODEL_NAME": "use --model",
    "VISION_MODEL_REPOSITORY": "use --model-repository",
    "VISION_DEVICE": "use --device",
    "VISION_THREADS": "use --threads",
}
"""Variables `--server-env` may not set, and what to use instead: the harness sets them itself,
the same for the served processes and the in-process measurement."""


def check_server_env_key(key: str) -> None:
    """Raise ValueError (saying how to fix it) unless `key` may be passed with `--server-env`."""
    if not _ENV_KEY.match(key):
        raise ValueError(
            f"{key!r} is not a server setting: server settings are VISION_ variables in capitals, "
            "e.g. VISION_MAX_QUEUE_DELAY_US=500"
        )
    if key in RESERVED_ENV:
        raise ValueError(f"{key} cannot be set with --server-env: {RESERVED_ENV[key]}")


def parse_server_env(text: str) -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY, VALUE), the key checked by `check_server_env_key`."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(f"{text!r}: write KEY=VALUE, e.g. VISION_MAX_QUEUE_DELAY_US=500")
    check_server_env_key(key)
    return key, value


def _overrides(cls: type[BaseSettings], env: Mapping[str, str]) -> dict[str, Any]:
    """The entries of `env` that are fields of `cls` (by its env prefix), as keyword arguments."""
    prefix = str(cls.model_config.get("env_prefix") or "")
    found = {}
    for key, value in env.items():
        name = key[len(prefix) :].lower() if key.startswith(prefix) else ""
        if name in cls.model_fields:
            found[name] = value
    return found


def _settings(cls: type[SettingsT], env: Mapping[str, str], **overrides: Any) -> SettingsT:
    try:
        return from_env(cls, **{**_overrides(cls, env), **overrides})
    except ConfigurationError as exc:
        raise ValueError(f"{exc} (from --server-env or the environment)") from None


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how hard; every field has the CLI's default."""

    url: str | None = None
    """The HTTP API of a running deployment (`http://HOST:PORT`) to measure instead of starting
    servers: rows for the HTTP endpoints, server figures from `{url}/metrics`."""
    grpc_target: str | None = None
    """The gRPC API of a running deployment (`HOST:PORT`) to measure instead of starting servers."""
    grpc_metrics_url: str | None = None
    """The gRPC process's Prometheus endpoint (e.g. `http://127.0.0.1:8002/metrics`); None: the
    gRPC rows of a deployment have no server figures."""
    api_key: str | None = field(default=None, repr=False)
    """The deployment's API key, sent on every request to it (HTTP, gRPC, the metrics); None: the
    environment's `VISION_API_KEY` (so the notebooks and `make bench` pick it up); empty: none.
    Unused when the harness starts its servers. Never written into a report."""
    tls_ca: Path | None = None
    """PEM certificates to trust for `https://` URLs; also turns on TLS for `grpc_target`. None:
    the system CAs for `https://`, plain gRPC. Only with a deployment."""
    model_repository: Path = Path("model_repository")
    """Where the harness's own servers, the in-process rows and the baseline load the model from;
    with a deployment, only the in-process rows and the baseline, and only if it holds the served
    model."""
    model_name: str | None = None
    """None: the `ModelSettings` default (or `VISION_MODEL_NAME`); with a deployment, the model it
    serves (`GET {url}/models`), which this must match if given."""
    backends: tuple[Backend, ...] = ()
    """Runtimes to start servers for; empty: onnx and torch. With a deployment: empty (its
    runtime, from `GET {url}/models`) or the one runtime it serves."""
    endpoints: tuple[str, ...] = ("file", "json", "live", "grpc", "health", "stream")
    """Names from `ENDPOINTS`: HTTP requests (`http_load.REQUESTS`), `grpc` (unary Predict in a
    closed loop), `health` (the gRPC health check: the gRPC floor) and `stream` (one PredictStream
    call per round, frames back to back)."""
    image: Path | None = None
    """None: every packaged photo as a 600 px JPEG (`images.default_images`); else this file."""
    requests: int | None = 300
    """Measured requests per row (None: bounded by `duration_s` only); also the images of each
    in-process layout."""
    duration_s: float | None = None
    """Stop each row after this long, if `requests` have not run out first."""
    warmup: int = 30
    """Unmeasured requests before each row."""
    concurrency: tuple[int, ...] = (1,)
    """Closed-loop senders: every served closed-loop row (HTTP, gRPC unary, the floors, the
    baseline) is measured at each level. The in-process stages are one image at a time, the
    stream always one call."""
    batching: tuple[str, ...] = ("on",)
    """Served processes to measure, from `BATCHING_MODES`: each mode has its own processes."""
    server_env: Mapping[str, str] = field(default_factory=dict)
    """Extra `VISION_*` variables for every served process (and the in-process settings they
    name); see `check_server_env_key`."""
    layouts: tuple[Layout, ...] | None = None
    """In-process limit: the thread layouts to try; None: `default_layouts` of the usable cores;
    empty: no in-process limit."""
    limit_cap_s: float = 30.0
    """Time cap of each layout (split over the rounds), on top of `requests`."""
    baseline: bool = False
    """Also measure the naive reference server of seed 004 (`bench.baseline`)."""
    overload: bool = False
    """Also run the overload rows: `overload_concurrency` senders against processes whose queue
    holds `overload_queue_size` requests."""
    overload_concurrency: int = 64
    overload_queue_size: int = 8
    overload_requests: int | None = None
    """Measured requests of each overload row; None: `requests`, and at least 4 per sender (with
    fewer requests than senders, the queue never fills)."""
    overload_backoff_ms: float = 0.0
    """How long an overload sender waits after a refusal before its next request; 0 = at once (a
    flood of retries, the worst case), more = a client that backs off as Retry-After asks."""
    stream_window: int | None = None
    """Frames of the stream written and not yet answered; None: the server's read-ahead
    (`VISION_GRPC_STREAM_READ_AHEAD`, 8), which keeps its pipeline full. More only queue in HTTP/2
    buffers: the frames/s stay, and the latencies grow with the number of frames sent."""
    device: str | None = None
    threads: int | None = None
    """Runtime threads; None: the usable cores, as the server's default."""
    torch_eager: bool = True
    """Also measure torch eager in-process, to show what compiling gains."""
    rounds: int = 5
    """Each row's requests are split into this many rounds, and the rows take turns round by
    round (in-process, then each served row), so that a machine whose speed drifts over tens of
    seconds (shared or virtual CPUs) shifts every row alike; 1: one row after another."""
    ready_timeout_s: float = 300.0
    timeout_s: float = 30.0
    """Per-request HTTP timeout."""
    output: Path = Path("bench-results")
    """Where the report and the servers' logs go."""
    client: str = "raw"
    """HTTP client: `raw` (minimal keep-alive HTTP/1.1, the least client overhead) or `httpx2`."""

    def __post_init__(self) -> None:
        if isinstance(self.concurrency, int):  # one level given as a number
            object.__setattr__(self, "concurrency", (self.concurrency,))
        object.__setattr__(self, "server_env", dict(self.server_env))
        object.__setattr__(self, "backends", tuple(self.backends))
        if not self.backends and not self.external:
            object.__setattr__(self, "backends", tuple(DEPLOYABLES))
        unknown = [b for b in self.backends if b not in DEPLOYABLES]
        if unknown:
            raise ValueError(
                f"backends must be among {', '.join(DEPLOYABLES)}; got {', '.join(self.backends)}"
            )
        strangers = [e for e in self.endpoints if e not in ENDPOINTS]
        if strangers:
            raise ValueError(f"unknown endpoints {', '.join(strangers)}; choose from {', '.join(ENDPOINTS)}")
        self._check_targets()
        if self.requests is None and self.duration_s is None:
            raise ValueError("bound each measurement with a number of requests, a duration, or both")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be at least 1, got {self.requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration must be positive, got {self.duration_s}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be 0 or more, got {self.warmup}")
        if not self.concurrency or any(level < 1 for level in self.concurrency):
            raise ValueError(f"concurrency levels must be at least 1, got {self.concurrency}")
        if not self.batching or any(mode not in BATCHING_MODES for mode in self.batching):
            raise ValueError(f"batching must be among {', '.join(BATCHING_MODES)}, got {self.batching}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.client not in HTTP_CLIENTS:
            raise ValueError(f"client must be one of {', '.join(HTTP_CLIENTS)}, got {self.client!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.stream_window is not None and self.stream_window < 1:
            raise ValueError(f"the stream window must be at least 1, got {self.stream_window}")
        if self.limit_cap_s <= 0:
            raise ValueError(f"the layout time cap must be positive, got {self.limit_cap_s}")
        if self.overload:
            if self.overload_concurrency < 1 or self.overload_queue_size < 1:
                raise ValueError("the overload concurrency and queue size must be at least 1")
            if self.overload_backoff_ms < 0:
                raise ValueError(f"the overload backoff must not be negative, got {self.overload_backoff_ms}")
            if self.overload_requests is not None and self.overload_requests < 1:
                raise ValueError(f"overload requests must be at least 1, got {self.overload_requests}")
            if not self.overload_endpoints:
                raise ValueError(
                    "--overload loads HTTP JSON, HTTP multipart and/or gRPC unary: add json, file "
                    "or grpc to --endpoints"
                )
        for key in self.server_env:
            check_server_env_key(key)
        # settle bad --server-env values now, with the variable's name, not in a server's log
        self.server_settings()
        self.grpc_settings()
        for backend in self.backends:
            self.model_settings(backend)

    @property
    def external(self) -> bool:
        """Whether a running deployment is measured (`url` or `grpc_target`): no servers started."""
        return self.url is not None or self.grpc_target is not None

    def _check_targets(self) -> None:
        """Normalise the deployment's addresses; refuse options that only configure servers."""
        if self.url is not None:
            object.__setattr__(self, "url", normalise_url(self.url))
        if self.grpc_target is not None:
            object.__setattr__(self, "grpc_target", normalise_grpc_target(self.grpc_target))
        if self.grpc_metrics_url is not None:
            if self.grpc_target is None:
                raise ValueError("--grpc-metrics-url goes with --grpc-target (the gRPC API it counts)")
            object.__setattr__(self, "grpc_metrics_url", normalise_metrics_url(self.grpc_metrics_url))
        if self.api_key is None:  # the default, for the CLI and the notebooks alike
            object.__setattr__(self, "api_key", os.environ.get("VISION_API_KEY"))
        if self.api_key is not None:
            object.__setattr__(self, "api_key", self.api_key.strip() or None)
        if self.tls_ca is not None:
            if not self.external:
                raise ValueError(
                    "--tls-ca goes with --url https://... or --grpc-target (the harness's own "
                    "servers serve no TLS)"
                )
            if not self.tls_ca.is_file():
                raise ValueError(f"--tls-ca {self.tls_ca}: no such file (give a PEM certificate bundle)")
        if not self.external:
            return
        conflicts = self.external_conflicts()
        if conflicts:
            raise ValueError(
                "with --url/--grpc-target the harness starts no servers and measures the deployment "
                "as it is, so these options do not apply: "
                + "; ".join(f"{option} ({why})" for option, why in conflicts.items())
                + ". Configure the deployment itself, or leave out --url/--grpc-target to let the "
                "harness start its own servers."
            )
        if not self.http_endpoints and not self.grpc_endpoints:
            raise ValueError(
                f"nothing to measure: --endpoints {','.join(self.endpoints)} asks for "
                + ("gRPC rows: add --grpc-target" if self.url else "HTTP rows: add --url")
            )

    def external_conflicts(self) -> dict[str, str]:
        """Options set that only configure servers the harness starts -> why they do not apply to
        a deployment (empty when none are set)."""
        found: dict[str, str] = {}
        if "off" in self.batching:
            found["--batching off"] = (
                "batching is as deployed; measure batching off against a deployment started with "
                "VISION_MAX_BATCH_SIZE=1"
            )
        if self.server_env:
            found["--server-env " + ",".join(self.server_env)] = "set VISION_* variables on the deployment"
        if self.overload:
            found["--overload"] = (
                "it needs servers started with a small queue; start the deployment with a small "
                "VISION_MAX_QUEUE_SIZE and raise --concurrency instead"
            )
        if len(self.backends) > 1:
            found["--backends " + ",".join(self.backends)] = (
                "a deployment serves one runtime; give at most one, the one it serves"
            )
        if self.threads is not None:
            found["--threads"] = (
                "threads are as deployed (GET /models shows them; the in-process rows use the same)"
            )
        if self.device is not None:
            found["--device"] = (
                "the device is as deployed (GET /models shows it; the in-process rows use the same)"
            )
        return found

    def resolved_stream_window(self) -> int:
        """The stream window: the setting, or the server's read-ahead (as the served process reads
        it from the environment and `--server-env`)."""
        return self.stream_window or self.grpc_settings().stream_read_ahead

    def resolved_overload_requests(self) -> int | None:
        """Requests of each overload row (None: bounded by `duration_s` only)."""
        if self.overload_requests is not None:
            return self.overload_requests
        if self.requests is None:
            return None
        return max(self.requests, 4 * self.overload_concurrency)

    def resolved_layouts(self) -> tuple[Layout, ...]:
        """The layouts of the in-process limit (the default sweep when none were given)."""
        return default_layouts(available_cpus()) if self.layouts is None else self.layouts

    @property
    def access(self) -> Access:
        """How requests reach the deployment: `api_key` and `tls_ca` (open when the harness starts
        its own servers)."""
        if not self.external:
            return OPEN
        return Access(api_key=self.api_key, tls_ca=self.tls_ca)

    @property
    def http_endpoints(self) -> tuple[str, ...]:
        """The HTTP endpoints asked for, in order (with a deployment: none without `url`)."""
        if self.external and self.url is None:
            return ()
        return tuple(e for e in self.endpoints if e in REQUESTS)

    @property
    def grpc_endpoints(self) -> tuple[str, ...]:
        """The gRPC endpoints asked for, in order (with a deployment: none without `grpc_target`)."""
        if self.external and self.grpc_target is None:
            return ()
        return tuple(e for e in self.endpoints if e in GRPC_ENDPOINTS)

    @property
    def unmeasured_endpoints(self) -> tuple[str, ...]:
        """Endpoints asked for that a deployment cannot answer: HTTP ones without `url`, gRPC ones
        without `grpc_target` (none when the harness starts its servers)."""
        measured = {*self.http_endpoints, *self.grpc_endpoints}
        return tuple(e for e in self.endpoints if e not in measured)

    @property
    def overload_endpoints(self) -> tuple[str, ...]:
        """The endpoints an overload run loads: HTTP JSON, multipart and gRPC unary, where asked for."""
        return tuple(e for e in OVERLOAD_ENDPOINTS if e in self.endpoints)

    def server_settings(self) -> ServerSettings:
        """The served processes' front-door settings: the environment, then `--server-env`."""
        return _settings(ServerSettings, self.server_env)

    def grpc_settings(self) -> GrpcSettings:
        """The gRPC processes' settings: the environment, then `--server-env`."""
        return _settings(GrpcSettings, self.server_env)

    def model_settings(self, backend: Backend) -> ModelSettings:
        """The runtime settings for `backend`: the environment's `VISION_*`, `--server-env`, then
        these fields."""
        overrides: dict[str, Any] = {}
        if self.model_name:
            overrides["model_name"] = self.model_name
        if self.device:
            overrides["device"] = self.device
        if self.threads:
            overrides["threads"] = self.threads
        return _settings(
            ModelSettings,
            self.server_env,
            backend=backend,
            model_repository=self.model_repository,
            **overrides,
        )
