"""One whole benchmark run: for each runtime, the in-process limit (thread layouts) and pipeline
stages, and the served processes (HTTP, gRPC; batching on/off; overload; the baseline) under
closed-loop load at each concurrency level, on the same images with the same settings, measured
in turns (`rounds`). With `url` / `grpc_target` the served rows are those of a running
deployment instead (`external`).

`run_benchmark` is the entry point of scripts and notebooks as well as of the command line. Called
where an event loop is running (a notebook's kernel), it runs in a thread of its own and the call
waits for it: the harness drives its own event loop. The measurement is least disturbed in a
process of its own (`python -m bench --output DIR`, then read `DIR/bench.json` or
`DIR/bench.csv`), but the kernel is idle while the call waits, so little is lost in-process.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from bench.config import BenchConfig
from bench.external import run_external
from bench.facts import local_facts
from bench.images import BenchImage, default_images, file_image
from bench.machine import describe_machine
from bench.measure import InProcess, check_images, measure_runtime, runtime_label
from bench.plans import baseline_process, served_groups, split_requests
from bench.progress import ProgressBar
from bench.report import BenchReport
from bench.servers import model_env
from visionserve.cpu import available_cpus
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import ModelRepository

__all__ = ["BenchConfig", "run_benchmark", "runtime_label", "split_requests"]


def load_images(config: BenchConfig) -> list[BenchImage]:
    """`--image FILE` as it is, or every packaged photo as a 600 px JPEG."""
    return [file_image(config.image)] if config.image else default_images()


def run_benchmark(config: BenchConfig, *, progress: ProgressBar | None = None) -> BenchReport:
    """Measure what `config` asks (every backend's servers and in-process rows, or a running
    deployment) and return the report; nothing is written (`BenchReport.write` does that).

    Raises `ServerError` (a server did not start), `DeploymentError` (a target is not ready),
    `ConfigurationError`, `FileNotFoundError` or `ValueError` (a setting or input is wrong)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run(config, progress)
    # NOTE: asyncio.Runner refuses to start inside a running loop (a notebook's kernel), and the
    # harness needs its own (uvloop where installed); so the run gets a thread, and this waits.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="visionserve-bench") as pool:
        return pool.submit(_run, config, progress).result()


def _run(config: BenchConfig, progress: ProgressBar | None) -> BenchReport:
    bar = progress or ProgressBar()
    images = load_images(config)
    if config.external:
        return run_external(config, images, bar)
    server_settings = config.server_settings()  # as the served processes read it
    first = config.model_settings(config.backends[0])
    entry = ModelRepository(first.model_repository).get(first.model_name)
    preprocessor = ImagePreprocessor(entry.config.input, max_image_pixels=server_settings.max_image_pixels)
    check_images(images, preprocessor)
    max_batch = server_settings.max_batch_size or entry.config.max_batch_size
    report = BenchReport(
        machine=describe_machine(device=first.device),
        settings=local_facts(config, entry, first, max_batch),
        images=[image.describe() for image in images],
    )
    baseline_backend = "onnx" if "onnx" in config.backends else config.backends[0]
    for backend in config.backends:
        settings = config.model_settings(backend)
        env = {**model_env(settings), **config.server_env}
        baseline = None
        if config.baseline and backend == baseline_backend:
            baseline = baseline_process(config, model_name=settings.model_name, threads=available_cpus())
        rows, layout_rows = measure_runtime(
            config,
            label=runtime_label(settings),
            groups=served_groups(config, backend, env),
            baseline=baseline,
            in_process=InProcess(
                entry=entry,
                preprocessor=preprocessor,
                settings=settings,
                layouts=config.resolved_layouts(),
                max_batch=max_batch,
                torch_eager=config.torch_eager,
            ),
            images=images,
            bar=bar,
            model_name=settings.model_name,
        )
        report.rows += rows
        report.layouts += layout_rows
    return report
