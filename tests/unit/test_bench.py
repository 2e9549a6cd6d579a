"""The benchmark harness: statistics, report, closed-loop senders (against real sockets: HTTP and
gRPC servers over FakeRuntime on port 0)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import io
import itertools
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from bench.__main__ import parse_args, parse_concurrency
from bench.baseline import PlainClassifier, create_baseline_app
from bench.clip import CLIP_PHOTOS, describe_clip, make_clip, pan
from bench.closed_loop import RequestFailed, run_closed_loop
from bench.csvfile import COLUMNS as CSV_COLUMNS
from bench.csvfile import KEY_COLUMNS, write_csv
from bench.deployment import DeployedModel
from bench.face_images import GROUP_BACKGROUND, face_photos, group_image, one_face_image
from bench.face_stage import StageCost
from bench.facts import local_facts
from bench.groups import ServedGroup, served_groups
from bench.grpc_load import (
    HEALTH,
    STREAM,
    UNARY,
    V2_UNARY,
    grpc_channel,
    grpc_sender,
    health_sender,
    message_fields,
    v2_grpc_sender,
)
from bench.http_load import (
    CLASSIFY,
    HttpRequestSpec,
    event_loop_runner,
    file_request,
    json_request,
    live_request,
    measure_http,
    v2_request,
)
from bench.images import BenchImage, default_images, file_image
from bench.inprocess import STAGES, PipelineTimer, measure_pipeline, merge_pipeline
from bench.layouts import Layout, LayoutMeasurement, default_layouts, measure_layout
from bench.machine import cpu_model, describe_machine
from bench.pipeline_rows import LIMIT_LEVELS, PIPELINE_TARGET, pipeline_levels
from bench.plans import build_plans
from bench.plot import plot_throughput, plotted_rows, stream_rows
from bench.processes import ProcessesConfig
from bench.processes_report import LayoutResult, ProcessesReport, ProcessFigures
from bench.progress import ProgressBar
from bench.raw_http import RawHttpClient
from bench.report import (
    BASELINE,
    GRPC,
    GRPC_STREAM,
    HTTP,
    IN_PROCESS,
    ONNX_GRPC_TARGET_MS,
    ONNX_TARGET_MS,
    BenchReport,
    LayoutRow,
    ResultRow,
)
from bench.runner import BenchConfig, split_requests
from bench.senders import Clients
from bench.server_env import parse_server_env
from bench.server_metrics import BATCH_SIZE, Histogram, MetricsSnapshot, ServerFigures, parse_metrics
from bench.servers import (
    CombinedServerProcess,
    GrpcServerProcess,
    ServerError,
    ServerProcess,
    banner_url,
    grpc_banner_target,
    grpc_metrics_url,
    model_env,
)
from bench.stats import Measurement, percentile, summarize
from bench.steps import TaskSteps, describe_steps, request_parameters
from bench.stream_load import measure_paced, measure_stream
from bench.subjects import BenchModel, ImageSets
from bench.targets import check_targets
from bench.variants import Variant, parse_variant, prepare_repository
from tests.conftest import encode, photo_bytes, wait_ready
from tests.fixtures import (
    FailingRuntime,
    FakeDetectorRuntime,
    FakeRuntime,
    SlowRuntime,
    app_of,
    grpc_server_of,
    write_fake_detector,
    write_fake_entry,
)
from visionserve.errors import VisionError
from visionserve.metrics import Metrics
from visionserve.photos import packaged_photos
from visionserve.repository import ModelEntry, ModelRepository
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import GrpcSettings, ModelSettings, ServerSettings
from visionserve.tasks.boxes import Letterbox

T = TypeVar("T")

# --- statistics ---------------------------------------------------------------------------------


def test_percentiles_of_known_data_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("q", [1, 25, 50, 90, 95, 99, 99.9])
def test_percentiles_agree_with_numpy(q: float) -> None:
    values = sorted(np.random.default_rng(0).lognormal(size=257).tolist())
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_no_data_and_bad_q() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_summary_converts_seconds_to_milliseconds() -> None:
    summary = summarize([0.003, 0.001, 0.002, 0.004])  # seconds, unsorted
    assert summary.count == 4
    assert summary.min_ms == pytest.approx(1.0)
    assert summary.p50_ms == pytest.approx(2.5)
    assert summary.mean_ms == pytest.approx(2.5)
    assert summary.max_ms == pytest.approx(4.0)
    assert summary.p99_ms == pytest.approx(3.97)


def test_measurement_counts_failures_apart_from_latencies() -> None:
    m = Measurement(latencies_s=(0.01, 0.02), wall_s=0.5, errors={"HTTP 503": 3})
    assert (m.completed, m.failed, m.sent) == (2, 3, 5)
    assert m.throughput_rps == pytest.approx(4.0)  # completed / wall time; failures do not count
    summary = m.summary()
    assert summary is not None and summary.count == 2
    assert Measurement(latencies_s=(), wall_s=1.0, errors={"ConnectError": 1}).summary() is None


def test_parts_of_a_measurement_merge_into_one() -> None:
    first = Measurement(latencies_s=(0.01,), wall_s=0.5, errors={"HTTP 503": 1})
    second = Measurement(latencies_s=(0.02, 0.03), wall_s=1.5, errors={"HTTP 503": 2, "ReadTimeout": 1})
    merged = Measurement.merged([first, second])
    assert merged.latencies_s == (0.01, 0.02, 0.03)
    assert merged.wall_s == 2.0
    assert merged.errors == {"HTTP 503": 3, "ReadTimeout": 1}
    assert merged.throughput_rps == pytest.approx(1.5)


def test_requests_are_spread_evenly_over_rounds() -> None:
    assert split_requests(300, 5) == [60] * 5
    assert split_requests(52, 5) == [11, 11, 10, 10, 10]
    assert split_requests(2, 3) == [1, 1, 0]
    assert split_requests(None, 2) == [None, None]


# --- report -------------------------------------------------------------------------------------


def _report() -> BenchReport:
    pipeline = Measurement(latencies_s=(0.010, 0.011, 0.012), wall_s=0.033)
    stages = {name: (0.0025, 0.00275, 0.003) for name in STAGES}
    served = Measurement(latencies_s=(0.0115, 0.0125, 0.0135), wall_s=0.0375, errors={"HTTP 503": 1})
    slow = Measurement(latencies_s=(0.020, 0.021, 0.022), wall_s=0.063)
    unary = Measurement(latencies_s=(0.0115, 0.0118, 0.0121), wall_s=0.0354)
    floor = Measurement(latencies_s=(0.0008, 0.0009, 0.001), wall_s=0.0027)
    stream = Measurement(latencies_s=(0.05, 0.06, 0.07), wall_s=0.04)
    return BenchReport(
        machine={"date": "2030-01-01T00:00:00+00:00", "cpu": "Test CPU", "usable_cores": "2", "torch": "9.9"},
        settings={"model": "fake", "torch_compile": True, "warmup_per_row": 30},
        rows=[
            ResultRow("onnx", IN_PROCESS, "pipeline", 1, pipeline, stages_s=stages),
            ResultRow("onnx", HTTP, "POST /predict/file (multipart)", 1, served),
            ResultRow("onnx", HTTP, "POST /predict (JSON base64)", 1, slow),
            ResultRow("onnx", HTTP, "GET /health/live (HTTP floor)", 1, served, model_work=False),
            ResultRow("onnx", GRPC, UNARY, 1, unary),
            ResultRow("onnx", GRPC, HEALTH, 1, floor, model_work=False),
            ResultRow("onnx", GRPC_STREAM, STREAM, 1, stream),
            ResultRow("torch eager", HTTP, "POST /predict/file (multipart)", 1, slow),
        ],
    )


def test_markdown_report_has_header_units_and_rows() -> None:
    text = _report().to_markdown()
    assert "- date: 2030-01-01T00:00:00+00:00" in text
    assert "Test CPU, 2 usable cores" in text
    assert "torch 9.9" in text
    assert "- torch compile: on" in text
    assert (
        "| runtime | model | mode | measured | batching | conc. | ok | failed | p50 ms | p95 ms | p99 ms "
        "| max ms | req/s | × limit | mean batch | queue p50 ms | queue p99 ms |" in text
    )
    # in-process: p50 11 ms, p95 11.9, p99 11.98, max 12, 3 / 0.033 s = 90.9 req/s
    assert (
        "| onnx | – | in-process | pipeline | – | 1 | 3 | 0 | 11.00 | 11.90 | 11.98 | 12.00 | 90.9 | – |"
        in text
    )
    assert "| onnx | – | 2.75 | 2.75 | 2.75 | 2.75 | 11.00 |" in text  # stage p50s
    assert "- onnx HTTP POST /predict/file (multipart) c=1: HTTP 503 ×1" in text
    # served p50 12.5 - in-process p50 11 = +1.5 ms: within the 2 ms goal; JSON +10 ms is not
    assert "| onnx | – | POST /predict/file (multipart) | 12.50 | 11.00 | +1.50 | ≤ 2 ms: met |" in text
    assert "| onnx | – | POST /predict (JSON base64) | 21.00 | 11.00 | +10.00 | ≤ 2 ms: missed |" in text
    assert "health/live (HTTP floor) | 12.50" not in text  # the floor is not compared
    # gRPC unary: p50 11.8 - 11 = +0.8 ms, within its own 1 ms goal; its floor and the stream are
    # not compared (the stream's latencies include queueing; its req/s is frames/s)
    assert f"| onnx | – | {UNARY} | 11.80 | 11.00 | +0.80 | ≤ 1 ms: met |" in text
    assert f"| onnx | – | {GRPC_STREAM} | {STREAM} | – | 1 | 3 | 0 | 60.00 |" in text
    # the stream's own table: 3 frames sent and computed in 0.04 s
    assert f"| onnx | – | {STREAM} | – | 3 | 3 | 0 | 0 | 75.0 | – | 60.00 | 69.80 | 70.00 |" in text
    assert text.count(f"| {STREAM} |") == 2 and text.count(f"| {HEALTH} |") == 1
    assert "req/s is the frames computed per second" in text
    assert "seconds" not in text.split("| runtime |")[1]  # every latency column is in ms


def test_overheads_compare_only_served_model_work_with_its_own_runtime() -> None:
    overheads = _report().overheads()
    assert [(o.runtime, o.mode, o.target) for o in overheads] == [
        ("onnx", HTTP, "POST /predict/file (multipart)"),
        ("onnx", HTTP, "POST /predict (JSON base64)"),
        ("onnx", GRPC, UNARY),
    ]  # torch eager has no in-process row here, the floors run no model, the stream is throughput
    assert overheads[0].target_ms == ONNX_TARGET_MS
    assert overheads[2].target_ms == ONNX_GRPC_TARGET_MS == 1.0
    assert overheads[0].met is True and overheads[1].met is False and overheads[2].met is True


def test_json_report_is_plain_json_in_milliseconds(tmp_path: Path) -> None:
    paths = _report().write(tmp_path / "out")
    # one level: no throughput plot; a stream row: its latency plot
    assert sorted(p.name for p in paths) == ["bench.csv", "bench.json", "bench.md", "streams.png"]
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["units"]["latency"] == "ms"
    first = data["results"][0]
    assert first["latency_ms"]["p50_ms"] == pytest.approx(11.0)
    assert first["latencies_ms"] == pytest.approx([10.0, 11.0, 12.0])
    assert first["stages_ms"]["decode"]["p50_ms"] == pytest.approx(2.75)
    served = data["results"][1]
    assert (served["sent"], served["completed"], served["failed"]) == (4, 3, 1)
    assert served["errors"] == {"HTTP 503": 1}
    assert data["overhead"][0]["difference_ms"] == pytest.approx(1.5)
    assert data["overhead"][2]["mode"] == "gRPC" and data["overhead"][2]["target_ms"] == 1.0
    assert (tmp_path / "out" / "bench.md").read_text().startswith("## visionserve benchmark")


def test_a_row_where_every_request_failed_is_reported_without_latencies() -> None:
    failed = Measurement(latencies_s=(), wall_s=0.1, errors={"ConnectError": 5})
    report = BenchReport(machine={}, settings={}, rows=[ResultRow("onnx", HTTP, "x", 1, failed)])
    assert "| onnx | – | HTTP | x | – | 1 | 0 | 5 | – | – | – | – | 0.0 | – |" in report.to_markdown()
    assert report.to_dict()["results"][0]["latency_ms"] is None  # type: ignore[index]


# --- machine, servers, command line ---------------------------------------------------------------


def test_machine_facts_name_cpu_cores_and_versions(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU @ 3.00GHz\n")
    assert cpu_model(cpuinfo) == "Example CPU @ 3.00GHz"
    facts = describe_machine()
    for key in ("date", "cpu", "usable_cores", "python", "torch", "onnxruntime", "numpy", "pillow"):
        assert facts[key], key


def test_banner_url_is_read_from_the_service_banner() -> None:
    banner = "\nvisionserve HTTP API (onnx, model m) on http://127.0.0.1:43211\n  docs:   http://x/docs\n"
    assert banner_url("INFO starting\n" + banner) == "http://127.0.0.1:43211"
    assert banner_url("INFO loading model\n") is None


def test_grpc_target_is_read_from_the_grpc_banner() -> None:
    banner = (
        "\nvisionserve gRPC API (onnx, model m) on 127.0.0.1:50123\n"
        "  list:   grpcurl -plaintext 127.0.0.1:50123 list\n"
    )
    assert grpc_banner_target("INFO starting\n" + banner) == "127.0.0.1:50123"
    assert grpc_banner_target("visionserve HTTP API (onnx, model m) on http://127.0.0.1:1\n") is None
    assert grpc_banner_target("INFO loading model\n") is None


def test_served_process_gets_the_in_process_settings(tmp_path: Path) -> None:
    settings = ModelSettings(backend="torch", model_repository=tmp_path, threads=3, torch_compile=False)
    env = model_env(settings)
    assert env["VISION_BACKEND"] == "torch"  # the gRPC server picks its runtime from it
    assert env["VISION_THREADS"] == "3"
    assert env["VISION_TORCH_COMPILE"] == "false"
    assert env["VISION_MODEL_REPOSITORY"] == str(tmp_path.resolve())


def test_served_process_keeps_its_default_layout_when_no_threads_are_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --threads: no VISION_THREADS for the server, which then runs its default layout (as the
    in-process measurement does from the same settings), instead of a fixed one."""
    monkeypatch.delenv("VISION_THREADS", raising=False)
    env = model_env(ModelSettings(backend="onnx", model_repository=tmp_path))
    assert "VISION_THREADS" not in env and "VISION_INSTANCES" not in env


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    server = ServerProcess(
        "onnx", env={"VISION_MODEL_REPOSITORY": str(tmp_path / "empty")}, log_path=tmp_path / "server.log"
    )
    with pytest.raises(ServerError, match=r"exited with status 2 while starting(.|\n)*no model"):
        server.start()


def test_a_grpc_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    server = GrpcServerProcess(
        "torch", env={"VISION_MODEL_REPOSITORY": str(tmp_path / "empty")}, log_path=tmp_path / "grpc.log"
    )
    assert server.module == "grpc_server" and server.listen_env()["VISION_BACKEND"] == "torch"
    assert server.listen_env()["VISION_GRPC_PORT"] == "0"
    with pytest.raises(ServerError, match=r"grpc_server exited with status 2 while starting(.|\n)*no model"):
        server.start()


@pytest.mark.real_model
def test_the_real_service_starts_on_a_free_port_serves_and_stops(
    real_repository: Path, tmp_path: Path
) -> None:
    settings = ModelSettings(backend="onnx", model_repository=real_repository)
    server = ServerProcess("onnx", env=model_env(settings), log_path=tmp_path / "server.log")
    with server:
        assert server.base_url.startswith("http://127.0.0.1:")
        spec = file_request(photo_bytes("chelsea.png"), "chelsea.png")
        result = asyncio.run(measure_http(server.base_url, spec, requests=5, warmup=1))
    assert (result.completed, result.failed) == (5, 0)
    assert server.stop() == 0  # SIGTERM: a graceful, clean exit


@pytest.mark.real_model
def test_the_real_grpc_service_starts_on_a_free_port_serves_and_stops(
    real_repository: Path, tmp_path: Path
) -> None:
    settings = ModelSettings(backend="onnx", model_repository=real_repository)
    server = GrpcServerProcess("onnx", env=model_env(settings), log_path=tmp_path / "grpc.log")
    image = photo_bytes("chelsea.png")

    async def measure() -> tuple[Measurement, Measurement]:
        async with grpc_channel(server.target) as channel:
            unary = await run_closed_loop(grpc_sender(channel, image), requests=5)
            return unary, await measure_stream(channel, image, frames=5)

    with server:
        assert server.target.startswith("127.0.0.1:")
        unary, stream = asyncio.run(measure())
    assert (unary.completed, unary.failed) == (5, 0)
    assert (stream.completed, stream.failed) == (5, 0)
    assert server.stop() == 0


def test_command_line_defaults_and_lists() -> None:
    config = parse_args(["--requests", "50", "--warmup", "10"])
    assert config.backends == ("onnx",)  # torch only when asked: it compiles each model for minutes
    assert (config.requests, config.warmup, config.concurrency, config.rounds) == (50, 10, (1, 16), 4)
    assert (config.batching, config.server_env, config.baseline, config.overload) == (
        ("on",),
        {},
        False,
        False,
    )
    # `make bench`: the classifier, the detector and its 320 variant, the face_expression pipeline;
    # their JSON and gRPC rows and the three streams
    assert config.resolved_models() == ("efficientnet_lite0", "yolo11n", "yolo11n_320", "face_expression")
    assert config.model_name == "efficientnet_lite0" and config.coserving and config.images == "auto"
    assert config.endpoints == ("json", "grpc", "stream", "pacedstream", "livestream")
    assert (config.http_endpoints, config.grpc_endpoints, config.stream_endpoints) == (
        ("json",),
        ("grpc", "stream", "pacedstream", "livestream"),
        ("stream", "pacedstream", "livestream"),
    )
    assert config.clip_fps == 30.0
    assert parse_args(["--model", "yolo11n, yolo11n"]).resolved_models() == ("yolo11n",)
    assert parse_args(["--backends", "onnx,torch"]).backends == ("onnx", "torch")
    assert config.stream_window is None and config.resolved_stream_window() == 8  # the read-ahead
    assert config.output == Path("bench-results")
    grpc_only = parse_args(["--endpoints", "stream,grpc", "--stream-window", "4"])
    assert (grpc_only.http_endpoints, grpc_only.grpc_endpoints) == ((), ("stream", "grpc"))
    assert grpc_only.stream_window == grpc_only.resolved_stream_window() == 4
    with pytest.raises(SystemExit):
        parse_args(["--endpoints", "file,websocket"])
    with pytest.raises(SystemExit):
        parse_args(["--stream-window", "0"])
    assert parse_args(["--requests", "0", "--duration", "5"]).requests is None
    with pytest.raises(SystemExit):
        parse_args(["--backends", "onnx,tensorflow"])
    with pytest.raises(SystemExit):
        parse_args(["--requests", "0"])  # unbounded
    with pytest.raises(ValueError, match="concurrency"):
        BenchConfig(concurrency=0)
    assert BenchConfig(concurrency=4).concurrency == (4,)  # one level as a number


# --- in-process pipeline (fake runtime) ---------------------------------------------------------


def test_pipeline_measurement_times_every_stage(tmp_path: Path) -> None:
    entry = write_fake_entry(tmp_path)
    runtime = FakeRuntime(entry)
    runtime.load()
    steps = TaskSteps.of(entry, max_image_pixels=10**7).checked(photo_bytes("chelsea.png"))
    assert steps.split is not None  # a classifier's decoding is timed apart
    timer = PipelineTimer(runtime, steps)
    result = measure_pipeline(timer, photo_bytes("chelsea.png"), requests=5, warmup=2)
    assert result.total.completed == 5
    assert len(runtime.batches) == 7 and runtime.batches[0] == (1, 3, 32, 32)  # warm-up + measured
    assert set(result.stages_s) == set(STAGES)
    merged = merge_pipeline([result, result])
    assert merged.total.completed == 10 and len(merged.stages_s["decode"]) == 10
    for i, total in enumerate(result.total.latencies_s):
        assert total == pytest.approx(sum(result.stages_s[s][i] for s in STAGES))
        assert all(result.stages_s[s][i] > 0 for s in STAGES)


# --- closed-loop senders ------------------------------------------------------------------------


def test_closed_loop_sends_exactly_the_requests_asked_with_bounded_concurrency() -> None:
    in_flight = 0
    peak = 0
    calls = 0

    async def send() -> None:
        nonlocal in_flight, peak, calls
        calls += 1
        number = calls
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        if number % 4 == 0:
            raise RequestFailed("HTTP 503")
        if number % 5 == 0:
            raise ConnectionResetError

    result = asyncio.run(run_closed_loop(send, concurrency=3, requests=40))
    assert calls == 40 and peak == 3
    assert result.sent == 40
    assert result.errors == {"HTTP 503": 10, "ConnectionResetError": 6}
    assert result.completed == 24 and all(latency > 0 for latency in result.latencies_s)


def test_closed_loop_stops_at_the_duration() -> None:
    async def send() -> None:
        await asyncio.sleep(0.005)

    result = asyncio.run(run_closed_loop(send, concurrency=2, duration_s=0.1))
    assert 0.1 <= result.wall_s < 5.0
    assert 2 <= result.completed <= 45  # each sender sends at least one; at most ~0.1 s / 5 ms each
    assert result.failed == 0


def test_closed_loop_needs_a_bound() -> None:
    async def send() -> None:
        pass

    with pytest.raises(ValueError, match="bound the run"):
        asyncio.run(run_closed_loop(send, concurrency=1))


def test_a_refused_sender_backs_off_before_its_next_request() -> None:
    sent: list[float] = []

    async def refused() -> None:
        sent.append(time.perf_counter())
        raise RequestFailed("HTTP 503")

    measurement = asyncio.run(run_closed_loop(refused, concurrency=1, requests=3, backoff_s=0.05))
    assert measurement.errors == {"HTTP 503": 3}
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert len(gaps) == 2 and min(gaps) >= 0.05
    sent.clear()
    asyncio.run(run_closed_loop(refused, concurrency=1, requests=3))  # no backoff: at once
    assert max(b - a for a, b in itertools.pairwise(sent)) < 0.05
    with pytest.raises(ValueError, match="backoff"):
        asyncio.run(run_closed_loop(refused, concurrency=1, requests=1, backoff_s=-1))


# --- HTTP senders against a real server on a real socket ------------------------------------------


READY = HttpRequestSpec(name="ready", method="GET", path="/health/ready")


@contextlib.asynccontextmanager
async def _served_fake_app(tmp_path: Path, keep_alive_s: int = 5) -> AsyncIterator[str]:
    """The real app over FakeRuntime, served by uvicorn on 127.0.0.1, port 0; yields its URL."""
    app = app_of(ServerSettings(), FakeRuntime(write_fake_entry(tmp_path)))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, lifespan="on", timeout_keep_alive=keep_alive_s
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn stopped while starting"
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        # readiness is a request like any other: measured with the same sender
        for _ in range(500):
            ready = await measure_http(url, READY, requests=1)
            if ready.completed:
                break
            await asyncio.sleep(0.01)
        yield url
    finally:
        server.should_exit = True
        await task


def test_http_senders_complete_every_request_over_keep_alive(tmp_path: Path) -> None:
    image = encode(Image.new("RGB", (48, 40), "teal"))

    async def scenario() -> list[Measurement]:
        async with _served_fake_app(tmp_path) as url:
            return [
                await measure_http(url, spec, concurrency=4, requests=40, warmup=4)
                for spec in (file_request(image, "x.png"), json_request(image), live_request())
            ]

    for result in asyncio.run(scenario()):
        assert result.sent == 40
        assert (result.completed, result.failed) == (40, 0)
        assert all(latency > 0 for latency in result.latencies_s)
        assert result.throughput_rps > 0


def test_http_failures_are_counted_not_timed(tmp_path: Path) -> None:
    async def scenario() -> Measurement:
        async with _served_fake_app(tmp_path) as url:
            bad = file_request(b"this is not an image", "x.png")
            return await measure_http(url, bad, concurrency=2, requests=10, warmup=2)

    result = asyncio.run(scenario())
    assert result.sent == 10
    assert result.errors == {"HTTP 400": 10}
    assert result.completed == 0 and result.latencies_s == ()


def test_a_server_that_is_gone_counts_transport_errors() -> None:
    async def scenario() -> Measurement:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            port = sock.getsockname()[1]
            return await measure_http(f"http://127.0.0.1:{port}", live_request(), requests=3, timeout_s=2)

    result = asyncio.run(scenario())
    assert result.sent == 3 and result.completed == 0
    assert result.errors == {"ConnectError": 3}
    assert math.isclose(result.throughput_rps, 0.0)


def test_raw_client_completes_every_request_and_counts_failures(tmp_path: Path) -> None:
    image = encode(Image.new("RGB", (48, 40), "teal"))

    async def scenario() -> list[Measurement]:
        async with _served_fake_app(tmp_path) as url:
            client = RawHttpClient(url, concurrency=3)
            try:
                return [
                    await run_closed_loop(client.sender(spec), concurrency=3, requests=30)
                    for spec in (
                        file_request(image, "x.png"),
                        json_request(image),
                        live_request(),
                        file_request(b"not an image", "x.png"),
                    )
                ]
            finally:
                await client.aclose()

    *good, bad = asyncio.run(scenario())
    for result in good:
        assert (result.sent, result.completed, result.failed) == (30, 30, 0)
        assert all(latency > 0 for latency in result.latencies_s)
    assert bad.errors == {"HTTP 400": 30} and bad.completed == 0


def test_raw_client_reconnects_when_the_server_closed_an_idle_connection(tmp_path: Path) -> None:
    async def scenario() -> tuple[Measurement, Measurement]:
        async with _served_fake_app(tmp_path, keep_alive_s=1) as url:
            client = RawHttpClient(url, concurrency=1)
            send = client.sender(live_request())
            first = await run_closed_loop(send, requests=2)
            await asyncio.sleep(1.6)  # past the server's keep-alive timeout: it closes the connection
            second = await run_closed_loop(send, requests=2)
            await client.aclose()
            return first, second

    first, second = asyncio.run(scenario())
    assert first.completed == 2 and second.completed == 2 and second.failed == 0


# --- gRPC senders against a real grpc.aio server on a real socket ---------------------------------


async def _with_fake_grpc_server(tmp_path: Path, scenario: Callable[[str], Awaitable[T]]) -> T:
    """Run `scenario(target)` against GrpcServer over FakeRuntime on 127.0.0.1, port 0."""
    server = grpc_server_of(
        GrpcSettings(port=0, metrics_port=0), ServerSettings(), FakeRuntime(write_fake_entry(tmp_path))
    )
    port = await server.start()
    try:
        assert server.loaded is not None
        await server.loaded
        return await scenario(f"127.0.0.1:{port}")
    finally:
        await server.stop(grace_s=1)


def test_grpc_senders_complete_every_call_and_count_failures(tmp_path: Path) -> None:
    image = encode(Image.new("RGB", (48, 40), "teal"))

    async def scenario(target: str) -> list[Measurement]:
        async with grpc_channel(target) as channel:
            return [
                await run_closed_loop(send, concurrency=3, requests=30)
                for send in (
                    grpc_sender(channel, image),
                    health_sender(channel),
                    grpc_sender(channel, b"not an image"),
                )
            ]

    good, floor, bad = asyncio.run(_with_fake_grpc_server(tmp_path, scenario))
    for result in (good, floor):
        assert (result.sent, result.completed, result.failed) == (30, 30, 0)
        assert all(latency > 0 for latency in result.latencies_s)
    assert bad.sent == 30 and bad.completed == 0
    assert bad.errors == {"gRPC INVALID_ARGUMENT": 30}


def test_v2_grpc_sender_infers_over_the_open_inference_protocol(tmp_path: Path) -> None:
    image = encode(Image.new("RGB", (48, 40), "teal"))

    async def scenario(target: str) -> list[Measurement]:
        async with grpc_channel(target) as channel:
            return [
                await run_closed_loop(send, concurrency=2, requests=10)
                for send in (
                    v2_grpc_sender(channel, image, "fake"),
                    v2_grpc_sender(channel, image, "no-such-model"),
                    v2_grpc_sender(channel, b"not an image", "fake"),
                )
            ]

    good, unknown, bad = asyncio.run(_with_fake_grpc_server(tmp_path, scenario))
    assert (good.sent, good.completed, good.failed) == (10, 10, 0)
    assert unknown.errors == {"gRPC NOT_FOUND": 10}
    assert bad.errors == {"gRPC INVALID_ARGUMENT": 10}


def test_v2_request_is_what_the_v2_http_route_accepts(tmp_path: Path) -> None:

    image = encode(Image.new("RGB", (48, 40), "teal"))
    spec = v2_request(image, "fake", topk=3)
    with TestClient(app_of(ServerSettings(), FakeRuntime(write_fake_entry(tmp_path)))) as client:
        wait_ready(client)
        reply = client.post(spec.path, content=spec.body, headers=dict(spec.headers))
    assert reply.status_code == 200, reply.text
    (output,) = reply.json()["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "BYTES"
    assert len(output["data"]) == 3 and output["data"][0].endswith(":9:class_9")  # value:index:label


def test_a_stream_answers_every_frame_and_measures_frames_per_second(tmp_path: Path) -> None:
    image = encode(Image.new("RGB", (48, 40), "teal"))

    async def scenario(target: str) -> list[Measurement]:
        async with grpc_channel(target) as channel:
            return [
                await measure_stream(channel, image, frames=40),
                await measure_stream(channel, image, frames=40, window=2),
                await measure_stream(channel, image, frames=0),
                await measure_stream(channel, b"not an image", frames=6),
                await measure_stream(channel, image, duration_s=0.2, window=4),
            ]

    free, windowed, none, bad, timed = asyncio.run(_with_fake_grpc_server(tmp_path, scenario))
    for result in (free, windowed):
        assert (result.sent, result.completed, result.failed) == (40, 40, 0)
        assert all(latency > 0 for latency in result.latencies_s)
        assert result.throughput_rps > 0
    assert (none.sent, none.wall_s) == (0, 0.0)
    assert bad.errors == {"frame invalid_image": 6} and bad.completed == 0
    assert timed.completed >= 1 and timed.failed == 0 and 0.15 <= timed.wall_s < 5.0


def test_grpc_calls_to_a_server_that_is_gone_are_counted_as_unavailable() -> None:
    image = encode(Image.new("RGB", (48, 40), "teal"))

    async def scenario() -> tuple[Measurement, Measurement]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            async with grpc_channel(f"127.0.0.1:{sock.getsockname()[1]}") as channel:
                unary = await run_closed_loop(grpc_sender(channel, image, timeout_s=5), requests=3)
                return unary, await measure_stream(channel, image, frames=3, frame_timeout_s=5)

    unary, stream = asyncio.run(scenario())
    assert (unary.sent, unary.completed, unary.errors) == (3, 0, {"gRPC UNAVAILABLE": 3})
    assert stream.completed == 0 and stream.sent >= 1
    assert set(stream.errors) == {"gRPC UNAVAILABLE"}


def test_stream_bounds_are_checked() -> None:
    async def scenario() -> None:
        async with grpc_channel("127.0.0.1:1") as channel:
            with pytest.raises(ValueError, match="bound the stream"):
                await measure_stream(channel, b"x")
            with pytest.raises(ValueError, match="window"):
                await measure_stream(channel, b"x", frames=1, window=0)

    asyncio.run(scenario())


# --- server figures from /metrics -----------------------------------------------------------------


def _scrape_of(metrics: Metrics) -> MetricsSnapshot:
    return parse_metrics(metrics.render()[0].decode())


def test_two_scrapes_give_what_happened_between_them() -> None:
    metrics = Metrics()
    for size in (1, 1, 4):  # before the row: must not count
        metrics.batch_size.labels("fake").observe(size)
    metrics.queue_time.labels("fake").observe(0.2)
    metrics.rejected.labels("queue_full", "fake").inc(5)
    before = _scrape_of(metrics)
    for size in (1, 2, 2, 3, 5, 40):
        metrics.batch_size.labels("fake").observe(size)
    for seconds in (0.0005, 0.002, 0.004, 0.004, 0.04):
        metrics.queue_time.labels("fake").observe(seconds)
    metrics.compute_time.labels("fake").observe(0.008)
    metrics.compute_time.labels("fake").observe(0.012)
    metrics.rejected.labels("queue_full", "fake").inc(3)
    metrics.rejected.labels("deadline", "fake").inc()
    metrics.requests.labels("http", "/predict", "200", "fake").inc(6)
    metrics.requests.labels("http", "/predict", "503", "fake").inc(3)
    metrics.requests.labels("http", "/metrics", "200", "fake").inc(2)  # the scrapes themselves
    figures = ServerFigures.between(before, _scrape_of(metrics))
    assert figures.batches == 6
    assert figures.mean_batch == pytest.approx(53 / 6)
    # non-cumulative, inclusive integer ranges of the buckets 1, 2, 3, 4, 6, ..., 32, 48
    assert figures.batch_size.per_bucket() == {"1": 1, "2": 2, "3": 1, "5-6": 1, "33-48": 1}
    assert figures.queue_time_s.count == 5
    assert figures.rejected == {"deadline": 1, "queue_full": 3}
    assert figures.requests == {"http /predict 200": 6, "http /predict 503": 3}
    assert figures.compute_time_s.mean == pytest.approx(0.010)
    data = figures.to_dict()
    assert data["batch_size_counts"] == {"1": 1, "2": 2, "3": 1, "5-6": 1, "33-48": 1}
    assert data["queued_requests"] == 5 and data["compute_time_ms_mean"] == pytest.approx(10.0)
    # rounds of one row add up
    twice = figures.plus(figures)
    assert twice.batches == 12 and twice.rejected == {"deadline": 2, "queue_full": 6}


def test_quantiles_are_estimated_within_buckets_like_prometheus() -> None:
    # buckets (le): 0.001, 0.0025, 0.005, ...; 5 observations: 1 in (0, 1 ms], 1 in (1, 2.5], 2 in
    # (2.5, 5], 1 in (30, 50] ms
    metrics = Metrics()
    for seconds in (0.0005, 0.002, 0.004, 0.004, 0.04):
        metrics.queue_time.labels("fake").observe(seconds)
    figures = ServerFigures.between(MetricsSnapshot(), _scrape_of(metrics))
    # p50: rank 2.5 falls in (2.5, 5] ms holding ranks 2..4: 2.5 + 2.5 * (0.5 / 2)
    assert figures.queue_ms(0.5) == pytest.approx(3.125)
    # p99: rank 4.95 in (30, 50] ms holding rank 4..5: 30 + 20 * 0.95
    assert figures.queue_ms(0.99) == pytest.approx(49.0)
    assert figures.queue_ms(0.1) == pytest.approx(0.5)  # first bucket: from 0
    # beyond the last finite bound: that bound, as histogram_quantile answers
    late = Histogram(bounds=(1.0, 2.0, math.inf), cumulative=(0.0, 1.0, 3.0), count=3.0, total=9.0)
    assert late.quantile(0.9) == 2.0
    assert Histogram.empty((1.0, math.inf)).quantile(0.5) is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        late.quantile(1.5)


def test_a_restarted_server_cannot_be_subtracted() -> None:
    early = Histogram(bounds=(1.0, math.inf), cumulative=(1.0, 1.0), count=1.0, total=1.0)
    other = Histogram(bounds=(2.0, math.inf), cumulative=(1.0, 1.0), count=1.0, total=1.0)
    with pytest.raises(ValueError, match="restart"):
        other.minus(early)


def test_the_grpc_metrics_url_is_read_from_its_banner() -> None:
    text = (
        "visionserve gRPC API (onnx, model m) on 127.0.0.1:50123\n  stop:   Ctrl-C\n\n"
        "visionserve gRPC metrics on http://127.0.0.1:40111/metrics\n"
    )
    assert grpc_metrics_url(text) == "http://127.0.0.1:40111/metrics"
    assert grpc_metrics_url("visionserve gRPC API (onnx, model m) on 127.0.0.1:50123\n") is None
    assert banner_url(text) is None  # the HTTP banner's pattern does not take the metrics URL


# --- command line: concurrency, batching, server env, layouts -------------------------------------


def test_concurrency_takes_a_list_of_levels() -> None:
    config = parse_args(["--concurrency", "16, 1,4,16,32"])
    assert config.concurrency == (1, 4, 16, 32)
    assert parse_concurrency("8") == (8,)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "'0' is not a concurrency level"),
        ("1,x", "'x' is not a concurrency level"),
        ("4,-2", "'-2' is not a concurrency level"),
        (",", "at least one concurrency level"),
    ],
)
def test_bad_concurrency_levels_are_usage_errors(
    value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--concurrency", value])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_batching_modes_and_server_env_reach_the_config() -> None:
    config = parse_args(
        [
            "--batching",
            "off,on",
            "--server-env",
            "VISION_MAX_QUEUE_DELAY_US=500",
            "--server-env",
            "VISION_ONNX_ALLOW_SPINNING=true",
            "--server-env",
            "VISION_SOMETHING_NEW=x=y",  # unknown to the harness: passed on as it is
        ]
    )
    assert config.batching == ("off", "on")
    assert config.server_env == {
        "VISION_MAX_QUEUE_DELAY_US": "500",
        "VISION_ONNX_ALLOW_SPINNING": "true",
        "VISION_SOMETHING_NEW": "x=y",
    }
    assert config.server_settings().max_queue_delay_us == 500
    assert config.model_settings("onnx").onnx_allow_spinning is True  # in-process agrees with served
    assert model_env(config.model_settings("onnx"))["VISION_ONNX_ALLOW_SPINNING"] == "true"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("MAX_BATCH_SIZE=4", "VISION_ variables in capitals"),
        ("vision_threads=2", "VISION_ variables in capitals"),
        ("VISION_MAX_BATCH_SIZE", "write KEY=VALUE"),
        ("VISION_PORT=8000", "free port of 127.0.0.1"),
        ("VISION_THREADS=1", "use --threads"),
        ("VISION_BACKEND=torch", "use --backends"),
    ],
)
def test_server_env_is_validated(item: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--server-env", item])
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):
        parse_server_env(item)


def test_a_bad_server_setting_value_is_named_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--server-env", "VISION_MAX_BATCH_SIZE=zero"])
    assert "VISION_MAX_BATCH_SIZE='zero'" in capsys.readouterr().err


def test_batching_overload_and_layout_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--batching", "maybe"])
    with pytest.raises(SystemExit):
        parse_args(["--overload", "--endpoints", "live,stream"])
    assert "add json, file or grpc to --endpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--layouts", "2x"])
    assert "WORKERSxTHREADS" in capsys.readouterr().err
    config = parse_args(
        ["--overload", "--overload-concurrency", "16", "--requests", "10", "--endpoints", "json,file,grpc"]
    )
    assert (config.overload_concurrency, config.overload_queue_size) == (16, 8)
    assert config.overload_endpoints == ("json", "file", "grpc")
    assert config.resolved_overload_requests() == 64  # at least 4 per sender, or the queue never fills
    assert parse_args(["--overload", "--overload-requests", "7"]).resolved_overload_requests() == 7
    assert parse_args(["--layouts", "none"]).resolved_layouts() == ()
    assert parse_args(["--layouts", "1x2, 3x1,1x2"]).layouts == (Layout(1, 2), Layout(3, 1))


def test_a_deployment_is_named_by_url_and_grpc_target() -> None:
    config = parse_args(
        [
            "--url",
            "http://10.0.0.5:8000/",
            "--grpc-target",
            "10.0.0.5:50051",
            "--grpc-metrics-url",
            "http://10.0.0.5:8002/metrics",
            "--concurrency",
            "1,16",
            "--endpoints",
            "file,json,live,grpc,health,stream",
        ]
    )
    assert (config.url, config.grpc_target) == ("http://10.0.0.5:8000", "10.0.0.5:50051")
    assert config.grpc_metrics_url == "http://10.0.0.5:8002/metrics"
    assert config.external and config.backends == () and config.batching == ("on",)
    assert config.http_endpoints == ("file", "json", "live") and config.unmeasured_endpoints == ()
    # one model, the deployment's default unless named
    assert config.resolved_models() == () and config.model_name is None
    http_only = parse_args(["--url", "http://127.0.0.1:8000", "--backends", "torch", "--model", "yolo11n"])
    assert http_only.backends == ("torch",) and http_only.grpc_endpoints == ()
    assert http_only.model_name == "yolo11n"
    assert http_only.unmeasured_endpoints == ("grpc", "stream", "pacedstream", "livestream")
    assert not parse_args([]).external and parse_args([]).backends == ("onnx",)
    assert BenchConfig().backends == ("onnx",)
    with pytest.raises(ValueError, match="one model at a time"):
        BenchConfig(url="http://127.0.0.1:8000", models=("a", "b"))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--url", "127.0.0.1:8000"], "--url '127.0.0.1:8000': give the HTTP API as http(s)://HOST:PORT"),
        (["--url", "ftp://example.com:21"], "give the HTTP API as http(s)://HOST:PORT"),
        (["--url", "http://127.0.0.1"], "give the host and the port"),
        (["--url", "http://127.0.0.1:8000/api"], "with no path"),
        (["--grpc-target", "http://127.0.0.1:50051"], "give HOST:PORT without a scheme"),
        (["--grpc-target", "127.0.0.1"], "give HOST:PORT without a scheme"),
        (
            ["--grpc-metrics-url", "http://127.0.0.1:8002/metrics"],
            "--grpc-metrics-url goes with --grpc-target",
        ),
        (["--grpc-target", "h:1", "--grpc-metrics-url", "h:8002"], "give the gRPC process's Prometheus"),
        (["--url", "http://h:1", "--endpoints", "grpc,stream"], "nothing to measure"),
        (["--grpc-target", "h:1", "--endpoints", "json"], "HTTP rows: add --url"),
    ],
)
def test_bad_targets_are_usage_errors(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(arguments)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--batching", "on,off"], "--batching off"),
        (["--server-env", "VISION_MAX_QUEUE_DELAY_US=500"], "--server-env VISION_MAX_QUEUE_DELAY_US"),
        (["--overload"], "--overload"),
        (["--backends", "onnx,torch"], "--backends onnx,torch"),
        (["--threads", "2"], "--threads"),
        (["--device", "cpu"], "--device"),
    ],
)
def test_options_that_configure_servers_are_refused_with_a_deployment(
    arguments: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for target in (["--url", "http://127.0.0.1:8000"], ["--grpc-target", "127.0.0.1:50051"]):
        with pytest.raises(SystemExit) as exited:
            parse_args([*target, *arguments])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "with --url/--grpc-target the harness starts no servers" in err
        assert f"{named} (" in err
    parse_args(arguments)  # fine when the harness starts the servers
    with pytest.raises(ValueError, match=r"--threads .*; --device "):
        BenchConfig(url="http://127.0.0.1:8000", threads=2, device="cpu")  # every one named at once


def test_default_layouts_follow_the_issue_on_two_cores() -> None:
    labels = [layout.label for layout in default_layouts(2)]
    assert labels == ["1x1", "2x1", "3x1", "1x2", "2x2", "3x2"]  # 1-3 workers x 1-2 intra-op threads
    assert [layout.label for layout in default_layouts(1)] == ["1x1", "2x1"]
    assert len(default_layouts(16)) == 12 and Layout(17, 16) in default_layouts(16)
    with pytest.raises(ValueError, match="at least 1"):
        Layout(0, 1)


# --- in-process limit (fake runtime) --------------------------------------------------------------


def _fake_limit_parts(tmp_path: Path) -> tuple[FakeRuntime, TaskSteps, list[bytes]]:
    entry = write_fake_entry(tmp_path)
    runtime = FakeRuntime(entry)
    runtime.load()
    steps = TaskSteps.of(entry, max_image_pixels=10**7)
    images = [encode(Image.new("RGB", (60 + 10 * i, 40), (40 * i, 90, 200))) for i in range(3)]
    return runtime, steps, images


@pytest.mark.parametrize("workers", [1, 3])
def test_a_layout_computes_every_image_in_batches_up_to_the_limit(tmp_path: Path, workers: int) -> None:
    runtime, steps, images = _fake_limit_parts(tmp_path)
    postprocessed: list[str] = []
    postprocess = steps.task.postprocess

    def counted(row: np.ndarray, meta: object, params: object) -> object:
        postprocessed.append(threading.current_thread().name)
        return postprocess(row, meta, params)

    steps.task.postprocess = counted  # type: ignore[method-assign]
    result = measure_layout(runtime, steps, images, workers=workers, max_batch_size=4, count=50)
    assert result.images == 50 == sum(shape[0] for shape in runtime.batches)
    # every image's output is postprocessed, by the preprocessing threads (as the server's pool)
    assert len(postprocessed) == 50 and all(name.startswith("bench-preprocess-") for name in postprocessed)
    assert result.batches == len(runtime.batches)
    assert all(1 <= shape[0] <= 4 and shape[1:] == (3, 32, 32) for shape in runtime.batches)
    assert result.images_per_s > 0 and result.mean_batch is not None and 1 <= result.mean_batch <= 4
    merged = LayoutMeasurement.merged([result, result])
    assert (merged.images, merged.batches) == (100, 2 * result.batches)
    assert merged.images_per_s == pytest.approx(result.images_per_s)


def test_a_layout_feeds_the_images_in_a_fixed_order(tmp_path: Path) -> None:
    runtime, steps, images = _fake_limit_parts(tmp_path)
    seen: list[float] = []
    predict = runtime.predict_batch

    def record(batch: np.ndarray) -> np.ndarray:
        seen.extend(float(item.mean()) for item in batch)
        return predict(batch)

    runtime.predict_batch = record  # type: ignore[method-assign]
    measure_layout(runtime, steps, images, workers=1, max_batch_size=1, count=6)
    expected = [float(steps.prepare(images[i % 3]).tensor.mean()) for i in range(6)]
    assert seen == pytest.approx(expected)  # one worker, batch 1: exactly images 0, 1, 2, 0, 1, 2


def test_a_layout_stops_at_its_time_cap_and_reports_failures(tmp_path: Path) -> None:
    entry = write_fake_entry(tmp_path)
    slow = SlowRuntime(entry, batch_s=0.02)
    slow.load()
    preprocessor = TaskSteps.of(entry, max_image_pixels=10**7)
    image = [encode(Image.new("RGB", (48, 40), "teal"))]
    capped = measure_layout(slow, preprocessor, image, workers=2, max_batch_size=2, duration_s=0.2)
    assert 1 <= capped.images < 100 and 0.15 <= capped.wall_s < 5.0
    failing = FailingRuntime(entry)
    with pytest.raises(RuntimeError, match="kernel launch failed"):
        measure_layout(failing, preprocessor, image, workers=2, max_batch_size=2, count=20)
    with pytest.raises(VisionError, match="not an image"):  # a worker's failure ends the run too
        measure_layout(
            FakeRuntime(entry), preprocessor, [b"not an image"], workers=2, max_batch_size=2, count=5
        )
    with pytest.raises(ValueError, match="bound the run"):
        measure_layout(slow, preprocessor, image, workers=1, max_batch_size=1)
    assert measure_layout(slow, preprocessor, image, workers=1, max_batch_size=1, count=0).images == 0


# --- report: limit ratio, overload accounting, CSV, plot ------------------------------------------


def _sweep_report() -> BenchReport:
    def served(rate_rps: float, *, errors: dict[str, int] | None = None, n: int = 4) -> Measurement:
        return Measurement(latencies_s=(0.010,) * n, wall_s=n / rate_rps, errors=errors or {})

    figures = ServerFigures(
        batch_size=Histogram(bounds=(1.0, 2.0, math.inf), cumulative=(2.0, 4.0, 4.0), count=4.0, total=6.0),
        queue_time_s=Histogram(
            bounds=(0.001, 0.01, math.inf), cumulative=(2.0, 4.0, 4.0), count=4, total=0.01
        ),
        compute_time_s=Histogram.empty((0.01, math.inf)),
    )
    limit = LayoutMeasurement(images=200, wall_s=2.0, batches=50)  # 100 img/s
    rejected = {"HTTP 503": 6, "HTTP 500": 1}
    overload = Measurement(
        latencies_s=(0.1,) * 3, wall_s=1.0, errors=rejected, error_latencies_s={"HTTP 503": (0.001,) * 6}
    )
    return BenchReport(
        machine={"date": "2030-01-01", "cpu": "Test CPU", "usable_cores": "2"},
        settings={},
        rows=[
            ResultRow(
                "onnx", HTTP, "POST /predict (JSON base64)", 1, served(80.0), batching="on", server=figures
            ),
            ResultRow("onnx", HTTP, "POST /predict (JSON base64)", 16, served(90.0), batching="on"),
            ResultRow("onnx", HTTP, "POST /predict (JSON base64)", 1, served(70.0), batching="off"),
            ResultRow("onnx", HTTP, "POST /predict (JSON base64)", 16, served(75.0), batching="off"),
            ResultRow("onnx", BASELINE, "baseline", 1, served(60.0), batching="none"),
            ResultRow("onnx", BASELINE, "baseline", 16, served(65.0), batching="none"),
            ResultRow("onnx", HTTP, "GET /health/live (HTTP floor)", 16, served(900.0), model_work=False),
            ResultRow("onnx", HTTP, "POST /predict (JSON base64)", 64, overload, overload_queue_size=8),
        ],
        layouts=[
            LayoutRow("onnx", Layout(1, 1), LayoutMeasurement(images=100, wall_s=2.0, batches=100), 32),
            LayoutRow("onnx", Layout(2, 2), limit, 32),
        ],
        images=["a.jpg (600x400 JPEG, 1,000 bytes)"],
    )


def test_served_rows_are_held_against_the_best_layout() -> None:
    report = _sweep_report()
    assert report.limits()[("onnx", "")].layout == Layout(2, 2)
    ratios = [report.limit_ratio(row) for row in report.rows]
    assert ratios[:6] == pytest.approx([0.8, 0.9, 0.7, 0.75, 0.6, 0.65])
    assert ratios[6] is None  # the floor runs no model
    text = report.to_markdown()
    assert "- in-process limit, onnx: 100.0 img/s (2 preprocessing threads, 2 intra-op threads)" in text
    assert (
        "| onnx | – | 2x2: 2 preprocessing threads, 2 intra-op threads (best) | 200 | 100.0 | 4.00 | 32 |"
        in text
    )
    # req/s, ratio to the limit, mean batch, queue p50/p99 (ranks 2 and 3.96 of 4 in the buckets)
    assert "| 80.0 | 0.80 | 1.50 | 1.00 | 9.82 |" in text
    assert "images sent (senders cycle through them): a.jpg (600x400 JPEG, 1,000 bytes)" in text
    assert "bucket estimates" in text


def test_overload_rows_account_for_every_request() -> None:
    report = _sweep_report()
    (overload,) = report.overload_rows()
    assert (overload.measurement.sent, overload.rejected, overload.lost) == (10, 6, 1)
    assert not report.nothing_lost()  # the HTTP 500 was neither accepted nor refused
    text = report.to_markdown()
    assert "| onnx | – | HTTP | – | 64 | 8 | 10 | 3 | 6 | – | 1 | 100.00 | 100.00 | 1.00 | 1.00 |" in text
    assert "FAILED: 1 requests were neither accepted nor refused" in text
    data = report.to_dict()
    (entry,) = data["overload"]  # type: ignore[misc]
    assert entry["nothing_lost"] is False and entry["rejection_latency_ms"]["p99_ms"] == pytest.approx(1.0)
    report.rows[-1] = replace(overload, measurement=replace(overload.measurement, errors={"HTTP 503": 6}))
    assert report.nothing_lost()
    assert "nothing lost: every request sent was accepted or refused" in report.to_markdown()


def test_the_csv_has_one_line_per_row_with_the_notebook_columns(tmp_path: Path) -> None:
    report = _sweep_report()
    path = tmp_path / "bench.csv"
    write_csv(report, path)
    with path.open(newline="") as file:
        records = list(csv.DictReader(file))
    assert len(records) == len(report.rows)
    assert list(records[0]) == list(CSV_COLUMNS)
    first = records[0]
    assert (first["scenario"], first["protocol"], first["backend"], first["batching"]) == (
        "sweep",
        HTTP,
        "onnx",
        "on",
    )
    assert (first["concurrency"], first["ok"], first["errors"]) == ("1", "4", "0")
    assert (first["p50_ms"], first["max_ms"], first["req_per_s"]) == ("10.000", "10.000", "80.00")
    assert (first["ratio_to_in_process_limit"], first["mean_batch"]) == ("0.8000", "1.500")
    assert (first["queue_p50_ms_estimate"], first["queue_p99_ms_estimate"]) == ("1.000", "9.820")
    assert records[1]["mean_batch"] == "" and records[6]["ratio_to_in_process_limit"] == ""
    assert records[4]["scenario"] == "baseline" and records[4]["batching"] == "none"
    last = records[-1]
    assert (last["scenario"], last["max_queue_size"], last["rejected"]) == ("overload", "8", "6")
    assert last["errors_by_status"] == "HTTP 500: 1; HTTP 503: 6"


def test_records_are_the_csv_with_numbers_as_numbers(tmp_path: Path) -> None:
    report = _sweep_report()
    records = report.to_records()
    write_csv(report, tmp_path / "bench.csv")
    with (tmp_path / "bench.csv").open(newline="") as file:
        lines = list(csv.DictReader(file))
    assert [list(record) for record in records] == [list(CSV_COLUMNS)] * len(report.rows)
    for record, line in zip(records, lines, strict=True):  # the same cells, typed
        assert {k: "" if v is None else v for k, v in record.items()} == {
            k: type(record[k])(v) if record[k] is not None else v for k, v in line.items()
        }
    first = records[0]
    assert (first["concurrency"], first["ok"], first["errors"], first["max_queue_size"]) == (1, 4, 0, None)
    assert (first["p50_ms"], first["req_per_s"], first["ratio_to_in_process_limit"]) == (10.0, 80.0, 0.8)
    assert records[1]["mean_batch"] is None and records[6]["ratio_to_in_process_limit"] is None
    assert json.loads(json.dumps(records)) == records  # plain data


def test_latency_records_are_every_measured_request_in_ms_with_its_row() -> None:
    report = _report()
    records = report.latency_records()
    assert len(records) == sum(row.measurement.completed for row in report.rows)  # failures untimed
    first = records[0]
    assert list(first) == [*KEY_COLUMNS, "latency_ms"]
    assert (first["scenario"], first["protocol"], first["backend"], first["concurrency"]) == (
        "in-process",
        IN_PROCESS,
        "onnx",
        1,
    )
    served = [r["latency_ms"] for r in records if r["endpoint"] == "POST /predict/file (multipart)"]
    assert served[:3] == pytest.approx([11.5, 12.5, 13.5])  # seconds in the rows, ms here
    keys = {tuple(r[c] for c in KEY_COLUMNS) for r in records}
    assert keys <= {tuple(r[c] for c in KEY_COLUMNS) for r in report.to_records()}  # joinable
    assert json.loads(json.dumps(records)) == records


def test_batch_size_records_are_the_servers_histogram_by_bucket() -> None:
    report = _sweep_report()
    records = report.batch_size_records()
    # only the first row has server figures: 2 batches of 1 and 2 of 2 (none above)
    assert [(r["batch_size"], r["batch_size_max"], r["batches"]) for r in records] == [
        ("1", 1, 2),
        ("2", 2, 2),
    ]
    assert all(r["concurrency"] == 1 and r["batching"] == "on" for r in records)
    assert list(records[0]) == [*KEY_COLUMNS, "batch_size", "batch_size_max", "batches"]
    wide = Histogram(bounds=(1.0, 4.0, 8.0, math.inf), cumulative=(1.0, 1.0, 3.0, 4.0), count=4.0, total=40.0)
    assert wide.buckets() == [("1", 1.0, 1), ("5-8", 8.0, 2), (">8", math.inf, 1)]
    row = replace(report.rows[0], server=replace(report.rows[0].server, batch_size=wide))
    only = BenchReport(machine={}, settings={}, rows=[row]).batch_size_records()
    assert [(r["batch_size"], r["batch_size_max"]) for r in only] == [("1", 1), ("5-8", 8), (">8", None)]


def test_notes_are_in_the_markdown_and_the_json() -> None:
    report = _sweep_report()
    report.notes.append("in-process limit: not measured (no local model repository)")
    assert "\n- in-process limit: not measured (no local model repository)\n" in report.to_markdown()
    assert report.to_dict()["notes"] == ["in-process limit: not measured (no local model repository)"]


def test_the_plot_is_drawn_with_two_concurrency_levels_only(tmp_path: Path) -> None:
    report = _sweep_report()
    (lines,) = plotted_rows(report).values()  # one model
    assert set(lines) == {
        f"{BASELINE} baseline (onnx)",
        f"{HTTP} POST /predict (JSON base64) (onnx, batching off)",
        f"{HTTP} POST /predict (JSON base64) (onnx, batching on)",
    }  # no floor (no model work), no overload row
    assert [row.concurrency for row in lines[f"{HTTP} POST /predict (JSON base64) (onnx, batching on)"]] == [
        1,
        16,
    ]
    written = report.write(tmp_path / "out")
    assert sorted(p.name for p in written) == ["bench.csv", "bench.json", "bench.md", "throughput.png"]
    assert (tmp_path / "out" / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_level = BenchReport(machine={}, settings={}, rows=report.rows[:1])
    assert not plot_throughput(one_level, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_the_plot_leaves_the_callers_matplotlib_backend_alone(tmp_path: Path) -> None:
    import matplotlib

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # any backend but Agg, as a notebook's inline backend
    try:
        assert plot_throughput(_sweep_report(), tmp_path / "throughput.png")
        assert matplotlib.get_backend() == "svg"  # drawn without pyplot: no `matplotlib.use("Agg")`
    finally:
        matplotlib.use(backend)


# --- progress -------------------------------------------------------------------------------------


def test_progress_prints_a_line_per_finished_row_off_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream)
    assert not bar.live  # a StringIO is no terminal
    bar.note("starting")
    bar.advance(True)  # a warm-up request, between rows: not shown
    bar.start("onnx HTTP json c=4", 3)
    for ok in (True, False, True):
        bar.advance(ok)
    bar.finish("2 ok, 1 failed")
    assert stream.getvalue() == "bench: starting\nbench: onnx HTTP json c=4: 2 ok, 1 failed\n"


def test_progress_redraws_one_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, live=True)
    monkeypatch.setattr("bench.progress.REDRAW_S", 0.0)
    bar.start("row", 2)
    bar.advance(True)
    bar.advance(False)
    bar.finish("done")
    text = stream.getvalue()
    assert "\rbench: row  0/2  0.0 req/s" in text
    assert "2/2, 1 failed" in text and "req/s" in text
    assert text.endswith("bench: row: done\n") and "\n" not in text[: text.index("bench: row: done")]


# --- images -----------------------------------------------------------------------------------------


def test_default_images_are_every_packaged_photo_as_a_600_px_jpeg(tmp_path: Path) -> None:
    images = default_images()
    assert len(images) == len(packaged_photos()) >= 5
    for image in images:
        assert max(image.width, image.height) == 600 and image.format == "JPEG"
        with Image.open(io.BytesIO(image.data)) as decoded:
            assert decoded.format == "JPEG" and decoded.size == (image.width, image.height)
    assert images[0].describe().startswith("chelsea.jpg (600x399 JPEG, ")
    assert [i.data for i in default_images()] == [i.data for i in images]  # the same bytes every run
    path = tmp_path / "x.png"
    path.write_bytes(encode(Image.new("RGB", (30, 20), "red")))
    single = file_image(path)
    assert (single.name, single.width, single.height, single.format) == ("x.png", 30, 20, "PNG")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not an image"):
        file_image(tmp_path / "bad.jpg")


# --- the baseline server (seed 004's plain endpoint) ----------------------------------------------


@pytest.mark.real_model
def test_the_baseline_classifies_a_real_photo(real_entry: ModelEntry) -> None:
    classifier = PlainClassifier(real_entry, threads=2)
    classifier.load()
    with TestClient(create_baseline_app(classifier)) as client:
        body = {"image": base64.b64encode(photo_bytes("chelsea.png")).decode("ascii")}
        answer = client.post("/predict", json=body)
        assert answer.status_code == 200
        result = answer.json()
        assert set(result) == {"prediction", "probability"}
        assert result["prediction"] in {"tabby", "tiger cat", "Egyptian cat"}
        assert 0.3 < result["probability"] <= 1.0
        bad = client.post("/predict", json={"image": base64.b64encode(b"not an image").decode()})
        assert bad.status_code == 400
        assert client.get("/health/ready").status_code == 200


def test_the_issues_targets_are_checked_where_the_run_has_the_rows() -> None:
    report = _sweep_report()
    checks = {(c.target, c.row): c for c in check_targets(report)}
    off = checks[("c=16 HTTP JSON throughput", "batching off")]
    assert (off.measured, off.goal, off.met) == ("75.0 req/s = 0.75 × limit", "≥ 0.9 × limit", False)
    versus = checks[("c=16 HTTP JSON vs baseline throughput", "batching on")]
    assert versus.measured == "90.0 vs 65.0 req/s (1.38×)" and versus.met
    assert not checks[("c=16 HTTP JSON vs baseline p99", "batching on")].met  # equal is not lower
    assert checks[("c=1 HTTP JSON p50 vs baseline", "batching on")].met
    assert checks[(f"c=1 {HTTP} POST /predict (JSON base64): batching on − off, p50", "on vs off")].met
    assert checks[("c=16 HTTP JSON p99", "batching on")].met
    assert ("c=16 gRPC unary throughput", "batching on") not in checks  # not measured: left out
    overload = "HTTP, c=64"
    assert checks[("overload: rejection p99", overload)].met
    assert not checks[("overload: nothing lost", overload)].met
    text = report.to_markdown()
    assert "Against the issues' targets" in text
    row = "| c=16 HTTP JSON throughput | batching off | 75.0 req/s = 0.75 × limit | ≥ 0.9 × limit |"
    assert f"{row} **missed** |" in text
    assert report.to_dict()["targets"]


# --- a secured deployment: --api-key and --tls-ca ------------------------------------------------


def test_the_api_key_defaults_to_vision_api_key_and_stays_out_of_the_repr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = "a-key-from-the-env-" + "z" * 8
    monkeypatch.setenv("VISION_API_KEY", key)
    config = parse_args(["--url", "http://127.0.0.1:8000"])
    assert config.api_key == key and config.tls_ca is None
    assert config.access.headers() == {"Authorization": f"Bearer {key}"}
    assert config.access.metadata() == (("authorization", f"Bearer {key}"),)
    assert key not in repr(config) and key not in repr(config.access)
    assert key not in config.access.described()

    given = parse_args(["--url", "http://127.0.0.1:8000", "--api-key", " other-key-1234567 "])
    assert given.api_key == "other-key-1234567"  # the option wins; surrounding spaces dropped

    assert BenchConfig(url="http://127.0.0.1:8000").api_key == key  # as the notebooks build it
    assert BenchConfig(url="http://127.0.0.1:8000", api_key="").access.headers() == {}
    monkeypatch.setenv("VISION_API_KEY", "")
    assert parse_args(["--url", "http://127.0.0.1:8000"]).access.headers() == {}


def test_the_harness_own_servers_get_no_key_and_no_private_ca(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_API_KEY", "a-key-from-the-env-zzzzzzzz")
    assert parse_args(["--backends", "onnx"]).access.headers() == {}


def test_tls_ca_must_exist_and_goes_with_a_deployment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a connection is made")
    config = parse_args(
        ["--url", "https://127.0.0.1:8443", "--grpc-target", "127.0.0.1:50051", "--tls-ca", str(ca)]
    )
    assert config.url == "https://127.0.0.1:8443" and config.tls_ca == ca
    with pytest.raises(SystemExit):
        parse_args(["--url", "https://127.0.0.1:8443", "--tls-ca", str(tmp_path / "missing.pem")])
    assert "missing.pem: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--backends", "onnx", "--tls-ca", str(ca)])
    assert "--tls-ca goes with --url https://... or --grpc-target" in capsys.readouterr().err


def test_https_urls_are_accepted_and_other_schemes_refused(capsys: pytest.CaptureFixture[str]) -> None:
    config = parse_args(
        [
            "--url",
            "https://api.example:443/",
            "--grpc-target",
            "api.example:50051",
            "--grpc-metrics-url",
            "https://api.example:8002/metrics",
        ]
    )
    assert (config.url, config.grpc_metrics_url) == (
        "https://api.example:443",
        "https://api.example:8002/metrics",
    )
    with pytest.raises(SystemExit):
        parse_args(["--url", "ftp://api.example:21"])
    assert "give the HTTP API as http(s)://HOST:PORT" in capsys.readouterr().err


def test_the_harness_s_own_servers_inherit_no_key_or_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    """`VISION_API_KEY` exported for an external deployment must not turn the key on in the servers
    the harness starts itself (it sends them none)."""
    from bench.server_env import ACCESS_VARIABLES, inherited_env

    for name in ACCESS_VARIABLES:
        monkeypatch.setenv(name, "set-in-the-shell")
    monkeypatch.setenv("VISION_LOG_LEVEL", "warning")
    env = inherited_env()
    assert not set(ACCESS_VARIABLES) & set(env)
    assert env["VISION_LOG_LEVEL"] == "warning"


# --- issue 10: models, detectors, streams, serving several models -------------------------------


def test_the_clip_pans_over_the_packaged_photos_at_vga() -> None:
    frames = make_clip(frames_per_shot=3)
    shots = [name for name in CLIP_PHOTOS if name in {p.name for p in packaged_photos()}]
    assert len(frames) == 3 * len(shots) and frames[0].name == f"{Path(shots[0]).stem}-00.jpg"
    for frame in frames:
        with Image.open(io.BytesIO(frame.data)) as image:
            assert image.format == "JPEG" and image.size == (640, 480) == (frame.width, frame.height)
    assert len({frame.data for frame in frames}) == len(frames)  # a pan: no two frames alike
    assert describe_clip(frames, 30).startswith(f"{len(frames)} frames 640x480 JPEG ({len(shots)} shots of 3")
    still = pan(Image.new("RGB", (400, 100), "teal"), 1)
    assert [view.size for view in still] == [(640, 480)]
    with pytest.raises(ValueError, match="at least 1 frame"):
        pan(Image.new("RGB", (10, 10)), 0)


def test_task_steps_time_decoding_apart_and_carry_each_task_s_parameters(tmp_path: Path) -> None:
    photo = photo_bytes("chelsea.png")
    classifier = TaskSteps.of(write_fake_entry(tmp_path), max_image_pixels=10**7).checked(photo)
    detector = TaskSteps.of(write_fake_detector(tmp_path), max_image_pixels=10**7).checked(photo)
    assert (classifier.name, detector.name) == ("classification", "detection")
    assert classifier.split is not None and detector.split is not None  # halves equal the whole
    decode, shape = detector.split
    halves = shape(decode(photo))
    assert np.array_equal(halves.tensor, detector.prepare(photo).tensor)
    assert isinstance(halves.meta, Letterbox) and (halves.meta.width, halves.meta.height) == (451, 300)
    # a detector's requests set no parameter (a classifier's `topk` would be refused by it)
    assert request_parameters("detection") == {} and request_parameters("classification") == {"topk": 5}
    row = FakeDetectorRuntime(write_fake_detector(tmp_path)).predict_batch(halves.tensor[np.newaxis])[0]
    found = detector.finish(row, halves.meta)
    assert found.width == 451 and len(found.detections) == 1  # NMS, boxes in the photo's pixels
    assert describe_steps("detection") == "decode + letterbox + predict_batch + NMS"


def test_a_layout_of_a_detector_postprocesses_with_nms(tmp_path: Path) -> None:
    entry = write_fake_detector(tmp_path)
    runtime = FakeDetectorRuntime(entry)
    runtime.load()
    steps = TaskSteps.of(entry, max_image_pixels=10**7)
    images = [encode(Image.new("RGB", (80, 60), colour)) for colour in ("red", "green")]
    result = measure_layout(runtime, steps, images, workers=2, max_batch_size=4, count=12)
    assert result.images == 12 and all(shape[1:] == (3, 64, 64) for shape in runtime.batches)


def test_a_classifier_and_a_detector_are_asked_with_their_own_parameters() -> None:
    image = encode(Image.new("RGB", (48, 40), "teal"))
    detector = json_request(image, model="yolo11n", params={})
    assert detector.path == "/predict?model=yolo11n" and b"topk" not in detector.body
    classifier = file_request(image, "a.jpg", model="efficientnet_lite0")
    assert classifier.path == "/predict/file?model=efficientnet_lite0&topk=5"
    picked = file_request(image, "a.jpg", model="yolo11n", params={"classes": ["cat", "dog"]})
    assert picked.path == "/predict/file?model=yolo11n&classes=cat&classes=dog"
    assert message_fields("yolo11n", {"classes": ("cat",), "score_threshold": 0.5}) == {
        "model": "yolo11n",
        "classes": ["cat"],
        "score_threshold": 0.5,
    }
    assert message_fields("", CLASSIFY) == {"topk": 5}


async def _with_grpc_server(runtimes: list[ModelRuntime], scenario: Callable[[str], Awaitable[T]]) -> T:
    """Run `scenario(target)` against GrpcServer over `runtimes` (the first the default)."""
    server = grpc_server_of(GrpcSettings(port=0, metrics_port=0), ServerSettings(), *runtimes)
    port = await server.start()
    try:
        assert server.loaded is not None
        await server.loaded
        return await scenario(f"127.0.0.1:{port}")
    finally:
        await server.stop(grace_s=1)


class _PerImageRuntime(FakeRuntime):
    """Takes `image_s` per image of a batch (batching buys nothing)."""

    image_s = 0.05

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.image_s * len(batch))
        return super().predict_batch(batch)


def test_paced_streams_fall_behind_in_order_and_skip_live(tmp_path: Path) -> None:
    """A camera at 100 frames/s against a model of 20 frames/s: in order, every frame is computed
    and the backlog grows frame after frame; live, the superseded ones are answered skipped and the
    computed ones wait about as long as two computations."""
    image = encode(Image.new("RGB", (48, 40), "teal"))
    slow = _PerImageRuntime(write_fake_entry(tmp_path))

    async def scenario(target: str) -> list[Measurement]:
        async with grpc_channel(target) as channel:
            return [
                await measure_paced(channel, image, fps=100, live=False, frames=30),
                await measure_paced(channel, image, fps=100, live=True, frames=30),
                await measure_paced(channel, image, fps=100, live=True, duration_s=0.1),
            ]

    ordered, live, timed = asyncio.run(_with_grpc_server([slow], scenario))
    assert (ordered.sent, ordered.completed, ordered.skipped, ordered.failed) == (30, 30, 0, 0)
    assert ordered.latencies_s[-1] > ordered.latencies_s[0] + 0.5  # the backlog grows
    assert live.sent == 30 and live.failed == 0 and live.skipped >= 10
    assert live.completed == 30 - live.skipped and max(live.latencies_s) < 0.5
    assert live.throughput_rps == pytest.approx(live.completed / live.wall_s)
    assert 5 <= timed.sent <= 11 and timed.failed == 0  # 0.1 s of a 100 frames/s camera


def test_a_detector_s_stream_and_calls_carry_no_classification_parameters(tmp_path: Path) -> None:
    image = encode(Image.new("RGB", (48, 40), "red"))
    classifier = FakeRuntime(write_fake_entry(tmp_path))
    detector = FakeDetectorRuntime(write_fake_detector(tmp_path))

    async def scenario(target: str) -> list[Measurement]:
        async with grpc_channel(target) as channel:
            return [
                await run_closed_loop(grpc_sender(channel, image, model="fakedet", params={}), requests=5),
                await run_closed_loop(grpc_sender(channel, image, model="fakedet"), requests=2),  # topk=5
                await measure_stream(channel, image, frames=6, model="fakedet", params={}),
                await measure_paced(channel, image, fps=50, live=True, frames=6, model="fakedet", params={}),
            ]

    unary, refused, stream, live = asyncio.run(_with_grpc_server([classifier, detector], scenario))
    assert (unary.completed, unary.failed) == (5, 0)
    assert refused.errors == {"gRPC INVALID_ARGUMENT": 2}  # `topk` does not apply to a detector
    assert (stream.completed, stream.failed) == (6, 0)
    assert live.completed + live.skipped == 6 and live.failed == 0


def test_a_run_of_several_models_serves_them_all_and_the_first_alone(tmp_path: Path) -> None:
    config = BenchConfig(models=("cls", "det"), output=tmp_path, endpoints=("json", "live", "grpc", "stream"))
    groups = served_groups(config, "onnx", {"VISION_MODEL_NAME": "cls"}, ("cls", "det"))
    assert [(g.models, g.alone) for g in groups] == [(("cls", "det"), False), (("cls",), True)]
    together, alone = groups
    assert together.http is not None and together.grpc is not None and alone.http is not None
    assert isinstance(together.http, ServerProcess) and isinstance(alone.http, ServerProcess)
    assert together.http.env["VISION_MODELS"] == "cls,det" and alone.http.env["VISION_MODELS"] == "cls"
    assert alone.serves("cls") and not alone.serves("det") and together.serves("det")
    assert "alone" in str(alone.http.log_path)
    single = BenchConfig(models=("cls",), output=tmp_path)
    assert [g.alone for g in served_groups(single, "onnx", {}, ("cls",))] == [False]
    streams_only = BenchConfig(models=("cls", "det"), output=tmp_path, endpoints=("stream",))
    assert len(served_groups(streams_only, "onnx", {}, ("cls", "det"))) == 1  # nothing to compare alone


@dataclass(frozen=True)
class _End:
    base_url: str = "http://127.0.0.1:1"
    target: str = "127.0.0.1:1"
    metrics_url: str | None = None


def test_the_plans_give_each_model_its_rows_and_the_floors_once(tmp_path: Path) -> None:
    config = BenchConfig(
        models=("cls", "det"),
        output=tmp_path,
        endpoints=("json", "live", "v2", "grpc", "health", "v2grpc", "stream", "livestream"),
        concurrency=(1, 16),
        clip_fps=25,
    )
    image = encode(Image.new("RGB", (48, 40), "teal"))
    photos = [BenchImage("a.jpg", image, 48, 40, "JPEG", "test")]
    models = [
        BenchModel.of("cls", "classification", photos, None),
        BenchModel.of("det", "detection", photos, None),
    ]
    groups = [
        ServedGroup("on", None, _End(), _End(), models=("cls", "det")),
        ServedGroup("on", None, _End(), _End(), models=("cls",), alone=True),
    ]
    with event_loop_runner() as runner, contextlib.ExitStack() as stack:
        plans = build_plans(
            config,
            label="onnx",
            groups=groups,
            models=models,
            clients=Clients(config, runner, stack),
            bar=ProgressBar(io.StringIO()),
        )
        rows = [
            (p.template.model, p.template.alone, p.template.target, p.template.concurrency) for p in plans
        ]
    per_level = {
        ("cls", False, "POST /predict (JSON base64)"),
        ("cls", False, "GET /health/live (HTTP floor)"),
        ("cls", False, "POST /v2/models/{model}/infer (V2, binary)"),
        ("cls", False, UNARY),
        ("cls", False, HEALTH),
        ("cls", False, V2_UNARY),
        ("cls", True, "POST /predict (JSON base64)"),  # alone: model work only
        ("cls", True, "POST /v2/models/{model}/infer (V2, binary)"),
        ("cls", True, UNARY),
        ("cls", True, V2_UNARY),
        ("det", False, "POST /predict (JSON base64)"),  # no floor, no V2 (a classification)
        ("det", False, UNARY),
    }
    for level in (1, 16):
        assert {row[:3] for row in rows if row[3] == level and "stream" not in row[2]} == per_level
    streams = [row for row in rows if "Predict" in row[2] and "stream" in row[2]]
    assert streams == [
        ("cls", False, STREAM, 1),
        ("cls", False, "Inference/PredictLive (1 stream, 25 frames/s)", 1),
        ("det", False, STREAM, 1),
        ("det", False, "Inference/PredictLive (1 stream, 25 frames/s)", 1),
    ]  # streams with every model loaded only


def test_models_a_repository_lacks_are_exported_into_the_run_s_own(tmp_path: Path) -> None:
    source = tmp_path / "models"
    write_fake_entry(source, "efficientnet_lite0")
    write_fake_detector(source, "yolo11n")
    exported: list[str] = []

    def exporter(variant: Variant, repository: Path, log: Path) -> None:
        exported.append(f"{variant.base}@{variant.size}")
        write_fake_detector(repository, variant.name)

    assert prepare_repository(source, ["yolo11n"], tmp_path / "out", note=print, exporter=exporter) == source
    own = prepare_repository(
        source, ["efficientnet_lite0", "yolo11n_320"], tmp_path / "out", note=print, exporter=exporter
    )
    assert own == tmp_path / "out" / "repository" and exported == ["yolo11n@320"]
    assert (own / "efficientnet_lite0").is_symlink() and ModelRepository(own).names() == [
        "efficientnet_lite0",
        "yolo11n_320",
    ]
    again = prepare_repository(
        source, ["efficientnet_lite0", "yolo11n_320"], tmp_path / "out", note=print, exporter=exporter
    )
    assert again == own and exported == ["yolo11n@320"]  # kept from the first run
    assert parse_variant("yolo11n_480") == Variant("yolo11n_480", "yolo11n", 480)
    assert parse_variant("yolo11n_333") is None and parse_variant("resnet_320") is None
    command = Variant("yolo11n_320", "yolo11n", 320).command(own)
    assert command[1:] == [
        "-m",
        "export",
        "--model",
        "yolo11n",
        "--input-size",
        "320",
        "--name",
        "yolo11n_320",
        "--repository",
        str(own),
    ]
    with pytest.raises(ValueError, match=r"no model nothing_here .* exports itself: yolo11n_320"):
        prepare_repository(source, ["nothing_here"], tmp_path / "out", note=print, exporter=exporter)


def _models_report() -> BenchReport:
    def rate(rps: float, n: int = 10, latency_s: float = 0.05, skipped: int = 0) -> Measurement:
        return Measurement(latencies_s=(latency_s,) * n, wall_s=n / rps, skipped=skipped)

    json_target, live = "POST /predict (JSON base64)", "Inference/PredictLive (1 stream, 30 frames/s)"
    return BenchReport(
        machine={"date": "2030-01-01", "cpu": "Test CPU", "usable_cores": "2"},
        settings={},
        rows=[
            ResultRow("onnx", HTTP, json_target, 16, rate(95.0), batching="on", model="cls"),
            ResultRow("onnx", GRPC, UNARY, 16, rate(100.0), batching="on", model="cls"),
            ResultRow("onnx", HTTP, json_target, 16, rate(100.0), batching="on", model="cls", alone=True),
            ResultRow("onnx", GRPC, UNARY, 16, rate(99.0), batching="on", model="cls", alone=True),
            ResultRow("onnx", HTTP, json_target, 16, rate(19.0), batching="on", model="det"),
            ResultRow("onnx", GRPC, UNARY, 16, rate(17.0), batching="on", model="det"),
            ResultRow("onnx", GRPC_STREAM, STREAM, 1, rate(19.5, latency_s=0.3), batching="on", model="det"),
            ResultRow("onnx", GRPC_STREAM, live, 1, rate(18.0, skipped=4), batching="on", model="det"),
        ],
        layouts=[
            LayoutRow(
                "onnx", Layout(2, 2), LayoutMeasurement(images=100, wall_s=1.0, batches=20), 32, model="cls"
            ),
            LayoutRow(
                "onnx", Layout(2, 2), LayoutMeasurement(images=20, wall_s=1.0, batches=5), 32, model="det"
            ),
            LayoutRow(
                "onnx", Layout(1, 1), LayoutMeasurement(images=10, wall_s=1.0, batches=5), 32, model="det"
            ),
        ],
        tasks={"cls": "classification", "det": "detection"},
        stream_fps=30.0,
    )


def test_each_model_is_held_against_its_own_limit_and_targets() -> None:
    report = _models_report()
    assert set(report.limits()) == {("onnx", "cls"), ("onnx", "det")}
    assert report.limits()[("onnx", "det")].layout == Layout(2, 2)
    assert report.limit_ratio(report.rows[4]) == pytest.approx(0.95)  # 19 of the detector's 20
    assert (report.classifier(), report.models_of("detection")) == ("cls", ["det"])
    checks = {(c.target, c.row): c for c in check_targets(report)}
    assert checks[("c=16 HTTP JSON throughput", "det, batching on")].met  # 0.95 >= 0.9
    assert not checks[("c=16 gRPC unary throughput", "det, batching on")].met  # 0.85
    stream = checks[("stream frames/s (in order)", "det, batching on")]
    assert stream.met and stream.measured == "19.5 frames/s = 0.97 × limit"
    live = checks[("stream frames/s (live)", "det, batching on")]
    assert live.met and "0.90 × min(limit 20.0, camera 30)" in live.measured
    http = checks[("c=16 HTTP JSON: cls with 1 more model(s) loaded vs alone", "cls, batching on")]
    assert (http.measured, http.met) == ("95.0 vs 100.0 req/s (0.95×)", True)
    grpc_check = checks[("c=16 gRPC unary: cls with 1 more model(s) loaded vs alone", "cls, batching on")]
    assert grpc_check.met  # 1.01 times
    assert ("c=16 HTTP JSON throughput", "cls, batching on") in checks  # the classifier's own goals
    assert ("c=16 HTTP JSON throughput", "det, batching on") in checks


def test_the_report_has_a_stream_table_a_stream_plot_and_models_in_every_file(tmp_path: Path) -> None:
    report = _models_report()
    text = report.to_markdown()
    live = "Inference/PredictLive (1 stream, 30 frames/s)"
    assert f"| onnx | det | {live} | on | 14 | 10 | 4 | 0 | 18.0 | 0.90 | 50.00 | 50.00 | 50.00 |" in text
    assert "| onnx | cls | HTTP | POST /predict (JSON base64), served alone | on | 16 |" in text
    assert "- in-process limit, onnx, det: 20.0 img/s (2 preprocessing threads, 2 intra-op threads)" in text
    data = report.to_dict()
    assert data["format"] == "visionserve-bench/3" and data["models"] == {
        "cls": "classification",
        "det": "detection",
    }
    assert {(entry["model"], entry["layout"]) for entry in data["in_process_limit"]} == {
        ("cls", "2x2"),
        ("det", "2x2"),
    }  # type: ignore[index, union-attr]
    assert data["results"][7]["skipped"] == 4 and data["results"][2]["scenario"] == "alone"  # type: ignore[index]
    records = report.to_records()
    assert [r["model"] for r in records[:2]] == ["cls", "cls"] and records[7]["skipped"] == 4
    assert set(stream_rows(report)) == {"det"}
    written = report.write(tmp_path)
    assert sorted(p.name for p in written) == ["bench.csv", "bench.json", "bench.md", "streams.png"]
    assert (tmp_path / "streams.png").read_bytes()[:4] == b"\x89PNG"


def test_a_scrape_can_keep_one_model_s_samples() -> None:
    metrics = Metrics()
    metrics.batch_size.labels("cls").observe(4)
    metrics.batch_size.labels("det").observe(2)
    metrics.rejected.labels("queue_full", "det").inc()
    text = metrics.render()[0].decode()
    assert parse_metrics(text).histograms[BATCH_SIZE].count == 2
    only = parse_metrics(text, "det")
    assert only.histograms[BATCH_SIZE].count == 1 and only.histograms[BATCH_SIZE].total == 2
    assert only.rejected == {"queue_full": 1.0} and parse_metrics(text, "cls").rejected == {}


def test_a_deployment_s_model_is_the_one_named_or_its_default() -> None:
    body = {
        "models": [
            {"name": "cls", "runtime": "onnx", "device": "cpu", "task": "classification", "default": False},
            {"name": "det", "runtime": "onnx", "device": "cpu", "task": "detection", "default": True},
        ]
    }
    assert DeployedModel.from_models(body).name == "det"  # the default
    chosen = DeployedModel.from_models(body, "cls")
    assert (chosen.name, chosen.task, chosen.served) == ("cls", "classification", ("cls", "det"))
    assert DeployedModel.from_models(body, "nothing").name == "det"  # the caller refuses it
    with pytest.raises(ValueError, match="not a visionserve model list"):
        DeployedModel.from_models({"models": []})


def test_the_processes_report_compares_the_layouts() -> None:
    def load(rps: float) -> Measurement:
        return Measurement(latencies_s=(0.01, 0.02, 0.03, 0.04), wall_s=4 / rps)

    two = LayoutResult(
        "two",
        "two processes",
        [
            ProcessFigures("python -m fastapi_onnx", 1, 300.0, 320.0, 310.0, 12.0, 40),
            ProcessFigures("python -m grpc_server", 2, 310.0, 330.0, 320.0, 13.0, 45),
        ],
        mixed={"HTTP": load(50.0), "gRPC": load(60.0)},
        single={"HTTP": load(90.0), "gRPC": load(95.0)},
        mean_batch=4.0,
    )
    one = LayoutResult(
        "one",
        "one process",
        [ProcessFigures("python -m grpc_server (HTTP + gRPC)", 3, 320.0, 350.0, 340.0, 20.0, 50)],
        mixed={"HTTP": load(70.0), "gRPC": load(70.0)},
        single={"HTTP": load(92.0)},
    )
    report = ProcessesReport({"date": "2030-01-01", "cpu": "Test CPU", "usable_cores": "2"}, {}, [two, one])
    assert (two.total_rps, two.rss_peak_mb, one.total_rps) == (110.0, 650.0, 140.0)
    assert two.cpu_ms_per_request == pytest.approx(1e3 * 25.0 / 8)
    text = report.to_markdown()
    assert "| two processes | 50.0 | 25.00 | 39.70 | 60.0 | 25.00 | 39.70 | 110.0 | 0 | 4.00 |" in text
    assert "| one process | 92.0 | 25.00 | 39.70 | 92.0 | – | – | – |" not in text
    assert "| one process | 25.00 | 39.70 | 92.0 | – | – | – |" in text  # no gRPC row alone measured
    assert "| one | `python -m grpc_server (HTTP + gRPC)` | 320.0 | 350.0 | 340.0 | 20.0 | 50 |" in text
    assert report.to_dict()["layouts"][1]["total_requests_per_s"] == 140.0  # type: ignore[index]


def test_a_process_serving_both_apis_is_found_by_both_banners(tmp_path: Path) -> None:
    process = CombinedServerProcess("onnx", env={}, log_path=tmp_path / "both.log")
    grpc_banner = "visionserve gRPC API (onnx) on 127.0.0.1:50123\n"
    http_banner = "visionserve HTTP API (onnx) on http://127.0.0.1:8123\n"
    assert process.announced(grpc_banner) is None  # the HTTP side is not listening yet
    assert process.announced(grpc_banner + http_banner) == "127.0.0.1:50123"
    assert process.http_address == "http://127.0.0.1:8123" == process.base_url
    env = process.listen_env()
    assert env["VISION_GRPC_SERVE_HTTP"] == "true" and env["VISION_PORT"] == env["VISION_GRPC_PORT"] == "0"
    assert process.module == "grpc_server"
    with pytest.raises(ValueError, match="at least one sender"):
        ProcessesConfig(http_clients=0, grpc_clients=0)


# --- a pipeline: face_expression ---------------------------------------------------------------


def test_the_group_image_pastes_the_astronaut_s_face_8_times_as_a_jpeg() -> None:
    group = group_image()
    assert (group.name, group.width, group.height, group.format) == ("group-8-faces.jpg", 800, 480, "JPEG")
    with Image.open(io.BytesIO(group.data)) as opened:
        assert opened.format == "JPEG" and opened.size == (800, 480)
        pixels = np.asarray(opened.convert("RGB"), dtype=np.int16)
    cells = [pixels[r * 240 : (r + 1) * 240, c * 200 : (c + 1) * 200] for r in range(2) for c in range(4)]
    background = np.array(GROUP_BACKGROUND, dtype=np.int16)
    for cell in cells:  # a face in every cell of the 4 x 2 grid, on the plain canvas
        assert np.abs(cell[120, 100] - background).sum() > 30 and np.abs(cell[2, 2] - background).sum() < 15
    photos = face_photos()
    assert [image.name for image in photos] == [*(i.name for i in default_images()), "group-8-faces.jpg"]
    assert one_face_image().name == "astronaut.jpg" and "astronaut.jpg" in [i.name for i in photos]
    sets = ImageSets("auto")
    assert (sets.kind("face_expression"), sets.kind("detection"), sets.kind("classification")) == (
        "faces",
        "clip",
        "photos",
    )
    assert sets.for_task("face_expression")[-1].name == "group-8-faces.jpg"


def test_a_pipeline_s_limit_is_its_registry_under_n_concurrent_requests() -> None:
    layout = Layout(2, 2, concurrent=16)
    assert layout.label == "c=16" and layout.describe() == (
        "16 concurrent requests through the registry (2 preprocessing threads, 2 intra-op threads per stage)"
    )
    assert Layout(2, 1, concurrent=1).describe().startswith("1 request through the registry")
    assert Layout(2, 2).label == "2x2" and Layout(2, 2) != layout
    assert pipeline_levels(LIMIT_LEVELS, (1, 2)) == (1, 2, 4, 16, 32)
    assert pipeline_levels((), (1, 16)) == ()  # --layouts none: no limit


def _stage(image: str, faces: int, pipeline_ms: float, detector_ms: float, direct_ms: float) -> StageCost:
    n = 5
    return StageCost(
        runtime="onnx",
        model="face_expression",
        image=image,
        faces=faces,
        pipeline_s=(pipeline_ms / 1e3,) * n,
        detector_s=(detector_ms / 1e3,) * n,
        direct_s=(direct_ms / 1e3,) * n,
        classifier_batches=n,
        classifier_items=n * faces,
    )


def _faces_report() -> BenchReport:
    def rate(rps: float, n: int = 10) -> Measurement:
        return Measurement(latencies_s=(0.05,) * n, wall_s=n / rps)

    group = "group-8-faces.jpg"
    json_target, name = "POST /predict (JSON base64)", "face_expression"
    return BenchReport(
        machine={"date": "2030-01-01", "cpu": "Test CPU", "usable_cores": "2"},
        settings={},
        rows=[
            ResultRow("onnx", IN_PROCESS, PIPELINE_TARGET, 1, rate(20.0), model=name),
            ResultRow("onnx", IN_PROCESS, PIPELINE_TARGET, 16, rate(25.0), model=name, image=group),
            ResultRow("onnx", HTTP, json_target, 1, rate(18.0), batching="on", model=name),
            ResultRow("onnx", HTTP, json_target, 16, rate(22.0), batching="on", model=name),
            ResultRow("onnx", GRPC, UNARY, 16, rate(20.0), batching="on", model=name),
            ResultRow("onnx", GRPC, UNARY, 16, rate(23.0), batching="on", model=name, image=group),
        ],
        layouts=[
            LayoutRow("onnx", Layout(2, 2, 1), LayoutMeasurement(20, 1.0, 20), 4, model=name),
            LayoutRow("onnx", Layout(2, 2, 16), LayoutMeasurement(25, 1.0, 10), 4, model=name),
        ],
        tasks={name: "face_expression"},
        face_stages=[
            _stage("astronaut.jpg", 1, 44.0, 40.0, 1.0),  # 4 ms for its face through the registry
            _stage(group, 8, 52.0, 40.0, 6.4),  # 12 ms for 8: 1.5 ms each
        ],
    )


def test_a_pipeline_is_held_against_its_registry_limit_and_its_faces_targets(tmp_path: Path) -> None:
    report = _faces_report()
    assert report.limits()[("onnx", "face_expression")].layout == Layout(2, 2, 16)
    json_16, grpc_16, group_16 = report.rows[3], report.rows[4], report.rows[5]
    assert report.limit_ratio(json_16) == pytest.approx(0.88) and report.limit_ratio(grpc_16) == 0.8
    assert report.limit_ratio(group_16) is None  # one image: held against no limit
    assert (group_16.scenario, group_16.described_target) == ("image", f"{UNARY}, group-8-faces.jpg only")
    checks = {(c.target, c.row): c for c in check_targets(report)}
    label = "face_expression, batching on"
    http = checks[("c=16 HTTP JSON throughput", label)]
    assert (http.met, http.goal, http.margin) == (True, "≥ 0.85 × limit", "+0.030 × limit")
    grpc_check = checks[("c=16 gRPC unary throughput", label)]
    assert (grpc_check.met, grpc_check.margin) == (False, "-0.050 × limit")
    per_face = checks[
        ("classifier stage per face, 8 faces vs 1", "face_expression, in-process (through the registry)")
    ]
    assert (
        per_face.measured == "1.50 vs 4.00 ms per face = 0.38×"
        and per_face.met
        and per_face.margin == "+0.125×"
    )
    text = report.to_markdown()
    assert (
        "| onnx | face_expression | gRPC | Inference/Predict (unary), group-8-faces.jpg only | on | 16 | 8 |"
        in text
    )
    assert "| 23.0 | 184.0 |" in text  # img/s and faces/s
    stage_row = "| group-8-faces.jpg | 8 | 5 | 52.00 | 40.00 | 12.00 | 1.50 | 6.40 | 0.80 | 8.00 |"
    assert f"| onnx | face_expression {stage_row}" in text
    assert "per face with 8 faces vs 1: 0.38× through the registry, 0.80× direct" in text
    assert (
        "c=16: 16 concurrent requests through the registry" in text
        and "a pipeline's (face_expression)" in text
    )
    assert "| c=16 gRPC unary throughput | face_expression, batching on | 20.0 req/s = 0.80 × limit |" in text
    served_1 = [o for o in report.overheads() if o.model == "face_expression"]
    assert [(o.mode, round(o.difference_ms, 2)) for o in served_1] == [(HTTP, 0.0)]  # c=1 only
    data = report.to_dict()
    faces = data["faces"]
    assert isinstance(faces, dict)
    assert [(s["image"], s["per_face_ms_through_registry"]) for s in faces["classifier_stage"]] == [
        ("astronaut.jpg", 4.0),
        ("group-8-faces.jpg", 1.5),
    ]
    assert [(r["mode"], r["faces_per_s"]) for r in faces["faces_per_s"]] == [
        (IN_PROCESS, 200.0),
        (GRPC, 184.0),
    ]
    records = report.to_records()
    assert records[5]["scenario"] == "image" and records[5]["endpoint"] == f"{UNARY}, group-8-faces.jpg only"
    lost = replace(report, face_stages=[_stage("astronaut.jpg", 1, 40.0, 41.0, 1.0), report.face_stages[1]])
    noisy = {c.target: c for c in check_targets(lost)}["classifier stage per face, 8 faces vs 1"]
    assert not noisy.met and noisy.measured.startswith("not measurable")


def test_the_plans_send_a_pipeline_s_group_image_alone_at_the_top_level(tmp_path: Path) -> None:
    config = BenchConfig(
        models=("face_expression",), output=tmp_path, endpoints=("json", "grpc", "livestream")
    )
    image = encode(Image.new("RGB", (48, 40), "teal"), "JPEG")
    photo = BenchImage("a.jpg", image, 48, 40, "JPEG", "test")
    group = BenchImage("group-8-faces.jpg", image, 48, 40, "JPEG", "test")
    model = replace(
        BenchModel.of("face_expression", "face_expression", [photo, group], None),
        many_faces=group,
        metrics_model="retinaface_mnet025",
    )
    groups = [ServedGroup("on", None, _End(), _End(), models=("face_expression",))]
    with event_loop_runner() as runner, contextlib.ExitStack() as stack:
        plans = build_plans(
            config,
            label="onnx",
            groups=groups,
            models=[model],
            clients=Clients(config, runner, stack),
            bar=ProgressBar(io.StringIO()),
        )
    rows = [(p.template.target, p.template.concurrency, p.template.image) for p in plans]
    assert rows == [
        ("POST /predict (JSON base64)", 1, ""),
        (UNARY, 1, ""),
        ("POST /predict (JSON base64)", 16, ""),
        (UNARY, 16, ""),
        ("POST /predict (JSON base64)", 16, "group-8-faces.jpg"),
        (UNARY, 16, "group-8-faces.jpg"),
        ("Inference/PredictLive (1 stream, 30 frames/s)", 1, ""),
    ]
    assert {p.metrics_model for p in plans} == {"retinaface_mnet025"}  # the detector's batches
    assert plans[4].result().image == "group-8-faces.jpg"


def test_a_pipeline_s_stages_are_linked_into_the_run_s_repository(tmp_path: Path) -> None:
    source = tmp_path / "models"
    write_fake_entry(source, "cls", classes=7)
    write_fake_detector(source, "det")
    pipeline = {
        "name": "face_expression",
        "task": "face_expression",
        "stages": {"detector": "det", "classifier": "cls"},
    }
    (source / "face_expression").mkdir()
    (source / "face_expression" / "config.json").write_text(json.dumps(pipeline))

    def exporter(variant: Variant, repository: Path, log: Path) -> None:
        write_fake_detector(repository, variant.name)

    own = prepare_repository(
        source, ["face_expression", "yolo11n_320"], tmp_path / "out", note=print, exporter=exporter
    )
    assert ModelRepository(own).names() == ["cls", "det", "face_expression", "yolo11n_320"]
    assert all((own / name).is_symlink() for name in ("cls", "det", "face_expression"))
    config = BenchConfig(models=("face_expression",), output=tmp_path)
    facts = local_facts(
        config,
        {"face_expression": ModelRepository(own).get_pipeline("face_expression")},
        config.model_settings("onnx"),
        own,
    )
    assert str(facts["models"]).startswith(
        "face_expression (face_expression: det -> cls, the servers' default)"
    )
    assert "c=1,4,16,32" in str(facts["pipeline_in_process"])
