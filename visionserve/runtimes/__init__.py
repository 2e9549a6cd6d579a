"""Runtimes behind one interface. Each backend's module imports its framework; import lazily."""

from __future__ import annotations

from typing import Any

from visionserve.cpu import ThreadLayout, plan_threads
from visionserve.errors import ConfigurationError
from visionserve.repository import ModelEntry, ModelRepository
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import ModelSettings

__all__ = ["ModelRuntime", "create_runtime", "runtime_from_settings", "thread_layout"]


def thread_layout(model: ModelEntry, settings: ModelSettings) -> ThreadLayout:
    """Instances and intra-op threads for `model`: the environment's settings, else the model's
    config.json, else the defaults (`plan_threads`); too many threads for the cores is refused."""
    instances = settings.instances or model.config.instances
    threads = settings.threads or model.config.threads
    try:
        return plan_threads(instances=instances, threads=threads, device=settings.device)
    except ValueError as exc:
        raise ConfigurationError(
            f"{exc}; lower VISION_THREADS or VISION_INSTANCES (or `threads` / `instances` in "
            f"{model.root / 'config.json'})"
        ) from None


def create_runtime(model: ModelEntry, settings: ModelSettings) -> ModelRuntime:
    """Build (not load) the runtime that `settings.backend` names for `model`."""
    layout = thread_layout(model, settings)
    common: dict[str, Any] = {
        "device": settings.device,
        "threads": layout.threads,
        "instances": layout.instances,
    }
    if settings.backend == "onnx":
        from visionserve.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(model, allow_spinning=settings.onnx_allow_spinning, **common)
    from visionserve.runtimes.torch import TorchRuntime

    return TorchRuntime(model, compile=settings.torch_compile, **common)


def runtime_from_settings(settings: ModelSettings) -> ModelRuntime:
    """The runtime for the model that `settings` name (repository entry read and checked)."""
    entry = ModelRepository(settings.model_repository).get(settings.model_name)
    return create_runtime(entry, settings)
