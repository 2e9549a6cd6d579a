"""Where a result was measured: date, CPU, usable cores and the versions that matter.

A latency figure means little without these, so every report carries them in its header.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import visionserve
from visionserve.cpu import available_cpus

# (shown name, distributions that provide it, first found wins)
_PACKAGES = (
    ("torch", ("torch",)),
    ("onnxruntime", ("onnxruntime", "onnxruntime-gpu")),
    ("numpy", ("numpy",)),
    ("pillow", ("pillow",)),
    ("fastapi", ("fastapi",)),
    ("uvicorn", ("uvicorn",)),
    ("httpx2", ("httpx2",)),
    ("grpcio", ("grpcio",)),
    ("protobuf", ("protobuf",)),
)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def package_version(*distributions: str) -> str:
    """The installed version of the first of `distributions` found, or "not installed"."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name (via nvidia-smi), or None when there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    first = result.stdout.strip().splitlines()
    return first[0].strip() if first else None


def describe_machine(*, device: str = "cpu") -> dict[str, str]:
    """Date (UTC), CPU, cores, OS, Python and package versions (and the GPU on CUDA)."""
    facts = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "usable_cores": str(available_cpus()),
        "logical_cpus": str(os.cpu_count() or "unknown"),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    facts |= {shown: package_version(*names) for shown, names in _PACKAGES}
    facts["visionserve"] = visionserve.__version__
    if device == "cuda":
        facts["gpu"] = gpu_name() or "none found"
    return facts
