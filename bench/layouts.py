"""The in-process limit: the best throughput of decode + preprocess + predict_batch +
postprocess, no network, over a few thread layouts.

A layout is W preprocessing threads and one inference thread whose runtime has T intra-op
threads. The W threads decode and preprocess images from a fixed list (image i of the run is
`images[i % len(images)]`, whichever thread claims it) into a bounded queue; the inference thread
takes whatever is queued, up to the maximum batch size, runs `predict_batch` and hands each output
row back to the W threads, which postprocess it (top-k, or NMS and the boxes mapped back) before
they claim the next image. That is the served pipeline without HTTP, gRPC, asyncio or the
batcher's hand-offs: the number a served req/s is held against ("in-process limit" in the report
is the best layout's img/s).

Each layout is bounded by a number of images and/or a time cap; images claimed before the cap
are still computed, postprocessed and counted, and img/s is images / wall time (first claim to
the last image postprocessed).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.steps import TaskSteps
from visionserve.runtimes.base import ModelRuntime
from visionserve.tasks import Prepared

PIPELINE = "decode + preprocess + predict_batch + postprocess"


@dataclass(frozen=True, order=True)
class Layout:
    """W preprocessing threads feeding one inference thread with T intra-op threads; or, for a
    pipeline (`concurrent` N >= 1), the registry the servers build (W preprocessing threads, T
    intra-op threads per stage) driven by N concurrent requests (`pipeline_rows`)."""

    workers: int
    threads: int
    concurrent: int = 0
    """0: a thread layout; N: a pipeline's registry under N concurrent requests."""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.threads < 1 or self.concurrent < 0:
            raise ValueError(f"a layout needs at least 1 worker and 1 thread, got {self.label}")

    @property
    def label(self) -> str:
        """`WxT`, as on the command line; `c=N` for a pipeline's."""
        return f"c={self.concurrent}" if self.concurrent else f"{self.workers}x{self.threads}"

    def describe(self) -> str:
        """e.g. `2 preprocessing threads, 1 intra-op thread`; `16 concurrent requests through the
        registry (2 preprocessing threads, 2 intra-op threads per stage)`."""
        workers = "thread" if self.workers == 1 else "threads"
        threads = "thread" if self.threads == 1 else "threads"
        if self.concurrent:
            requests = "request" if self.concurrent == 1 else "concurrent requests"
            return (
                f"{self.concurrent} {requests} through the registry ({self.workers} preprocessing "
                f"{workers}, {self.threads} intra-op {threads} per stage)"
            )
        return f"{self.workers} preprocessing {workers}, {self.threads} intra-op {threads}"


def parse_layouts(text: str) -> tuple[Layout, ...]:
    """`1x1,2x1,3x2` -> layouts (workers x intra-op threads), in order, duplicates dropped."""
    found: dict[Layout, None] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        workers, sep, threads = part.lower().partition("x")
        try:
            if not sep:
                raise ValueError(part)
            found[Layout(int(workers), int(threads))] = None
        except ValueError:
            raise ValueError(
                f"{part!r} is not a layout: write WORKERSxTHREADS with both at least 1, e.g. 2x1"
            ) from None
    if not found:
        raise ValueError("give at least one layout, e.g. 1x1,2x1,3x2")
    return tuple(found)


def default_layouts(cores: int) -> tuple[Layout, ...]:
    """The issue's sweep scaled to `cores`: workers 1, cores/2, cores, cores+1; intra-op threads
    1, cores/2, cores. On 2 cores: workers 1-3 x threads 1-2 (six layouts)."""
    half = max(1, cores // 2)
    workers = sorted({1, half, cores, cores + 1})
    threads = sorted({1, half, cores})
    return tuple(Layout(w, t) for t in threads for w in workers)


@dataclass(frozen=True)
class LayoutMeasurement:
    """Images computed, their wall time and how many `predict_batch` calls they took."""

    images: int
    wall_s: float
    batches: int

    @property
    def images_per_s(self) -> float:
        """Images per second of wall time."""
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_batch(self) -> float | None:
        """Images per `predict_batch` call."""
        return self.images / self.batches if self.batches else None

    @classmethod
    def merged(cls, parts: Sequence[LayoutMeasurement]) -> LayoutMeasurement:
        """Rounds of one layout, as one."""
        return cls(
            images=sum(p.images for p in parts),
            wall_s=sum(p.wall_s for p in parts),
            batches=sum(p.batches for p in parts),
        )


def use_threads(runtime: ModelRuntime) -> None:
    """Make the process's torch intra-op pool match `runtime.threads` (ONNX Runtime sessions
    have their own pools: nothing to do)."""
    if runtime.backend == "torch":
        # NOTE: torch's intra-op thread count is process-wide (TorchRuntime.load sets it once):
        # runtimes of several thread counts in one process must set it before each use.
        import torch

        torch.set_num_threads(runtime.threads)


def measure_layout(
    runtime: ModelRuntime,
    steps: TaskSteps,
    images: Sequence[bytes],
    *,
    workers: int,
    max_batch_size: int,
    count: int | None = None,
    duration_s: float | None = None,
) -> LayoutMeasurement:
    """Run `workers` preprocessing threads and one inference thread (the caller) over `images`
    until `count` images and/or `duration_s` run out; return what was computed and postprocessed.

    The workers also postprocess the inference thread's output rows, before they claim another
    image (the server runs both in its one preprocessing pool)."""
    if count is None and duration_s is None:
        raise ValueError("bound the run: give a number of images, a duration, or both")
    if workers < 1 or max_batch_size < 1:
        raise ValueError("workers and max_batch_size must be at least 1")
    if not images:
        raise ValueError("no images to measure with")
    if count == 0:
        return LayoutMeasurement(images=0, wall_s=0.0, batches=0)
    use_threads(runtime)
    limit = math.inf if count is None else count
    # NOTE: bounded, so that preprocessing cannot run far ahead of inference (a backlog would
    # make every batch the largest, a throughput a server with a closed loop of clients never sees).
    tensors: queue.Queue[Prepared | None] = queue.Queue(maxsize=max(2 * max_batch_size, 2 * workers))
    outputs: queue.Queue[tuple[np.ndarray, object]] = queue.Queue()
    claim = threading.Lock()
    stop = threading.Event()
    computed = threading.Event()  # the inference thread has run its last batch
    claimed = 0
    finished: list[float] = []  # when each image's postprocessing ended
    failures: list[BaseException] = []
    started = time.perf_counter()
    deadline = math.inf if duration_s is None else started + duration_s

    def put(item: Prepared | None) -> None:
        while not stop.is_set():
            try:
                tensors.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def postprocess_one(block: bool) -> bool:
        """Postprocess one output row if there is one (waiting a little if `block`)."""
        try:
            row, meta = outputs.get(timeout=0.05) if block else outputs.get_nowait()
        except queue.Empty:
            return False
        steps.finish(row, meta)
        finished.append(time.perf_counter())
        return True

    def work() -> None:
        nonlocal claimed
        try:
            while not stop.is_set():
                if postprocess_one(block=False):
                    continue
                with claim:
                    if claimed >= limit or time.perf_counter() >= deadline:
                        break
                    index = claimed
                    claimed += 1
                put(steps.prepare(images[index % len(images)]))
            put(None)  # this worker claims no more
            while not stop.is_set() and not (computed.is_set() and outputs.empty()):
                postprocess_one(block=True)
        except BaseException as exc:
            failures.append(exc)
            stop.set()
            put(None)

    threads = [
        threading.Thread(target=work, name=f"bench-preprocess-{i}", daemon=True) for i in range(workers)
    ]
    for thread in threads:
        thread.start()
    done = batches = ended = 0
    try:
        while ended < workers and not stop.is_set():
            try:
                item = tensors.get(timeout=0.1)
            except queue.Empty:
                continue  # a failed worker sets `stop` and may never send its end
            if item is None:
                ended += 1
                continue
            batch = [item]
            while len(batch) < max_batch_size:
                try:
                    more = tensors.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    ended += 1
                else:
                    batch.append(more)
            rows = runtime.predict_batch(np.stack([prepared.tensor for prepared in batch]))
            for row, prepared in zip(rows, batch, strict=True):
                outputs.put((row, prepared.meta))
            done += len(batch)
            batches += 1
    except BaseException:
        stop.set()
        raise
    finally:
        computed.set()
        for thread in threads:
            thread.join()
        stop.set()
    if failures:
        raise failures[0]
    last = max(finished, default=started)
    return LayoutMeasurement(images=done, wall_s=last - started, batches=batches)
