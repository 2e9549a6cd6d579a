"""`ModelRegistry`: every model one process serves, by name, and what they share.

The registry owns the models; front doors (the FastAPI app, the gRPC server) are handed it and
look a model up per request. The models share one decode/preprocess thread pool, one metrics
registry (labelled by model) and one compute budget (the usable cores), so that serving several
models costs no more threads than serving one, and an idle model costs nothing.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from visionserve.cpu import available_cpus
from visionserve.errors import ConfigurationError, ErrorCode, VisionError
from visionserve.metrics import Metrics
from visionserve.repository import PipelineEntry
from visionserve.runtimes.base import ModelRuntime
from visionserve.serving.budget import ComputeBudget
from visionserve.serving.faces import FaceExpressionModel
from visionserve.serving.lifecycle import ServiceState
from visionserve.serving.model import ServedModel
from visionserve.settings import ModelSettings, ServerSettings
from visionserve.tasks import create_task

logger = logging.getLogger(__name__)

AnyModel = ServedModel | FaceExpressionModel
"""A model the front doors serve: one with a runtime, or a pipeline over such models."""


class ModelRegistry:
    """The served models by name, the default one first. Coroutines run on one event loop.

    `get(None)` is the default model (`VISION_MODEL_NAME`): the seed-compatible endpoints use it
    when a request names none.
    """

    def __init__(
        self,
        runtimes: Sequence[ModelRuntime],
        settings: ServerSettings,
        *,
        default: str | None = None,
        cores: int | None = None,
        metrics: Metrics | None = None,
        pipelines: Sequence[PipelineEntry] = (),
    ):
        if not runtimes:
            raise ConfigurationError("no model to serve: the model repository is empty (run `make export`)")
        names = [runtime.model.name for runtime in runtimes] + [pipeline.name for pipeline in pipelines]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"model names must be unique; got {names}")
        self.default_name = default or names[0]
        if self.default_name not in names:
            raise ConfigurationError(
                f"the default model {self.default_name!r} (VISION_MODEL_NAME) is not among the models "
                f"served ({', '.join(names)}); export it, or add it to VISION_MODELS"
            )
        self.settings = settings
        self._frozen = 0
        """Objects `start` froze out of the cyclic collector's view (`settings.gc_freeze`)."""
        self.metrics = metrics or Metrics()
        self.cores = cores or available_cpus()
        self.budget = ComputeBudget(self.cores, metrics=self.metrics)
        self.preprocess_workers = settings.resolved_preprocess_workers()
        self.preprocess_pool = ThreadPoolExecutor(self.preprocess_workers, thread_name_prefix="preprocess")
        models: dict[str, AnyModel] = {}
        for runtime in runtimes:
            task = create_task(
                runtime.model, max_image_pixels=settings.max_image_pixels, default_topk=settings.default_topk
            )
            models[runtime.model.name] = ServedModel(
                runtime,
                task,
                preprocess_pool=self.preprocess_pool,
                metrics=self.metrics,
                budget=self.budget,
                max_batch_size=settings.max_batch_size,
                max_queue_delay_us=settings.max_queue_delay_us,
                max_queue_size=settings.max_queue_size,
            )
        for pipeline in pipelines:
            models[pipeline.name] = FaceExpressionModel(
                pipeline,
                detector=self._stage(models, pipeline, pipeline.config.stages.detector),
                classifier=self._stage(models, pipeline, pipeline.config.stages.classifier),
                preprocess_pool=self.preprocess_pool,
                max_image_pixels=settings.max_image_pixels,
            )
        self._models = dict(sorted(models.items(), key=lambda item: item[0] != self.default_name))
        self.state = ServiceState.CREATED
        self._loaded = asyncio.Event()
        self._failure: BaseException | None = None

    @staticmethod
    def _stage(models: dict[str, AnyModel], pipeline: PipelineEntry, name: str) -> ServedModel:
        model = models.get(name)
        if not isinstance(model, ServedModel):
            raise ConfigurationError(
                f"pipeline {pipeline.name!r} ({pipeline.root / 'config.json'}) names stage {name!r}, which "
                "is not served; export it (`python -m export --model NAME`) and serve it too"
            )
        return model

    # --- lookup -----------------------------------------------------------------------------------

    @property
    def default(self) -> AnyModel:
        """The model the seed-compatible endpoints use when a request names none."""
        return self._models[self.default_name]

    @property
    def names(self) -> list[str]:
        """The served models' names, the default first."""
        return list(self._models)

    @property
    def backend(self) -> str:
        """The runtime backend the models run on (`onnx`, `torch`)."""
        return next(m.runtime.backend for m in self if isinstance(m, ServedModel))

    @property
    def device(self) -> str:
        """The device the models run on (`cpu`, `cuda:0`)."""
        return next(m.runtime.device for m in self if isinstance(m, ServedModel))

    def __iter__(self) -> Iterator[AnyModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str | None = None) -> AnyModel:
        """The model called `name` (None or empty: the default); MODEL_NOT_FOUND lists the others."""
        if not name:
            return self.default
        model = self._models.get(name)
        if model is None:
            raise VisionError(ErrorCode.MODEL_NOT_FOUND, self.not_found_message(name))
        return model

    def not_found_message(self, name: str) -> str:
        """What a request naming an unknown model is told."""
        served = ", ".join(repr(n) for n in self._models)
        return f"model {name!r} is not served here; this server serves {served}"

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every model loaded and warmed, until shutdown begins."""
        return self.state is ServiceState.READY and all(model.ready for model in self)

    def check_ready(self) -> None:
        """Raise NOT_READY unless every model takes requests (the first that does not says why)."""
        for model in self:
            model.check_ready()

    def readiness(self) -> dict[str, str]:
        """The body of every `/health/ready` (the HTTP API's, the gRPC process's metrics port's):
        `{"status": "ready"}`, else the state and why not (answered with 503)."""
        if self.ready:
            return {"status": "ready"}
        return {"status": self.state.value, "detail": self.not_ready_detail()}

    def not_ready_detail(self) -> str:
        """Why the server is not ready, for /health/ready (load errors stay in the server log)."""
        if self.state is ServiceState.FAILED:
            return "a model failed to load; the server log says why"
        waiting = [f"{m.name} ({m.state.value})" for m in self if not m.ready]
        return f"models not ready: {', '.join(waiting)}" if waiting else f"the server is {self.state.value}"

    async def start(self) -> None:
        """Load and warm up every model, one after another (each takes every core while it
        warms up); raise what made one fail."""
        self.metrics.watch_event_loop(asyncio.get_running_loop())
        self.state = ServiceState.LOADING
        # NOTE: the models with runtimes first: a pipeline warms up through its stages
        order = sorted(self, key=lambda model: isinstance(model, FaceExpressionModel))
        try:
            for model in order:
                try:
                    await model.start()
                except BaseException as exc:
                    self.state = ServiceState.FAILED
                    self._failure = exc
                    raise
                if self.state is not ServiceState.LOADING:  # shutdown began while loading
                    return
            if self.settings.gc_freeze:
                self._frozen = freeze_heap()
            self.state = ServiceState.READY
        finally:
            self._loaded.set()
        logger.info(
            "%d model(s) ready (default %s): %s; %d preprocessing thread(s), compute budget %d core(s)",
            len(self),
            self.default_name,
            ", ".join(f"{m.name} ({m.task.name})" for m in self),
            self.preprocess_workers,
            self.budget.units,
        )

    async def wait_loaded(self) -> None:
        """Wait until `start` has ended (for a front door that did not start the registry itself);
        raise what made loading fail."""
        await self._loaded.wait()
        if self._failure is not None:
            raise self._failure

    def begin_shutdown(self) -> None:
        """Readiness turns not-ready for every model; requests still arriving are served."""
        if self.state in (ServiceState.CREATED, ServiceState.LOADING, ServiceState.READY):
            self.state = ServiceState.STOPPING
        for model in self:
            model.lifecycle.begin_shutdown()

    def refuse_new_requests(self) -> None:
        """New inference requests are refused on every model; admitted ones run to their answers."""
        self.begin_shutdown()
        for model in self:
            model.lifecycle.refuse_new_requests()

    async def stop(self) -> None:
        """Stop every model (each computes what it has queued), then the shared pool."""
        if self.state is ServiceState.STOPPED:
            return
        self.refuse_new_requests()
        for model in sorted(self, key=lambda model: not isinstance(model, FaceExpressionModel)):
            await model.stop()
        await asyncio.to_thread(self.preprocess_pool.shutdown, wait=True, cancel_futures=False)
        if self._frozen:
            gc.unfreeze()  # what start-up made may be garbage now (a process that goes on: tests)
            self._frozen = 0
        self.state = ServiceState.STOPPED

    def describe(self, model: AnyModel) -> dict[str, object]:
        """Facts of one of the models for GET /models: its own, whether it is the default, and
        the preprocessing threads it shares with the others."""
        return model.describe() | {
            "default": model.name == self.default_name,
            "preprocess_workers": self.preprocess_workers,
        }


def freeze_heap() -> int:
    """Collect the young garbage, then freeze what is left (`gc.freeze()`): the cyclic collector
    no longer traverses the objects made at start-up, so a full (generation 2) collection under
    load traverses only what was made since. Measured in the HTTP server serving the five bundled
    models, 16 clients: a full collection stopped every thread for 40-80 ms unfrozen, ~0.5 ms
    frozen (~82 k objects frozen). Returns how many objects are frozen.

    Only the young generations are collected first: a full collection costs in proportion to the
    heap (0.2 s for 2 million objects here), which a process that starts many registries (the
    test suite) paid at every start; old garbage frozen with the rest is collected once unfrozen."""
    started = time.perf_counter()
    gc.collect(1)
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info(
        "froze %d start-up objects out of the garbage collector's view in %.0f ms (VISION_GC_FREEZE)",
        frozen,
        (time.perf_counter() - started) * 1000,
    )
    return frozen


def registry_from_settings(model_settings: ModelSettings, server_settings: ServerSettings) -> ModelRegistry:
    """The registry of every model the settings name (VISION_MODELS, else the whole repository),
    with VISION_MODEL_NAME as the default; built, not loaded."""
    from visionserve.runtimes import models_from_settings

    runtimes, pipelines = models_from_settings(model_settings)
    return ModelRegistry(runtimes, server_settings, default=model_settings.model_name, pipelines=pipelines)
