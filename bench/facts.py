"""The settings a report's header states: what was measured, how, and with which configuration,
for a run that starts its own servers (`local_facts`) and, piece by piece, for one that measures
a deployment (`external`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import grpc

from bench.config import HTTP_CLIENTS, BenchConfig
from bench.face_images import GROUP_FACES, GROUP_NAME
from bench.http_load import event_loop_name
from bench.images import DEFAULT_LONG_SIDE, DEFAULT_QUALITY
from bench.layouts import PIPELINE as LIMIT_PIPELINE
from bench.layouts import Layout
from bench.pipeline_rows import LIMIT_LEVELS, pipeline_levels
from visionserve.cpu import available_cpus
from visionserve.repository import ModelEntry, PipelineEntry
from visionserve.settings import ModelSettings


def images_fact(config: BenchConfig) -> str:
    """What was sent."""
    if config.image:
        return "--image as is"
    photos = f"every packaged photo, longer side {DEFAULT_LONG_SIDE} px, JPEG quality {DEFAULT_QUALITY}"
    clip = "the clip's frames (bench.clip: pans over the packaged photos, 640x480 JPEG)"
    faces = (
        f"the photos and {GROUP_NAME} (bench.face_images: the astronaut's face pasted {GROUP_FACES} times)"
    )
    return {
        "photos": photos,
        "clip": clip,
        "auto": f"a classifier: {photos}; a detector: {clip}; a face_expression pipeline: {faces}",
    }[config.images]


def load_facts(config: BenchConfig) -> dict[str, object]:
    """How hard each row was loaded."""
    return {
        "concurrency": list(config.concurrency),
        "requests_per_row": config.requests,
        "duration_bound_s": config.duration_s,
        "warmup_per_row": config.warmup,
        "rounds": f"{config.rounds} (every row takes a turn each round)",
    }


def limit_fact(config: BenchConfig, layouts: tuple[Layout, ...]) -> str:
    """How the in-process limit was measured."""
    if not layouts:
        return "not measured (--layouts none)"
    return (
        f"{LIMIT_PIPELINE}, layouts {', '.join(layout.label for layout in layouts)} (W preprocessing "
        f"threads, which also postprocess, x T intra-op threads), each model's max batch, "
        f"{config.requests or 'unbounded'} images each, capped at {config.limit_cap_s:g} s"
    )


def pipeline_fact(config: BenchConfig) -> str:
    """How a pipeline's in-process rows were measured (`pipeline_rows`, `face_stage`)."""
    levels = pipeline_levels(LIMIT_LEVELS if config.resolved_layouts() else (), config.concurrency)
    limit = (
        f"limit = the best of c={','.join(map(str, levels))}: the registry (the served processes' "
        "settings) in the harness's process, FaceExpressionModel.predict from N concurrent "
        "coroutines, closed loop, the same images, no protocol; capped like a layout"
        if levels
        else "no limit (--layouts none)"
    )
    return (
        f"{limit}; the same calls at c={','.join(map(str, config.concurrency))} on the images and "
        f"on {GROUP_NAME} alone (faces/s); the classifier stage on the astronaut (1 face) and "
        f"{GROUP_NAME}, one request at a time"
    )


def client_facts(config: BenchConfig, *, where: str, read_ahead: str) -> dict[str, object]:
    """The clients: `where` they ran (e.g. `same machine`), the stream's window against the
    server's `read_ahead`, and the baseline where there is one."""
    loop = event_loop_name()
    facts: dict[str, object] = {
        "http_client": f"{HTTP_CLIENTS[config.client]}, {where}, keep-alive, closed loop, {loop}",
        "latency_unit": "milliseconds; req/s = completed requests / wall time",
    }
    if config.grpc_endpoints:
        facts["grpc_client"] = (
            f"grpc.aio {grpc.__version__}, {where}, one channel (one HTTP/2 connection) per "
            f"process, unary closed loop, {event_loop_name()}"
        )
    if "stream" in config.grpc_endpoints:
        facts["grpc_stream"] = (
            f"one PredictStream call per round, frames back to back with at most "
            f"{config.resolved_stream_window()} unanswered (server read-ahead {read_ahead}); "
            "latency = frame written -> its answer; req/s = frames/s"
        )
    if {"pacedstream", "livestream"} & set(config.grpc_endpoints):
        facts["paced_streams"] = (
            f"one PredictStream (in order) / PredictLive (live) call per round, a frame captured "
            f"every {1e3 / config.clip_fps:.1f} ms ({config.clip_fps:g} frames/s, a camera); "
            "latency = frame captured -> its answer; req/s = frames computed per second; live "
            "frames superseded by a newer one are answered skipped (counted, not timed)"
        )
    if config.baseline:
        facts["baseline"] = (
            "seed 004's plain endpoint (python -m bench.baseline): sync def FastAPI "
            "POST /predict, Pillow decode, resize to the input size, batch 1, ONNX Runtime with "
            f"{available_cpus()} intra-op threads (the usable cores) and spinning off, uvicorn, one process"
        )
    return facts


def models_fact(
    config: BenchConfig, entries: Mapping[str, ModelEntry | PipelineEntry], repository: Path
) -> str:
    """The models measured: name, task, input size (a pipeline: its stages), where from."""
    parts = []
    for number, (name, entry) in enumerate(entries.items()):
        default = ", the servers' default" if number == 0 else ""
        if isinstance(entry, PipelineEntry):
            stages = entry.config.stages
            parts.append(f"{name} ({entry.config.task}: {stages.detector} -> {stages.classifier}{default})")
            continue
        height, width = entry.config.input.size
        parts.append(f"{name} ({entry.config.task}, {width}x{height}{default})")
    where = (
        ""
        if repository == Path(config.model_repository)
        else f" (run repository {repository}: links and exports)"
    )
    return ", ".join(parts) + where


def local_facts(
    config: BenchConfig,
    entries: Mapping[str, ModelEntry | PipelineEntry],
    first: ModelSettings,
    repository: Path,
) -> dict[str, object]:
    """The header of a run whose servers the harness started: every setting they were given."""
    server = config.server_settings()
    delay = (
        f"{server.max_queue_delay_us} us"
        if server.max_queue_delay_us is not None
        else "each model's max_queue_delay_us (config.json)"
    )
    max_batch = server.max_batch_size or "each model's max_batch_size (config.json)"
    names = list(entries)
    pipelines = [entry for entry in entries.values() if isinstance(entry, PipelineEntry)]
    stages = "; a pipeline's stages with it" if pipelines else ""
    facts: dict[str, object] = {
        "models": models_fact(config, entries, repository),
        "served": f"every model by every served process{stages}"
        + (f"; {names[0]} also alone (processes of its own)" if config.coserving and len(names) > 1 else ""),
        "images": images_fact(config),
        "request_parameters": "classification: topk=5; detection: none (the model's thresholds)"
        + ("; face_expression: none (the pipeline's defaults)" if pipelines else ""),
        "device": first.device,
        "runtime_threads": first.resolved_threads(),
        "runtime_instances": first.instances or 1,
        "server_preprocess_workers": server.resolved_preprocess_workers(),
        "torch_compile": first.torch_compile,
        "onnx_allow_spinning": first.onnx_allow_spinning,
        "batching": ", ".join(config.batching)
        + f" (on: max batch {max_batch}, max queue delay {delay}; off: VISION_MAX_BATCH_SIZE=1)",
        "server_env": dict(config.server_env),
        **load_facts(config),
        "in_process_limit": limit_fact(config, config.resolved_layouts()),
        "in_process_stages": "batch 1, one image after another",
        **({"pipeline_in_process": pipeline_fact(config)} if pipelines else {}),
        **client_facts(
            config, where="same machine", read_ahead=str(config.grpc_settings().stream_read_ahead)
        ),
    }
    if config.overload:
        facts["overload"] = (
            f"{config.overload_concurrency} closed-loop senders, VISION_MAX_QUEUE_SIZE="
            f"{config.overload_queue_size}, on {', '.join(config.overload_endpoints)}; a refused "
            + (
                f"sender waits {config.overload_backoff_ms:g} ms before its next request"
                if config.overload_backoff_ms
                else "sender retries at once"
            )
        )
    return facts
