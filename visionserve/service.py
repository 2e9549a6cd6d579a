"""`InferenceService`: the one inference path that every protocol calls.

bytes -> decode + preprocess (thread pool) -> runtime.predict_batch (runtime thread) ->
postprocess -> `InferenceResult`. Protocol layers only translate to and from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

import numpy as np

from visionserve.batching import DynamicBatcher, drop_reason
from visionserve.cpu import available_cpus
from visionserve.errors import ConfigurationError, ErrorCode, VisionError
from visionserve.metrics import Metrics
from visionserve.payloads import decode_base64
from visionserve.postprocessing import ClassScore, postprocess
from visionserve.preprocessing import ImagePreprocessor
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import ServerSettings

logger = logging.getLogger(__name__)


def _warmup_image() -> bytes:
    """A small real JPEG shipped with the package, decoded once during warm-up."""
    return resources.files("visionserve.data").joinpath("example.jpg").read_bytes()


class ServiceState(enum.StrEnum):
    """Where the service is in its life."""

    CREATED = "created"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class InferenceResult:
    """One image's answer, with where the time went."""

    model: str
    predictions: list[ClassScore]
    preprocess_ms: float
    inference_ms: float
    total_ms: float


class InferenceService:
    """Serves one model: validates requests, runs the pipeline off the event loop, reports state.

    Coroutines must be awaited on one event loop. The runtime is driven by one worker thread per
    runtime instance, each computing one batch at a time. While other requests are in flight,
    decode and preprocess run in their own pool, so that they overlap with inference; a request
    that finds nothing queued or being preprocessed and an instance free is decoded on that
    instance's thread itself, saving a thread hand-off.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        max_image_pixels: int,
        preprocess_workers: int,
        default_topk: int = 5,
        max_batch_size: int | None = None,
        max_queue_delay_us: int | None = None,
        max_queue_size: int | None = None,
        metrics: Metrics | None = None,
    ):
        self.runtime = runtime
        self.model = runtime.model
        self.preprocessor = ImagePreprocessor(self.model.config.input, max_image_pixels=max_image_pixels)
        self.default_topk = default_topk
        self.state = ServiceState.CREATED
        self.failure: str | None = None
        self.preprocess_workers = preprocess_workers
        self._preprocess_pool = ThreadPoolExecutor(preprocess_workers, thread_name_prefix="preprocess")
        self._runtime_thread = ThreadPoolExecutor(runtime.instances, thread_name_prefix="runtime")
        self._preparing = 0  # requests in the preprocessing pool (event loop only)
        self._admitting = False  # set when ready; cleared by refuse_new_requests
        self.metrics = metrics or Metrics()
        config = self.model.config
        batch = max_batch_size or config.max_batch_size
        if batch > config.max_batch_size:
            raise ConfigurationError(
                f"VISION_MAX_BATCH_SIZE={batch} is above the max_batch_size {config.max_batch_size} "
                f"that model {self.model.name!r} was exported for; lower it, or re-export with "
                f"--max-batch-size {batch}"
            )
        delay_us = config.max_queue_delay_us if max_queue_delay_us is None else max_queue_delay_us
        self.batcher = DynamicBatcher(
            self._run,
            executor=self._runtime_thread,
            max_batch_size=batch,
            max_queue_delay_s=delay_us / 1e6,
            max_queue_size=max_queue_size or config.max_queue_size,
            instances=runtime.instances,
            metrics=self.metrics,
        )

    @classmethod
    def from_settings(cls, runtime: ModelRuntime, settings: ServerSettings) -> InferenceService:
        """The service as every front door builds it: limits, pool and batching from `settings`."""
        return cls(
            runtime,
            max_image_pixels=settings.max_image_pixels,
            preprocess_workers=settings.resolved_preprocess_workers(),
            default_topk=settings.default_topk,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_queue_size=settings.max_queue_size,
        )

    @property
    def ready(self) -> bool:
        """True once the model is loaded and warmed, until shutdown begins."""
        return self.state is ServiceState.READY

    @property
    def admitting(self) -> bool:
        """True while inference requests are taken: when ready, and during a shutdown's drain
        delay (`begin_shutdown`) until `refuse_new_requests`."""
        return self._admitting

    def begin_shutdown(self) -> None:
        """Shutdown's first step: readiness turns not-ready (state STOPPING), so that load balancers
        and health checks send no more traffic here, while requests still arriving are served.

        NOTE: during the drain delay (VISION_SHUTDOWN_DELAY_S) a load balancer may still route
        requests here (Kubernetes removes a terminating pod's endpoints a few seconds late);
        refusing them would fail requests that this process can still answer.
        """
        if self.state in (ServiceState.CREATED, ServiceState.LOADING, ServiceState.READY):
            self.state = ServiceState.STOPPING

    def refuse_new_requests(self) -> None:
        """Shutdown's second step: new inference requests are refused (NOT_READY, "shutting
        down": 503 / UNAVAILABLE); those already admitted run to their answers."""
        self.begin_shutdown()
        self._admitting = False

    @property
    def num_classes(self) -> int:
        """Number of classes the model outputs."""
        return self.model.config.output.classes

    async def start(self) -> None:
        """Load and warm up the runtime in its worker thread; raise if that fails."""
        self.state = ServiceState.LOADING
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        self.metrics.watch_event_loop(loop)  # the loop every request of this service runs on
        try:
            await loop.run_in_executor(self._runtime_thread, self.runtime.load)
            await loop.run_in_executor(self._runtime_thread, self.runtime.warmup)
            # the first decode pays one-off costs too (Pillow plugins, pool threads): ~70 ms
            with contextlib.suppress(VisionError):  # e.g. a pixel limit below the image's size
                await loop.run_in_executor(self._preprocess_pool, self.preprocessor, _warmup_image())
            self.batcher.start()
        except BaseException as exc:
            self.state = ServiceState.FAILED
            self.failure = str(exc) or type(exc).__name__
            raise
        if self.state is not ServiceState.LOADING:  # shutdown began while loading
            return
        self.state = ServiceState.READY
        self._admitting = True
        logger.info(
            "model %s ready on %s/%s in %.1f s: %d instance(s) x %d intra-op thread(s), %d "
            "preprocessing thread(s), %d usable core(s)",
            self.model.name,
            self.runtime.backend,
            self.runtime.device,
            time.perf_counter() - started,
            self.runtime.instances,
            self.runtime.threads,
            self.preprocess_workers,
            available_cpus(),
        )

    async def stop(self) -> None:
        """Stop taking requests, let in-flight work finish, release the runtime."""
        if self.state is ServiceState.STOPPED:
            return
        self.state = ServiceState.STOPPING
        self._admitting = False
        await self.batcher.stop()  # computes what is queued
        await asyncio.to_thread(self._shutdown_pools)
        self.runtime.close()
        self.state = ServiceState.STOPPED

    def _shutdown_pools(self) -> None:
        self._preprocess_pool.shutdown(wait=True, cancel_futures=False)
        self._runtime_thread.shutdown(wait=True, cancel_futures=False)

    def check_admission(self) -> None:
        """Raise now what `predict` would raise before any work: not ready, or no room in the
        queue. A front door calls it before reading a request's body, so that an overloaded
        server refuses for the price of the headers."""
        self.check_ready()
        if not (self._preparing == 0 and self.batcher.idle):
            self.batcher.check_capacity(incoming=self._preparing)

    def check_ready(self) -> None:
        """Raise NOT_READY unless the service takes requests."""
        if self._admitting:
            return
        if self.state in (ServiceState.STOPPING, ServiceState.STOPPED):
            raise VisionError(
                ErrorCode.NOT_READY,
                "the server is shutting down; retry on another instance",
                retry_after_s=1,
            )
        if self.state is ServiceState.FAILED:
            raise VisionError(ErrorCode.NOT_READY, "the model failed to load; the server log says why")
        retry = 5 if self.state in (ServiceState.CREATED, ServiceState.LOADING) else None
        raise VisionError(
            ErrorCode.NOT_READY,
            f"the model {self.model.name!r} is not ready ({self.state.value}); retry shortly",
            retry_after_s=retry,
        )

    def resolve_topk(self, topk: int | None) -> int:
        """The top-k to use: the request's if valid, else the default; an error names the bounds."""
        k = self.default_topk if topk is None else topk
        if not 1 <= k <= self.num_classes:
            raise VisionError(
                ErrorCode.INVALID_ARGUMENT,
                f"topk must be between 1 and {self.num_classes} (the classes of model "
                f"{self.model.name!r}); got {k}",
            )
        return k

    def check_model(self, name: str | None) -> None:
        """Raise MODEL_NOT_FOUND if a request names a model this service does not serve."""
        if name and name != self.model.name:
            raise VisionError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model {name!r} is not served here; this server serves {self.model.name!r}",
            )

    async def predict(
        self,
        image: bytes | str,
        *,
        topk: int | None = None,
        model: str | None = None,
        field: str = "image",
        deadline: float | None = None,
    ) -> InferenceResult:
        """Classify one encoded image: bytes, or base64 text (decoded off the event loop; errors
        name `field`). `deadline` (time.monotonic()) drops the request if it is still queued then.
        Raises `VisionError` for anything the client must fix."""
        started = time.perf_counter()
        self.check_model(model)
        k = self.resolve_topk(topk)
        self.check_ready()
        loop = asyncio.get_running_loop()
        if self._preparing == 0 and self.batcher.idle:
            # NOTE: nothing queued or being preprocessed, an instance free: decode and infer in one
            # hand-off to its thread. A second hand-off (pool -> runtime thread) cost ~2 ms at
            # concurrency 1 here (p50 18.5 vs 20.6-21.1 ms served). Under load the path below
            # decodes in the pool, overlapping inference, and the batcher groups what queues up.
            scores, preprocess_s = await self.batcher.run_exclusive(self._preprocess_and_run, image, field)
            preprocessed = started + preprocess_s
        else:
            # NOTE: requests being preprocessed count against the queue's bound: one that could
            # not be queued is refused now, in microseconds, not after a decode in a backlogged pool.
            self.batcher.check_capacity(incoming=self._preparing)
            self._preparing += 1
            try:
                tensor = await loop.run_in_executor(self._preprocess_pool, self._preprocess, image, field)
            except asyncio.CancelledError:
                self._count_dropped(deadline)
                raise
            finally:
                self._preparing -= 1
            preprocessed = time.perf_counter()
            scores = (await self.batcher.submit(tensor, deadline=deadline))[np.newaxis]
        inferred = time.perf_counter()
        (predictions,) = postprocess(scores, k, self.model.labels, kind=self.model.config.output.kind)
        finished = time.perf_counter()
        return InferenceResult(
            model=self.model.name,
            predictions=predictions,
            preprocess_ms=(preprocessed - started) * 1e3,
            inference_ms=(inferred - preprocessed) * 1e3,
            total_ms=(finished - started) * 1e3,
        )

    async def scores_for_images(
        self, images: Sequence[bytes | str], *, field: str = "image", deadline: float | None = None
    ) -> np.ndarray:
        """The model's raw scores, float32 (N, classes), for N encoded images (bytes, or base64
        text), for protocols that return tensors (the Open Inference Protocol).

        The same path as `predict`: admission, decode + preprocess off the event loop, then each
        image is its own item in the batcher, batched with every other request. All N are decoded
        before any is queued; a bad one fails the call with an error naming `field[i]`.
        """
        self.check_ready()
        self._check_count(len(images))
        if len(images) == 1 and self._preparing == 0 and self.batcher.idle:
            # the idle fast path, as in `predict`: decode and infer in one hand-off
            return await self.batcher.run_exclusive(self._preprocess_item_and_run, images[0], f"{field}[0]")
        count = len(images)
        self._check_room(count)
        loop = asyncio.get_running_loop()
        self._preparing += count
        try:
            outcomes = await asyncio.gather(
                *(
                    loop.run_in_executor(self._preprocess_pool, self._preprocess_item, image, f"{field}[{i}]")
                    for i, image in enumerate(images)
                ),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            self._count_dropped(deadline, count)
            raise
        finally:
            self._preparing -= count
        tensors: list[np.ndarray] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            tensors.append(outcome)
        return await self._submit_rows(tensors, deadline)

    async def scores_for_tensor(self, batch: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        """The model's raw scores, float32 (N, classes), for N preprocessed images: float32
        (N, 3, H, W) as the model's input spec says (the caller has checked the shape).

        Each row is its own item in the batcher, batched with every other request; when the
        batcher is idle the whole tensor runs at once on a free instance.
        """
        self.check_ready()
        self._check_count(len(batch))
        if self._preparing == 0 and self.batcher.idle:
            return await self.batcher.run_exclusive(self._run, batch)
        self._check_room(len(batch))
        return await self._submit_rows(list(batch), deadline)

    def _count_dropped(self, deadline: float | None, count: int = 1) -> None:
        """Count `count` items whose caller was cancelled while they were decoded, before they
        reached the batcher's queue (which counts those cancelled there)."""
        self.metrics.rejected.labels(drop_reason(deadline, time.monotonic())).inc(count)

    def _check_count(self, count: int) -> None:
        """Refuse a request of more items than the queue can ever hold: it would only ever be
        answered "at capacity", however long the client retried."""
        limit = self.batcher.max_queue_size
        if count > limit:
            raise VisionError(
                ErrorCode.INVALID_ARGUMENT,
                f"a request of {count} images can never be queued: the queue holds {limit} (setting "
                "VISION_MAX_QUEUE_SIZE); send fewer at once",
            )

    def _check_room(self, count: int) -> None:
        """Raise OVERLOADED unless the queue has room for `count` more items now."""
        self.batcher.check_capacity(incoming=self._preparing + count - 1)

    async def _submit_rows(self, rows: list[np.ndarray], deadline: float | None) -> np.ndarray:
        """Queue each row as its own item; the scores in the same order. If one fails (queue full,
        deadline), the others are cancelled: the batcher drops them uncomputed."""
        tasks = [asyncio.ensure_future(self.batcher.submit(row, deadline=deadline)) for row in rows]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return np.stack(results)

    def _preprocess_item(self, image: bytes | str, field: str) -> np.ndarray:
        """`_preprocess`, with the item's name (`image[2]`) in front of a decode error's message."""
        try:
            return self._preprocess(image, field)
        except VisionError as exc:
            if field in exc.message:
                raise
            raise VisionError(exc.code, f"{field}: {exc.message}", retry_after_s=exc.retry_after_s) from None

    def _preprocess_item_and_run(self, image: bytes | str, field: str) -> np.ndarray:
        return self._run(self._preprocess_item(image, field)[np.newaxis])

    def _preprocess(self, image: bytes | str, field: str) -> np.ndarray:
        data = decode_base64(image, field=field) if isinstance(image, str) else image
        return self.preprocessor(data)

    def _preprocess_and_run(self, image: bytes | str, field: str) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        tensor = self._preprocess(image, field)
        preprocess_s = time.perf_counter() - started
        return self._run(tensor[np.newaxis]), preprocess_s

    def _run(self, batch: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        try:
            scores = self.runtime.predict_batch(batch)
        except Exception as exc:
            logger.exception("runtime %s failed on a batch of %d", self.runtime.backend, len(batch))
            raise VisionError(ErrorCode.INTERNAL, "inference failed; the server log has the details") from exc
        if scores.ndim != 2 or scores.shape[0] != batch.shape[0] or scores.shape[1] != self.num_classes:
            logger.error("runtime returned shape %s for a batch of %d", scores.shape, len(batch))
            raise VisionError(ErrorCode.INTERNAL, "inference returned a malformed result")
        if self.state is not ServiceState.LOADING:  # warm-up batches are not traffic
            self.metrics.compute_time.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(batch))
        return scores

    def describe(self) -> dict[str, object]:
        """Facts for GET /models."""
        config = self.model.config
        return {
            "name": config.name,
            "version": config.version,
            "task": config.task,
            "input_size": config.input.size,
            "labels_count": len(self.model.labels),
            "max_batch_size": self.batcher.max_batch_size,
            "max_queue_delay_us": round(self.batcher.max_queue_delay_s * 1e6),
            "max_queue_size": self.batcher.max_queue_size,
            "runtime": self.runtime.backend,
            "device": self.runtime.device,
            "instances": self.runtime.instances,
            "threads": self.runtime.threads,
            "preprocess_workers": self.preprocess_workers,
            "ready": self.ready,
        }
