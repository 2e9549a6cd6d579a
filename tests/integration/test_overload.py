"""Overload: far more senders than a small queue holds, against the real servers started as users
start them, with the real model. The server refuses fast (503 + Retry-After / UNAVAILABLE with
retry-after), its memory stays bounded, every accepted request gets the right answer, and every
request sent is either answered or refused: nothing lost.

The load is the benchmark harness's own (`run_closed_loop` with its raw HTTP and grpc.aio
senders); each answer is checked as it arrives. The figures (offered, accepted, rejected, lost,
rejection latency, RSS) are printed (`pytest -s` shows them); latency is recorded, not asserted.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from fastapi.testclient import TestClient

from bench.closed_loop import RequestFailed, run_closed_loop
from bench.grpc_load import grpc_channel, grpc_sender, v2_grpc_sender
from bench.http_load import (
    HttpRequestSpec,
    event_loop_runner,
    file_request,
    json_request,
    v2_request,
)
from bench.images import as_jpeg
from bench.raw_http import RawHttpClient, RawResponse
from bench.server_metrics import MetricsSnapshot, scrape
from bench.servers import GrpcServerProcess, ServerProcess
from bench.stats import Measurement
from visionserve.errors import ErrorCode, VisionError
from visionserve.photos import packaged_photo
from visionserve.v1 import inference_pb2 as pb

MODEL = "efficientnet_lite0"
QUEUE = 4
SENDERS = 64
REQUESTS = 640  # per row: 10 per sender
RSS_BOUND_MB = 200
REFUSED_HTTP = "HTTP 503"
REFUSED_GRPC = "gRPC UNAVAILABLE"
RSS = "process_resident_memory_bytes"


@dataclass(frozen=True)
class Expected:
    """What the model answers for the photo when the server is not loaded."""

    label: str
    probability: float

    def matches(self, label: str, probability: float) -> bool:
        # NOTE: batched inference may differ from batch 1 in the last float bits
        return label == self.label and abs(probability - self.probability) < 1e-3


class RssSampler:
    """Polls a process's resident memory every 20 ms in a thread; `peak_mb` is the highest seen."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


@pytest.fixture(scope="module")
def photo() -> bytes:
    """coffee.png (espresso, p ~0.96 for this model) as the harness sends it: a 600 px JPEG."""
    return as_jpeg(packaged_photo("coffee.png")).data


def _env(real_repository: Path) -> dict[str, str]:
    return {"VISION_MODEL_REPOSITORY": str(real_repository), "VISION_MAX_QUEUE_SIZE": str(QUEUE)}


@pytest.fixture
def http_server(real_repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(
        "onnx", env=_env(real_repository), log_path=tmp_path / "http.log", ready_timeout_s=120
    ) as s:
        yield s


@pytest.fixture
def grpc_server(real_repository: Path, tmp_path: Path) -> Iterator[GrpcServerProcess]:
    server = GrpcServerProcess(
        "onnx", env=_env(real_repository), log_path=tmp_path / "grpc.log", ready_timeout_s=120
    )
    with server:
        yield server


def _report(name: str, m: Measurement, refused: str, rss_mb: tuple[float, float, float]) -> str:
    rejection = m.failures_summary([refused])
    accepted = m.summary()
    lost = m.failed - m.errors.get(refused, 0)
    line = (
        f"overload {name}: {SENDERS} senders, VISION_MAX_QUEUE_SIZE={QUEUE}: offered {m.sent}, accepted "
        f"{m.completed}, rejected {m.errors.get(refused, 0)}, lost {lost}"
    )
    if rejection is not None:
        line += f"; rejection p50 {rejection.p50_ms:.2f} ms, p99 {rejection.p99_ms:.2f} ms"
    if accepted is not None:
        line += f"; accepted p50 {accepted.p50_ms:.1f} ms, p99 {accepted.p99_ms:.1f} ms"
    line += f"; RSS warm {rss_mb[0]:.1f} MB, peak {rss_mb[1]:.1f} MB, after {rss_mb[2]:.1f} MB"
    print(line)
    return line


def _check_accounting(m: Measurement, refused: str, before: MetricsSnapshot, after: MetricsSnapshot) -> None:
    assert m.sent == REQUESTS
    assert set(m.errors) <= {refused}, f"lost: {m.errors}"  # no other status, no transport error
    assert m.completed + m.errors.get(refused, 0) == REQUESTS
    assert m.completed > 0 and m.errors.get(refused, 0) > 0, "not overloaded, or nothing accepted"
    # the server counted the same refusals, as queue_full
    refusals = after.rejected.get("queue_full", 0) - before.rejected.get("queue_full", 0)
    assert refusals == m.errors[refused]


def _rss_mb(url: str) -> float:
    return scrape(url).gauges[RSS] / 2**20


# --- HTTP ---------------------------------------------------------------------------------------


def _v2_top(element: str) -> tuple[str, float]:
    """A V2 classification element `prob:index:label` -> (label, prob)."""
    probability, _, label = element.split(":", 2)
    return label, float(probability)


def _http_check(expected: Expected) -> Callable[[RawResponse], None]:
    def check(response: RawResponse) -> None:
        if response.status == 503:
            body = json.loads(response.body)
            # the V2 routes answer the Open Inference Protocol's {"error": "<message>"}
            overloaded = body["error"]["code"] == "overloaded" if isinstance(body["error"], dict) else True
            if "retry-after" not in response.headers or not overloaded:
                raise RequestFailed(f"HTTP 503 without Retry-After or code overloaded: {body}")
        elif response.status == 200:
            answer = json.loads(response.body)
            if "outputs" in answer:
                label, probability = _v2_top(answer["outputs"][0]["data"][0])
            else:
                label, probability = answer["prediction"], answer["probability"]
            if not expected.matches(label, probability):
                raise RequestFailed(f"wrong answer {label} {probability}")

    return check


def _http_flood(base_url: str, spec: HttpRequestSpec, expected: Expected) -> Measurement:
    async def flood() -> Measurement:
        client = RawHttpClient(base_url, concurrency=SENDERS, timeout_s=30)
        try:
            return await run_closed_loop(
                client.sender(spec, check=_http_check(expected)), concurrency=SENDERS, requests=REQUESTS
            )
        finally:
            await client.aclose()

    with event_loop_runner() as runner:
        return runner.run(flood())


@pytest.mark.real_model
@pytest.mark.slow
def test_http_refuses_fast_and_answers_every_accepted_request_correctly(
    http_server: ServerProcess, photo: bytes
) -> None:
    import httpx2

    url = http_server.base_url
    metrics_url = f"{url}/metrics"
    specs = {
        "JSON": json_request(photo),
        "multipart": file_request(photo, "coffee.jpg"),
        "V2 binary": v2_request(photo, MODEL),
    }
    with httpx2.Client(base_url=url, trust_env=False, timeout=30) as client:
        for _ in range(5):  # unloaded, and the warm-up: the reference answer
            reply = client.post("/predict/file", files={"file": ("coffee.jpg", photo, "image/jpeg")})
            assert reply.status_code == 200, reply.text
        expected = Expected(reply.json()["prediction"], reply.json()["probability"])
    assert expected.label == "espresso"
    assert http_server.pid is not None
    warm = _rss_mb(metrics_url)
    lines = []
    for name, spec in specs.items():
        before = scrape(metrics_url)
        with RssSampler(http_server.pid) as rss:
            m = _http_flood(url, spec, expected)
        after = scrape(metrics_url)
        lines.append(_report(f"HTTP {name}", m, REFUSED_HTTP, (warm, rss.peak_mb, after.gauges[RSS] / 2**20)))
        _check_accounting(m, REFUSED_HTTP, before, after)
        assert rss.peak_mb < warm + RSS_BOUND_MB, lines[-1]
        assert after.gauges[RSS] / 2**20 < warm + RSS_BOUND_MB
    # still serving normally once the flood is over
    with httpx2.Client(base_url=url, trust_env=False, timeout=30) as client:
        reply = client.post("/predict/file", files={"file": ("coffee.jpg", photo, "image/jpeg")})
    assert reply.status_code == 200 and expected.matches(
        reply.json()["prediction"], reply.json()["probability"]
    )


# --- gRPC ---------------------------------------------------------------------------------------


def _grpc_check(expected: Expected) -> Callable[[Any], None]:
    def check(outcome: Any) -> None:
        if isinstance(outcome, grpc.aio.AioRpcError):
            if outcome.code() is grpc.StatusCode.UNAVAILABLE:
                metadata = dict(outcome.trailing_metadata() or ())
                if "retry-after" not in metadata:
                    raise RequestFailed("gRPC UNAVAILABLE without retry-after")
            return
        if isinstance(outcome, pb.PredictResponse):
            label, probability = outcome.prediction, outcome.probability
        else:  # V2 ModelInfer: BYTES elements, 4-byte little-endian length first
            (length,) = struct.unpack_from("<I", outcome.raw_output_contents[0])
            label, probability = _v2_top(outcome.raw_output_contents[0][4 : 4 + length].decode())
        if not expected.matches(label, probability):
            raise RequestFailed(f"wrong answer {label} {probability}")

    return check


@pytest.mark.real_model
@pytest.mark.slow
def test_grpc_refuses_fast_and_answers_every_accepted_request_correctly(
    grpc_server: GrpcServerProcess, photo: bytes
) -> None:
    metrics_url = grpc_server.metrics_url
    assert metrics_url is not None and grpc_server.pid is not None

    replies: list[Any] = []

    async def unloaded() -> None:  # unloaded, and the warm-up: the reference answer
        async with grpc_channel(grpc_server.target) as channel:
            await run_closed_loop(grpc_sender(channel, photo, check=replies.append), requests=5)

    asyncio.run(unloaded())
    assert all(isinstance(reply, pb.PredictResponse) for reply in replies), replies
    expected = Expected(replies[-1].prediction, replies[-1].probability)
    assert expected.label == "espresso"
    warm = _rss_mb(metrics_url)

    async def flood(v2: bool) -> Measurement:
        async with grpc_channel(grpc_server.target) as channel:
            check = _grpc_check(expected)
            send = (
                v2_grpc_sender(channel, photo, MODEL, check=check)
                if v2
                else grpc_sender(channel, photo, check=check)
            )
            return await run_closed_loop(send, concurrency=SENDERS, requests=REQUESTS)

    for name, v2 in (("gRPC Predict", False), ("gRPC V2 ModelInfer", True)):
        before = scrape(metrics_url)
        with RssSampler(grpc_server.pid) as rss, event_loop_runner() as runner:
            m = runner.run(flood(v2))
        after = scrape(metrics_url)
        line = _report(name, m, REFUSED_GRPC, (warm, rss.peak_mb, after.gauges[RSS] / 2**20))
        _check_accounting(m, REFUSED_GRPC, before, after)
        assert rss.peak_mb < warm + RSS_BOUND_MB, line


# --- refused before the body is read ------------------------------------------------------------


def test_an_upload_is_refused_before_its_multipart_body_is_parsed(
    fake_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/predict/file checks admission first: an overloaded server refuses even a malformed body
    with 503, and never parses the form (FastAPI would parse an UploadFile parameter first)."""
    from starlette.requests import Request

    service = fake_client.app.state.registry.default  # type: ignore[attr-defined]
    parsed: list[str] = []
    form = Request.form

    def recording_form(self: Request, **kwargs: Any) -> Any:
        parsed.append(self.url.path)
        return form(self, **kwargs)

    def full() -> None:
        raise VisionError(ErrorCode.OVERLOADED, "at capacity; retry shortly", retry_after_s=1)

    monkeypatch.setattr(Request, "form", recording_form)
    monkeypatch.setattr(service, "check_admission", full)
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    response = fake_client.post("/predict/file", content=b"not multipart at all", headers=headers)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "overloaded"
    assert parsed == []
    monkeypatch.setattr(service, "check_admission", lambda: None)
    response = fake_client.post("/predict/file", content=b"not multipart at all", headers=headers)
    assert response.status_code == 400 and parsed == ["/predict/file"]  # admitted: parsed, malformed
