"""`ServedModel`: one model of the registry, with its runtime, task, batcher, lifecycle,
admission and inference pipeline. Protocol layers look it up in the `ModelRegistry` and call it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from importlib import resources

import numpy as np

from visionserve.batching import DynamicBatcher
from visionserve.errors import ConfigurationError, VisionError
from visionserve.metrics import Metrics
from visionserve.runtimes.base import ModelRuntime
from visionserve.serving.admission import Admission
from visionserve.serving.budget import ComputeBudget
from visionserve.serving.lifecycle import Lifecycle, ServiceState
from visionserve.serving.pipeline import InferencePipeline, InferenceResult
from visionserve.tasks.base import Task

logger = logging.getLogger(__name__)


def warmup_image() -> bytes:
    """A small real JPEG shipped with the package, decoded once during warm-up."""
    return resources.files("visionserve.data").joinpath("example.jpg").read_bytes()


class ServedModel:
    """Serves one model: its lifecycle (`start`, `stop`, readiness), admission (`check_admission`)
    and pipeline (`predict`, `infer_images`, `infer_tensor`). Coroutines run on one event loop.

    The runtime is driven by one worker thread per runtime instance, each computing one batch at a
    time within the process's compute budget; decode and preprocess run in the registry's shared
    pool, so that they overlap with inference.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        task: Task[object, object],
        *,
        preprocess_pool: Executor,
        metrics: Metrics,
        budget: ComputeBudget | None = None,
        max_batch_size: int | None = None,
        max_queue_delay_us: int | None = None,
        max_queue_size: int | None = None,
    ):
        self.runtime = runtime
        self.task = task
        self.entry = runtime.model
        self.name = self.entry.name
        self.metrics = metrics
        self.lifecycle = Lifecycle(self.name)
        config = self.entry.config
        batch = max_batch_size or config.max_batch_size
        if batch > config.max_batch_size:
            raise ConfigurationError(
                f"VISION_MAX_BATCH_SIZE={batch} is above the max_batch_size {config.max_batch_size} "
                f"that model {self.name!r} was exported for; lower it, or re-export with "
                f"--max-batch-size {batch}"
            )
        delay_us = config.max_queue_delay_us if max_queue_delay_us is None else max_queue_delay_us
        lanes = runtime.lanes
        # NOTE: a thread per session of every lane: the batcher's sessions, not the executor,
        # bound what computes at once, so that nothing ever waits in the executor's queue
        self.runtime_threads = ThreadPoolExecutor(
            sum(lane.sessions for lane in lanes), thread_name_prefix=f"runtime-{self.name}"
        )
        self.batcher = DynamicBatcher(
            self._run,
            executor=self.runtime_threads,
            max_batch_size=batch,
            max_queue_delay_s=delay_us / 1e6,
            max_queue_size=max_queue_size or config.max_queue_size,
            instances=runtime.instances,
            metrics=metrics,
            model=self.name,
            budget=budget,
            units=runtime.threads,
            lanes=lanes,
        )
        self.admission = Admission(self.lifecycle, self.batcher)
        self.batcher.incoming = lambda: self.admission.preparing
        self.pipeline = InferencePipeline(
            runtime,
            task,
            self.batcher,
            lifecycle=self.lifecycle,
            admission=self.admission,
            preprocess_pool=preprocess_pool,
            runtime_threads=self.runtime_threads,
            metrics=metrics,
        )
        self._preprocess_pool = preprocess_pool

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.pipeline.run_batch(batch)

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def state(self) -> ServiceState:
        """Where this model is in its life."""
        return self.lifecycle.state

    @property
    def ready(self) -> bool:
        """Loaded and warmed, until shutdown begins."""
        return self.lifecycle.ready

    async def start(self) -> None:
        """Load and warm up the runtime in its worker thread; raise if that fails."""
        self.lifecycle.loading()
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.runtime_threads, self.runtime.load)
            await loop.run_in_executor(self.runtime_threads, self.runtime.warmup)
            # the first decode pays one-off costs too (Pillow plugins, pool threads): ~70 ms
            with contextlib.suppress(VisionError):  # e.g. a pixel limit below the image's size
                await loop.run_in_executor(self._preprocess_pool, self.task.preprocess, warmup_image())
            self.batcher.start()
        except BaseException as exc:
            self.lifecycle.failed(exc)
            raise
        if not self.lifecycle.loaded():  # shutdown began while loading
            return
        logger.info(
            "model %s (%s) ready on %s/%s in %.1f s: %s",
            self.name,
            self.task.name,
            self.runtime.backend,
            self.runtime.device,
            time.perf_counter() - started,
            self.layout_line(),
        )

    def layout_line(self) -> str:
        """What runs and why, in words, for the start-up log."""
        runtime = self.runtime
        if self.batcher.adaptive:
            what = (
                f"layout {runtime.layout} (sessions x intra-op threads; a batch takes the wide "
                "session when nothing else computes, waits or is being decoded, else a narrow one)"
            )
        else:
            what = (
                f"layout {runtime.layout}: {runtime.instances} instance(s) x {runtime.threads} "
                "intra-op thread(s)"
            )
        reason = runtime.layout_reason
        return f"{what}; {reason}" if reason else what

    async def stop(self) -> None:
        """Stop taking requests, let queued work finish, release the runtime."""
        if self.lifecycle.state is ServiceState.STOPPED:
            return
        self.lifecycle.refuse_new_requests()
        await self.batcher.stop()  # computes what is queued
        await asyncio.to_thread(self.runtime_threads.shutdown, wait=True, cancel_futures=False)
        self.runtime.close()
        self.lifecycle.stopped()

    # --- admission and inference ------------------------------------------------------------------

    def check_ready(self) -> None:
        """Raise NOT_READY unless this model takes requests."""
        self.lifecycle.check_ready()

    def check_admission(self) -> None:
        """Raise what a request would meet before any work (not ready, no room in the queue); a
        front door calls it before reading the request's body."""
        self.admission.check()

    def parameters(self, raw: Mapping[str, object]) -> object:
        """The request's task parameters, checked (a 400 names what is wrong)."""
        return self.task.parameters(raw)

    async def predict(
        self,
        image: bytes | str,
        raw_params: Mapping[str, object] | None = None,
        *,
        field: str = "image",
        deadline: float | None = None,
    ) -> InferenceResult:
        """One encoded image -> its result: parameters checked, then readiness, then the pipeline."""
        params = self.parameters(raw_params or {})
        self.check_ready()
        return await self.pipeline.infer(image, params, field=field, deadline=deadline)

    async def infer_images(
        self,
        images: Sequence[bytes | str],
        params: object,
        *,
        field: str = "image",
        deadline: float | None = None,
    ) -> list[object]:
        """N encoded images -> N task results (checked `params`); see `InferencePipeline`."""
        self.check_ready()
        return await self.pipeline.infer_images(images, params, field=field, deadline=deadline)

    async def infer_tensor(
        self, batch: np.ndarray, params: object, *, deadline: float | None = None
    ) -> list[object]:
        """N preprocessed inputs -> N task results (checked `params`); see `InferencePipeline`."""
        self.check_ready()
        return await self.pipeline.infer_tensor(batch, params, deadline=deadline)

    def describe(self) -> dict[str, object]:
        """Facts for GET /models."""
        config = self.entry.config
        return self.task.describe() | {
            "name": config.name,
            "version": config.version,
            "max_batch_size": self.batcher.max_batch_size,
            "max_queue_delay_us": round(self.batcher.max_queue_delay_s * 1e6),
            "max_queue_size": self.batcher.max_queue_size,
            "runtime": self.runtime.backend,
            "compiled": self.runtime.describe().get("compiled"),
            "device": self.runtime.device,
            "instances": self.runtime.instances,
            "threads": self.runtime.threads,
            "layout": self.runtime.layout,
            "layout_reason": self.runtime.layout_reason or None,
            "sessions": [
                {"kind": lane.kind, "count": lane.sessions, "threads": lane.threads}
                for lane in self.runtime.lanes
            ],
            "ready": self.ready,
            "state": self.state.value,
        }
