"""The measuring loop of one runtime: its served rows (processes the harness starts, or a
deployment it did not) and, where a local model is at hand, its in-process stages and limit, all
up at once and measured in turns (`rounds`), with the server's metrics scraped around each row.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import httpx2

from bench.config import BenchConfig
from bench.http_load import event_loop_runner
from bench.images import BenchImage
from bench.inprocess import (
    STAGES,
    PipelineMeasurement,
    PipelineTimer,
    loaded_runtime,
    measure_pipeline,
    merge_pipeline,
)
from bench.layouts import Layout, LayoutMeasurement, measure_layout, use_threads
from bench.plans import RowPlan, ServedGroup, build_plans, split_requests
from bench.progress import ProgressBar
from bench.rows import IN_PROCESS, LayoutRow, ResultRow
from bench.server_metrics import MetricsSnapshot, ServerFigures, scrape
from bench.servers import ServerProcess
from bench.stats import Measurement
from bench.tables import row_name
from visionserve.cpu import available_cpus
from visionserve.errors import VisionError
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import ModelEntry
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import ModelSettings

PIPELINE = " + ".join(STAGES)


def runtime_label(settings: ModelSettings) -> str:
    """`onnx`, `torch compiled` or `torch eager`."""
    if settings.backend == "torch":
        return "torch compiled" if settings.torch_compile else "torch eager"
    return settings.backend


@dataclass(frozen=True)
class InProcess:
    """What the in-process rows of a runtime need: the local model entry and its preprocessing,
    the runtime's settings (torch: eager as well as compiled, unless `torch_eager` is off), the
    layouts of the in-process limit (empty: none) and its maximum batch size."""

    entry: ModelEntry
    preprocessor: ImagePreprocessor
    settings: ModelSettings
    layouts: tuple[Layout, ...]
    max_batch: int
    torch_eager: bool = True

    def variants(self) -> list[ModelSettings]:
        """The runtime settings whose stages are timed: the settings, and torch eager beside
        torch compiled."""
        found = [self.settings]
        if self.settings.backend == "torch" and self.settings.torch_compile and self.torch_eager:
            found.append(self.settings.model_copy(update={"torch_compile": False}))
        return found


def check_images(images: list[BenchImage], preprocessor: ImagePreprocessor) -> None:
    """ValueError naming the first image the model's preprocessing refuses."""
    for image in images:
        try:
            preprocessor(image.data)
        except VisionError as exc:
            raise ValueError(f"{image.name} cannot be benchmarked: {exc.message}") from exc


def launch(processes: Sequence[ServerProcess], stack: contextlib.ExitStack) -> None:
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


def measure_runtime(
    config: BenchConfig,
    *,
    label: str,
    groups: list[ServedGroup],
    baseline: ServerProcess | None,
    in_process: InProcess | None,
    images: list[BenchImage],
    bar: ProgressBar,
    model_name: str | None = None,
) -> tuple[list[ResultRow], list[LayoutRow]]:
    """One runtime: the processes of `groups` and the `baseline` started (a deployment's ends are
    only addresses), the in-process runtimes loaded, then every row measured in turns. Served rows
    are labelled `label`, and so are the layouts they are held against. Whatever is not being
    measured is idle: the runtimes' threads do not spin (ONNX Runtime's spinning is off unless
    configured on, for all alike)."""
    datas = [image.data for image in images]

    with contextlib.ExitStack() as stack:
        processes: list[ServerProcess] = [p for group in groups for p in group.processes]
        if baseline is not None:
            processes.append(baseline)
        if processes:
            modules = sorted({f"python -m {p.module}" for p in processes})
            bar.note(
                f"{label}: starting {len(processes)} servers ({', '.join(modules)}), waiting until ready"
            )
        launch(processes, stack)

        runtimes: dict[tuple[str, int], ModelRuntime] = {}

        def runtime(variant: ModelSettings) -> ModelRuntime:
            assert in_process is not None
            key = (runtime_label(variant), variant.resolved_threads())
            if key not in runtimes:
                slow = " (compiling: a minute or so)" if key[0] == "torch compiled" else ""
                bar.note(f"{key[0]}: loading and warming up in-process (threads={key[1]}){slow}")
                runtimes[key] = stack.enter_context(loaded_runtime(in_process.entry, variant))
            return runtimes[key]

        timers: dict[str, PipelineTimer] = {}
        layout_runtimes: dict[Layout, ModelRuntime] = {}
        if in_process is not None:
            timers = {
                runtime_label(v): PipelineTimer(runtime(v), in_process.preprocessor, topk=5)
                for v in in_process.variants()
            }
            layout_runtimes = {
                layout: runtime(in_process.settings.model_copy(update={"threads": layout.threads}))
                for layout in in_process.layouts
            }

        def measure_limit(layout: Layout, count: int | None, duration_s: float | None) -> LayoutMeasurement:
            assert in_process is not None  # there are layouts only with it
            return measure_layout(
                layout_runtimes[layout],
                in_process.preprocessor,
                datas,
                workers=layout.workers,
                max_batch_size=in_process.max_batch,
                count=count,
                duration_s=duration_s,
            )

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
            model_name=model_name,
        )

        bar.note(f"{label}: warming up every row ({config.warmup} requests each)")
        for timer in timers.values():
            use_threads(timer.runtime)
            timer.warm_up(datas, config.warmup)
        for layout in layout_runtimes:
            if config.warmup:
                measure_limit(layout, config.warmup, None)
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
            for layout in layout_runtimes:
                bar.start(f"{label} in-process limit {layout.label} ({layout.describe()})", requests)
                part = measure_limit(layout, requests, layout_cap)
                limits[layout].append(part)
                mean = f"{part.mean_batch:.2f}" if part.mean_batch else "–"
                bar.finish(f"{part.images} images, {part.images_per_s:.1f} img/s, mean batch {mean}")
            for timer_label, timer in timers.items():
                bar.start(f"{timer_label} in-process stages (batch 1)", requests)
                use_threads(timer.runtime)
                pipeline = measure_pipeline(timer, datas, requests=requests, duration_s=round_duration)
                pipelines[timer_label].append(pipeline)
                bar.finish(summary(pipeline.total, None))
            for plan in plans:
                own = requests if plan.rounds is None else plan.rounds[number - 1]
                _measure_round(plan, runner, own, round_duration, bar)

    rows = []
    for timer_label, parts in pipelines.items():
        merged = merge_pipeline(parts)
        rows.append(ResultRow(timer_label, IN_PROCESS, PIPELINE, 1, merged.total, stages_s=merged.stages_s))
    rows += [plan.result() for plan in plans]
    layout_rows = []
    if in_process is not None:
        layout_rows = [
            LayoutRow(label, layout, LayoutMeasurement.merged(limits[layout]), in_process.max_batch)
            for layout in layout_runtimes
        ]
    return rows, layout_rows


def _scrape(plan: RowPlan, bar: ProgressBar) -> MetricsSnapshot | None:
    if plan.metrics_url is None:
        return None
    try:
        return scrape(plan.metrics_url, access=plan.access)
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
    bar.finish(summary(measurement, figures))


def summary(measurement: Measurement, figures: ServerFigures | None) -> str:
    """One row's round in a line: answers, req/s, p50 and p99, the server's mean batch."""
    text = f"{measurement.completed} ok, {measurement.failed} failed, {measurement.throughput_rps:.1f} req/s"
    latency = measurement.summary()
    if latency is not None:
        text += f", p50 {latency.p50_ms:.2f} ms, p99 {latency.p99_ms:.2f} ms"
    if figures is not None and figures.mean_batch is not None:
        text += f", mean batch {figures.mean_batch:.2f}"
    return text
