"""The adaptive layout (issue 15): a wide session for a lone request, narrow ones side by side
under load, picked per batch by the batcher from the compute budget; over fake runtimes that
record which kind of session each computation ran on."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import encode
from tests.fixtures import FakeRuntime
from visionserve.batching import DynamicBatcher
from visionserve.cpu import FIXED, NARROW, WIDE, Lane, current_lane
from visionserve.errors import ErrorCode, VisionError
from visionserve.repository import ModelEntry
from visionserve.serving.budget import ComputeBudget
from visionserve.serving.registry import ModelRegistry
from visionserve.settings import ServerSettings

ADAPTIVE = (Lane(WIDE, 1, 2), Lane(NARROW, 2, 1))
"""2 cores: one wide session of 2 threads, two narrow ones of 1."""
UNITS = {WIDE: 2, NARROW: 1, FIXED: 2}
"""Budget units (cores) a computation on each kind of session takes."""
IMAGE = encode(Image.new("RGB", (40, 30), (10, 120, 200)))


class Meter:
    """Budget units computing at once, across every recorder that shares it (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.units = 0
        self.peak = 0

    def enter(self, units: int) -> None:
        with self.lock:
            self.units += units
            self.peak = max(self.peak, self.units)

    def leave(self, units: int) -> None:
        with self.lock:
            self.units -= units


class Recorder:
    """A run_batch that records the kind of session (`current_lane()`), size and values of each
    batch, counts what runs at once by kind, and holds each batch until `release` is set."""

    def __init__(self, threads: dict[str, int], meter: Meter | None = None, *, hold: bool = False):
        self.threads = threads
        self.meter = meter or Meter()
        self.lock = threading.Lock()
        self.runs: list[tuple[str, int]] = []
        self.values: list[float] = []
        self.running: dict[str, int] = {}
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.delay_s = 0.0
        self.fail_on: float | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        kind = current_lane() or "none"
        units = self.threads[kind]
        with self.lock:
            self.runs.append((kind, len(batch)))
            self.values += [float(value) for value in batch[:, 0]]
            self.running[kind] = self.running.get(kind, 0) + 1
        self.meter.enter(units)
        try:
            assert self.release.wait(10)
            time.sleep(self.delay_s)
            if self.fail_on is not None and (batch[:, 0] == self.fail_on).any():
                raise VisionError(ErrorCode.INTERNAL, "batch failed")
            return batch * 2
        finally:
            self.meter.leave(units)
            with self.lock:
                self.running[kind] -= 1

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.runs]


def _adaptive(recorder: Recorder, budget: ComputeBudget | None, **options: object) -> DynamicBatcher:
    return DynamicBatcher(
        recorder,
        executor=ThreadPoolExecutor(3),
        **{"max_batch_size": 4, "budget": budget, "lanes": ADAPTIVE, **options},  # type: ignore[arg-type]
    )


def _item(value: float) -> np.ndarray:
    return np.full(3, value, dtype=np.float32)


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never: {what}")


async def _run(batcher: DynamicBatcher, scenario: Callable[[DynamicBatcher], Awaitable[object]]) -> object:
    batcher.start()
    try:
        return await scenario(batcher)
    finally:
        await batcher.stop()
        batcher.executor.shutdown()  # type: ignore[attr-defined]


async def _one_computing_one_waiting(
    batcher: DynamicBatcher, recorder: Recorder
) -> tuple[asyncio.Future[np.ndarray], asyncio.Future[np.ndarray]]:
    """Submit two items: the first computes on the wide session (held by `recorder`), the second
    waits for the cores."""
    budget = batcher.budget
    assert budget is not None
    first = asyncio.ensure_future(batcher.submit(_item(0)))
    await _until(lambda: recorder.running.get(WIDE) == 1, "the first on the wide session")
    second = asyncio.ensure_future(batcher.submit(_item(1)))
    await _until(lambda: budget.waiting == 1, "the second waits for the cores")
    return first, second


# --- the decision --------------------------------------------------------------------------------


def test_a_lone_request_gets_the_wide_session() -> None:
    recorder = Recorder(UNITS)

    async def scenario(batcher: DynamicBatcher) -> None:
        for value in range(3):  # one after another: each finds nothing else to do
            row = await batcher.submit(_item(value))
            assert float(row[0]) == 2.0 * value
        assert await batcher.run_exclusive(recorder, np.stack([_item(5)])) is not None  # fast path
        assert batcher.budget is not None and batcher.budget.free == 2

    asyncio.run(_run(_adaptive(recorder, ComputeBudget(2)), scenario))
    assert recorder.kinds() == [WIDE] * 4
    assert recorder.meter.peak == 2


def test_concurrent_requests_get_narrow_sessions_side_by_side() -> None:
    recorder = Recorder(UNITS, hold=True)

    async def scenario(batcher: DynamicBatcher) -> list[np.ndarray]:
        try:
            calls = [asyncio.ensure_future(batcher.submit(_item(i))) for i in range(6)]
            await _until(lambda: recorder.running.get(NARROW) == 2, "two narrow batches at once")
            await asyncio.sleep(0.02)
            assert recorder.running.get(WIDE, 0) == 0  # the budget has no room for it
            assert batcher.queue_depth == 4  # the rest wait, droppable
        finally:
            recorder.release.set()
        return await asyncio.gather(*calls)

    results = asyncio.run(_run(_adaptive(recorder, ComputeBudget(2), max_batch_size=1), scenario))
    assert [float(r[0]) for r in results] == [2.0 * i for i in range(6)]  # type: ignore[attr-defined]
    assert recorder.kinds()[:2] == [NARROW, NARROW]
    assert recorder.meter.peak == 2


def test_a_request_being_decoded_makes_a_batch_narrow() -> None:
    recorder = Recorder(UNITS)

    async def scenario(batcher: DynamicBatcher) -> None:
        await batcher.submit(_item(1))
        batcher.incoming = lambda: 1  # another request is on its way (being decoded)
        await batcher.submit(_item(2))

    asyncio.run(_run(_adaptive(recorder, ComputeBudget(2)), scenario))
    assert recorder.kinds() == [WIDE, NARROW]


def test_another_model_computing_makes_a_batch_narrow() -> None:
    recorder = Recorder(UNITS)

    async def scenario(batcher: DynamicBatcher) -> None:
        budget = batcher.budget
        assert budget is not None
        await budget.acquire(1, "other")  # another model computes on one core
        await batcher.submit(_item(1))  # the other core: a narrow session, not waiting for both
        budget.release(1)
        await batcher.submit(_item(2))

    asyncio.run(_run(_adaptive(recorder, ComputeBudget(2)), scenario))
    assert recorder.kinds() == [NARROW, WIDE]


def test_a_batch_never_waits_for_a_busy_kind_while_the_other_is_free() -> None:
    """Without a budget (sessions are the only limit): wide busy -> narrow at once; all busy ->
    the next waits in the queue."""
    recorder = Recorder(UNITS, hold=True)

    async def scenario(batcher: DynamicBatcher) -> list[np.ndarray]:
        try:
            calls = [asyncio.ensure_future(batcher.submit(_item(0)))]  # alone: wide
            await _until(lambda: recorder.running.get(WIDE) == 1, "the wide session computes")
            calls.append(asyncio.ensure_future(batcher.submit(_item(1))))  # wide busy: narrow
            await _until(lambda: recorder.running.get(NARROW) == 1, "a narrow one beside it")
            calls.append(asyncio.ensure_future(batcher.submit(_item(2))))
            await _until(lambda: recorder.running.get(NARROW) == 2, "the second narrow one")
            calls.append(asyncio.ensure_future(batcher.submit(_item(3))))
            await asyncio.sleep(0.02)
            assert batcher.queue_depth == 1  # every session busy: it waits
        finally:
            recorder.release.set()
        return await asyncio.gather(*calls)

    results = asyncio.run(_run(_adaptive(recorder, None, max_batch_size=1), scenario))
    assert [float(r[0]) for r in results] == [0.0, 2.0, 4.0, 6.0]  # type: ignore[attr-defined]
    assert recorder.kinds()[:3] == [WIDE, NARROW, NARROW]


def test_narrow_sessions_busy_and_the_wide_one_free_takes_the_wide_one() -> None:
    recorder = Recorder(UNITS, hold=True)

    async def scenario(batcher: DynamicBatcher) -> None:
        try:
            calls = [asyncio.ensure_future(batcher.submit(_item(i))) for i in range(2)]  # a crowd
            await _until(lambda: recorder.running.get(NARROW) == 2, "both narrow sessions")
            calls.append(asyncio.ensure_future(batcher.submit(_item(2))))
            await _until(lambda: recorder.running.get(WIDE) == 1, "the wide one, without waiting")
        finally:
            recorder.release.set()
        await asyncio.gather(*calls)

    asyncio.run(_run(_adaptive(recorder, None, max_batch_size=1), scenario))
    assert recorder.kinds() == [NARROW, NARROW, WIDE]


def test_a_batch_that_waited_widens_when_it_finds_itself_alone() -> None:
    recorder = Recorder(UNITS, hold=True)

    async def scenario(batcher: DynamicBatcher) -> None:
        first, second = await _one_computing_one_waiting(batcher, recorder)
        recorder.release.set()
        await asyncio.gather(first, second)

    asyncio.run(_run(_adaptive(recorder, ComputeBudget(2)), scenario))
    assert recorder.kinds() == [WIDE, WIDE]  # nothing else by then: the whole machine
    assert recorder.meter.peak == 2


def test_a_steady_stream_stays_narrow_and_a_pause_makes_the_next_request_wide_again() -> None:
    """Two in flight, each arriving while the other computes (a live video): once one has been
    dispatched beside another, the next ones do not widen when they find themselves alone for a
    moment, until the model has been quiet for twice a computation."""
    recorder = Recorder(UNITS)
    recorder.delay_s = 0.02

    async def scenario(batcher: DynamicBatcher) -> None:
        first = asyncio.ensure_future(batcher.submit(_item(0)))
        await _until(lambda: recorder.running.get(WIDE) == 1, "the first on the wide session")
        for value in range(1, 7):  # each frame arrives while the previous one computes
            frame = asyncio.ensure_future(batcher.submit(_item(value)))
            await _until(lambda n=value: len(recorder.runs) > n, "the frame started")  # type: ignore[misc]
            await first
            first = frame
        await first
        assert batcher.contended
        await _until(lambda: not batcher.contended, "quiet for twice a computation")
        await batcher.submit(_item(9))

    asyncio.run(_run(_adaptive(recorder, ComputeBudget(2), max_batch_size=1), scenario))
    kinds = recorder.kinds()
    assert kinds[0] == WIDE and kinds[-1] == WIDE, kinds
    assert kinds[2:-1] == [NARROW] * 5, kinds  # the second waited for the first; from then on narrow
    assert recorder.meter.peak <= 2


def test_a_fixed_layout_is_unchanged() -> None:
    recorder = Recorder({FIXED: 1})

    async def scenario(batcher: DynamicBatcher) -> None:
        assert not batcher.adaptive and batcher.instances == 2 and batcher.units == 1
        await asyncio.gather(*(batcher.submit(_item(i)) for i in range(5)))

    batcher = DynamicBatcher(recorder, executor=ThreadPoolExecutor(2), max_batch_size=2, instances=2, units=1)
    asyncio.run(_run(batcher, scenario))
    assert set(recorder.kinds()) == {FIXED}


def test_lanes_must_be_one_or_a_wide_and_a_narrow_one() -> None:
    with pytest.raises(ValueError, match="wide and a narrow"):
        DynamicBatcher(
            lambda batch: batch,
            executor=ThreadPoolExecutor(1),
            max_batch_size=1,
            lanes=(Lane(WIDE, 1, 2), Lane(WIDE, 1, 2)),
        )


# --- the budget, starvation, cancellation, failures ----------------------------------------------


def test_the_budget_is_never_oversubscribed_with_another_model_beside() -> None:
    """An adaptive model and a fixed 2-thread model on one 2-core budget, lone requests and crowds
    in turn: never more than 2 units computing, every request answered, both kinds used."""
    meter = Meter()
    adaptive = Recorder(UNITS, meter)
    fixed = Recorder(UNITS, meter)
    adaptive.delay_s = fixed.delay_s = 0.002

    async def scenario() -> None:
        budget = ComputeBudget(2)
        first = _adaptive(adaptive, budget)
        second = DynamicBatcher(
            fixed, executor=ThreadPoolExecutor(1), max_batch_size=4, budget=budget, units=2, model="b"
        )
        for batcher in (first, second):
            batcher.start()
        try:
            for value in range(3):
                await first.submit(_item(value))  # alone: wide
            for round_ in range(5):
                crowd = [first.submit(_item(100 * round_ + i)) for i in range(7)]
                crowd += [second.submit(_item(-1 - i)) for i in range(3)]
                rows = await asyncio.gather(*crowd)
                assert [float(r[0]) for r in rows[:7]] == [2.0 * (100 * round_ + i) for i in range(7)]
            assert budget.free == 2 and budget.waiting == 0
        finally:
            for batcher in (first, second):
                await batcher.stop()
                batcher.executor.shutdown()  # type: ignore[attr-defined]

    asyncio.run(scenario())
    assert meter.peak <= 2
    assert {WIDE, NARROW} <= set(adaptive.kinds())
    assert sum(size for _, size in fixed.runs) == 15


def test_a_busy_adaptive_model_does_not_starve_another() -> None:
    meter = Meter()
    busy = Recorder(UNITS, meter)
    other = Recorder(UNITS, meter)
    busy.delay_s = 0.003

    async def scenario() -> list[float]:
        budget = ComputeBudget(2)
        flooded = _adaptive(busy, budget)
        quiet = DynamicBatcher(
            other, executor=ThreadPoolExecutor(1), max_batch_size=1, budget=budget, units=2
        )
        for batcher in (flooded, quiet):
            batcher.start()
        stop = asyncio.Event()

        async def client(i: int) -> None:
            while not stop.is_set():
                await flooded.submit(_item(i))

        clients = [asyncio.ensure_future(client(i)) for i in range(8)]
        waits = []
        try:
            await asyncio.sleep(0.05)
            for _ in range(5):
                started = time.perf_counter()
                await asyncio.wait_for(quiet.submit(_item(1)), 2)
                waits.append(time.perf_counter() - started)
        finally:
            stop.set()
            await asyncio.gather(*clients)
            for batcher in (flooded, quiet):
                await batcher.stop()
                batcher.executor.shutdown()  # type: ignore[attr-defined]
        return waits

    waits = asyncio.run(scenario())
    assert len(waits) == 5 and max(waits) < 1.0  # in turn, within a few batches
    assert meter.peak <= 2
    assert NARROW in busy.kinds()


def test_a_cancelled_waiter_and_a_cancelled_caller_give_everything_back() -> None:
    recorder = Recorder(UNITS, hold=True)

    async def scenario(batcher: DynamicBatcher) -> None:
        budget = batcher.budget
        assert budget is not None
        first, waiting = await _one_computing_one_waiting(batcher, recorder)
        waiting.cancel()  # its client went away while it waited
        await asyncio.gather(waiting, return_exceptions=True)
        recorder.release.set()
        await first
        await _until(lambda: batcher.idle and budget.free == 2 and budget.waiting == 0, "all free")
        # a fast-path caller that goes away mid-computation holds its session until it ends
        gate = threading.Event()
        exclusive = asyncio.ensure_future(batcher.run_exclusive(gate.wait, 10))
        await _until(lambda: not batcher.idle, "the job computes")
        exclusive.cancel()
        await asyncio.gather(exclusive, return_exceptions=True)
        await asyncio.sleep(0.02)
        assert not batcher.idle and budget.free == 0  # its job still computes: not freed yet
        gate.set()
        await _until(lambda: batcher.idle and budget.free == 2 and budget.waiting == 0, "all free")
        await batcher.submit(_item(2))

    asyncio.run(_run(_adaptive(recorder, ComputeBudget(2)), scenario))
    assert recorder.values == [0.0, 2.0]  # the cancelled waiter's item was never computed
    assert recorder.kinds() == [WIDE, WIDE]
    assert recorder.meter.peak <= 2


def test_a_failing_batch_gives_its_session_and_units_back() -> None:
    recorder = Recorder(UNITS)
    recorder.fail_on = 3.0

    async def scenario(batcher: DynamicBatcher) -> list[object]:
        budget = batcher.budget
        assert budget is not None
        calls = (batcher.submit(_item(i)) for i in range(6))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        await _until(lambda: batcher.idle and budget.free == 2, "everything given back")
        await _until(lambda: not batcher.contended, "quiet for twice a computation")
        assert float((await batcher.submit(_item(7)))[0]) == 14.0
        return outcomes

    outcomes = asyncio.run(_run(_adaptive(recorder, ComputeBudget(2), max_batch_size=1), scenario))
    failed = [o for o in outcomes if isinstance(o, VisionError)]  # type: ignore[attr-defined]
    assert len(failed) == 1 and failed[0].code is ErrorCode.INTERNAL
    assert recorder.kinds()[-1] == WIDE  # alone again afterwards


# --- served: the fast path, warm-up, describe, the log -------------------------------------------


class AdaptiveRuntime(FakeRuntime):
    """A fake runtime with an adaptive layout on 2 cores; records the kind each call ran on."""

    def __init__(self, model: ModelEntry, *, batch_s: float = 0.0):
        super().__init__(model)
        self._lanes = ADAPTIVE
        self.threads, self.instances = 2, 2
        self.layout_reason = "the default on ONNX Runtime on CPU"
        self.kinds: list[str | None] = []
        self.batch_s = batch_s

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        self.kinds.append(current_lane())
        time.sleep(self.batch_s)
        return super().predict_batch(batch)


def test_served_lone_requests_take_the_wide_session_and_a_crowd_narrow_ones(fake_entry: ModelEntry) -> None:
    runtime = AdaptiveRuntime(fake_entry, batch_s=0.01)

    async def scenario() -> None:
        registry = ModelRegistry([runtime], ServerSettings(preprocess_workers=2), cores=2)
        await registry.start()
        model = registry.default
        runtime.kinds.clear()  # warm-up: each session in turn
        for _ in range(3):
            await model.predict(IMAGE)
        assert runtime.kinds == [WIDE] * 3
        runtime.kinds.clear()
        await asyncio.gather(*(model.predict(IMAGE) for _ in range(12)))
        assert runtime.kinds.count(NARROW) >= 2
        assert registry.budget.free == 2
        assert model.runtime_threads._max_workers == 3  # type: ignore[union-attr]  # one per session
        await registry.stop()

    asyncio.run(scenario())


def test_warm_up_runs_every_session_of_every_kind(fake_entry: ModelEntry) -> None:
    runtime = AdaptiveRuntime(fake_entry)
    runtime.warmup(2)
    assert runtime.kinds == [WIDE, WIDE] + [NARROW] * 4


def test_describe_and_the_start_up_log_say_what_runs_and_why(
    fake_entry: ModelEntry, caplog: pytest.LogCaptureFixture, app_client: Callable[..., TestClient]
) -> None:
    runtime = AdaptiveRuntime(fake_entry)
    with caplog.at_level(logging.INFO, logger="visionserve.serving.model"):
        client = app_client(runtime)
    (line,) = [r.getMessage() for r in caplog.records if "ready on" in r.getMessage()]
    assert "adaptive: 1x2 for a lone request, 2x1 under load" in line
    assert "the default on ONNX Runtime on CPU" in line and "wide session when nothing else" in line
    (listed,) = client.get("/models").json()["models"]
    assert listed["layout"] == "adaptive: 1x2 for a lone request, 2x1 under load"
    assert listed["layout_reason"] == "the default on ONNX Runtime on CPU"
    assert listed["sessions"] == [
        {"kind": "wide", "count": 1, "threads": 2},
        {"kind": "narrow", "count": 2, "threads": 1},
    ]
    assert (listed["instances"], listed["threads"]) == (2, 2)
    assert client.get("/models/fake").json()["layout"] == listed["layout"]


def test_a_fixed_runtime_says_fixed(fake_entry: ModelEntry, app_client: Callable[..., TestClient]) -> None:
    client = app_client(FakeRuntime(fake_entry))
    (listed,) = client.get("/models").json()["models"]
    assert listed["layout"] == "fixed: 1x1"
    assert listed["sessions"] == [{"kind": "fixed", "count": 1, "threads": 1}]
