"""Runtimes behind one interface. Each backend's module imports its framework; import lazily."""

from __future__ import annotations

from typing import Any

from visionserve.cpu import ThreadLayout, plan_threads
from visionserve.errors import ConfigurationError
from visionserve.repository import ModelEntry, ModelRepository, PipelineEntry
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import ModelSettings

__all__ = [
    "ModelRuntime",
    "create_runtime",
    "models_from_settings",
    "runtime_from_settings",
    "runtimes_from_settings",
    "thread_layout",
]


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
    """The runtime for the default model that `settings` name (repository entry read and checked)."""
    entry = ModelRepository(settings.model_repository).get(settings.model_name)
    return create_runtime(entry, settings)


def runtimes_from_settings(settings: ModelSettings) -> list[ModelRuntime]:
    """The runtimes of every model to serve (pipelines aside: see `models_from_settings`)."""
    return models_from_settings(settings)[0]


def models_from_settings(settings: ModelSettings) -> tuple[list[ModelRuntime], list[PipelineEntry]]:
    """The runtimes and pipelines to serve: those in VISION_MODELS, else every model in the
    repository; a pipeline's stages are served with it even when VISION_MODELS leaves them out.
    The default model (VISION_MODEL_NAME) must be among them."""
    repository = ModelRepository(settings.model_repository)
    names = settings.model_names() or repository.names()
    if not names:
        raise ConfigurationError(
            f"no model in repository {repository.root} (empty or missing); export one with "
            "`python -m export` (`make export`) or set VISION_MODEL_REPOSITORY"
        )
    if settings.model_name not in names:
        listed = "VISION_MODELS" if settings.model_names() else f"the repository {repository.root}"
        raise ConfigurationError(
            f"the default model {settings.model_name!r} (VISION_MODEL_NAME) is not in {listed} "
            f"(models: {', '.join(names) or 'none'}); export it with `python -m export`, or set "
            "VISION_MODEL_NAME to one of them"
        )
    is_pipeline = {name: repository.is_pipeline(name) for name in names}
    pipelines = [repository.get_pipeline(name) for name in names if is_pipeline[name]]
    models = [name for name in names if not is_pipeline[name]]
    for pipeline in pipelines:
        for stage in (pipeline.config.stages.detector, pipeline.config.stages.classifier):
            if stage not in models:
                models.append(stage)
    return [create_runtime(repository.get(name), settings) for name in models], pipelines
