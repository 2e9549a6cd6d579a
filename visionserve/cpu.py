"""How many CPU cores this process may really use (affinity and cgroup quota)."""

from __future__ import annotations

import math
import os
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
