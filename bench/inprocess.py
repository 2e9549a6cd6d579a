"""The pipeline without a server: decode + preprocess + predict_batch (batch 1) + postprocess,
timed per stage with `time.perf_counter`, in the calling thread, one image after another.

This is the floor a served request's latency is compared with: the same runtime class, settings,
task steps (`steps`: centre crop and top-k, or letterbox and NMS) and images as the served
process, with no protocol, queueing or thread hand-offs. (The throughput a machine can reach, over
several threads and batches, is `layouts`.) Where the task's decoding cannot be timed apart, the
`decode` stage reads 0 and `preprocess` holds both.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from bench.stats import Measurement
from bench.steps import TaskSteps
from visionserve.repository import ModelEntry
from visionserve.runtimes import create_runtime
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import ModelSettings

STAGES = ("decode", "preprocess", "predict_batch", "postprocess")

Images = bytes | Sequence[bytes]
"""One encoded image, or several to take in turn."""


def _as_list(images: Images) -> list[bytes]:
    found = [images] if isinstance(images, bytes) else list(images)
    if not found:
        raise ValueError("no images to measure with")
    return found


@dataclass(frozen=True)
class PipelineMeasurement:
    """The whole pipeline's measurement, and each stage's latencies (seconds) of the same runs."""

    total: Measurement
    stages_s: dict[str, tuple[float, ...]]


@contextlib.contextmanager
def loaded_runtime(entry: ModelEntry, settings: ModelSettings) -> Iterator[ModelRuntime]:
    """The runtime `settings` names, built exactly as the server builds it, loaded and warmed up
    (for torch with compile on, this is where inductor compiles); closed on exit."""
    runtime = create_runtime(entry, settings)
    runtime.load()
    try:
        runtime.warmup()
        yield runtime
    finally:
        runtime.close()


class PipelineTimer:
    """Runs the pipeline on one image and returns each stage's duration (seconds)."""

    def __init__(self, runtime: ModelRuntime, steps: TaskSteps):
        self.runtime = runtime
        self.steps = steps

    def warm_up(self, images: Images, passes: int) -> None:
        """Run the pipeline `passes` times over `images` in turn, unmeasured."""
        for image in itertools.islice(itertools.cycle(_as_list(images)), passes):
            self.run_once(image)

    def run_once(self, image: bytes) -> tuple[float, float, float, float]:
        """decode, preprocess, predict_batch, postprocess durations of one pass, in seconds."""
        steps = self.steps
        t0 = time.perf_counter()
        if steps.split is not None:
            decode, shape = steps.split
            decoded = decode(image)
            t1 = time.perf_counter()
            prepared = shape(decoded)
        else:
            t1 = t0
            prepared = steps.prepare(image)
        t2 = time.perf_counter()
        outputs = self.runtime.predict_batch(prepared.tensor[np.newaxis])
        t3 = time.perf_counter()
        steps.finish(outputs[0], prepared.meta)
        t4 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3


def merge_pipeline(parts: list[PipelineMeasurement]) -> PipelineMeasurement:
    """Parts of one pipeline measurement (rounds), as one."""
    stages = {name: tuple(v for part in parts for v in part.stages_s.get(name, ())) for name in STAGES}
    return PipelineMeasurement(total=Measurement.merged([part.total for part in parts]), stages_s=stages)


def measure_pipeline(
    timer: PipelineTimer,
    images: Images,
    *,
    requests: int | None = None,
    duration_s: float | None = None,
    warmup: int = 0,
) -> PipelineMeasurement:
    """Run `warmup` unmeasured passes, then measure passes over `images` in turn until `requests`
    and/or `duration_s` run out. A pass's total is the sum of its stages (nothing else runs
    between them)."""
    if requests is None and duration_s is None:
        raise ValueError("bound the run: give a number of requests, a duration, or both")
    sequence = _as_list(images)
    timer.warm_up(sequence, warmup)
    limit = math.inf if requests is None else requests
    stages: list[tuple[float, float, float, float]] = []
    started = time.perf_counter()
    deadline = math.inf if duration_s is None else started + duration_s
    while len(stages) < limit and time.perf_counter() < deadline:
        stages.append(timer.run_once(sequence[len(stages) % len(sequence)]))
    wall_s = time.perf_counter() - started
    totals = tuple(sum(durations) for durations in stages)
    by_stage = {name: tuple(durations[i] for durations in stages) for i, name in enumerate(STAGES)}
    return PipelineMeasurement(total=Measurement(latencies_s=totals, wall_s=wall_s), stages_s=by_stage)
