"""The in-process rows of a pipeline model (face_expression): the registry the servers build
(`registry_from_settings`, the same settings), started in this process on an event loop of its
own and driven without any protocol.

- The in-process limit: `FaceExpressionModel.predict` called by N concurrent coroutines in a
  closed loop (as the served rows' clients call), over the model's images, for each N of the
  levels; the limit is the best N's img/s. It is the served pipeline (decode and letterbox on the
  shared pool, the detector's batcher, the crops, the classifier's batcher, the compute budget,
  the same threads) minus HTTP / gRPC and their event loop, which is what a served row adds. The
  detector's thread layouts do not apply: the registry fixes its threads as the server does.
- In-process rows: the same calls at each of the run's concurrency levels, on the model's images
  and on the group image alone (its faces/s).
- The classifier stage per face (`face_stage`), on the one-face and the group image.

Each round measures every level and image once, as the other in-process rows take their turns.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.closed_loop import SendOnce, cycling, run_closed_loop
from bench.face_stage import CropAndClassify, StageCost, StageSamples, batch_counts
from bench.http_load import event_loop_runner
from bench.images import BenchImage
from bench.layouts import Layout, LayoutMeasurement
from bench.progress import ProgressBar
from bench.rows import IN_PROCESS, LayoutRow, ResultRow
from bench.stats import Measurement
from bench.subjects import BenchModel, InProcessPipeline
from visionserve.serving.faces import FaceExpressionModel
from visionserve.serving.registry import ModelRegistry, registry_from_settings

PIPELINE_TARGET = "FaceExpressionModel.predict (the registry, no protocol)"
"""What a pipeline's in-process rows call."""
LIMIT_LEVELS = (1, 4, 16, 32)
"""Concurrent requests of a pipeline's in-process limit (the run's concurrency levels too)."""


def pipeline_levels(levels: tuple[int, ...], concurrency: tuple[int, ...]) -> tuple[int, ...]:
    """The levels of a pipeline's in-process limit: `levels` and the run's concurrency levels
    (none when the limit is off: `--layouts none`)."""
    return tuple(sorted({*levels, *concurrency})) if levels else ()


@dataclass
class _Subject:
    """One pipeline's registry and what has been measured of it."""

    model: BenchModel
    spec: InProcessPipeline
    registry: ModelRegistry
    pipeline: FaceExpressionModel
    direct: dict[str, CropAndClassify]
    limits: dict[int, list[LayoutMeasurement]] = field(default_factory=dict)
    results: dict[tuple[str, int], list[Measurement]] = field(default_factory=dict)
    stages: dict[str, StageSamples] = field(default_factory=dict)

    @property
    def levels(self) -> tuple[int, ...]:
        """Every level measured on the model's images: the limit's and the rows'."""
        return tuple(sorted({*self.spec.levels, *self.spec.face_levels}))

    def send(self, images: list[BenchImage]) -> SendOnce:
        """One `predict` of each image in turn (default parameters, as the served requests)."""
        return cycling([self._predict(image.data) for image in images])

    def _predict(self, data: bytes) -> Callable[[], Awaitable[None]]:
        async def send() -> None:
            await self.pipeline.predict(data)

        return send

    def batches(self, stage: str) -> tuple[float, float]:
        """(calls, images) of `stage`'s `predict_batch` so far."""
        return batch_counts(self.registry.metrics.registry, stage)


class PipelineRows:
    """The registries of the run's pipelines (one per pipeline, started on `stack`'s own event
    loop, stopped with it) and their rounds."""

    def __init__(self, models: list[BenchModel], stack: contextlib.ExitStack, bar: ProgressBar, label: str):
        self.label = label
        self.bar = bar
        self.subjects: list[_Subject] = []
        pipelines = [model for model in models if model.pipeline is not None]
        if not pipelines:
            return
        self.runner = stack.enter_context(event_loop_runner())
        for model in pipelines:
            spec = model.pipeline
            assert spec is not None
            stages = f"{spec.entry.config.stages.detector} -> {spec.entry.config.stages.classifier}"
            bar.note(f"{label} {model.name}: starting its registry in-process ({stages})")
            registry = registry_from_settings(spec.settings, spec.server)
            stack.callback(self.runner.run, registry.stop())
            self.runner.run(registry.start())
            pipeline = registry.get(model.name)
            if not isinstance(pipeline, FaceExpressionModel):
                raise ValueError(f"{model.name} is not a face_expression pipeline")
            direct = {
                image.name: CropAndClassify(pipeline, image) for image in (spec.one_face, spec.many_faces)
            }
            subject = _Subject(model, spec, registry, pipeline, direct)
            for image in (spec.one_face, spec.many_faces):
                found = self.runner.run(pipeline.predict(image.data)).output
                subject.stages[image.name] = StageSamples(image.name, len(getattr(found, "faces", [])))
            self.subjects.append(subject)

    def warm_up(self, requests: int) -> None:
        """`requests` unmeasured calls of every kind, at the highest level."""
        if not requests:
            return
        for subject in self.subjects:
            top = max(subject.levels, default=1)
            self.runner.run(
                run_closed_loop(subject.send(subject.model.images), concurrency=top, requests=requests)
            )
            self.runner.run(
                run_closed_loop(subject.send([subject.spec.many_faces]), concurrency=top, requests=requests)
            )
            for direct in subject.direct.values():
                for _ in range(min(requests, 8)):
                    direct.run_once()

    def measure_round(self, requests: int | None, duration_s: float | None, cap_s: float) -> None:
        """One round of every pipeline: each level on its images (limit and rows), the group image
        at each of the run's levels, the classifier stage on each image."""
        bar = self.bar
        for subject in self.subjects:
            name, spec = subject.model.name, subject.spec
            for level in subject.levels:
                bound = cap_s if level in spec.levels else duration_s
                bar.start(f"{self.label} {name} in-process c={level} ({PIPELINE_TARGET})", requests)
                before = subject.batches(spec.detector)
                part = self.runner.run(
                    run_closed_loop(
                        subject.send(subject.model.images),
                        concurrency=level,
                        requests=requests,
                        duration_s=bound,
                        on_answer=bar.advance,
                    )
                )
                after = subject.batches(spec.detector)
                subject.results.setdefault(("", level), []).append(part)
                if level in spec.levels:
                    layout = LayoutMeasurement(part.completed, part.wall_s, round(after[0] - before[0]))
                    subject.limits.setdefault(level, []).append(layout)
                bar.finish(_summary(part, after, before))
            group = spec.many_faces
            for level in spec.face_levels:
                bar.start(f"{self.label} {name} in-process c={level}, {group.name} only", requests)
                part = self.runner.run(
                    run_closed_loop(
                        subject.send([group]),
                        concurrency=level,
                        requests=requests,
                        duration_s=duration_s,
                        on_answer=bar.advance,
                    )
                )
                subject.results.setdefault((group.name, level), []).append(part)
                faces = subject.stages[group.name].faces
                bar.finish(f"{part.throughput_rps:.1f} img/s, {part.throughput_rps * faces:.1f} faces/s")
            for image in (spec.one_face, group):
                self._stage_round(subject, image, requests, duration_s)

    def _stage_round(
        self, subject: _Subject, image: BenchImage, requests: int | None, duration_s: float | None
    ) -> None:
        samples = subject.stages[image.name]
        classifier = subject.spec.entry.config.stages.classifier
        detector = subject.pipeline.detector
        bar = self.bar
        faces = f"{samples.faces} face{'' if samples.faces == 1 else 's'}"
        bar.start(f"{self.label} {subject.model.name} classifier stage, {image.name} ({faces})", requests)
        limit = math.inf if requests is None else requests
        deadline = math.inf if duration_s is None else time.perf_counter() + duration_s
        pipeline_s: list[float] = []
        detector_s: list[float] = []
        pipeline_batches = [0.0, 0.0]

        async def timed(call: Awaitable[object]) -> float:
            started = time.perf_counter()
            await call
            return time.perf_counter() - started

        async def pairs() -> None:
            while len(pipeline_s) < limit and time.perf_counter() < deadline:
                # NOTE: the pair's order alternates, so that a machine slowing down or speeding up
                # within a pair weighs on both sides alike
                detector_first = len(pipeline_s) % 2 == 1
                if detector_first:
                    detector_s.append(await timed(detector.predict(image.data)))
                before = subject.batches(classifier)
                pipeline_s.append(await timed(subject.pipeline.predict(image.data)))
                after = subject.batches(classifier)
                if not detector_first:
                    detector_s.append(await timed(detector.predict(image.data)))
                pipeline_batches[0] += after[0] - before[0]
                pipeline_batches[1] += after[1] - before[1]
                bar.advance(True)

        self.runner.run(pairs())
        direct = subject.direct[image.name]
        passes = [direct.run_once() for _ in range(len(pipeline_s))] if direct.faces else []
        samples.pipeline_s += pipeline_s
        samples.detector_s += detector_s
        samples.direct_s += passes
        samples.classifier_batches += pipeline_batches[0]
        samples.classifier_items += pipeline_batches[1]
        cost = StageCost.of(self.label, subject.model.name, samples)
        registry_ms, direct_ms = cost.registry_ms, cost.direct_ms
        bar.finish(
            f"{len(pipeline_s)} pairs; stage so far: {_ms(registry_ms)} ms through the registry, "
            f"{_ms(direct_ms)} ms direct"
        )

    def rows(self) -> tuple[list[ResultRow], list[LayoutRow], list[StageCost]]:
        """The in-process rows (the model's images first, then the group image's), the limit's
        layouts and the classifier stage's costs, rounds merged."""
        results: list[ResultRow] = []
        layouts: list[LayoutRow] = []
        stages: list[StageCost] = []
        for subject in self.subjects:
            name, spec = subject.model.name, subject.spec
            threads = spec.settings.resolved_threads()
            workers = spec.server.resolved_preprocess_workers()
            for image in ("", spec.many_faces.name):
                for level in spec.face_levels:
                    parts = subject.results.get((image, level), [])
                    results.append(
                        ResultRow(
                            self.label,
                            IN_PROCESS,
                            PIPELINE_TARGET,
                            level,
                            Measurement.merged(parts),
                            model=name,
                            image=image,
                        )
                    )
            for level, computed in subject.limits.items():
                layout = Layout(workers, threads, concurrent=level)
                merged = LayoutMeasurement.merged(computed)
                layouts.append(LayoutRow(self.label, layout, merged, spec.max_batch, model=name))
            stages += [StageCost.of(self.label, name, samples) for samples in subject.stages.values()]
        return results, layouts, stages


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _summary(part: Measurement, after: tuple[float, float], before: tuple[float, float]) -> str:
    text = f"{part.completed} ok, {part.failed} failed, {part.throughput_rps:.1f} img/s"
    latency = part.summary()
    if latency is not None:
        text += f", p50 {latency.p50_ms:.2f} ms, p99 {latency.p99_ms:.2f} ms"
    calls = after[0] - before[0]
    if calls:
        text += f", detector mean batch {(after[1] - before[1]) / calls:.2f}"
    return text
