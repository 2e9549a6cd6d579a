"""`InferencePipeline`: one model's path from encoded image to typed result.

bytes (or base64 text) -> decode + task.preprocess (thread pool) -> the model's batcher ->
runtime.predict_batch (a runtime thread, within the compute budget) -> task.postprocess. When
nothing is queued or being decoded and the cores are free, a lone request is decoded, computed
and postprocessed on the runtime's thread in one hand-off (the idle fast path).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from visionserve.batching import DynamicBatcher, drop_reason
from visionserve.errors import ErrorCode, VisionError
from visionserve.metrics import Metrics
from visionserve.payloads import decode_base64
from visionserve.runtimes.base import ModelRuntime
from visionserve.serving.admission import Admission
from visionserve.serving.lifecycle import Lifecycle, ServiceState
from visionserve.tasks.base import Prepared, Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceResult:
    """One image's answer (the task's typed result), with where the time went."""

    model: str
    task: str
    output: object
    """`Classification`, `Detections`, ...: what the model's task returns."""
    preprocess_ms: float
    inference_ms: float
    total_ms: float


class InferencePipeline:
    """Decode, batch, compute and postprocess for one model. Coroutines run on one event loop."""

    def __init__(
        self,
        runtime: ModelRuntime,
        task: Task[object, object],
        batcher: DynamicBatcher,
        *,
        lifecycle: Lifecycle,
        admission: Admission,
        preprocess_pool: Executor,
        runtime_threads: ThreadPoolExecutor,
        metrics: Metrics,
    ):
        self.runtime = runtime
        self.task = task
        self.batcher = batcher
        self.lifecycle = lifecycle
        self.admission = admission
        self.preprocess_pool = preprocess_pool
        self.runtime_threads = runtime_threads
        self.metrics = metrics
        self.name = runtime.model.name

    async def infer(
        self, image: bytes | str, params: object, *, field: str = "image", deadline: float | None = None
    ) -> InferenceResult:
        """One encoded image (bytes, or base64 text decoded off the loop; errors name `field`) ->
        its result. `deadline` (time.monotonic()) drops the request if it is still queued then.
        The caller has checked `params` with the task and readiness."""
        started = time.perf_counter()
        if self.admission.idle:
            # NOTE: nothing queued or being preprocessed, an instance and the cores free: decode,
            # infer and postprocess in one hand-off to its thread. A second hand-off (pool ->
            # runtime thread) cost ~2 ms at concurrency 1 here (p50 18.5 vs 20.6-21.1 ms served).
            output, preprocess_s, compute_s = await self.batcher.run_exclusive(
                self._whole, self._prepare, image, field, params
            )
            preprocessed = started + preprocess_s
            inferred = preprocessed + compute_s
        else:
            self.admission.check_room()
            loop = asyncio.get_running_loop()
            with self.admission.preparing_items():
                try:
                    prepared = await loop.run_in_executor(self.preprocess_pool, self._prepare, image, field)
                except asyncio.CancelledError:
                    self._count_dropped(deadline)
                    raise
            preprocessed = time.perf_counter()
            row = await self.batcher.submit(prepared.tensor, deadline=deadline)
            inferred = time.perf_counter()
            output = await self._postprocess(row, prepared.meta, params)
        return InferenceResult(
            model=self.name,
            task=self.task.name,
            output=output,
            preprocess_ms=(preprocessed - started) * 1e3,
            inference_ms=(inferred - preprocessed) * 1e3,
            total_ms=(time.perf_counter() - started) * 1e3,
        )

    async def infer_images(
        self,
        images: Sequence[bytes | str],
        params: object,
        *,
        field: str = "image",
        deadline: float | None = None,
    ) -> list[object]:
        """N encoded images -> N results, for protocols that answer a batch at once (the Open
        Inference Protocol). All N are decoded before any is queued; a bad one fails the call with
        an error naming `field[i]`. Each image is its own item in the batcher."""
        self.admission.check_count(len(images))
        if len(images) == 1 and self.admission.idle:
            output, _, _ = await self.batcher.run_exclusive(
                self._whole, self._prepare_item, images[0], f"{field}[0]", params
            )
            return [output]
        count = len(images)
        self.admission.check_room(count)
        loop = asyncio.get_running_loop()
        with self.admission.preparing_items(count):
            try:
                outcomes = await asyncio.gather(
                    *(
                        loop.run_in_executor(self.preprocess_pool, self._prepare_item, image, f"{field}[{i}]")
                        for i, image in enumerate(images)
                    ),
                    return_exceptions=True,
                )
            except asyncio.CancelledError:
                self._count_dropped(deadline, count)
                raise
        prepared: list[Prepared] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            prepared.append(outcome)
        rows = await self._submit_rows([p.tensor for p in prepared], deadline)
        return [await self._postprocess(row, p.meta, params) for row, p in zip(rows, prepared, strict=True)]

    async def infer_tensor(
        self, batch: np.ndarray, params: object, *, deadline: float | None = None
    ) -> list[object]:
        """N preprocessed inputs, float32 (N, 3, H, W) as the model's input spec says (the caller
        has checked the shape) -> N results. When the batcher is idle the whole tensor runs at once
        on a free instance; else each row is its own item, batched with every other request."""
        self.admission.check_count(len(batch))
        rows: Sequence[np.ndarray]
        if self.admission.idle:
            rows = list(await self.batcher.run_exclusive(self.run_batch, batch))
        else:
            self.admission.check_room(len(batch))
            rows = await self._submit_rows(list(batch), deadline)
        meta = self.task.tensor_meta()
        return [await self._postprocess(row, meta, params) for row in rows]

    # --- steps ------------------------------------------------------------------------------------

    def _prepare(self, image: bytes | str, field: str) -> Prepared:
        data = decode_base64(image, field=field) if isinstance(image, str) else image
        return self.task.preprocess(data)

    def _prepare_item(self, image: bytes | str, field: str) -> Prepared:
        """`_prepare`, with the item's name (`image[2]`) in front of a decode error's message."""
        try:
            return self._prepare(image, field)
        except VisionError as exc:
            named = with_item_name(field, exc)
            if named is exc:
                raise
            raise named from None

    def _whole(
        self, prepare: Callable[[bytes | str, str], Prepared], image: bytes | str, field: str, params: object
    ) -> tuple[object, float, float]:
        """The fast path, on a runtime thread: `prepare`, compute, postprocess."""
        started = time.perf_counter()
        prepared = prepare(image, field)
        prepared_at = time.perf_counter()
        row = self.run_batch(prepared.tensor[np.newaxis])[0]
        computed_at = time.perf_counter()
        output = self.task.postprocess(row, prepared.meta, params)
        return output, prepared_at - started, computed_at - prepared_at

    async def _postprocess(self, row: np.ndarray, meta: object, params: object) -> object:
        if self.task.postprocess_off_loop:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.preprocess_pool, self.task.postprocess, row, meta, params)
        return self.task.postprocess(row, meta, params)

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        """The runtime on one batch (a runtime thread), its output checked against the task's."""
        started = time.perf_counter()
        try:
            outputs = self.runtime.predict_batch(batch)
        except Exception as exc:
            logger.exception(
                "runtime %s of model %s failed on a batch of %d", self.runtime.backend, self.name, len(batch)
            )
            raise VisionError(ErrorCode.INTERNAL, "inference failed; the server log has the details") from exc
        try:
            self.task.check_output(outputs, len(batch))
        except ValueError as exc:
            logger.error("runtime of model %s returned a malformed result: %s", self.name, exc)
            raise VisionError(ErrorCode.INTERNAL, "inference returned a malformed result") from None
        if self.lifecycle.state is not ServiceState.LOADING:  # warm-up batches are not traffic
            self.metrics.compute_time.labels(self.name).observe(time.perf_counter() - started)
            self.metrics.batch_size.labels(self.name).observe(len(batch))
        return outputs

    async def _submit_rows(self, rows: list[np.ndarray], deadline: float | None) -> list[np.ndarray]:
        return await submit_each(self.batcher, rows, deadline)

    def _count_dropped(self, deadline: float | None, count: int = 1) -> None:
        """Count `count` items whose caller was cancelled while they were decoded, before they
        reached the batcher's queue (which counts those cancelled there)."""
        self.metrics.rejected.labels(drop_reason(deadline, time.monotonic()), self.name).inc(count)


async def submit_each(
    batcher: DynamicBatcher, rows: Sequence[np.ndarray], deadline: float | None
) -> list[np.ndarray]:
    """Queue each row as its own item of `batcher`; the outputs in the same order. If one fails
    (queue full, deadline), the others are cancelled: the batcher drops them uncomputed."""
    tasks = [asyncio.ensure_future(batcher.submit(row, deadline=deadline)) for row in rows]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def with_item_name(field: str, exc: VisionError) -> VisionError:
    """`exc` with the item's name (`image[2]`) in front of its message (`exc` itself when its
    message names the item already)."""
    if field in exc.message:
        return exc
    return VisionError(exc.code, f"{field}: {exc.message}", retry_after_s=exc.retry_after_s)
