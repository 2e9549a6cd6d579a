"""The measuring loop of one runtime: its served rows (processes the harness starts, or a
deployment it did not) and, for each model this machine has, its in-process stages and limit,
all up at once and measured in turns (`rounds`), with the server's metrics scraped around each
row.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import httpx2

from bench.config import BenchConfig
from bench.face_stage import StageCost
from bench.groups import ServedGroup
from bench.http_load import event_loop_runner
from bench.inprocess import (
    STAGES,
    PipelineMeasurement,
    PipelineTimer,
    loaded_runtime,
    measure_pipeline,
    merge_pipeline,
)
from bench.layouts import Layout, LayoutMeasurement, measure_layout, use_threads
from bench.pipeline_rows import PipelineRows
from bench.plans import RowPlan, build_plans, split_requests
from bench.progress import ProgressBar
from bench.rows import IN_PROCESS, LayoutRow, ResultRow
from bench.senders import Clients
from bench.server_metrics import MetricsSnapshot, ServerFigures, scrape
from bench.servers import ServerProcess
from bench.stats import Measurement
from bench.subjects import BenchModel, InProcess, runtime_label
from bench.tables import row_name
from visionserve.cpu import available_cpus
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import ModelSettings

PIPELINE = " + ".join(STAGES)
LAYOUT_WARMUP = 8
"""Unmeasured images of each layout before its first round (at most `warmup`)."""


def launch(processes: Sequence[ServerProcess], stack: contextlib.ExitStack) -> None:
    """Start `processes`, as many at a time as there are cores: each loads its models (torch:
    compiles) in its own time budget, and their start-ups overlap where cores allow."""
    wave = max(1, available_cpus())
    for start in range(0, len(processes), wave):
        batch = processes[start : start + wave]
        for process in batch:
            stack.callback(process.stop)
            process.launch()
        for process in batch:
            process.wait_until_ready()


class InProcessRows:
    """The in-process runtimes of the run's models (loaded once per model, label and thread
    count, closed by `stack`), their stage timers and their layouts' measurements."""

    def __init__(self, models: list[BenchModel], stack: contextlib.ExitStack, bar: ProgressBar):
        self.stack = stack
        self.bar = bar
        self._runtimes: dict[tuple[str, str, int], ModelRuntime] = {}
        self.timers: dict[tuple[str, str], PipelineTimer] = {}
        self.layouts: dict[tuple[str, Layout], ModelRuntime] = {}
        self.owners: dict[str, InProcess] = {}
        self.images = {model.name: model.datas for model in models}
        for model in models:
            local = model.in_process
            if local is None:
                continue
            self.owners[model.name] = local
            for variant in local.variants():
                timer = PipelineTimer(self._runtime(local, variant), local.steps)
                self.timers[(model.name, runtime_label(variant))] = timer
            for layout in local.layouts:
                settings = local.settings.model_copy(update={"threads": layout.threads})
                self.layouts[(model.name, layout)] = self._runtime(local, settings)
        self.pipelines: dict[tuple[str, str], list[PipelineMeasurement]] = {key: [] for key in self.timers}
        self.limits: dict[tuple[str, Layout], list[LayoutMeasurement]] = {key: [] for key in self.layouts}

    def _runtime(self, local: InProcess, variant: ModelSettings) -> ModelRuntime:
        key = (local.entry.name, runtime_label(variant), variant.resolved_threads())
        if key not in self._runtimes:
            slow = " (compiling: a minute or so)" if key[1] == "torch compiled" else ""
            self.bar.note(f"{key[1]} {key[0]}: loading and warming up in-process (threads={key[2]}){slow}")
            self._runtimes[key] = self.stack.enter_context(loaded_runtime(local.entry, variant))
        return self._runtimes[key]

    def measure_limit(
        self, model: str, layout: Layout, count: int | None, duration_s: float | None
    ) -> LayoutMeasurement:
        """One round of `model`'s layout."""
        local = self.owners[model]
        return measure_layout(
            self.layouts[(model, layout)],
            local.steps,
            self.images[model],
            workers=layout.workers,
            max_batch_size=local.max_batch,
            count=count,
            duration_s=duration_s,
        )

    def rows(self, label: str) -> tuple[list[ResultRow], list[LayoutRow]]:
        """The stage rows and layout rows measured (rounds merged)."""
        results = []
        for (model, timer_label), parts in self.pipelines.items():
            merged = merge_pipeline(parts)
            results.append(
                ResultRow(
                    timer_label, IN_PROCESS, PIPELINE, 1, merged.total, stages_s=merged.stages_s, model=model
                )
            )
        layouts = [
            LayoutRow(
                label, layout, LayoutMeasurement.merged(parts), self.owners[model].max_batch, model=model
            )
            for (model, layout), parts in self.limits.items()
        ]
        return results, layouts


def measure_runtime(
    config: BenchConfig,
    *,
    label: str,
    groups: list[ServedGroup],
    models: list[BenchModel],
    bar: ProgressBar,
    baseline: ServerProcess | None = None,
    baseline_model: str = "",
) -> tuple[list[ResultRow], list[LayoutRow], list[StageCost]]:
    """One runtime: the processes of `groups` and the `baseline` started (a deployment's ends are
    only addresses), the models' in-process runtimes (and pipelines' registries) loaded, then every
    row measured in turns; the rows, the in-process limits' layouts, the pipelines' stage costs.
    Served rows are labelled `label`, and so are the layouts they are held against. Whatever is
    not being measured is idle: the runtimes' threads do not spin (ONNX Runtime's spinning is off
    unless configured on, for all alike)."""
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
        local = InProcessRows(models, stack, bar)
        pipelines = PipelineRows(models, stack, bar, label)
        runner = stack.enter_context(event_loop_runner())
        plans = build_plans(
            config,
            label=label,
            groups=groups,
            models=models,
            clients=Clients(config, runner, stack),
            bar=bar,
            baseline=baseline,
            baseline_model=baseline_model,
        )

        bar.note(f"{label}: warming up every row ({config.warmup} requests each)")
        for (model, _), timer in local.timers.items():
            use_threads(timer.runtime)
            timer.warm_up(local.images[model], config.warmup)
        for model, layout in local.layouts:
            if config.warmup:
                local.measure_limit(model, layout, min(config.warmup, LAYOUT_WARMUP), None)
        pipelines.warm_up(config.warmup)
        for plan in plans:
            runner.run(plan.measure(config.warmup, None))

        round_duration = None if config.duration_s is None else config.duration_s / config.rounds
        layout_cap = config.limit_cap_s / config.rounds
        if round_duration is not None:
            layout_cap = min(layout_cap, round_duration)
        for number, requests in enumerate(split_requests(config.requests, config.rounds), start=1):
            bar.note(f"{label}: round {number}/{config.rounds}")
            for model, layout in local.layouts:
                bar.start(f"{label} {model} in-process limit {layout.label} ({layout.describe()})", requests)
                part = local.measure_limit(model, layout, requests, layout_cap)
                local.limits[(model, layout)].append(part)
                mean = f"{part.mean_batch:.2f}" if part.mean_batch else "–"
                bar.finish(f"{part.images} images, {part.images_per_s:.1f} img/s, mean batch {mean}")
            for (model, timer_label), timer in local.timers.items():
                bar.start(f"{timer_label} {model} in-process stages (batch 1)", requests)
                use_threads(timer.runtime)
                pipeline = measure_pipeline(
                    timer, local.images[model], requests=requests, duration_s=round_duration
                )
                local.pipelines[(model, timer_label)].append(pipeline)
                bar.finish(summary(pipeline.total, None))
            pipelines.measure_round(requests, round_duration, layout_cap)
            for plan in plans:
                own = requests if plan.rounds is None else plan.rounds[number - 1]
                _measure_round(plan, runner, own, round_duration, bar)

    rows, layout_rows = local.rows(label)
    pipeline_rows, pipeline_layouts, stages = pipelines.rows()
    return rows + pipeline_rows + [plan.result() for plan in plans], layout_rows + pipeline_layouts, stages


def _scrape(plan: RowPlan, bar: ProgressBar) -> MetricsSnapshot | None:
    if plan.metrics_url is None:
        return None
    try:
        return scrape(
            plan.metrics_url, access=plan.access, model=plan.metrics_model or plan.template.model or None
        )
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
