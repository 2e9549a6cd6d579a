"""How many CPU cores this process may really use (affinity and cgroup quota), and how a serving
process lays its threads out on them: runtime sessions of a few kinds (`Lane`), preprocessing."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cgroup_quota_cores() -> float | None:
    """Cores allowed by the cgroup CPU quota, or None when there is no quota."""
    try:
        if _CGROUP_V2_CPU_MAX.exists():
            quota, period = _CGROUP_V2_CPU_MAX.read_text().split()[:2]
            if quota == "max":
                return None
            return int(quota) / int(period)
        if _CGROUP_V1_QUOTA.exists() and _CGROUP_V1_PERIOD.exists():
            quota_us = int(_CGROUP_V1_QUOTA.read_text())
            if quota_us <= 0:
                return None
            return quota_us / int(_CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus() -> int:
    """Cores this process may use: the smaller of its CPU affinity and its cgroup quota.

    `os.cpu_count()` reports the host's cores, which oversubscribes a container limited to a few
    (e.g. `docker run --cpus 2` on a 64-core host).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota_cores()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


FIXED = "fixed"
"""The lane of a fixed layout: `instances` sessions of `threads` intra-op threads, used alike."""
WIDE = "wide"
"""The adaptive layout's session for a lone request: every usable core as intra-op threads."""
NARROW = "narrow"
"""The adaptive layout's sessions for a crowd: several, of fewer threads each, side by side."""

MAX_NARROW_SESSIONS = 4
"""The most narrow sessions an adaptive layout has, whatever the cores (see `narrow_sessions`)."""


@dataclass(frozen=True)
class Lane:
    """One kind of runtime session: `sessions` of them, each with `threads` intra-op threads. A
    computation on one takes `threads` units of the process's compute budget while it runs."""

    kind: str
    sessions: int
    threads: int

    @property
    def label(self) -> str:
        """`2x1`: sessions x threads."""
        return f"{self.sessions}x{self.threads}"


_LANE: ContextVar[str | None] = ContextVar("visionserve_lane", default=None)


def current_lane() -> str | None:
    """The kind of session the batcher picked for the computation running in this thread (None:
    a call from outside a batcher, e.g. warm-up or a test: the runtime's first kind)."""
    return _LANE.get()


@contextlib.contextmanager
def on_lane(kind: str) -> Iterator[None]:
    """Within this block, this thread's `predict_batch` calls run on a session of `kind`."""
    token = _LANE.set(kind)
    try:
        yield
    finally:
        _LANE.reset(token)


def call_on_lane(kind: str, function: Callable[..., T], *args: object) -> T:
    """`function(*args)` with this thread's computations on a session of `kind` (for an executor)."""
    with on_lane(kind):
        return function(*args)


def layout_summary(lanes: Sequence[Lane]) -> str:
    """What runs, in words: `fixed: 1x2` or `adaptive: 1x2 for a lone request, 2x1 under load`."""
    by_kind = {lane.kind: lane for lane in lanes}
    if WIDE in by_kind and NARROW in by_kind:
        return f"adaptive: {by_kind[WIDE].label} for a lone request, {by_kind[NARROW].label} under load"
    return "fixed: " + ", ".join(lane.label for lane in lanes)


@dataclass(frozen=True)
class ThreadLayout:
    """How one serving process shares its cores: `instances` runtime instances of `threads`
    intra-op threads each, and `preprocess_workers` decode/preprocess threads.

    The runtime's threads may not exceed the cores (they would only take turns on them, each
    slower); by default they take every core (inference is most of the work). The preprocessing
    pool is sized to the cores too, on purpose: its threads sleep until an image arrives and must
    then win CPU time from the runtime's busy threads, which the scheduler shares per thread.
    Measured on 2 cores at 16 clients (docs/benchmarks.md): 2 intra-op threads with a pool of 1
    served 91-92 req/s, with a pool of 2 108-111, of 3 96-111; 1 intra-op thread + 1 preprocessing
    thread (an exact fit) served ~81.

    `lanes` are the kinds of sessions: one (`fixed`: `instances` x `threads`), or for an adaptive
    layout a `wide` session of every core and `narrow` ones; then `instances` is the most
    computations at once (the narrow sessions) and `threads` the most intra-op threads of one (the
    wide session's). `reason` says why this layout, for the log.
    """

    cores: int
    instances: int
    threads: int
    preprocess_workers: int
    lanes: tuple[Lane, ...] = field(default=())
    reason: str = ""

    def __post_init__(self) -> None:
        if not self.lanes:
            object.__setattr__(self, "lanes", (Lane(FIXED, self.instances, self.threads),))

    @property
    def adaptive(self) -> bool:
        """A wide session for a lone request and narrow ones under load."""
        return any(lane.kind == WIDE for lane in self.lanes)

    @property
    def runtime_threads(self) -> int:
        """The most intra-op threads computing at once (all instances of a fixed layout; the wide
        session, or the narrow ones, of an adaptive one: never both, the compute budget sees to it)."""
        return max(lane.sessions * lane.threads for lane in self.lanes)

    @property
    def summary(self) -> str:
        """`fixed: 1x2` or `adaptive: 1x2 for a lone request, 2x1 under load`."""
        return layout_summary(self.lanes)

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.adaptive:
            runtime = f"{self.summary} (sessions x intra-op threads)"
        else:
            runtime = f"{self.instances} runtime instance(s) x {self.threads} intra-op thread(s)"
        return (
            f"{runtime} + {self.preprocess_workers} preprocessing thread(s), on {self.cores} usable core(s)"
        )


def narrow_sessions(cores: int) -> tuple[int, int]:
    """(sessions, threads each) of an adaptive layout's narrow sessions on `cores` cores.

    Every core is used when the narrow sessions all compute (throughput under load), then as many
    sessions as possible, at most `MAX_NARROW_SESSIONS`: 2 cores -> 2x1, 3 -> 3x1, 4 -> 4x1,
    6 -> 3x2, 8 -> 4x2, 16 -> 4x4. Why at most 4: each session beyond the first costs memory even
    with the weights shared (`runtimes.onnx.SharedWeights`: 0.5-5.8 MB per bundled model, measured;
    a lane of 1-thread sessions is one session); each batch takes 1/N of the queue, so more
    sessions form smaller batches; and a 1-thread session's batch is slow on a large machine,
    where 4 threads per session still scale well for these CNNs (measured on 2 cores only: 1
    thread 7.3 ms, 2 threads 4.1 ms for a batch-1 image)."""
    if cores < 2:
        return 1, 1
    best = (2, cores // 2)
    for count in range(2, min(cores, MAX_NARROW_SESSIONS) + 1):
        threads = cores // count
        if (count * threads, count) > (best[0] * best[1], best[0]):
            best = (count, threads)
    return best


def plan_adaptive(
    *,
    threads: int | None = None,
    instances: int | None = None,
    preprocess_workers: int | None = None,
    cores: int | None = None,
    reason: str = "",
) -> ThreadLayout:
    """An adaptive layout on `cores` cores (default: the usable cores): one wide session of
    `threads` intra-op threads (default: every core) for a lone request, and `instances` narrow
    sessions (default: `narrow_sessions`) of `threads // instances` threads each, used when other
    work computes or waits. On one core (or `threads` 1) there is nothing to adapt: the fixed 1x1.
    Raises ValueError when the wide session has more threads than the cores."""
    usable = available_cpus() if cores is None else cores
    wide = threads if threads is not None else usable
    if wide > usable:
        raise ValueError(
            f"an adaptive layout's wide session of {wide} intra-op thread(s) is more than the "
            f"{usable} core(s) this process may use (CPU affinity and cgroup quota)"
        )
    pool = preprocess_workers or usable
    if wide < 2:
        return ThreadLayout(
            cores=usable,
            instances=1,
            threads=1,
            preprocess_workers=pool,
            reason="one core: nothing to adapt",
        )
    count, each = narrow_sessions(wide) if instances is None else (instances, max(1, wide // instances))
    if count < 2:
        raise ValueError(
            f"an adaptive layout needs at least 2 narrow sessions (1 of {wide} thread(s) would be "
            "the wide session again), got 1"
        )
    if count * each > usable:
        raise ValueError(
            f"{count} narrow session(s) x {each} intra-op thread(s) = {count * each} runtime threads, "
            f"more than the {usable} core(s) this process may use (CPU affinity and cgroup quota)"
        )
    lanes = (Lane(WIDE, 1, wide), Lane(NARROW, count, each))
    return ThreadLayout(
        cores=usable, instances=count, threads=wide, preprocess_workers=pool, lanes=lanes, reason=reason
    )


def plan_threads(
    *,
    instances: int = 1,
    threads: int | None = None,
    preprocess_workers: int | None = None,
    device: str = "cpu",
    cores: int | None = None,
) -> ThreadLayout:
    """The layout for the given settings (None = default), on `cores` (default: the usable cores).

    Default intra-op threads: on CPU the cores shared among the instances; on CUDA one per
    instance (the GPU computes; the cores are better spent decoding images). Raises ValueError
    when the runtime's threads alone (instances x threads) exceed the cores: they would only take
    turns on them, each slower.
    """
    usable = available_cpus() if cores is None else cores
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    share = 1 if device == "cuda" else max(1, usable // instances)
    per_instance = threads if threads is not None else share
    if instances * per_instance > usable:
        raise ValueError(
            f"{instances} instance(s) x {per_instance} intra-op thread(s) = "
            f"{instances * per_instance} runtime threads, more than the {usable} core(s) this "
            "process may use (CPU affinity and cgroup quota)"
        )
    pool = preprocess_workers or usable
    return ThreadLayout(cores=usable, instances=instances, threads=per_instance, preprocess_workers=pool)
