"""What one benchmark run measures and how hard: `BenchConfig`, with every default of the CLI.

A run measures one or more models (`models`; the CLI's `--model`), each with its own rows: the
in-process limit and stages, served HTTP and gRPC at each concurrency level, the streams. The
harness's servers load every model of the run (so a row sees the others idle beside it), and,
with two or more models, the first is also served alone (`coserving`), so that what the others
cost it is measured in the same run.

Settings that the served processes read (`VISION_*`) reach them in three ways: the harness's own
options (`--backends`, `--threads`, `--device`, ...) through `model_env`; `--batching off`
(`VISION_MAX_BATCH_SIZE=1`) and `--overload` (`VISION_MAX_QUEUE_SIZE`); and `--server-env
KEY=VALUE` for anything else (`server_env`), so that a new server setting needs no harness
change. Where a `--server-env` variable is a setting the in-process measurement also uses (e.g.
`VISION_ONNX_ALLOW_SPINNING`, `VISION_MAX_BATCH_SIZE`), it applies there too, so that both sides
measure the same configuration.

With `url` and/or `grpc_target` (`--url`, `--grpc-target`) the harness starts no servers of the
project's API: it measures that deployment as it is (`deployment`, `external`), one model. The
options that only configure servers it starts (`--batching off`, `--server-env`, `--overload`,
more than one of `--backends`, `--threads`, `--device`) are refused then (`deployment.server_only_options`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.access import OPEN, Access
from bench.choices import (
    BATCHING_MODES,
    DEFAULT_BACKENDS,
    DEFAULT_ENDPOINTS,
    DEFAULT_MODELS,
    ENDPOINTS,
    HTTP_CLIENTS,
    IMAGE_SETS,
    OVERLOAD_ENDPOINTS,
)
from bench.deployment import (
    normalise_grpc_target,
    normalise_metrics_url,
    normalise_url,
    refuse_server_only_options,
    server_only_options,
)
from bench.grpc_load import GRPC_ENDPOINTS, STREAM_ENDPOINTS
from bench.http_load import REQUESTS
from bench.layouts import Layout, default_layouts
from bench.server_env import check_server_env_key, settings_from
from bench.servers import DEPLOYABLES
from visionserve.cpu import available_cpus
from visionserve.repository import Backend
from visionserve.settings import GrpcSettings, ModelSettings, ServerSettings

__all__ = [
    "BATCHING_MODES",
    "DEFAULT_BACKENDS",
    "DEFAULT_ENDPOINTS",
    "DEFAULT_MODELS",
    "ENDPOINTS",
    "HTTP_CLIENTS",
    "IMAGE_SETS",
    "OVERLOAD_ENDPOINTS",
    "BenchConfig",
]


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
    models: tuple[str, ...] | None = None
    """The models to measure, in order, the first the servers' default; None: `DEFAULT_MODELS`
    (with a deployment: the model it serves by default, `GET {url}/models`). With a deployment,
    one model, which it must serve."""
    backends: tuple[Backend, ...] = ()
    """Runtimes to start servers for; empty: `DEFAULT_BACKENDS`. With a deployment: empty (its
    runtime, from `GET {url}/models`) or the one runtime it serves."""
    endpoints: tuple[str, ...] = DEFAULT_ENDPOINTS
    """Names from `ENDPOINTS`: HTTP requests (`http_load.REQUESTS`: `json`, `file`, `v2`, and
    `live`, the HTTP floor), `grpc` (unary Predict in a closed loop), `v2grpc`, `health` (the
    gRPC floor), `stream` (one PredictStream call per round, frames back to back), `pacedstream`
    and `livestream` (one PredictStream / PredictLive call per round, frames at `clip_fps`). The
    floors are measured once per run (with the first model), the V2 ones for classifiers only."""
    image: Path | None = None
    """None: the images of `images` (per model); else this file for every model."""
    images: str = "auto"
    """From `IMAGE_SETS`: which images each model is sent (and measured with in-process)."""
    clip_fps: float = 30.0
    """Frame rate of the paced streams (`pacedstream`, `livestream`): a camera's."""
    coserving: bool = True
    """With two or more models: also serve the first one alone (its own processes) and measure
    its closed-loop rows there, against the same rows with every model loaded."""
    requests: int | None = 200
    """Measured requests per row (None: bounded by `duration_s` only); also the images of each
    in-process layout."""
    duration_s: float | None = None
    """Stop each row after this long, if `requests` have not run out first."""
    warmup: int = 30
    """Unmeasured requests before each row."""
    concurrency: tuple[int, ...] = (1, 16)
    """Closed-loop senders: every served closed-loop row (HTTP, gRPC unary, the floors, the
    baseline) is measured at each level. The in-process stages are one image at a time, a
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
    rounds: int = 4
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
            object.__setattr__(self, "backends", DEFAULT_BACKENDS)
        self._check_models()
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
        if self.images not in IMAGE_SETS:
            raise ValueError(f"images must be one of {', '.join(IMAGE_SETS)}, got {self.images!r}")
        if not (math.isfinite(self.clip_fps) and 0 < self.clip_fps <= 1000):
            raise ValueError(
                f"the clip's frame rate must be between 0 and 1000 frames/s, got {self.clip_fps}"
            )
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
            for model in self.resolved_models() or (None,):
                self.model_settings(backend, model)

    def _check_models(self) -> None:
        if self.models is None:
            return
        names = tuple(dict.fromkeys(name.strip() for name in self.models if name.strip()))
        if not names:
            raise ValueError("name at least one model, e.g. efficientnet_lite0")
        for name in names:
            if "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"{name!r} is not a model name: give a folder name of the model repository")
        if self.external and len(names) > 1:
            raise ValueError(
                "a deployment is measured one model at a time: give one --model (it must serve it)"
            )
        object.__setattr__(self, "models", names)

    def resolved_models(self) -> tuple[str, ...]:
        """The models measured, in order: `models`, else `DEFAULT_MODELS`; with a deployment,
        `models` or none (the deployment's default, which `GET /models` says)."""
        if self.models is not None:
            return self.models
        return () if self.external else DEFAULT_MODELS

    @property
    def model_name(self) -> str | None:
        """The first model named (the servers' default), if any."""
        models = self.resolved_models()
        return models[0] if models else None

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
        refuse_server_only_options(
            server_only_options(
                batching=self.batching,
                server_env=self.server_env,
                overload=self.overload,
                backends=self.backends,
                threads=self.threads,
                device=self.device,
            )
        )
        if not self.http_endpoints and not self.grpc_endpoints:
            raise ValueError(
                f"nothing to measure: --endpoints {','.join(self.endpoints)} asks for "
                + ("gRPC rows: add --grpc-target" if self.url else "HTTP rows: add --url")
            )

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
    def stream_endpoints(self) -> tuple[str, ...]:
        """The streams asked for (`stream`, `pacedstream`, `livestream`), in order."""
        return tuple(e for e in self.grpc_endpoints if e in STREAM_ENDPOINTS)

    @property
    def overload_endpoints(self) -> tuple[str, ...]:
        """The endpoints an overload run loads: HTTP JSON, multipart and gRPC unary, where asked for."""
        return tuple(e for e in OVERLOAD_ENDPOINTS if e in self.endpoints)

    def server_settings(self) -> ServerSettings:
        """The served processes' front-door settings: the environment, then `--server-env`."""
        return settings_from(ServerSettings, self.server_env)

    def grpc_settings(self) -> GrpcSettings:
        """The gRPC processes' settings: the environment, then `--server-env`."""
        return settings_from(GrpcSettings, self.server_env)

    def model_settings(self, backend: Backend, model: str | None = None) -> ModelSettings:
        """The runtime settings for `backend` and `model` (None: the run's first): the
        environment's `VISION_*`, `--server-env`, then these fields."""
        overrides: dict[str, Any] = {}
        model = model or self.model_name
        if model:
            overrides["model_name"] = model
        if self.device:
            overrides["device"] = self.device
        if self.threads:
            overrides["threads"] = self.threads
        return settings_from(
            ModelSettings,
            self.server_env,
            backend=backend,
            model_repository=self.model_repository,
            **overrides,
        )
