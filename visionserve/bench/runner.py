"""One whole benchmark run: for each runtime, the in-process pipeline and the served processes
(HTTP, gRPC) under load, on the same image with the same settings, measured in turns (`rounds`).

Notebooks run it as a process of its own (`python -m visionserve.bench --output DIR`) and read
`DIR/bench.json`: a kernel's running event loop and its own threads would skew (or refuse) the
measurement. Scripts without a running event loop may call `run_benchmark` directly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from PIL import Image

from visionserve.bench.closed_loop import SendOnce, run_closed_loop
from visionserve.bench.grpc_load import (
    GRPC_ENDPOINTS,
    HEALTH,
    STREAM,
    UNARY,
    grpc_channel,
    grpc_sender,
    health_sender,
    measure_stream,
)
from visionserve.bench.http_load import (
    REQUESTS,
    HttpRequestSpec,
    event_loop_name,
    event_loop_runner,
    http_client,
    http_sender,
)
from visionserve.bench.inprocess import (
    STAGES,
    PipelineMeasurement,
    PipelineTimer,
    loaded_runtime,
    measure_pipeline,
    merge_pipeline,
)
from visionserve.bench.machine import describe_machine
from visionserve.bench.raw_http import RawHttpClient
from visionserve.bench.report import GRPC, GRPC_STREAM, HTTP, IN_PROCESS, BenchReport, ResultRow
from visionserve.bench.servers import DEPLOYABLES, GrpcServerProcess, ServerProcess, model_env
from visionserve.bench.stats import Measurement
from visionserve.errors import VisionError
from visionserve.photos import packaged_photo
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import Backend, ModelEntry, ModelRepository
from visionserve.settings import GrpcSettings, ModelSettings, ServerSettings

DEFAULT_IMAGE = "chelsea.png"
"""scikit-image's photo of a cat (451x300 PNG): real, and installed wherever the tests run."""

PIPELINE = " + ".join(STAGES)

Progress = Callable[[str], None]
Measure = Callable[[int | None, float | None], Coroutine[Any, Any, Measurement]]
"""Runs one measurement of a served row, bounded by (requests, duration_s)."""

ENDPOINTS = [*REQUESTS, *GRPC_ENDPOINTS]
"""Every endpoint name the CLI knows: HTTP (`http_load.REQUESTS`), then gRPC (`grpc`, `stream`)."""


def _to_stderr(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


HTTP_CLIENTS = {
    "raw": "minimal HTTP/1.1 client (visionserve.bench.raw_http)",
    "httpx2": "httpx2 AsyncClient",
}
"""Client name -> description for reports."""


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how hard; every field has the CLI's default."""

    model_repository: Path = Path("model_repository")
    model_name: str | None = None
    """None: the `ModelSettings` default (or `VISION_MODEL_NAME`)."""
    backends: tuple[Backend, ...] = ("onnx", "torch")
    endpoints: tuple[str, ...] = ("file", "json", "live", "grpc", "health", "stream")
    """Names from `ENDPOINTS`: HTTP requests (`http_load.REQUESTS`), `grpc` (unary Predict in a
    closed loop), `health` (the gRPC health check: the gRPC floor) and `stream` (one PredictStream
    call per round, frames back to back)."""
    image: Path | None = None
    """None: the packaged `chelsea.png`."""
    requests: int | None = 300
    """Measured requests per row (None: bounded by `duration_s` only)."""
    duration_s: float | None = None
    """Stop each row after this long, if `requests` have not run out first."""
    warmup: int = 30
    """Unmeasured requests before each row."""
    concurrency: int = 1
    """Closed-loop HTTP and gRPC unary senders (the in-process pipeline is always one image at a
    time, the stream always one call)."""
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
    round (in-process, then each endpoint), so that a machine whose speed drifts over tens of
    seconds (shared or virtual CPUs) shifts every row alike; 1: one row after another."""
    ready_timeout_s: float = 300.0
    timeout_s: float = 30.0
    """Per-request HTTP timeout."""
    output: Path = Path("bench-results")
    """Where the report and the servers' logs go."""
    client: str = "raw"
    """HTTP client: `raw` (minimal keep-alive HTTP/1.1, the least client overhead) or `httpx2`."""

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in DEPLOYABLES]
        if unknown or not self.backends:
            raise ValueError(
                f"backends must be among {', '.join(DEPLOYABLES)}; got {', '.join(self.backends)}"
            )
        strangers = [e for e in self.endpoints if e not in ENDPOINTS]
        if strangers:
            raise ValueError(f"unknown endpoints {', '.join(strangers)}; choose from {', '.join(ENDPOINTS)}")
        if self.requests is None and self.duration_s is None:
            raise ValueError("bound each measurement with a number of requests, a duration, or both")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be at least 1, got {self.requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration must be positive, got {self.duration_s}")
        if self.warmup < 0 or self.concurrency < 1:
            raise ValueError("warmup must be 0 or more and concurrency at least 1")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.client not in HTTP_CLIENTS:
            raise ValueError(f"client must be one of {', '.join(HTTP_CLIENTS)}, got {self.client!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.stream_window is not None and self.stream_window < 1:
            raise ValueError(f"the stream window must be at least 1, got {self.stream_window}")

    def resolved_stream_window(self) -> int:
        """The stream window: the setting, or the server's read-ahead (as the served process reads
        it from the environment)."""
        return self.stream_window or GrpcSettings().stream_read_ahead

    @property
    def http_endpoints(self) -> tuple[str, ...]:
        """The HTTP endpoints asked for, in order."""
        return tuple(e for e in self.endpoints if e in REQUESTS)

    @property
    def grpc_endpoints(self) -> tuple[str, ...]:
        """The gRPC endpoints asked for, in order."""
        return tuple(e for e in self.endpoints if e in GRPC_ENDPOINTS)

    def model_settings(self, backend: Backend) -> ModelSettings:
        """The runtime settings for `backend`: the environment's `VISION_*`, then these fields."""
        overrides: dict[str, Any] = {}
        if self.model_name:
            overrides["model_name"] = self.model_name
        if self.device:
            overrides["device"] = self.device
        if self.threads:
            overrides["threads"] = self.threads
        return ModelSettings(backend=backend, model_repository=self.model_repository, **overrides)


def runtime_label(settings: ModelSettings) -> str:
    """`onnx`, `torch compiled` or `torch eager`."""
    if settings.backend == "torch":
        return "torch compiled" if settings.torch_compile else "torch eager"
    return settings.backend


def _describe_image(path: Path, data: bytes) -> str:
    with Image.open(path) as image:
        return f"{path.name} ({image.width}x{image.height} {image.format}, {len(data):,} bytes)"


def split_requests(total: int | None, rounds: int) -> list[int | None]:
    """`total` requests spread over `rounds` as evenly as possible (None: unbounded each round)."""
    if total is None:
        return [None] * rounds
    base, extra = divmod(total, rounds)
    return [base + 1 if i < extra else base for i in range(rounds)]


def run_benchmark(config: BenchConfig, *, progress: Progress = _to_stderr) -> BenchReport:
    """Measure every backend in `config`, one after another, and return the report."""
    image_path = config.image or packaged_photo(DEFAULT_IMAGE)
    image = image_path.read_bytes()
    server_settings = ServerSettings()  # as the served process reads it from the environment
    first = config.model_settings(config.backends[0])
    entry = ModelRepository(first.model_repository).get(first.model_name)
    preprocessor = ImagePreprocessor(entry.config.input, max_image_pixels=server_settings.max_image_pixels)
    try:
        preprocessor(image)
    except VisionError as exc:
        raise ValueError(f"{image_path} cannot be benchmarked: {exc.message}") from exc

    report = BenchReport(
        machine=describe_machine(device=first.device),
        settings={
            "model": entry.name,
            "image": _describe_image(image_path, image),
            "device": first.device,
            "runtime_threads": first.resolved_threads(),
            "server_preprocess_workers": server_settings.resolved_preprocess_workers(),
            "torch_compile": first.torch_compile,
            "onnx_allow_spinning": first.onnx_allow_spinning,
            "batch": "1 (in-process and served: one image per predict_batch)",
            "requests_per_row": config.requests,
            "duration_bound_s": config.duration_s,
            "warmup_per_row": config.warmup,
            "rounds": f"{config.rounds} (each runtime's rows take turns, round by round)",
            "http_concurrency": config.concurrency,
            "http_client": f"{HTTP_CLIENTS[config.client]}, same machine, keep-alive, closed loop, "
            f"{event_loop_name()}",
            "latency_unit": "milliseconds; req/s = completed requests / wall time",
        },
    )
    if config.grpc_endpoints:
        report.settings["grpc_client"] = (
            f"grpc.aio {grpc.__version__}, same machine, one channel (one HTTP/2 connection), "
            f"unary closed loop at concurrency {config.concurrency}, {event_loop_name()}"
        )
    if "stream" in config.grpc_endpoints:
        report.settings["grpc_stream"] = (
            f"one PredictStream call per round, frames back to back with at most "
            f"{config.resolved_stream_window()} unanswered (server read-ahead "
            f"{GrpcSettings().stream_read_ahead}); latency = frame written -> its answer; req/s = frames/s"
        )
    specs = [REQUESTS[name](image, image_path.name) for name in config.http_endpoints]
    for backend in config.backends:
        report.rows += _measure_backend(
            config,
            backend,
            entry=entry,
            preprocessor=preprocessor,
            image=image,
            specs=specs,
            progress=progress,
        )
    return report


def _measure_backend(
    config: BenchConfig,
    backend: Backend,
    *,
    entry: ModelEntry,
    preprocessor: ImagePreprocessor,
    image: bytes,
    specs: list[HttpRequestSpec],
    progress: Progress,
) -> list[ResultRow]:
    """One backend: its served processes (HTTP, gRPC) and its in-process runtimes, all up at once,
    measured in turns. Whatever is not being measured is idle: the runtimes' threads do not spin
    (ONNX Runtime's spinning is off unless configured on, for all alike)."""
    settings = config.model_settings(backend)
    variants = [settings]
    if backend == "torch" and settings.torch_compile and config.torch_eager:
        variants.append(settings.model_copy(update={"torch_compile": False}))
    served_label = runtime_label(settings)
    env = model_env(settings)
    log_dir = config.output
    grpc_names = config.grpc_endpoints

    with contextlib.ExitStack() as stack:
        http_server = grpc_server = None
        if specs:
            http_server = ServerProcess(
                backend,
                env=env,
                log_path=log_dir / f"server-{backend}.log",
                ready_timeout_s=config.ready_timeout_s,
            )
        if grpc_names:
            grpc_server = GrpcServerProcess(
                backend,
                env=env,
                log_path=log_dir / f"server-grpc-{backend}.log",
                ready_timeout_s=config.ready_timeout_s,
            )
        processes = [p for p in (http_server, grpc_server) if p is not None]
        if processes:
            modules = " and ".join(f"python -m {p.module}" for p in processes)
            progress(f"{served_label}: starting {modules} and waiting until ready")
        for process in processes:  # loading at once: their warm-ups (torch: compiling) overlap
            stack.callback(process.stop)
            process.launch()
        for process in processes:
            process.wait_until_ready()

        timers: dict[str, PipelineTimer] = {}
        for variant in variants:
            label = runtime_label(variant)
            slow = " (compiling: a minute or so)" if label == "torch compiled" else ""
            progress(f"{label}: loading and warming up in-process{slow}")
            runtime = stack.enter_context(loaded_runtime(entry, variant))
            timers[label] = PipelineTimer(runtime, preprocessor, topk=5)

        runner = stack.enter_context(event_loop_runner())
        measures: dict[str, Measure] = {}
        if http_server is not None:
            senders: dict[str, SendOnce]
            if config.client == "raw":
                raw = RawHttpClient(
                    http_server.base_url, concurrency=config.concurrency, timeout_s=config.timeout_s
                )
                stack.callback(runner.run, raw.aclose())
                senders = {spec.name: raw.sender(spec) for spec in specs}
            else:
                client = http_client(
                    http_server.base_url, concurrency=config.concurrency, timeout_s=config.timeout_s
                )
                stack.callback(runner.run, client.aclose())
                senders = {spec.name: http_sender(client, spec) for spec in specs}
            measures.update({name: _closed_loop(send, config.concurrency) for name, send in senders.items()})
        if grpc_server is not None:
            # NOTE: made on the runner's loop: a grpc.aio channel belongs to the loop it is made on.
            channel = runner.run(_open_channel(grpc_server.target))
            stack.callback(runner.run, channel.close())
            if "grpc" in grpc_names:
                send = grpc_sender(channel, image, timeout_s=config.timeout_s)
                measures[UNARY] = _closed_loop(send, config.concurrency)
            if "health" in grpc_names:
                measures[HEALTH] = _closed_loop(
                    health_sender(channel, timeout_s=config.timeout_s), config.concurrency
                )
            if "stream" in grpc_names:
                measures[STREAM] = _stream(channel, image, config)

        progress(f"{served_label}: warming up every row ({config.warmup} requests each)")
        for timer in timers.values():
            timer.warm_up(image, config.warmup)
        for measure in measures.values():
            runner.run(measure(config.warmup, None))

        pipelines: dict[str, list[PipelineMeasurement]] = {label: [] for label in timers}
        served: dict[str, list[Measurement]] = {name: [] for name in measures}
        round_duration = None if config.duration_s is None else config.duration_s / config.rounds
        for number, requests in enumerate(split_requests(config.requests, config.rounds), start=1):
            progress(f"{served_label}: round {number}/{config.rounds}")
            for label, timer in timers.items():
                pipelines[label].append(
                    measure_pipeline(timer, image, requests=requests, duration_s=round_duration)
                )
            for name, measure in measures.items():
                served[name].append(runner.run(measure(requests, round_duration)))

    rows = []
    for label, parts in pipelines.items():
        merged = merge_pipeline(parts)
        rows.append(ResultRow(label, IN_PROCESS, PIPELINE, 1, merged.total, stages_s=merged.stages_s))
    for spec in specs:
        measurement = Measurement.merged(served[spec.name])
        rows.append(
            ResultRow(
                served_label, HTTP, spec.name, config.concurrency, measurement, model_work=spec.model_work
            )
        )
    for name in (UNARY, HEALTH):  # HEALTH runs no model: not compared with in-process
        if name in served:
            measurement = Measurement.merged(served[name])
            rows.append(
                ResultRow(served_label, GRPC, name, config.concurrency, measurement, model_work=name == UNARY)
            )
    if STREAM in served:
        rows.append(ResultRow(served_label, GRPC_STREAM, STREAM, 1, Measurement.merged(served[STREAM])))
    return rows


async def _open_channel(target: str) -> grpc.aio.Channel:
    return grpc_channel(target)


def _closed_loop(send: SendOnce, concurrency: int) -> Measure:
    def measure(requests: int | None, duration_s: float | None) -> Coroutine[Any, Any, Measurement]:
        return run_closed_loop(send, concurrency=concurrency, requests=requests, duration_s=duration_s)

    return measure


def _stream(channel: grpc.aio.Channel, image: bytes, config: BenchConfig) -> Measure:
    def measure(frames: int | None, duration_s: float | None) -> Coroutine[Any, Any, Measurement]:
        return measure_stream(
            channel,
            image,
            frames=frames,
            duration_s=duration_s,
            window=config.resolved_stream_window(),
            frame_timeout_s=config.timeout_s,
        )

    return measure
