"""Clients that vanish: their work is dropped, the metrics show it, and the server serves on.

The cases, and where each is covered:
- HTTP client gone while its request is queued     here (JSON and V2 bodies), and
                                                   tests/integration/test_http_disconnect.py
                                                   (multipart upload)
- HTTP client gone mid-body (half the body sent)   test_http_client_gone_mid_body_*
- HTTP client gone while its request is computed,
  or after its answer was sent and never read      test_http_client_gone_while_computed*,
                                                   test_http_client_that_never_reads_its_answer
- gRPC call cancelled while queued (Predict, V2)   test_grpc_call_cancelled_while_queued_*
- gRPC call whose deadline passes while queued     test_grpc_call_timing_out_while_queued_*
- a cancelled PredictStream                        test_cancelled_stream_drops_its_queued_frames,
                                                   and tests/integration/test_grpc.py
                                                   (test_cancelled_stream_*)

What shows it: `visionserve_rejected_total{reason="cancelled"}` counts requests whose client went
away before the model computed them (mid-body, while decoded, while queued);
`{reason="deadline"}` those whose deadline passed first (a gRPC call's deadline cancels it: counted
as `deadline`, not `cancelled`). Over HTTP the request is also counted in
`visionserve_requests_total` with status 499 (nginx's "client closed request"); nobody receives it.
A request already being computed cannot be stopped: it is computed, its answer dropped, and it is
not counted as rejected.

Each scenario runs a real server on 127.0.0.1:0 in its own event loop, with a runtime that computes
a batch only when the test lets it (`HeldRuntime`), so that "queued" and "computing" are states the
test waits for, not guesses of timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from bench.http_load import HttpRequestSpec, file_request, json_request
from bench.raw_http import encode_request
from tests.fixtures import FakeRuntime, app_of
from tests.integration.test_grpc import (
    GOOD_IMAGE,
    Served,
    assert_good,
    assert_serving,
    count_predictions,
    frames_of,
    live_tasks,
    new_tasks,
    rpc_error,
    run,
    serving,
    until,
)
from tests.integration.test_v2_grpc import constant_batch, logits, tensor_request, v2_stub
from visionserve.repository import ModelEntry
from visionserve.serving.model import ServedModel
from visionserve.settings import ServerSettings
from visionserve.v1 import inference_pb2 as pb

StatusCode = grpc.StatusCode


class HeldRuntime(FakeRuntime):
    """FakeRuntime whose batches wait until the test sets `gate` (bounded); counts the batches
    started (`started`) besides those finished (`batches`). Warm-up is not held."""

    def __init__(self, model: ModelEntry):
        super().__init__(model)
        self.gate = threading.Event()
        self.gate.set()
        self.started = 0

    def warmup(self, iterations: int = 3) -> None:
        FakeRuntime.predict_batch(self, np.zeros((1, 3, *self.model.config.input.size), np.float32))

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        self.started += 1
        assert self.gate.wait(timeout=20), "the test never released the runtime"
        return super().predict_batch(batch)


def rejected_in(text: str) -> dict[str, float]:
    """`visionserve_rejected_total` by reason, from a Prometheus text exposition."""
    counts = {"queue_full": 0.0, "deadline": 0.0, "cancelled": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "visionserve_rejected":
            for sample in family.samples:
                if sample.name == "visionserve_rejected_total":
                    counts[sample.labels["reason"]] = sample.value
    return counts


def requests_with_status(service: ServedModel, endpoint: str, status: int) -> float:
    value = service.metrics.registry.get_sample_value(
        "visionserve_requests_total",
        {"protocol": "http", "endpoint": endpoint, "status": str(status), "model": service.name},
    )
    return value or 0.0


# --- HTTP ---------------------------------------------------------------------------------------


@dataclass
class HttpServed:
    """A uvicorn server on 127.0.0.1:`port` serving the app over `runtime`."""

    port: int
    service: ServedModel
    runtime: HeldRuntime

    async def send(self, spec: HttpRequestSpec) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a connection and send the whole request; the caller reads or closes."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(encode_request(spec, "127.0.0.1"))
        await writer.drain()
        return reader, writer

    async def call(self, spec: HttpRequestSpec) -> tuple[int, bytes]:
        """One request on its own connection: the status and the body."""
        reader, writer = await self.send(spec)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            length = int({k.lower(): v for k, v in headers.items()}["content-length"])
            return int(lines[0].split()[1]), await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def rejected(self) -> dict[str, float]:
        """The rejection counters, read from GET /metrics."""
        status, body = await self.call(HttpRequestSpec("metrics", "GET", "/metrics", {}, b""))
        assert status == 200
        return rejected_in(body.decode())

    async def assert_serving(self) -> None:
        """A new request gets a correct answer."""
        status, body = await self.call(json_request(GOOD_IMAGE))
        assert status == 200, body
        assert b'"prediction":"class_9"' in body.replace(b" ", b""), body


@contextlib.asynccontextmanager
async def http_serving(runtime: HeldRuntime) -> AsyncIterator[HttpServed]:
    app = app_of(ServerSettings(preprocess_workers=2), runtime)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    serving_task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started, "uvicorn to start", timeout_s=20)
        service: ServedModel = app.state.registry.default
        await until(lambda: service.ready, "the model to load", timeout_s=20)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield HttpServed(port, service, runtime)
    finally:
        runtime.gate.set()
        server.should_exit = True
        await serving_task


def v2_json_request() -> HttpRequestSpec:
    body = (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": ['
        + b", ".join([b"0.5"] * (3 * 32 * 32))
        + b"]}]}"
    )
    return HttpRequestSpec("v2", "POST", "/v2/models/fake/infer", {"Content-Type": "application/json"}, body)


HTTP_REQUESTS: dict[str, tuple[str, Callable[[], HttpRequestSpec]]] = {
    "json": ("/predict", lambda: json_request(GOOD_IMAGE)),
    "multipart": ("/predict/file", lambda: file_request(GOOD_IMAGE, "x.png")),
    "v2": ("/v2/models/{model_name}/infer", v2_json_request),
}


@pytest.fixture
def server_errors(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The ERROR records logged so far (uvicorn's "Exception in ASGI application", ours)."""
    caplog.set_level(logging.INFO)
    return lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def until_metric(served: HttpServed, reason: str, value: float) -> None:
    counts: dict[str, float] = {}

    async def reached() -> bool:
        counts.update(await served.rejected())
        return counts[reason] == value

    for _ in range(200):
        if await reached():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"rejected{{reason={reason!r}}} is {counts.get(reason)}, expected {value}")


@pytest.mark.parametrize("kind", ["json", "v2"])
def test_http_client_gone_while_queued_is_dropped_and_counted(
    fake_entry: ModelEntry, kind: str, server_errors: Callable[[], list[str]]
) -> None:
    endpoint, make = HTTP_REQUESTS[kind]

    async def scenario() -> None:
        runtime = HeldRuntime(fake_entry)
        async with http_serving(runtime) as served:
            await served.assert_serving()
            before_tasks = live_tasks()
            before = await served.rejected()
            computed, started = len(runtime.batches), runtime.started
            runtime.gate.clear()
            reader_a, writer_a = await served.send(make())  # computing, held
            await until(lambda: runtime.started == started + 1, "A to be computing")
            _, writer_b = await served.send(make())
            await until(lambda: served.service.batcher.queue_depth == 1, "B to be queued")
            writer_b.close()  # B goes away while queued
            await until(lambda: served.service.batcher.queue_depth == 0, "B to be dropped from the queue")
            await until_metric(served, "cancelled", before["cancelled"] + 1)
            runtime.gate.set()
            head = await reader_a.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            writer_a.close()
            await until(lambda: requests_with_status(served.service, endpoint, 499) == 1, "B's 499")
            assert len(runtime.batches) == computed + 1, "B was computed for nobody"
            assert (await served.rejected())["deadline"] == before["deadline"]
            await served.assert_serving()
            await until(lambda: not new_tasks(before_tasks), lambda: f"tasks left: {new_tasks(before_tasks)}")
        assert server_errors() == []

    run(scenario())


@pytest.mark.parametrize("kind", list(HTTP_REQUESTS))
def test_http_client_gone_mid_body_is_counted_as_cancelled(
    fake_entry: ModelEntry, kind: str, server_errors: Callable[[], list[str]]
) -> None:
    """Half the body sent, then the connection closed: nothing reaches the model, the request is
    counted as cancelled (not as a 400 or a 500), no error is logged."""
    endpoint, make = HTTP_REQUESTS[kind]

    async def scenario() -> None:
        runtime = HeldRuntime(fake_entry)
        async with http_serving(runtime) as served:
            await served.assert_serving()
            before_tasks = live_tasks()
            before = await served.rejected()
            computed = runtime.started
            whole = encode_request(make(), "127.0.0.1")
            _, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(whole[: len(whole) - len(make().body) // 2])
            await writer.drain()
            await asyncio.sleep(0.05)  # the server reads the head and starts on the body
            writer.close()
            await until_metric(served, "cancelled", before["cancelled"] + 1)
            await until(lambda: requests_with_status(served.service, endpoint, 499) == 1, "a 499 recorded")
            for status in (400, 500):
                assert requests_with_status(served.service, endpoint, status) == 0
            assert runtime.started == computed
            await served.assert_serving()
            await until(lambda: not new_tasks(before_tasks), lambda: f"tasks left: {new_tasks(before_tasks)}")
        assert server_errors() == []

    run(scenario())


def test_http_client_gone_while_computed_holds_the_instance_until_it_is_free(
    fake_entry: ModelEntry, server_errors: Callable[[], list[str]]
) -> None:
    """A computation cannot be stopped: its answer is dropped (499, not counted as rejected), and the
    runtime instance stays busy until it ends, so the next request waits in the batcher's queue
    (where it can be dropped and is bounded by VISION_MAX_QUEUE_SIZE) rather than in the runtime
    thread's queue. Regression: the instance was freed when the client left."""

    async def scenario() -> None:
        runtime = HeldRuntime(fake_entry)
        async with http_serving(runtime) as served:
            await served.assert_serving()
            before_tasks = live_tasks()
            before = await served.rejected()
            computed, started = len(runtime.batches), runtime.started
            runtime.gate.clear()
            _, writer_a = await served.send(json_request(GOOD_IMAGE))
            await until(lambda: runtime.started == started + 1, "A to be computing")
            writer_a.close()
            await until(lambda: requests_with_status(served.service, "/predict", 499) == 1, "A's 499")
            assert not served.service.batcher.idle, "the instance was freed while it still computed"
            b = asyncio.ensure_future(served.call(json_request(GOOD_IMAGE)))
            await until(lambda: served.service.batcher.queue_depth == 1, "B to wait in the batcher's queue")
            assert runtime.started == started + 1
            runtime.gate.set()
            status, _ = await b
            assert status == 200
            assert len(runtime.batches) == computed + 2  # A (for nobody) and B
            assert await served.rejected() == before
            await served.assert_serving()
            await until(lambda: not new_tasks(before_tasks), lambda: f"tasks left: {new_tasks(before_tasks)}")
        assert server_errors() == []

    run(scenario())


def test_http_client_that_never_reads_its_answer(
    fake_entry: ModelEntry, server_errors: Callable[[], list[str]]
) -> None:
    """The answer is computed and sent, the client closes without reading it: a 200 on the server's
    books, nothing rejected, the server serves on."""

    async def scenario() -> None:
        runtime = HeldRuntime(fake_entry)
        async with http_serving(runtime) as served:
            await served.assert_serving()
            before_tasks = live_tasks()
            before = await served.rejected()
            answered = requests_with_status(served.service, "/predict", 200)
            _, writer = await served.send(json_request(GOOD_IMAGE))
            await until(
                lambda: requests_with_status(served.service, "/predict", 200) == answered + 1, "the answer"
            )
            writer.close()
            await served.assert_serving()
            assert await served.rejected() == before
            assert requests_with_status(served.service, "/predict", 499) == 0
            await until(lambda: not new_tasks(before_tasks), lambda: f"tasks left: {new_tasks(before_tasks)}")
        assert server_errors() == []

    run(scenario())


# --- gRPC ---------------------------------------------------------------------------------------


async def grpc_rejected(served: Served) -> dict[str, float]:
    """The rejection counters, read from the gRPC process's metrics endpoint."""
    url = f"http://127.0.0.1:{served.server.metrics_port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    return rejected_in(await asyncio.to_thread(fetch))


def grpc_call(served: Served, method: str, **kwargs: object) -> object:
    if method == "Predict":
        return served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE), **kwargs)
    return v2_stub(served).ModelInfer(tensor_request(constant_batch(0.5)), **kwargs)


async def assert_grpc_answer(method: str, call: object) -> None:
    if method == "Predict":
        assert_good(await call)  # type: ignore[misc]
    else:
        np.testing.assert_allclose(
            logits(await call),  # type: ignore[misc]
            [np.arange(10, dtype=np.float32) * 1.05],
            rtol=1e-6,
        )


async def one_computing_one_queued(
    served: Served, runtime: HeldRuntime, method: str, **kwargs: object
) -> tuple[asyncio.Future[object], asyncio.Future[object]]:
    """Call A (held in the runtime), then call B (queued behind it, with `kwargs`)."""
    computed = runtime.started
    runtime.gate.clear()
    first = asyncio.ensure_future(grpc_call(served, method))  # type: ignore[arg-type]
    await until(lambda: runtime.started == computed + 1, "A to be computing")
    second = asyncio.ensure_future(grpc_call(served, method, **kwargs))  # type: ignore[arg-type]
    await until(lambda: served.server.registry.default.batcher.queue_depth == 1, "B to be queued")
    return first, second


@pytest.mark.parametrize("method", ["Predict", "ModelInfer"])
def test_grpc_call_cancelled_while_queued_is_dropped_and_counted(fake_entry: ModelEntry, method: str) -> None:
    async def scenario() -> None:
        runtime = HeldRuntime(fake_entry)
        async with serving(runtime) as served:
            await assert_serving(served)
            before_tasks = live_tasks()
            before = await grpc_rejected(served)
            computed = len(runtime.batches)
            first, second = await one_computing_one_queued(served, runtime, method)
            second.cancel()
            await until(
                lambda: served.server.registry.default.batcher.queue_depth == 0, "B to leave the queue"
            )
            runtime.gate.set()
            await assert_grpc_answer(method, first)
            with pytest.raises(asyncio.CancelledError):
                await second
            after = await grpc_rejected(served)
            assert after == {**before, "cancelled": before["cancelled"] + 1}, after
            assert len(runtime.batches) == computed + 1, "the cancelled call was computed"
            await assert_serving(served)
            await until(lambda: not new_tasks(before_tasks), lambda: f"tasks left: {new_tasks(before_tasks)}")

    run(scenario())


@pytest.mark.parametrize("method", ["Predict", "ModelInfer"])
def test_grpc_call_timing_out_while_queued_is_dropped_and_counted_as_deadline(
    fake_entry: ModelEntry, method: str
) -> None:
    """gRPC cancels a call at its deadline: the queued item is dropped at once and counted as
    `deadline` (regression: it was counted as `cancelled`, and only when its batch formed)."""

    async def scenario() -> None:
        runtime = HeldRuntime(fake_entry)
        async with serving(runtime) as served:
            await assert_serving(served)
            before_tasks = live_tasks()
            before = await grpc_rejected(served)
            computed = len(runtime.batches)
            first, second = await one_computing_one_queued(served, runtime, method, timeout=0.3)
            error = await rpc_error(second)
            assert error.code() == StatusCode.DEADLINE_EXCEEDED
            await until(
                lambda: served.server.registry.default.batcher.queue_depth == 0, "B to leave the queue"
            )
            after = await grpc_rejected(served)
            assert after == {**before, "deadline": before["deadline"] + 1}, after
            runtime.gate.set()
            await assert_grpc_answer(method, first)
            assert len(runtime.batches) == computed + 1, "the call that timed out was computed"
            await assert_serving(served)
            await until(lambda: not new_tasks(before_tasks), lambda: f"tasks left: {new_tasks(before_tasks)}")

    run(scenario())


def test_cancelled_stream_drops_its_queued_frames(fake_entry: ModelEntry) -> None:
    """One frame computing, the rest of the read-ahead queued: cancelling the stream drops every
    queued frame uncomputed, and each is counted as cancelled."""
    read_ahead = 4

    async def scenario() -> None:
        runtime = HeldRuntime(fake_entry)
        async with serving(runtime, grpc_settings={"stream_read_ahead": read_ahead}) as served:
            await assert_serving(served)
            before_tasks = live_tasks()
            before = await grpc_rejected(served)
            computed, started = len(runtime.batches), runtime.started
            runtime.gate.clear()

            async def frames() -> AsyncIterator[pb.Frame]:
                for frame in frames_of([GOOD_IMAGE] * 50):
                    yield frame

            counts = count_predictions(served)
            call = served.stub.PredictStream(frames())
            service = served.server.registry.default
            await until(lambda: runtime.started == started + 1, "the first frame to be computing")
            await until(lambda: service.batcher.queue_depth >= read_ahead - 1, "the read-ahead to queue")
            assert call.cancel()
            await until(lambda: service.batcher.queue_depth == 0, "the queued frames to be dropped")
            runtime.gate.set()
            assert await call.code() == StatusCode.CANCELLED
            assert read_ahead <= counts["started"] <= read_ahead + 2, counts  # the window, bounded
            after = await grpc_rejected(served)
            # every frame started but the one computing was dropped, and counted
            assert after == {**before, "cancelled": before["cancelled"] + counts["started"] - 1}, after
            await until(lambda: not new_tasks(before_tasks), lambda: f"tasks left: {new_tasks(before_tasks)}")
            assert len(runtime.batches) == computed + 1, "queued frames of a cancelled stream were computed"
            await assert_serving(served)

    run(scenario())
