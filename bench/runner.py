"""One whole benchmark run: for each runtime, each model's in-process limit (thread layouts) and
pipeline stages, and the served processes (HTTP, gRPC; batching on/off; the first model alone;
overload; the baseline) under closed-loop load at each concurrency level and streaming, on the
same images with the same settings, measured in turns (`rounds`). With `url` / `grpc_target` the
served rows are those of a running deployment instead (`external`).

`run_benchmark` is the entry point of scripts and notebooks as well as of the command line. Called
where an event loop is running (a notebook's kernel), it runs in a thread of its own and the call
waits for it: the harness drives its own event loop. The measurement is least disturbed in a
process of its own (`python -m bench --output DIR`, then read `DIR/bench.json` or
`DIR/bench.csv`), but the kernel is idle while the call waits, so little is lost in-process.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.clip import describe_clip
from bench.config import BenchConfig
from bench.external import run_external
from bench.face_images import group_image, one_face_image
from bench.facts import local_facts
from bench.groups import baseline_process, served_groups
from bench.images import file_image
from bench.machine import describe_machine
from bench.measure import measure_runtime
from bench.pipeline_rows import LIMIT_LEVELS, pipeline_levels
from bench.plans import split_requests
from bench.progress import ProgressBar
from bench.report import BenchReport
from bench.server_env import model_env
from bench.steps import TaskSteps
from bench.subjects import (
    PIPELINE_TASK,
    BenchModel,
    ImageSets,
    InProcess,
    InProcessPipeline,
    check_images,
    runtime_label,
)
from bench.variants import prepare_repository
from visionserve.cpu import available_cpus
from visionserve.repository import ModelEntry, ModelRepository, PipelineEntry
from visionserve.settings import ModelSettings

__all__ = ["BenchConfig", "run_benchmark", "runtime_label", "split_requests"]


def run_benchmark(config: BenchConfig, *, progress: ProgressBar | None = None) -> BenchReport:
    """Measure what `config` asks (every backend's servers and in-process rows, or a running
    deployment) and return the report; nothing is written (`BenchReport.write` does that).

    Raises `ServerError` (a server did not start), `DeploymentError` (a target is not ready),
    `ConfigurationError`, `FileNotFoundError`, `ExportError` (a model could not be exported) or
    `ValueError` (a setting or input is wrong)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run(config, progress)
    # NOTE: asyncio.Runner refuses to start inside a running loop (a notebook's kernel), and the
    # harness needs its own (uvloop where installed); so the run gets a thread, and this waits.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="visionserve-bench") as pool:
        return pool.submit(_run, config, progress).result()


def image_sets(config: BenchConfig) -> ImageSets:
    """`--image FILE` as it is, or the sets of `--images` (made on first use)."""
    return ImageSets(config.images, file_image(config.image) if config.image else None)


def describe_images(sets: ImageSets, models: list[BenchModel], fps: float) -> list[str]:
    """The images sent, for the report: each photo, and the clip in one line."""
    described: list[str] = []
    for kind in dict.fromkeys(sets.kind(model.task) for model in models):
        users = [model for model in models if sets.kind(model.task) == kind]
        if kind == "clip":
            names = ", ".join(model.name for model in users)
            described.append(f"clip ({names}): {describe_clip(users[0].images, fps)}")
        else:
            # the photos once, though a pipeline is sent them too (and its group image)
            described += [image.describe() for image in users[0].images if image.describe() not in described]
    return described


def _run(config: BenchConfig, progress: ProgressBar | None) -> BenchReport:
    bar = progress or ProgressBar()
    sets = image_sets(config)
    if config.external:
        return run_external(config, sets, bar)
    names = config.resolved_models()
    repository = prepare_repository(Path(config.model_repository), names, config.output, note=bar.note)
    local = ModelRepository(repository)
    pipelines = {name: local.get_pipeline(name) for name in names if local.is_pipeline(name)}
    entries = {name: local.get(name) for name in names if name not in pipelines}
    detectors = {name: local.get(pipeline.config.stages.detector) for name, pipeline in pipelines.items()}
    server_settings = config.server_settings()
    pixels = server_settings.max_image_pixels
    steps: dict[str, TaskSteps] = {}
    for name, entry in entries.items():
        steps[name] = check_images(
            sets.for_task(entry.config.task), TaskSteps.of(entry, max_image_pixels=pixels)
        )
    for detector in detectors.values():  # a pipeline's images go through its detector first
        check_images(sets.for_task(PIPELINE_TASK), TaskSteps.of(detector, max_image_pixels=pixels))
    first = config.model_settings(config.backends[0], names[0]).model_copy(
        update={"model_repository": repository}
    )
    described = {name: pipelines.get(name) or entries[name] for name in names}
    report = BenchReport(
        machine=describe_machine(device=first.device),
        settings=local_facts(config, described, first, repository),
        tasks={name: entry.config.task for name, entry in described.items()},
        stream_fps=config.clip_fps if {"pacedstream", "livestream"} & set(config.stream_endpoints) else None,
    )
    baseline_backend = "onnx" if "onnx" in config.backends else config.backends[0]
    classifiers = [name for name, entry in entries.items() if entry.config.task == "classification"]
    for backend in config.backends:
        models = []
        for name in names:
            settings = config.model_settings(backend, name).model_copy(
                update={"model_repository": repository}
            )
            if name in pipelines:
                pipeline = in_process_pipeline(config, pipelines[name], detectors[name], settings)
                images = sets.for_task(PIPELINE_TASK)
                models.append(BenchModel.of(name, PIPELINE_TASK, images, None, pipeline))
                continue
            entry = entries[name]
            in_process = InProcess(
                entry=entry,
                steps=steps[name],
                settings=settings,
                layouts=config.resolved_layouts(),
                max_batch=_max_batch(server_settings.max_batch_size, entry),
                torch_eager=config.torch_eager,
            )
            models.append(BenchModel.of(name, steps[name].name, sets.for_task(steps[name].name), in_process))
        settings = config.model_settings(backend, names[0]).model_copy(
            update={"model_repository": repository}
        )
        env = {**model_env(settings), **config.server_env}
        baseline = None
        if config.baseline and backend == baseline_backend and classifiers:
            baseline = baseline_process(
                config, repository=repository, model_name=classifiers[0], threads=available_cpus()
            )
        elif config.baseline and not classifiers and not report.notes:
            report.notes.append(
                "baseline: not measured (seed 004's endpoint serves a classifier; none is measured)"
            )
        rows, layout_rows, stages = measure_runtime(
            config,
            label=runtime_label(settings),
            groups=served_groups(config, backend, env, names),
            models=models,
            bar=bar,
            baseline=baseline,
            baseline_model=classifiers[0] if classifiers else "",
        )
        report.rows += rows
        report.layouts += layout_rows
        report.face_stages += stages
        if not report.images:
            report.images = describe_images(sets, models, config.clip_fps)
    return report


def in_process_pipeline(
    config: BenchConfig, entry: PipelineEntry, detector: ModelEntry, settings: ModelSettings
) -> InProcessPipeline:
    """What a pipeline's in-process rows run (`pipeline_rows`): a registry of it and its stages,
    with the served processes' settings; its limit over `LIMIT_LEVELS` and the run's levels (none
    with `--layouts none`), its faces/s at the run's levels."""
    server = config.server_settings()
    limit = LIMIT_LEVELS if config.resolved_layouts() else ()
    return InProcessPipeline(
        entry=entry,
        settings=settings.model_copy(update={"models": entry.name, "model_name": entry.name}),
        server=server,
        levels=pipeline_levels(limit, config.concurrency),
        face_levels=config.concurrency,
        max_batch=_max_batch(server.max_batch_size, detector),
        one_face=one_face_image(),
        many_faces=group_image(),
    )


def _max_batch(setting: int | None, entry: ModelEntry) -> int:
    """The largest batch the served process computes: `VISION_MAX_BATCH_SIZE`, else the model's."""
    return min(setting, entry.config.max_batch_size) if setting else entry.config.max_batch_size
