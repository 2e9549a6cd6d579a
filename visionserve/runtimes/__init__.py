"""Runtimes behind one interface. Each backend's module imports its framework; import lazily."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from visionserve.cpu import ThreadLayout, plan_adaptive, plan_threads
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


def _fixed_by(model: ModelEntry, settings: ModelSettings) -> list[str]:
    """The settings that ask for a fixed layout: VISION_THREADS, VISION_INSTANCES, or the model's
    config.json `threads`, or `instances` above 1 (the exporter writes `instances: 1, threads:
    null`, the defaults, which ask for nothing)."""
    named = []
    if settings.threads:
        named.append(f"VISION_THREADS={settings.threads}")
    if settings.instances:
        named.append(f"VISION_INSTANCES={settings.instances}")
    if model.config.threads:
        named.append(f"threads {model.config.threads} in config.json")
    if model.config.instances > 1:
        named.append(f"instances {model.config.instances} in config.json")
    return named


def _not_adaptive(settings: ModelSettings) -> str | None:
    """Why no adaptive layout can run with these settings, or None when one can."""
    if settings.backend != "onnx":
        return "PyTorch runs one module with process-wide threads; adaptive layouts are ONNX Runtime's"
    if settings.device != "cpu":
        return "on CUDA the GPU computes; adaptive layouts are for CPU sessions"
    return None


def thread_layout(model: ModelEntry, settings: ModelSettings) -> ThreadLayout:
    """Sessions and intra-op threads for `model`, and why (`ThreadLayout.reason`).

    `VISION_LAYOUT=auto` (the default): the adaptive layout (`plan_adaptive`) on ONNX Runtime on
    CPU where no setting asks for a fixed one; else the fixed layout of the environment's
    settings, else the model's config.json, else the defaults (`plan_threads`), as it always was.
    `fixed`: always that fixed layout. `adaptive`: the adaptive layout on ONNX Runtime on CPU, its
    wide session of VISION_THREADS (default: the cores), VISION_INSTANCES narrow sessions
    (default: `narrow_sessions`). Too many threads for the cores is refused.
    """
    fixed_by = _fixed_by(model, settings)
    cannot = _not_adaptive(settings)
    try:
        if settings.layout == "adaptive" and cannot is None:
            return plan_adaptive(
                threads=settings.threads or model.config.threads,
                instances=settings.instances,
                reason="VISION_LAYOUT=adaptive",
            )
        if settings.layout == "auto" and cannot is None and not fixed_by:
            return plan_adaptive(
                reason="the default on ONNX Runtime on CPU (no VISION_THREADS, VISION_INSTANCES or "
                "config.json threads/instances set; VISION_LAYOUT=fixed for one session of every core)"
            )
        instances = settings.instances or model.config.instances
        threads = settings.threads or model.config.threads
        layout = plan_threads(instances=instances, threads=threads, device=settings.device)
    except ValueError as exc:
        raise ConfigurationError(
            f"{exc}; lower VISION_THREADS or VISION_INSTANCES (or `threads` / `instances` in "
            f"{model.root / 'config.json'})"
        ) from None
    if settings.layout == "fixed":
        reason = "VISION_LAYOUT=fixed"
    elif settings.layout == "adaptive":
        # asked for but impossible (PyTorch, CUDA): say that first, then what sized the fixed one
        reason = f"VISION_LAYOUT=adaptive does not apply: {cannot}"
        if fixed_by:
            reason += "; sized by " + ", ".join(fixed_by)
    elif fixed_by:
        reason = "set by " + ", ".join(fixed_by)
    else:
        reason = str(cannot)
    return replace(layout, reason=reason)


def create_runtime(model: ModelEntry, settings: ModelSettings) -> ModelRuntime:
    """Build (not load) the runtime that `settings.backend` names for `model`."""
    layout = thread_layout(model, settings)
    common: dict[str, Any] = {
        "device": settings.device,
        "threads": layout.threads,
        "instances": layout.instances,
        "lanes": layout.lanes,
        "layout_reason": layout.reason,
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
