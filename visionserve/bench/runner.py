"""One whole benchmark run: for each runtime, the in-process limit (thread layouts) and pipeline
stages, and the served processes (HTTP, gRPC; batching on/off; overload; the baseline) under
closed-loop load at each concurrency level, on the same images with the same settings, measured
in turns (`rounds`).

Notebooks run it as a process of its own (`python -m visionserve.bench --output DIR`) and read
`DIR/bench.json` or `DIR/bench.csv`: a kernel's running event loop and its own threads would skew
(or refuse) the measurement. Scripts without a running event loop may call `run_benchmark`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import grpc
import httpx2

from visionserve.bench.config import HTTP_CLIENTS, BenchConfig
from visionserve.bench.http_load import (
    event_loop_name,
    event_loop_runner,
)
from visionserve.bench.images import (
    DEFAULT_LONG_SIDE,
    DEFAULT_QUALITY,
    BenchImage,
    default_images,
    file_image,
)
from visionserve.bench.inprocess import (
    STAGES,
    PipelineMeasurement,
    PipelineTimer,
    loaded_runtime,
    measure_pipeline,
    merge_pipeline,
)
from visionserve.bench.layouts import PIPELINE as LIMIT_PIPELINE
from visionserve.bench.layouts import Layout, LayoutMeasurement, measure_layout, use_threads
from visionserve.bench.machine import describe_machine
from visionserve.bench.plans import (
    RowPlan,
    baseline_process,
    build_plans,
    served_groups,
    split_requests,
)
from visionserve.bench.progress import ProgressBar
from visionserve.bench.report import BenchReport
from visionserve.bench.rows import IN_PROCESS, LayoutRow, ResultRow
from visionserve.bench.server_metrics import MetricsSnapshot, ServerFigures, scrape
from visionserve.bench.servers import ServerProcess, model_env
from visionserve.bench.stats import Measurement
from visionserve.bench.tables import row_name
from visionserve.cpu import available_cpus
from visionserve.errors import VisionError
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import Backend, ModelEntry, ModelRepository
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import ModelSettings

__all__ = ["BenchConfig", "run_benchmark", "runtime_label", "split_requests"]

PIPELINE = " + ".join(STAGES)


def runtime_label(settings: ModelSettings) -> str:
    """`onnx`, `torch compiled` or `torch eager`."""
    if settings.backend == "torch":
        return "torch compiled" if settings.torch_compile else "torch eager"
    return settings.backend


def load_images(config: BenchConfig) -> list[BenchImage]:
    """`--image FILE` as it is, or every packaged photo as a 600 px JPEG."""
    return [file_image(config.image)] if config.image else default_images()


def run_benchmark(config: BenchConfig, *, progress: ProgressBar | None = None) -> BenchReport:
    """Measure every backend in `config`, one after another, and return the report."""
    bar = progress or ProgressBar()
    images = load_images(config)
    server_settings = config.server_settings()  # as the served processes read it
    first = config.model_settings(config.backends[0])
    entry = ModelRepository(first.model_repository).get(first.model_name)
    preprocessor = ImagePreprocessor(entry.config.input, max_image_pixels=server_settings.max_image_pixels)
    for image in images:
        try:
            preprocessor(image.data)
        except VisionError as exc:
            raise ValueError(f"{image.name} cannot be benchmarked: {exc.message}") from exc
    max_batch = server_settings.max_batch_size or entry.config.max_batch_size
    report = BenchReport(
        machine=describe_machine(device=first.device),
        settings=_settings_facts(config, entry, first, max_batch),
        images=[image.describe() for image in images],
    )
    baseline_backend = "onnx" if "onnx" in config.backends else config.backends[0]
    for backend in config.backends:
        rows, layout_rows = _measure_backend(
            config,
            backend,
            entry=entry,
            preprocessor=preprocessor,
            images=images,
            max_batch=max_batch,
            with_baseline=config.baseline and backend == baseline_backend,
            bar=bar,
        )
        report.rows += rows
        report.layouts += layout_rows
    return report


def _settings_facts(
    config: BenchConfig, entry: ModelEntry, first: ModelSettings, max_batch: int
) -> dict[str, object]:
    server = config.server_settings()
    layouts = config.resolved_layouts()
    delay = (
        f"{server.max_queue_delay_us} us"
        if server.max_queue_delay_us is not None
        else f"{entry.config.max_queue_delay_us} us (config.json)"
    )
    facts: dict[str, object] = {
        "model": entry.name,
        "images": "--image as is"
        if config.image
        else f"every packaged photo, longer side {DEFAULT_LONG_SIDE} px, JPEG quality {DEFAULT_QUALITY}",
        "device": first.device,
        "runtime_threads": first.resolved_threads(),
        "runtime_instances": first.instances or 1,
        "server_preprocess_workers": server.resolved_preprocess_workers(),
        "torch_compile": first.torch_compile,
        "onnx_allow_spinning": first.onnx_allow_spinning,
        "batching": ", ".join(config.batching)
        + f" (on: max batch {max_batch}, max queue delay {delay}; off: VISION_MAX_BATCH_SIZE=1)",
        "server_env": dict(config.server_env),
        "concurrency": list(config.concurrency),
        "requests_per_row": config.requests,
        "duration_bound_s": config.duration_s,
        "warmup_per_row": config.warmup,
        "rounds": f"{config.rounds} (every row takes a turn each round)",
        "in_process_limit": (
            f"{LIMIT_PIPELINE}, layouts {', '.join(layout.label for layout in layouts)} (W preprocessing "
            f"threads x T intra-op threads), max batch {max_batch}, {config.requests or 'unbounded'} "
            f"images each, capped at {config.limit_cap_s:g} s"
            if layouts
            else "not measured (--layouts none)"
        ),
        "in_process_stages": "batch 1, one image after another",
        "http_client": f"{HTTP_CLIENTS[config.client]}, same machine, keep-alive, closed loop, "
        f"{event_loop_name()}",
        "latency_unit": "milliseconds; req/s = completed requests / wall time",
    }
    if config.grpc_endpoints:
        facts["grpc_client"] = (
            f"grpc.aio {grpc.__version__}, same machine, one channel (one HTTP/2 connection) per "
            f"process, unary closed loop, {event_loop_name()}"
        )
    if "stream" in config.grpc_endpoints:
        facts["grpc_stream"] = (
            f"one PredictStream call per round, frames back to back with at most "
            f"{config.resolved_stream_window()} unanswered (server read-ahead "
            f"{config.grpc_settings().stream_read_ahead}); latency = frame written -> its answer; "
            "req/s = frames/s"
        )
    if config.baseline:
        facts["baseline"] = (
            "seed 004's plain endpoint (python -m visionserve.bench.baseline): sync def FastAPI "
            "POST /predict, Pillow decode, resize to the input size, batch 1, ONNX Runtime with "
            f"{available_cpus()} intra-op threads (the usable cores) and spinning off, uvicorn, one process"
        )
    if config.overload:
        facts["overload"] = (
            f"{config.overload_concurrency} closed-loop senders, VISION_MAX_QUEUE_SIZE="
            f"{config.overload_queue_size}, on {', '.join(config.overload_endpoints)}; a refused "
            + (
                f"sender waits {config.overload_backoff_ms:g} ms before its next request"
                if config.overload_backoff_ms
                else "sender retries at once"
            )
        )
    return facts


def _launch(processes: Sequence[ServerProcess], stack: contextlib.ExitStack) -> None:
    """Start `processes`, as many at a time as there are cores: each loads its model (torch:
    compiles) in its own time budget, and their start-ups overlap where cores allow."""
    wave = max(1, available_cpus())
    for start in range(0, len(processes), wave):
        batch = processes[start : start + wave]
        for process in batch:
            stack.callback(process.stop)
            process.launch()
        for process in batch:
            process.wait_until_ready()


def _measure_backend(
    config: BenchConfig,
    backend: Backend,
    *,
    entry: ModelEntry,
    preprocessor: ImagePreprocessor,
    images: list[BenchImage],
    max_batch: int,
    with_baseline: bool,
    bar: ProgressBar,
) -> tuple[list[ResultRow], list[LayoutRow]]:
    """One backend: its served processes and in-process runtimes, all up at once, measured in
    turns. Whatever is not being measured is idle: the runtimes' threads do not spin (ONNX
    Runtime's spinning is off unless configured on, for all alike)."""
    settings = config.model_settings(backend)
    variants = [settings]
    if backend == "torch" and settings.torch_compile and config.torch_eager:
        variants.append(settings.model_copy(update={"torch_compile": False}))
    label = runtime_label(settings)
    env = {**model_env(settings), **config.server_env}
    datas = [image.data for image in images]

    with contextlib.ExitStack() as stack:
        groups = served_groups(config, backend, env)
        processes: list[ServerProcess] = [p for group in groups for p in group.processes]
        baseline = None
        if with_baseline:
            baseline = baseline_process(config, model_name=settings.model_name, threads=available_cpus())
            processes.append(baseline)
        if processes:
            modules = sorted({f"python -m {p.module}" for p in processes})
            bar.note(
                f"{label}: starting {len(processes)} servers ({', '.join(modules)}), waiting until ready"
            )
        _launch(processes, stack)

        runtimes: dict[tuple[str, int], ModelRuntime] = {}

        def runtime(variant: ModelSettings) -> ModelRuntime:
            key = (runtime_label(variant), variant.resolved_threads())
            if key not in runtimes:
                slow = " (compiling: a minute or so)" if key[0] == "torch compiled" else ""
                bar.note(f"{key[0]}: loading and warming up in-process (threads={key[1]}){slow}")
                runtimes[key] = stack.enter_context(loaded_runtime(entry, variant))
            return runtimes[key]

        timers = {runtime_label(v): PipelineTimer(runtime(v), preprocessor, topk=5) for v in variants}
        layout_runtimes = {
            layout: runtime(settings.model_copy(update={"threads": layout.threads}))
            for layout in config.resolved_layouts()
        }

        runner = stack.enter_context(event_loop_runner())
        plans = build_plans(
            config,
            label=label,
            groups=groups,
            baseline=baseline,
            images=images,
            runner=runner,
            stack=stack,
            bar=bar,
        )

        bar.note(f"{label}: warming up every row ({config.warmup} requests each)")
        for timer in timers.values():
            use_threads(timer.runtime)
            timer.warm_up(datas, config.warmup)
        for layout, layout_runtime in layout_runtimes.items():
            if config.warmup:
                measure_layout(
                    layout_runtime,
                    preprocessor,
                    datas,
                    workers=layout.workers,
                    max_batch_size=max_batch,
                    count=config.warmup,
                )
        for plan in plans:
            runner.run(plan.measure(config.warmup, None))

        pipelines: dict[str, list[PipelineMeasurement]] = {name: [] for name in timers}
        limits: dict[Layout, list[LayoutMeasurement]] = {layout: [] for layout in layout_runtimes}
        round_duration = None if config.duration_s is None else config.duration_s / config.rounds
        layout_cap = config.limit_cap_s / config.rounds
        if round_duration is not None:
            layout_cap = min(layout_cap, round_duration)
        for number, requests in enumerate(split_requests(config.requests, config.rounds), start=1):
            bar.note(f"{label}: round {number}/{config.rounds}")
            for layout, layout_runtime in layout_runtimes.items():
                bar.start(f"{label} in-process limit {layout.label} ({layout.describe()})", requests)
                part = measure_layout(
                    layout_runtime,
                    preprocessor,
                    datas,
                    workers=layout.workers,
                    max_batch_size=max_batch,
                    count=requests,
                    duration_s=layout_cap,
                )
                limits[layout].append(part)
                mean = f"{part.mean_batch:.2f}" if part.mean_batch else "–"
                bar.finish(f"{part.images} images, {part.images_per_s:.1f} img/s, mean batch {mean}")
            for timer_label, timer in timers.items():
                bar.start(f"{timer_label} in-process stages (batch 1)", requests)
                use_threads(timer.runtime)
                pipeline = measure_pipeline(timer, datas, requests=requests, duration_s=round_duration)
                pipelines[timer_label].append(pipeline)
                bar.finish(_summary(pipeline.total, None))
            for plan in plans:
                own = requests if plan.rounds is None else plan.rounds[number - 1]
                _measure_round(plan, runner, own, round_duration, bar)

    rows = []
    for timer_label, parts in pipelines.items():
        merged = merge_pipeline(parts)
        rows.append(ResultRow(timer_label, IN_PROCESS, PIPELINE, 1, merged.total, stages_s=merged.stages_s))
    rows += [plan.result() for plan in plans]
    layout_rows = [
        LayoutRow(label, layout, LayoutMeasurement.merged(limits[layout]), max_batch)
        for layout in layout_runtimes
    ]
    return rows, layout_rows


def _scrape(plan: RowPlan, bar: ProgressBar) -> MetricsSnapshot | None:
    if plan.metrics_url is None:
        return None
    try:
        return scrape(plan.metrics_url)
    except (httpx2.HTTPError, ValueError) as exc:
        bar.note(f"cannot read {plan.metrics_url} ({exc}); {row_name(plan.template)} has no server figures")
        plan.metrics_url = None
        plan.figures = None
        return None


def _measure_round(
    plan: RowPlan, runner: asyncio.Runner, requests: int | None, duration_s: float | None, bar: ProgressBar
) -> None:
    """One round of one served row, with a scrape of its server's metrics on either side."""
    before = _scrape(plan, bar)
    bar.start(row_name(plan.template), requests)
    measurement = runner.run(plan.measure(requests, duration_s))
    after = _scrape(plan, bar) if before is not None else None
    figures = ServerFigures.between(before, after) if before is not None and after is not None else None
    plan.add(measurement, figures)
    bar.finish(_summary(measurement, figures))


def _summary(measurement: Measurement, figures: ServerFigures | None) -> str:
    summary = measurement.summary()
    text = f"{measurement.completed} ok, {measurement.failed} failed, {measurement.throughput_rps:.1f} req/s"
    if summary is not None:
        text += f", p50 {summary.p50_ms:.2f} ms, p99 {summary.p99_ms:.2f} ms"
    if figures is not None and figures.mean_batch is not None:
        text += f", mean batch {figures.mean_batch:.2f}"
    return text
