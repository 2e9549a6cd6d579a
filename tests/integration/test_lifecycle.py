"""Lifecycle: SIGTERM with requests in flight, on both protocols, and a runtime that fails a batch.

Shutdown, as users see it (real processes started with `python -m`, the real model, 16 clients
sending real photos, SIGTERM while their requests are in flight; VISION_SHUTDOWN_DELAY_S=1):
1. readiness turns not-ready first: GET /health/ready 503 `{"status": "stopping"}`, gRPC health
   NOT_SERVING, while requests are still served (over HTTP with `Connection: close`);
2. after the delay new requests are refused: over HTTP the port is closed (connection refused) or,
   on a connection still open, 503 "shutting down" with Retry-After; over gRPC UNAVAILABLE. At
   the instant the port closes, a request that has arrived but was not yet taken by the server is
   not processed, and its client sees the transport end it: HTTP connection reset, gRPC CANCELLED
   (gRPC core's answer to calls it had not handed to the server). These are counted as refused
   only when they happen at the end of the delay, never to a request in flight at SIGTERM;
3. every request in flight at SIGTERM completes with the right answer, none hangs or is lost;
4. the process exits 0 within the delay plus the grace, without a traceback.
The in-process tests check the two steps of `ServedModel` (`begin_shutdown`,
`refuse_new_requests`) exactly, with a fake runtime.
"""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.http_load import json_request
from tests.conftest import photo_bytes
from tests.fixtures import FakeRuntime
from tests.integration.test_grpc import (
    GOOD_IMAGE,
    assert_good,
    assert_message,
    assert_serving,
    health_of,
    rpc_error,
    run,
    serving,
    until,
)
from tests.integration.test_grpc_process import GrpcProcess
from tests.integration.test_server_process import Server
from tests.integration.test_vanishing_clients import HeldRuntime, http_serving
from visionserve.repository import ModelEntry
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

PHOTOS = {"coffee.png": "espresso", "flower.jpg": "daisy"}
CLIENTS = 16
DELAY_S = 1.0
GRACE_S = 10.0
SERVICE = "visionserve.v1.Inference"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


# --- in process: the two steps of a shutdown ----------------------------------------------------


def test_http_begin_shutdown_turns_readiness_503_first_then_refuse_new_requests_refuses(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    client = app_client(FakeRuntime(fake_entry))
    registry = client.app.state.registry  # type: ignore[attr-defined]
    files = {"file": ("x.png", GOOD_IMAGE)}
    registry.begin_shutdown()
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "stopping", ready.text
    served = client.post("/predict/file", files=files)  # the drain delay: still served
    assert served.status_code == 200 and served.json()["prediction"] == "class_9", served.text
    registry.refuse_new_requests()
    for response in (client.post("/predict/file", files=files), client.post("/predict", json={"image": ""})):
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "not_ready"
        assert "shutting down" in response.json()["error"]["message"]
    assert client.get("/health/ready").json()["status"] == "stopping"
    assert client.get("/health/live").status_code == 200


def test_grpc_begin_shutdown_is_not_serving_first_then_calls_are_unavailable(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            await served.server.begin_shutdown()
            assert await health_of(served) == NOT_SERVING
            assert await health_of(served, SERVICE) == NOT_SERVING
            await assert_serving(served)  # the drain delay: still served
            served.server.registry.refuse_new_requests()
            error = await rpc_error(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert_message(error.details() or "", "shutting down")

    run(scenario())


# --- a runtime that raises during a batch ------------------------------------------------------


class FailingBatchRuntime(HeldRuntime):
    """HeldRuntime that raises in the batches whose start numbers are in `fail` (counted from 1)."""

    def __init__(self, model: ModelEntry):
        super().__init__(model)
        self.fail: set[int] = set()
        self.sizes: dict[int, int] = {}

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        number = self.started + 1
        self.sizes[number] = len(batch)
        scores = super().predict_batch(batch)  # counts, waits for the gate
        if number in self.fail:
            raise RuntimeError("secret internal detail: kernel launch failed at 0xdeadbeef")
        return scores


QUEUED = 4


def test_http_a_failing_batch_fails_each_of_its_requests_with_a_generic_500_and_the_next_batch_works(
    fake_entry: ModelEntry,
) -> None:
    """A computing (held), four requests queued behind it form the next batch, which raises: each
    of the four gets a 500 with the generic message; A, and a batch after, are answered."""

    async def scenario() -> None:
        runtime = FailingBatchRuntime(fake_entry)
        async with http_serving(runtime) as served:
            runtime.gate.clear()
            first = asyncio.ensure_future(served.call(json_request(GOOD_IMAGE)))
            await until(lambda: runtime.started >= 1, "A to be computing")
            queued = [asyncio.ensure_future(served.call(json_request(GOOD_IMAGE))) for _ in range(QUEUED)]
            await until(lambda: served.service.batcher.queue_depth == QUEUED, "the four to queue")
            runtime.fail = {runtime.started + 1}
            runtime.gate.set()
            status, body = await first
            assert status == 200, body
            for status, body in await asyncio.gather(*queued):
                assert status == 500, body
                assert b"inference failed" in body and b"internal" in body, body
                assert b"secret" not in body and b"0xdeadbeef" not in body, body
            assert runtime.sizes[max(runtime.fail)] == QUEUED, runtime.sizes  # one batch of the four
            await served.assert_serving()

    run(scenario())


def test_grpc_a_failing_batch_fails_each_of_its_calls_with_internal_and_the_next_batch_works(
    fake_entry: ModelEntry,
) -> None:
    async def scenario() -> None:
        runtime = FailingBatchRuntime(fake_entry)
        async with serving(runtime) as served:
            await assert_serving(served)
            runtime.gate.clear()
            first = asyncio.ensure_future(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)))
            started = runtime.started
            await until(lambda: runtime.started == started + 1, "A to be computing")
            queued = [
                asyncio.ensure_future(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)))
                for _ in range(QUEUED)
            ]
            await until(
                lambda: served.server.registry.default.batcher.queue_depth == QUEUED, "the four to queue"
            )
            runtime.fail = {runtime.started + 1}
            runtime.gate.set()
            assert_good(await first)
            for call in queued:
                error = await rpc_error(call)
                assert error.code() == grpc.StatusCode.INTERNAL
                assert_message(error.details() or "", "inference failed")
            assert runtime.sizes[max(runtime.fail)] == QUEUED, runtime.sizes
            await assert_serving(served)

    run(scenario())


# --- real processes: SIGTERM with requests in flight ------------------------------------------


@dataclass
class Outcome:
    """One request as a client saw it (time.monotonic())."""

    started: float
    ended: float
    kind: str  # ok, refused (503 / UNAVAILABLE / connection refused) or what went wrong
    closing: bool = False  # HTTP: the answer said `Connection: close`
    how: str = ""  # how it was refused


@dataclass
class Load:
    """CLIENTS threads sending real photos one after another until refused."""

    send: Callable[[int], Outcome]
    outcomes: list[Outcome] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for index in range(CLIENTS):
            thread = threading.Thread(target=self._client, args=(index,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _client(self, index: int) -> None:
        for count in range(10_000):
            outcome = self.send(index + count)
            with self.lock:
                self.outcomes.append(outcome)
            if outcome.kind != "ok":
                return

    def answered(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = sum(thread.is_alive() for thread in self.threads)
        assert hung == 0, f"{hung} client(s) still waiting for an answer {timeout_s} s after SIGTERM"


def photo(index: int) -> tuple[str, bytes, str]:
    name = list(PHOTOS)[index % len(PHOTOS)]
    return name, photo_bytes(name), PHOTOS[name]


@dataclass
class Figures:
    """What happened around SIGTERM (sent at `sigterm`)."""

    protocol: str
    sigterm: float
    exited: float
    exit_code: int
    outcomes: list[Outcome]
    not_ready_at: float

    @property
    def in_flight(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.started < self.sigterm < o.ended]

    def report(self) -> str:
        after = [o for o in self.outcomes if o.started >= self.sigterm]
        kinds = Counter(o.how or o.kind for o in after)
        completed = sum(o.kind == "ok" for o in self.in_flight)
        return (
            f"{self.protocol}: {len(self.in_flight)} in flight at SIGTERM, {completed} completed; "
            f"sent after SIGTERM: {dict(kinds)}; not ready {self.not_ready_at - self.sigterm:.2f} s "
            f"after SIGTERM; exit {self.exit_code} "
            f"{self.exited - self.sigterm:.2f} s after SIGTERM (delay {DELAY_S} s)"
        )


def check(figures: Figures, output: str) -> None:
    """The shutdown contract (module docstring), for either protocol."""
    print(figures.report())
    assert figures.exit_code == 0, output
    assert figures.exited - figures.sigterm < DELAY_S + GRACE_S, figures.report()
    assert "Traceback" not in output, output
    kinds = Counter(o.kind for o in figures.outcomes)
    assert set(kinds) <= {"ok", "refused"}, kinds  # no wrong answer, no error, nothing lost
    assert len(figures.in_flight) >= 2, figures.report()  # the test had work in flight
    assert all(o.kind == "ok" for o in figures.in_flight), figures.report()
    refused = [o for o in figures.outcomes if o.kind == "refused"]
    assert refused, "no request was refused after the delay"
    assert figures.not_ready_at < min(o.ended for o in refused), "refused before readiness flipped"
    assert all(o.ended >= figures.sigterm + DELAY_S * 0.9 for o in refused), "refused during the delay"
    served_draining = [o for o in figures.outcomes if o.kind == "ok" and o.started > figures.not_ready_at]
    assert served_draining, "nothing was served during the drain delay"


Processes = list[Server | GrpcProcess]


@pytest.fixture
def processes() -> Iterator[Processes]:
    started: Processes = []
    yield started
    for process in started:
        process.output()


@pytest.mark.real_model
@pytest.mark.slow
def test_http_sigterm_with_requests_in_flight(
    real_repository: Path, processes: list[Server | GrpcProcess]
) -> None:
    server = Server(
        "fastapi_onnx",
        {
            "VISION_PORT": "0",
            "VISION_MODEL_REPOSITORY": str(real_repository),
            "VISION_SHUTDOWN_DELAY_S": str(DELAY_S),
            "VISION_GRACEFUL_SHUTDOWN_S": str(GRACE_S),
        },
    )
    processes.append(server)
    server.wait_ready()
    local = threading.local()

    def send(index: int) -> Outcome:
        if not hasattr(local, "client"):
            local.client = httpx2.Client(base_url=server.url, timeout=60)
        name, data, label = photo(index)
        started = time.monotonic()
        try:
            response = local.client.post("/predict/file", files={"file": (name, data, "image/png")})
        except httpx2.ConnectError:
            return Outcome(started, time.monotonic(), "refused", how="connection refused")
        except (httpx2.ReadError, httpx2.WriteError, httpx2.RemoteProtocolError):
            # NOTE: when the port closes, a connection still in the accept backlog, or accepted with
            # its request not yet read, is reset: the request never reached the app. (Behind a load
            # balancer that has stopped routing here, during the drain delay, none arrive then.)
            return Outcome(started, time.monotonic(), "refused", how="connection reset, no answer")
        except httpx2.TransportError as exc:
            return Outcome(started, time.monotonic(), f"transport error {exc!r}")
        ended = time.monotonic()
        closing = response.headers.get("connection", "").lower() == "close"
        if response.status_code == 200:
            kind = "ok" if response.json()["prediction"] == label else f"wrong {response.text}"
        elif (
            response.status_code == 503
            and "shutting down" in response.json()["error"]["message"]
            and response.headers.get("retry-after") == "1"
        ):
            return Outcome(started, ended, "refused", closing, how="503 shutting down")
        else:
            kind = f"{response.status_code} {response.text}"
        return Outcome(started, ended, kind, closing)

    load = Load(send)
    load.start()
    while load.answered() < 2 * CLIENTS:  # warm, and every client has a request in flight
        time.sleep(0.01)
    sigterm = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    not_ready_at = float("inf")
    while server.process.poll() is None:
        try:
            ready = httpx2.get(f"{server.url}/health/ready", timeout=5)
        except httpx2.TransportError:
            break  # the port is closed
        assert ready.status_code in (200, 503), ready.text
        if ready.status_code == 503:
            assert ready.json()["status"] == "stopping", ready.text
            not_ready_at = min(not_ready_at, time.monotonic())
        else:
            assert not_ready_at == float("inf"), "ready again after not ready"
        time.sleep(0.02)
    exit_code = server.process.wait(timeout=DELAY_S + GRACE_S + 10)
    exited = time.monotonic()
    load.join(timeout_s=30)
    figures = Figures("HTTP", sigterm, exited, exit_code, load.outcomes, not_ready_at)
    check(figures, server.output())
    drained = [o for o in figures.outcomes if o.kind == "ok" and o.started > not_ready_at]
    assert all(o.closing for o in drained), "an answer during the drain kept its connection open"


@pytest.mark.real_model
@pytest.mark.slow
def test_grpc_sigterm_with_calls_in_flight(
    real_repository: Path, processes: list[Server | GrpcProcess]
) -> None:
    server = GrpcProcess(
        {
            "VISION_GRPC_PORT": "0",
            "VISION_GRPC_METRICS_PORT": "0",
            "VISION_MODEL_REPOSITORY": str(real_repository),
            "VISION_SHUTDOWN_DELAY_S": str(DELAY_S),
            "VISION_GRPC_GRACE_S": str(GRACE_S),
        }
    )
    processes.append(server)
    health_channel = grpc.insecure_channel(server.target)
    server.wait_serving(health_channel)
    channels = [grpc.insecure_channel(server.target) for _ in range(CLIENTS)]

    def send(index: int) -> Outcome:
        _, data, label = photo(index)
        stub = pb_grpc.InferenceStub(channels[index % CLIENTS])
        started = time.monotonic()
        try:
            response = stub.Predict(pb.PredictRequest(image=data), timeout=60)
        except grpc.RpcError as exc:
            ended = time.monotonic()
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return Outcome(started, ended, "refused", how="UNAVAILABLE")
            if exc.code() == grpc.StatusCode.CANCELLED:
                # NOTE: a call that gRPC core had received but not yet handed to the server when the
                # server stopped is ended CANCELLED by core: it never reached the service. (Behind a
                # load balancer that has stopped routing here, during the drain delay, none arrive.)
                return Outcome(started, ended, "refused", how="CANCELLED by gRPC core, not started")
            return Outcome(started, ended, f"{exc.code()} {exc.details()}")
        kind = "ok" if response.prediction == label else f"wrong {response.prediction}"
        return Outcome(started, time.monotonic(), kind)

    try:
        load = Load(send)
        load.start()
        while load.answered() < 2 * CLIENTS:
            time.sleep(0.01)
        sigterm = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(health_channel)
        not_ready_at = float("inf")
        while server.process.poll() is None:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
            except grpc.RpcError:
                break  # stopped
            if status == NOT_SERVING:
                not_ready_at = min(not_ready_at, time.monotonic())
            else:
                assert status == SERVING and not_ready_at == float("inf"), "serving again after not serving"
            time.sleep(0.02)
        exit_code = server.process.wait(timeout=DELAY_S + GRACE_S + 10)
        exited = time.monotonic()
        load.join(timeout_s=30)
    finally:
        for channel in (*channels, health_channel):
            channel.close()
    check(Figures("gRPC", sigterm, exited, exit_code, load.outcomes, not_ready_at), server.output())
    assert re.search(r"shutting down: NOT_SERVING, serving 1\.0 s more", server.output())


# --- a second signal ends the drain delay -------------------------------------------------------

LONG_DELAY_S = 120.0


@pytest.mark.real_model
@pytest.mark.slow
def test_http_a_second_signal_ends_the_drain_delay(
    real_repository: Path, processes: list[Server | GrpcProcess]
) -> None:
    server = Server(
        "fastapi_onnx",
        {
            "VISION_PORT": "0",
            "VISION_MODEL_REPOSITORY": str(real_repository),
            "VISION_SHUTDOWN_DELAY_S": str(LONG_DELAY_S),
        },
    )
    processes.append(server)
    server.wait_ready()
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while httpx2.get(f"{server.url}/health/ready", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "readiness did not turn 503"
        time.sleep(0.02)
    # still serving during the delay
    answer = httpx2.post(f"{server.url}/predict/file", files={"file": ("c.png", photo_bytes("coffee.png"))})
    assert answer.status_code == 200 and answer.json()["prediction"] == "espresso"
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    assert time.monotonic() - started < LONG_DELAY_S / 4, "the second signal did not end the delay"
    assert "Traceback" not in server.output()


@pytest.mark.real_model
@pytest.mark.slow
def test_grpc_a_second_signal_ends_the_drain_delay(
    real_repository: Path, processes: list[Server | GrpcProcess]
) -> None:
    server = GrpcProcess(
        {
            "VISION_GRPC_PORT": "0",
            "VISION_GRPC_METRICS_PORT": "0",
            "VISION_MODEL_REPOSITORY": str(real_repository),
            "VISION_SHUTDOWN_DELAY_S": str(LONG_DELAY_S),
        }
    )
    processes.append(server)
    with grpc.insecure_channel(server.target) as channel:
        server.wait_serving(channel)
        health = health_pb2_grpc.HealthStub(channel)
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status != NOT_SERVING:
            assert time.monotonic() < deadline, "health did not turn NOT_SERVING"
            time.sleep(0.02)
        reply = pb_grpc.InferenceStub(channel).Predict(  # type: ignore[no-untyped-call]
            pb.PredictRequest(image=photo_bytes("coffee.png")), timeout=30
        )
        assert reply.prediction == "espresso"  # still serving during the delay
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    assert time.monotonic() - started < LONG_DELAY_S / 4, "the second signal did not end the delay"
    assert "Traceback" not in server.output()
