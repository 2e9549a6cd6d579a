"""How many CPU cores this process may really use (affinity and cgroup quota)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

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
    """

    cores: int
    instances: int
    threads: int
    preprocess_workers: int

    @property
    def runtime_threads(self) -> int:
        """Intra-op threads of all instances together."""
        return self.instances * self.threads

    def describe(self) -> str:
        """One line for the start-up log."""
        return (
            f"{self.instances} runtime instance(s) x {self.threads} intra-op thread(s) + "
            f"{self.preprocess_workers} preprocessing thread(s), on {self.cores} usable core(s)"
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
