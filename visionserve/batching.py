"""`DynamicBatcher`: groups single-image requests into batches for one runtime.

asyncio inside the server process: one future per request, one background task that forms a batch
when `max_batch_size` requests are waiting or `max_queue_delay_s` has passed since the first
request of the batch arrived (that deadline is fixed once, from `time.monotonic()`), runs the batch
in one of the runtime's worker threads (one per runtime instance; while every instance is busy,
requests keep queueing and the next batch takes them all) and splits the rows back to the callers.

A runtime with an adaptive layout has two kinds of sessions (`cpu.Lane`): a wide one of every
core and narrow ones of fewer threads. The batcher picks one per batch as it dispatches it, on
the event loop, from what it knows for free: a lone computation (nothing else of this model
computing, queued beyond this batch or being decoded, and the compute budget idle, and no
computation of it dispatched beside another within twice a computation's time) takes the wide
session; anything else takes a narrow one. A kind that is not free now is never waited for while
the other is free; when neither is, the batch waits for a narrow session (the only kind that can
free up while others compute) and, if it then finds itself alone, widens.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from visionserve.cpu import FIXED, NARROW, WIDE, Lane, call_on_lane
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


class _Sessions:
    """The free sessions of one lane, and who waits for one (first come, first served). Event
    loop only."""

    def __init__(self, lane: Lane):
        self.lane = lane
        self.free = lane.sessions
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def available(self) -> bool:
        """A session free now and nobody waiting for one."""
        return self.free > 0 and not self._waiters

    def take_now(self) -> None:
        """Take a session (the caller checked `available`)."""
        self.free -= 1

    async def take(self) -> None:
        """Wait for a free session, in turn, and take it."""
        if self.available:
            self.free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.put()  # granted just as it was cancelled: give it back
            else:
                self._waiters.remove(future)
            raise

    def put(self) -> None:
        """Give a session back; the first waiter gets it."""
        self.free += 1
        while self._waiters and self.free > 0:
            future = self._waiters.popleft()
            if future.done():
                continue
            self.free -= 1
            future.set_result(None)


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

    `lanes` (default: one of `instances` sessions of `units` threads) are the runtime's kinds of
    sessions; with a wide and a narrow one the batcher picks per batch (module docstring) and runs
    `run_batch` under `cpu.on_lane(kind)`; a computation takes its lane's threads in units.
    `incoming` says how many requests are on their way to the queue (being decoded), one of the
    signs that a batch is not alone.
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
        lanes: Sequence[Lane] | None = None,
    ):
        if max_batch_size < 1 or max_queue_size < 1 or instances < 1 or max_queue_delay_s < 0:
            raise ValueError(
                "max_batch_size, max_queue_size and instances must be >= 1, max_queue_delay_s >= 0"
            )
        lanes = tuple(lanes or (Lane(FIXED, instances, units),))
        kinds = [lane.kind for lane in lanes]
        if len(lanes) > 1 and sorted(kinds) != sorted([WIDE, NARROW]):
            raise ValueError(f"lanes must be one (any kind) or a wide and a narrow one, got {kinds}")
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.lanes = lanes
        self.instances = sum(lane.sessions for lane in lanes)
        """Sessions of every lane (a fixed layout: `instances`)."""
        self.metrics = metrics
        self.model = model
        """The model's name, the `model` label of this batcher's metrics."""
        self.budget = budget
        self.units = lanes[0].threads if len(lanes) == 1 else max(lane.threads for lane in lanes)
        """Budget units the widest computation takes (its session's intra-op threads)."""
        self.incoming: Callable[[], int] = lambda: 0
        """Requests on their way to the queue now (the model's admission counts those decoded)."""
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        # NOTE: the sessions of each lane, one held while it computes (a batch, or a
        # `run_exclusive` job), so that items stay in this queue, where a cancelled or expired one
        # can still be dropped, rather than waiting in the executor's queue, where it cannot.
        self._sessions = {lane.kind: _Sessions(lane) for lane in lanes}
        self._wide = self._sessions.get(WIDE) if len(lanes) > 1 else None
        self._wait_for = self._sessions[NARROW] if len(lanes) > 1 else self._sessions[lanes[0].kind]
        """The lane a batch waits for when none is free now (under load: the narrow one)."""
        self._busy = 0
        self._compute_s = 0.0
        """How long the latest computation of this model took (s)."""
        self._narrow_until = 0.0
        """Until then (time.monotonic()), no batch is alone: one was dispatched while another
        computed (`_contended`)."""
        self._closed = False
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        """How many batches of each size ran (for tests and metrics)."""
        self.lane_runs: collections.Counter[str] = collections.Counter()
        """How many computations (batches and `run_exclusive` jobs) each lane ran."""
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
        """Nothing waiting, and a session free with its compute budget free now."""
        return not self._queue and any(self._fits(sessions) for sessions in self._sessions.values())

    @property
    def contended(self) -> bool:
        """A computation was dispatched beside another of this model lately (`_contended`): no
        batch counts as alone until it has been quiet for twice a computation."""
        return time.monotonic() < self._narrow_until

    @property
    def adaptive(self) -> bool:
        """A wide and a narrow lane, picked per batch."""
        return self._wide is not None

    async def run_exclusive(self, function: Callable[..., T], *args: object) -> T:
        """Run `function(*args)` on a free session's thread (the idle fast path: one request
        decoded and computed in a single hand-off)."""
        lane = await self._take_lane()
        self._busy += 1
        started = time.monotonic()
        job = asyncio.get_running_loop().run_in_executor(
            self.executor, call_on_lane, lane.kind, function, *args
        )
        job.add_done_callback(lambda done: self._job_done(done, lane, started))
        # NOTE: shielded, so that a caller cancelled mid-computation (its client went away) does not
        # free the instance while its thread still computes: the next request would otherwise
        # wait in the executor's queue, outside the bound of max_queue_size, where no cancelled or
        # expired request can be dropped.
        return await asyncio.shield(job)

    def _job_done(self, job: asyncio.Future[Any], lane: Lane, started: float) -> None:
        """A `run_exclusive` job has ended (its caller may have gone): free its session."""
        self._compute_s = time.monotonic() - started
        self._busy -= 1
        self._give_back(lane)
        if not job.cancelled():
            job.exception()  # NOTE: retrieved, else asyncio logs it as lost when its caller has gone

    # --- which session: decided on the event loop, per computation ------------------------------

    def _units(self, lane: Lane) -> int:
        return lane.threads if self.budget is None else self.budget.clamp(lane.threads)

    def _fits(self, sessions: _Sessions) -> bool:
        """A session of this lane and its units are free now, and nobody waits for either."""
        if not sessions.available:
            return False
        budget = self.budget
        return budget is None or (not budget.waiting and budget.free >= self._units(sessions.lane))

    def _alone(self, held: int = 0) -> bool:
        """Nothing else to compute now or soon: no other computation of this model, nothing queued
        beyond one batch, nothing being decoded for it, and the compute budget idle but for the
        `held` units this dispatch holds (no other model computing or waiting)."""
        if self._busy or len(self._queue) > self.max_batch_size or self.incoming():
            return False
        if self.contended:
            return False
        budget = self.budget
        return budget is None or (not budget.waiting and budget.free + held >= budget.units)

    def _take_free_lane(self) -> Lane | None:
        """Take a session and its units now: of the kind this dispatch wants (wide when it is
        alone, else narrow), else of the other kind if that one is free; None when neither is."""
        if self._wide is None:
            order = [self._wait_for]
        elif self._alone():
            order = [self._wide, self._wait_for]
        else:
            order = [self._wait_for, self._wide]
        for sessions in order:
            if self._fits(sessions):
                sessions.take_now()
                if self.budget is not None:
                    taken = self.budget.try_acquire(sessions.lane.threads)
                    assert taken, "checked by _fits"
                return sessions.lane
        return None

    def _contended(self) -> None:
        """A computation is being dispatched while another of this model computes: requests come
        faster than one at a time, so for twice the latest computation's duration no batch counts
        as alone. Without this a steady stream whose requests arrive while the previous one
        computes (a live video's frames, two in flight) found each frame alone once the previous
        had ended, widened, and kept the cores for one frame at a time: yolo11n PredictLive at a
        30 frames/s camera computed 20.4-22.7 frames/s, as the fixed 1x2 layout (docs/benchmarks.md,
        "Live video and the adaptive layout")."""
        if self._wide is not None:
            self._narrow_until = time.monotonic() + 2 * self._compute_s

    async def _take_lane(self) -> Lane:
        """A session and its budget units for the next computation (`_take_free_lane`); when none
        is free, wait in turn for the lane that frees up under load, then widen if alone."""
        if self._busy:
            self._contended()
        lane = self._take_free_lane()
        if lane is not None:
            self.lane_runs[lane.kind] += 1
            return lane
        sessions = self._wait_for
        await sessions.take()
        try:
            if self.budget is not None:
                await self.budget.acquire(sessions.lane.threads, self.model)
        except BaseException:
            sessions.put()
            raise
        lane = self._widen(sessions.lane)
        self.lane_runs[lane.kind] += 1
        return lane

    def _widen(self, lane: Lane) -> Lane:
        """`lane` (narrow, taken after a wait), or the wide one if this batch now finds itself
        alone and the wide session and the rest of the budget are free."""
        wide = self._wide
        if wide is None or not wide.available or not self._alone(held=self._units(lane)):
            return lane
        extra = self._units(wide.lane) - self._units(lane)
        if self.budget is not None and extra > 0 and not self.budget.try_acquire(extra):
            return lane
        wide.take_now()
        self._sessions[lane.kind].put()
        return wide.lane

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
            # NOTE: what queues while every session is busy, or other models compute, joins this batch
            lane = await self._take_lane()
            batch = self._take_live(time.monotonic())
            if not batch:
                self.lane_runs[lane.kind] -= 1
                self._give_back(lane)
                continue
            self._busy += 1
            task = asyncio.get_running_loop().create_task(self._compute(batch, lane), name="batch")
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _stack_and_run(self, tensors: list[np.ndarray]) -> np.ndarray:
        return self.run_batch(np.stack(tensors))

    async def _compute(self, batch: list[_Pending], lane: Lane) -> None:
        """Run one batch on a session of `lane`, answer its callers, free the session."""
        started = time.monotonic()
        try:
            # NOTE: stacked on the runtime's thread, not the event loop: a batch of 8 224x224
            # images is a 4.8 MB copy, which showed up in the event loop's profile at 16 clients.
            outputs = await asyncio.get_running_loop().run_in_executor(
                self.executor, call_on_lane, lane.kind, self._stack_and_run, [b.tensor for b in batch]
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
            self._compute_s = time.monotonic() - started
            self._busy -= 1
            self._give_back(lane)

    def _give_back(self, lane: Lane) -> None:
        """Free a session of `lane` and the budget units taken with it."""
        if self.budget is not None:
            self.budget.release(lane.threads)
        self._sessions[lane.kind].put()
