"""`DynamicBatcher`: groups single-image requests into batches for one runtime.

asyncio inside the server process: one future per request, one background task that forms a batch
when `max_batch_size` requests are waiting or `max_queue_delay_s` has passed since the first
request of the batch arrived (that deadline is fixed once, from `time.monotonic()`), runs the batch
in one of the runtime's worker threads (one per runtime instance; while every instance is busy,
requests keep queueing and the next batch takes them all) and splits the rows back to the callers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from visionserve.errors import ErrorCode, VisionError
from visionserve.metrics import Metrics
from visionserve.serving.budget import ComputeBudget

logger = logging.getLogger(__name__)

RunBatch = Callable[[np.ndarray], np.ndarray]
_DEADLINE_SLACK_S = 0.005
"""A caller cancelled this close to its deadline was cancelled by it: gRPC core ends a call at its
deadline on its own clock, which may run a little ahead of the deadline computed here."""
T = TypeVar("T")
REJECTION_REASONS = ("queue_full", "deadline", "cancelled")
"""The `reason` label values of `visionserve_rejected`."""


def drop_reason(deadline: float | None, now: float) -> str:
    """The `visionserve_rejected` reason of a request cancelled at `now` before it was computed:
    `deadline` if its deadline (time.monotonic()) had passed, else `cancelled` (its client went)."""
    expired = deadline is not None and now >= deadline - _DEADLINE_SLACK_S
    return "deadline" if expired else "cancelled"


@dataclass(eq=False)  # NOTE: compared by identity (`deque.remove`); == on its arrays is ambiguous
class _Pending:
    tensor: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued_at: float
    deadline: float | None = None  # time.monotonic() after which the answer is useless


class DynamicBatcher:
    """Batches `submit()`ted items for `run_batch`, at most `instances` batches at a time on
    `executor`.

    Inputs: one preprocessed item per `submit` (e.g. float32 (3, H, W)); `run_batch` gets them
    stacked on a new first axis and returns one output row per item. Outputs: each caller gets its
    own row. Thread-safety: every method must be called on one event loop; `run_batch` runs in
    `executor` (give it `instances` threads), never on the loop, and must be safe to call from
    `instances` threads at once.

    A full queue rejects at once (OVERLOADED, a 503/UNAVAILABLE with Retry-After); a cancelled
    caller or one whose deadline has passed is dropped before its item is computed; a failing
    `run_batch` fails only the callers of that batch. With a `budget`, each computation also takes
    `units` of the process's compute budget (shared with the other models' batchers) while it
    runs; what queues while it waits for them joins its batch.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        executor: Executor,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        max_queue_size: int = 128,
        instances: int = 1,
        metrics: Metrics | None = None,
        model: str = "",
        budget: ComputeBudget | None = None,
        units: int = 1,
    ):
        if max_batch_size < 1 or max_queue_size < 1 or instances < 1 or max_queue_delay_s < 0:
            raise ValueError(
                "max_batch_size, max_queue_size and instances must be >= 1, max_queue_delay_s >= 0"
            )
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.metrics = metrics
        self.model = model
        """The model's name, the `model` label of this batcher's metrics."""
        self.budget = budget
        self.units = units
        """Budget units one computation takes (its runtime instance's intra-op threads)."""
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        # NOTE: one slot per runtime instance, held while it computes (a batch, or a
        # `run_exclusive` job), so that items stay in this queue, where a cancelled or expired one
        # can still be dropped, rather than waiting in the executor's queue, where it cannot.
        self._slots = asyncio.Semaphore(instances)
        self._busy = 0
        self._closed = False
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        """How many batches of each size ran (for tests and metrics)."""
        if metrics is not None:  # NOTE: every series of this model from the start, at zero
            metrics.queue_depth.labels(model).set(0)
            for reason in REJECTION_REASONS:
                metrics.rejected.labels(reason, model)
            for histogram in (
                metrics.queue_time,
                metrics.batch_size,
                metrics.compute_time,
                metrics.budget_wait,
            ):
                histogram.labels(model)

    @property
    def queue_depth(self) -> int:
        """Items waiting, not yet in a batch."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing waiting, a runtime instance free, and its compute budget free now."""
        if self._queue or self._busy >= self.instances:
            return False
        budget = self.budget
        return budget is None or (not budget.waiting and budget.free >= budget.clamp(self.units))

    async def run_exclusive(self, function: Callable[..., T], *args: object) -> T:
        """Run `function(*args)` on a free runtime instance's thread (the idle fast path: one
        request decoded and computed in a single hand-off)."""
        await self._slots.acquire()
        try:
            await self._take_budget()
        except BaseException:
            self._slots.release()
            raise
        self._busy += 1
        job = asyncio.get_running_loop().run_in_executor(self.executor, function, *args)
        job.add_done_callback(self._job_done)
        # NOTE: shielded, so that a caller cancelled mid-computation (its client went away) does not
        # free the instance while its thread still computes: the next request would otherwise
        # wait in the executor's queue, outside the bound of max_queue_size, where no cancelled or
        # expired request can be dropped.
        return await asyncio.shield(job)

    def _job_done(self, job: asyncio.Future[Any]) -> None:
        """A `run_exclusive` job has ended (its caller may have gone): free its instance."""
        self._busy -= 1
        self._give_back()
        if not job.cancelled():
            job.exception()  # NOTE: retrieved, else asyncio logs it as lost when its caller has gone

    def start(self) -> None:
        """Start the background task (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="dynamic-batcher")

    def check_capacity(self, incoming: int = 0) -> None:
        """Raise OVERLOADED (counted as a `queue_full` rejection) if the queue, with `incoming`
        items already on their way to it, has no room for one more.

        Called before a request's image is decoded, so that a request that cannot be queued is
        refused at once, without spending a core on it first.
        """
        if len(self._queue) + incoming >= self.max_queue_size:
            self._count_rejected("queue_full")
            raise VisionError(
                ErrorCode.OVERLOADED,
                f"the server is at capacity ({self.max_queue_size} requests waiting; setting "
                "VISION_MAX_QUEUE_SIZE); retry shortly",
                retry_after_s=1,
            )

    async def submit(self, tensor: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        """Queue one item and wait for its output row."""
        if self._closed:
            raise VisionError(ErrorCode.NOT_READY, "the server is shutting down", retry_after_s=None)
        self.check_capacity()
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        item = _Pending(tensor, future, time.monotonic(), deadline)
        self._queue.append(item)
        self._set_depth()
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            self._drop_cancelled(item)
            raise

    def _drop_cancelled(self, item: _Pending) -> None:
        """The caller of a queued item was cancelled (its client went away, or gRPC cancelled the
        call at its deadline): take the item out of the queue, uncomputed, and count it, as a
        `deadline` rejection if its deadline had passed, else as `cancelled`. An item already in a
        batch is being computed: nothing to drop, nothing counted."""
        try:
            self._queue.remove(item)
        except ValueError:
            return
        self._set_depth()
        self._count_rejected(self._drop_reason(item, time.monotonic()))

    @staticmethod
    def _drop_reason(item: _Pending, now: float) -> str:
        return drop_reason(item.deadline, now)

    async def stop(self) -> None:
        """Refuse new items, compute the ones already queued, then end the background task."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    def _take_live(self, now: float) -> list[_Pending]:
        """Pop up to max_batch_size items, dropping cancelled and expired ones."""
        batch: list[_Pending] = []
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if item.future.done():  # cancelled by its caller, which has not yet dropped it
                self._count_rejected(self._drop_reason(item, now))
                continue
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(
                    VisionError(
                        ErrorCode.DEADLINE_EXCEEDED, "the deadline passed while the request was queued"
                    )
                )
                self._count_rejected("deadline")
                continue
            batch.append(item)
            if self.metrics is not None:
                self.metrics.queue_time.labels(self.model).observe(now - item.enqueued_at)
        self._set_depth()
        return batch

    def _count_rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason, self.model).inc()

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.model).set(len(self._queue))

    def _live_count(self) -> int:
        return sum(1 for item in self._queue if not item.future.done())

    async def _loop(self) -> None:
        try:
            await self._serve()
        finally:  # ended (stop) or broken: nobody may wait forever
            for task in list(self._batches):
                task.cancel()
            if self._batches:
                await asyncio.gather(*self._batches, return_exceptions=True)
            while self._queue:
                item = self._queue.popleft()
                if not item.future.done():
                    item.future.set_exception(VisionError(ErrorCode.NOT_READY, "the server is shutting down"))

    async def _serve(self) -> None:
        while True:
            while not self._queue:
                if self._closed:
                    if self._batches:  # stop() returns once every batch has been answered
                        await asyncio.gather(*self._batches, return_exceptions=True)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            # NOTE: the batch's deadline is fixed once, from the first waiting item's arrival on
            # the monotonic clock (a wall-clock timeout fired early in MLServer#1936).
            batch_deadline = self._queue[0].enqueued_at + self.max_queue_delay_s
            while self._live_count() < self.max_batch_size and not self._closed:
                remaining = batch_deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            await self._slots.acquire()  # what queues while every instance is busy joins this batch
            try:
                await self._take_budget()  # and what queues while other models compute
            except BaseException:
                self._slots.release()
                raise
            batch = self._take_live(time.monotonic())
            if not batch:
                self._give_back()
                continue
            self._busy += 1
            task = asyncio.get_running_loop().create_task(self._compute(batch), name="batch")
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _stack_and_run(self, tensors: list[np.ndarray]) -> np.ndarray:
        return self.run_batch(np.stack(tensors))

    async def _compute(self, batch: list[_Pending]) -> None:
        """Run one batch on a runtime instance, answer its callers, free the instance."""
        try:
            # NOTE: stacked on the runtime's thread, not the event loop: a batch of 8 224x224
            # images is a 4.8 MB copy, which showed up in the event loop's profile at 16 clients.
            outputs = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._stack_and_run, [b.tensor for b in batch]
            )
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        except BaseException:  # the batcher itself is cancelled: its callers must not hang
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(VisionError(ErrorCode.NOT_READY, "the server is shutting down"))
            raise
        else:
            self.batch_sizes[len(batch)] += 1
            for item, row in zip(batch, outputs, strict=True):
                if not item.future.done():
                    item.future.set_result(row)
        finally:
            self._busy -= 1
            self._give_back()

    async def _take_budget(self) -> None:
        """Take this model's units of the shared compute budget (after an instance slot)."""
        if self.budget is not None:
            await self.budget.acquire(self.units, self.model)

    def _give_back(self) -> None:
        """Free an instance slot and the budget units taken with it."""
        if self.budget is not None:
            self.budget.release(self.units)
        self._slots.release()
