"""Runtimes behind one interface. Each backend's module imports its framework; import lazily."""

from __future__ import annotations

from visionserve.repository import ModelEntry, ModelRepository
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import ModelSettings

__all__ = ["ModelRuntime", "create_runtime", "runtime_from_settings"]


def create_runtime(model: ModelEntry, settings: ModelSettings) -> ModelRuntime:
    """Build (not load) the runtime that `settings.backend` names for `model`."""
    threads = settings.resolved_threads()
    if settings.backend == "onnx":
        from visionserve.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(
            model, device=settings.device, threads=threads, allow_spinning=settings.onnx_allow_spinning
        )
    from visionserve.runtimes.torch import TorchRuntime

    return TorchRuntime(model, device=settings.device, threads=threads, compile=settings.torch_compile)


def runtime_from_settings(settings: ModelSettings) -> ModelRuntime:
    """The runtime for the model that `settings` name (repository entry read and checked)."""
    entry = ModelRepository(settings.model_repository).get(settings.model_name)
    return create_runtime(entry, settings)
