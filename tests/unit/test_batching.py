"""DynamicBatcher through its public API (`submit`, `start`, `stop`) only."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from visionserve.batching import DynamicBatcher
from visionserve.errors import ErrorCode, VisionError


class Recorder:
    """A run_batch that records batch sizes, optionally sleeps, fails on a marked item."""

    def __init__(self, delay_s: float = 0.0, fail_on: float | None = None):
        self.sizes: list[int] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.gate: threading.Event | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            assert self.gate.wait(10)
        self.sizes.append(len(batch))
        time.sleep(self.delay_s)
        if self.fail_on is not None and (batch[:, 0] == self.fail_on).any():
            raise VisionError(ErrorCode.INTERNAL, "batch failed")
        return batch * 2  # one row per item, traceable to its input


def _item(value: float) -> np.ndarray:
    return np.full(3, value, dtype=np.float32)


async def _until_running(batcher: DynamicBatcher) -> None:
    """Wait until the batcher has taken everything queued into a running batch."""
    for _ in range(5000):
        await asyncio.sleep(0.001)
        if not batcher.idle and batcher.queue_depth == 0:
            return
    raise AssertionError("no batch started")


async def _with_batcher(recorder: Recorder, scenario, **options):  # type: ignore[no-untyped-def]
    executor = ThreadPoolExecutor(options.get("instances", 1))
    batcher = DynamicBatcher(recorder, executor=executor, **{"max_batch_size": 4, **options})
    batcher.start()
    try:
        return await scenario(batcher)
    finally:
        await batcher.stop()
        executor.shutdown()


def test_concurrent_submits_form_batches_and_rows_go_back_to_their_callers() -> None:
    recorder = Recorder(delay_s=0.05)

    async def scenario(batcher: DynamicBatcher) -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.submit(_item(i)) for i in range(9)))

    results = asyncio.run(_with_batcher(recorder, scenario, max_batch_size=4))
    assert [float(r[0]) for r in results] == [2.0 * i for i in range(9)]
    assert max(recorder.sizes) == 4 and sum(recorder.sizes) == 9  # max size respected
    assert len(recorder.sizes) < 9  # batches formed


def test_zero_delay_takes_what_is_waiting_now() -> None:
    recorder = Recorder()

    async def scenario(batcher: DynamicBatcher) -> float:
        started = time.monotonic()
        await batcher.submit(_item(1))
        return time.monotonic() - started

    elapsed = asyncio.run(_with_batcher(recorder, scenario, max_queue_delay_s=0.0))
    assert recorder.sizes == [1] and elapsed < 1.0


def test_max_delay_waits_for_more_then_runs_what_it_has() -> None:
    recorder = Recorder()

    async def scenario(batcher: DynamicBatcher) -> float:
        started = time.monotonic()
        first = asyncio.create_task(batcher.submit(_item(1)))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit(_item(2)))
        await asyncio.gather(first, second)
        return time.monotonic() - started

    elapsed = asyncio.run(_with_batcher(recorder, scenario, max_queue_delay_s=0.3))
    assert recorder.sizes == [2]  # the second joined the first's batch
    assert 0.25 <= elapsed < 2.0  # the deadline ran from the first arrival


def test_full_batch_does_not_wait_for_the_delay() -> None:
    recorder = Recorder()

    async def scenario(batcher: DynamicBatcher) -> float:
        started = time.monotonic()
        await asyncio.gather(*(batcher.submit(_item(i)) for i in range(4)))
        return time.monotonic() - started

    elapsed = asyncio.run(_with_batcher(recorder, scenario, max_queue_delay_s=5.0))
    assert recorder.sizes == [4] and elapsed < 2.0


def test_full_queue_rejects_at_once() -> None:
    recorder = Recorder()
    recorder.gate = threading.Event()

    async def scenario(batcher: DynamicBatcher) -> tuple[list[object], float]:
        running = asyncio.create_task(batcher.submit(_item(0)))  # taken into a batch, blocked
        await _until_running(batcher)
        queued = [asyncio.create_task(batcher.submit(_item(i))) for i in range(1, 3)]
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(VisionError) as rejected:
            await batcher.submit(_item(9))
        took = time.monotonic() - started
        assert rejected.value.code is ErrorCode.OVERLOADED and rejected.value.retry_after_s
        assert "VISION_MAX_QUEUE_SIZE" in rejected.value.message
        recorder.gate.set()  # type: ignore[union-attr]
        return await asyncio.gather(running, *queued), took

    results, took = asyncio.run(_with_batcher(recorder, scenario, max_queue_size=2))
    assert len(results) == 3 and took < 0.05


def test_a_failing_batch_fails_only_its_callers() -> None:
    recorder = Recorder(fail_on=1.0)
    recorder.gate = threading.Event()

    async def scenario(batcher: DynamicBatcher) -> list[object]:
        first = asyncio.create_task(batcher.submit(_item(5)))  # alone in the first batch
        await _until_running(batcher)
        bad_batch = [asyncio.create_task(batcher.submit(_item(v))) for v in (1.0, 2.0)]
        await asyncio.sleep(0.01)
        recorder.gate.set()  # type: ignore[union-attr]
        outcomes = await asyncio.gather(first, *bad_batch, return_exceptions=True)
        after = await batcher.submit(_item(3))
        return [*outcomes, after]

    first, bad_1, bad_2, after = asyncio.run(_with_batcher(recorder, scenario))
    assert float(first[0]) == 10.0 and float(after[0]) == 6.0
    assert isinstance(bad_1, VisionError) and isinstance(bad_2, VisionError)


def test_cancelled_and_expired_requests_are_not_computed() -> None:
    recorder = Recorder()
    recorder.gate = threading.Event()

    async def scenario(batcher: DynamicBatcher) -> object:
        running = asyncio.create_task(batcher.submit(_item(0)))
        await _until_running(batcher)
        cancelled = asyncio.create_task(batcher.submit(_item(7)))
        expired = asyncio.create_task(batcher.submit(_item(8), deadline=time.monotonic() + 0.01))
        kept = asyncio.create_task(batcher.submit(_item(3)))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        recorder.gate.set()  # type: ignore[union-attr]
        await running
        with pytest.raises(VisionError) as late:
            await expired
        assert late.value.code is ErrorCode.DEADLINE_EXCEEDED
        return await kept

    kept = asyncio.run(_with_batcher(recorder, scenario))
    assert float(kept[0]) == 6.0
    assert recorder.sizes == [1, 1]  # 7 (cancelled) and 8 (expired) never reached run_batch


def test_stop_drains_what_is_queued_and_refuses_new_items() -> None:
    recorder = Recorder(delay_s=0.02)

    async def scenario() -> None:
        executor = ThreadPoolExecutor(1)
        batcher = DynamicBatcher(recorder, executor=executor, max_batch_size=2)
        batcher.start()
        pending = [asyncio.create_task(batcher.submit(_item(i))) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.stop()
        results = await asyncio.gather(*pending)
        assert [float(r[0]) for r in results] == [0.0, 2.0, 4.0, 6.0, 8.0]
        with pytest.raises(VisionError) as refused:
            await batcher.submit(_item(1))
        assert refused.value.code is ErrorCode.NOT_READY
        executor.shutdown()

    asyncio.run(scenario())


class Concurrency:
    """A run_batch that holds each batch until released and records how many ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.sizes: list[int] = []
        self.release = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.sizes.append(len(batch))
        try:
            assert self.release.wait(10)
            return batch * 2
        finally:
            with self.lock:
                self.running -= 1


def test_instances_compute_batches_at_once_and_the_queue_waits_for_a_free_one() -> None:
    runtime = Concurrency()

    async def running(count: int) -> None:
        for _ in range(5000):
            await asyncio.sleep(0.001)
            if runtime.running == count:
                return
        raise AssertionError(f"{runtime.running} batches running, expected {count}")

    async def scenario(batcher: DynamicBatcher) -> list[np.ndarray]:
        try:
            first = [asyncio.ensure_future(batcher.submit(_item(0)))]
            await running(1)
            assert batcher.idle  # one instance still free
            first.append(asyncio.ensure_future(batcher.submit(_item(1))))
            await running(2)  # the second instance starts while the first computes
            assert not batcher.idle and batcher.queue_depth == 0
            rest = [asyncio.ensure_future(batcher.submit(_item(i))) for i in range(2, 7)]
            await asyncio.sleep(0.05)
            assert batcher.queue_depth == 5  # no instance free: they wait in the queue, droppable
        finally:
            runtime.release.set()
        return await asyncio.gather(*first, *rest)

    results = asyncio.run(_with_batcher(runtime, scenario, max_batch_size=8, instances=2))
    assert [float(r[0]) for r in results] == [2.0 * i for i in range(7)]
    assert runtime.peak == 2
    assert runtime.sizes[:2] == [1, 1] and sum(runtime.sizes) == 7
    assert len(runtime.sizes) <= 4  # the five that queued went in one or two batches, not five


def test_stop_waits_for_every_instance_s_batch() -> None:
    runtime = Concurrency()

    async def scenario() -> list[np.ndarray]:
        executor = ThreadPoolExecutor(2)
        batcher = DynamicBatcher(runtime, executor=executor, max_batch_size=1, instances=2)
        batcher.start()
        calls = [asyncio.ensure_future(batcher.submit(_item(i))) for i in range(3)]
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()  # two batches still running, one queued
        runtime.release.set()
        await stopping
        executor.shutdown()
        return await asyncio.gather(*calls)

    results = asyncio.run(scenario())
    assert [float(r[0]) for r in results] == [0.0, 2.0, 4.0]
