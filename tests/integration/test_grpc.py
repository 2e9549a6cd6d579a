"""gRPC API (visionserve.v1.Inference), health checking and reflection: a real `GrpcServer` on a real
socket (127.0.0.1, port 0) and grpc.aio clients in the same event loop.

Each test runs one scenario with `asyncio.run`. The server is built exactly as `python -m grpc_server`
builds it (same class, same options); only its settings and runtime are chosen by the test.

The issue's list, and where it is covered:
- unary                                            test_predict*
- batch, one bad image among good ones             test_predict_batch_*, every `rejection` case
- streaming: 100 frames, order kept, a bad frame
  in the middle, client half-close                 test_stream_of_100_frames_*
- flow control (stream_read_ahead)                 test_stream_read_ahead_*
- health transitions                               test_health_*
- reflection list                                  test_reflection_*
- message-size error                               test_message_*
- an already-expired deadline                      test_*deadline*
- a client that cancels mid-stream                 test_cancelled_stream_*, test_stream_broken_*
- graceful shutdown with calls in flight           test_graceful_shutdown_*, test_shutdown_grace_*
- every bad-input case of the foundation issue     the "bad input", "failures" and "not ready"
  (tests/integration/test_http_bad_input.py)       sections, through all three methods; base64 and
                                                   JSON-schema cases have no gRPC equivalent (bytes
                                                   fields, typed messages): a message that does not
                                                   parse stands in for them
- the real model on real photos                    test_real_model_over_grpc
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image, ImageFile

from grpc_server.server import GrpcServer
from grpc_server.status import grpc_code
from tests.conftest import encode, photo_bytes
from tests.fixtures import FAKE_CLASSES, FailingRuntime, FakeRuntime, SlowRuntime, crafted_png, grpc_server_of
from tests.integration.test_http_bad_input import (
    GOOD_IMAGE,
    MODES,
    NOT_IMAGES,
    RED,
    WHITE,
    RecordingRuntime,
    WrongShapeRuntime,
    truncated_jpeg,
)
from visionserve.errors import GENERIC_INTERNAL_MESSAGE, ConfigurationError, ErrorCode
from visionserve.repository import ModelEntry
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import GrpcSettings, SecuritySettings, ServerSettings
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

SERVICE = "visionserve.v1.Inference"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
METHODS = ("Predict", "PredictBatch", "PredictStream")
SIZE_SETTING = "VISION_GRPC_MAX_MESSAGE_BYTES"
LIMIT = 4096  # the smallest VISION_GRPC_MAX_MESSAGE_BYTES allowed is 1024
StatusCode = grpc.StatusCode


# --- harness ------------------------------------------------------------------------------------


@dataclass
class Served:
    """A started server and a channel to it."""

    server: GrpcServer
    runtime: ModelRuntime
    channel: grpc.aio.Channel
    stub: pb_grpc.InferenceStub
    health: health_pb2_grpc.HealthStub


@contextlib.asynccontextmanager
async def serving(
    runtime: ModelRuntime,
    *,
    ready: bool = True,
    grpc_settings: dict[str, Any] | None = None,
    channel_options: Sequence[tuple[str, Any]] = (),
    security: SecuritySettings | None = None,
    **server_settings: Any,
) -> AsyncIterator[Served]:
    """Start a GrpcServer on 127.0.0.1:0 (waiting for the model unless `ready=False`), open a channel;
    on exit close the channel and stop the server (stopping twice is allowed)."""
    settings = GrpcSettings(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, **(grpc_settings or {})})
    server = grpc_server_of(
        settings, ServerSettings(preprocess_workers=2, **server_settings), runtime, security=security
    )
    port = await server.start()
    assert port > 0
    try:
        if ready:
            assert server.loaded is not None
            await server.loaded
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=list(channel_options)) as channel:
            yield Served(
                server,
                runtime,
                channel,
                pb_grpc.InferenceStub(channel),
                health_pb2_grpc.HealthStub(channel),
            )
    finally:
        gate = getattr(runtime, "gate", None)
        if gate is not None:
            gate.set()  # a runtime still waiting to load must not hold up the shutdown
        await server.stop(grace_s=1)


def run(scenario: Coroutine[Any, Any, None], timeout_s: float = 30.0) -> None:
    """Run one scenario in a fresh event loop, bounded so that a hang fails instead of stalling."""

    async def bounded() -> None:
        await asyncio.wait_for(scenario, timeout_s)

    asyncio.run(bounded())


async def until(
    predicate: Callable[[], object], what: str | Callable[[], str], timeout_s: float = 5.0
) -> None:
    """Poll `predicate` until true; fail naming `what` (or what it returns) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {what() if callable(what) else what}"
            )
        await asyncio.sleep(0.005)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    """Await a unary call, or read a streaming call to its end; it must fail: return its error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return info.value


async def health_of(served: Served, service: str = "") -> int:
    """Health Check's status for `service` ("" = the whole server)."""
    response = await served.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


def assert_message(message: str, *fragments: str) -> str:
    """A message a person can act on: non-empty, nothing internal, every fragment in it."""
    assert message.strip(), "empty message"
    for leak in ("Traceback", 'File "', "0xdeadbeef", "secret", "RuntimeError"):
        assert leak not in message, f"{leak!r} leaked into {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_status(error: grpc.aio.AioRpcError, status: grpc.StatusCode, *fragments: str) -> str:
    """The call failed with `status` and a message holding every fragment."""
    assert error.code() == status, f"{error.code()} {error.details()!r}"
    return assert_message(error.details() or "", *fragments)


def assert_good(response: pb.PredictResponse, topk: int = 5) -> None:
    """A FakeRuntime answer: the last class first, `topk` classes in descending probability."""
    assert response.prediction == f"class_{FAKE_CLASSES - 1}"
    assert [p.index for p in response.topk] == list(range(FAKE_CLASSES - 1, FAKE_CLASSES - 1 - topk, -1))
    assert response.topk[0].label == response.prediction
    assert response.probability == pytest.approx(response.topk[0].prob)
    probs = [p.prob for p in response.topk]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert response.model == "fake"
    assert response.latency_ms > 0


async def assert_serving(served: Served) -> None:
    """A good request still gets a good answer."""
    assert_good(await served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE), timeout=10))


async def stream(
    served: Served, frames: Sequence[pb.Frame], *, metadata: Sequence[tuple[str, str]] = ()
) -> list[pb.FramePrediction]:
    """Write every frame, half-close, read every answer (concurrently); the call must end OK."""
    call = served.stub.PredictStream(metadata=tuple(metadata) or None)

    async def write() -> None:
        for frame in frames:
            await call.write(frame)
        await call.done_writing()

    writer = asyncio.create_task(write())
    try:
        answers = [answer async for answer in call]
        await writer
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, grpc.aio.UsageError):
            await writer
    assert await call.code() == StatusCode.OK, await call.details()
    return answers


def frames_of(images: Sequence[bytes], *, topk: int = 0, first_id: int = 0) -> list[pb.Frame]:
    return [pb.Frame(image=image, frame_id=first_id + i, topk=topk) for i, image in enumerate(images)]


@dataclass(frozen=True)
class Outcome:
    """How one bad image was refused: the gRPC status (for batch slots and stream frames, the one the
    table gives the entry's code), the entry's code (None for Predict, which has only a status) and
    the message."""

    status: grpc.StatusCode
    code: str | None
    message: str


def _entry_outcome(error: pb.Error) -> Outcome:
    return Outcome(grpc_code(ErrorCode(error.code)), error.code, error.message)


async def rejection(served: Served, method: str, data: bytes, *, topk: int = 0) -> Outcome:
    """Send `data` through `method`: alone (Predict), or between two good images (batch slot, stream
    frame), where the good neighbours must still be answered. Returns how `data` was refused."""
    if method == "Predict":
        error = await rpc_error(served.stub.Predict(pb.PredictRequest(image=data, topk=topk)))
        return Outcome(error.code(), None, error.details() or "")
    if method == "PredictBatch":
        response = await served.stub.PredictBatch(
            pb.PredictBatchRequest(images=[GOOD_IMAGE, data, GOOD_IMAGE], topk=topk)
        )
        assert response.model == "fake"
        assert [r.WhichOneof("outcome") for r in response.results] == ["result", "error", "result"]
        for good in (response.results[0], response.results[2]):
            assert_good(good.result, topk or 5)
        return _entry_outcome(response.results[1].error)
    assert method == "PredictStream"
    answers = await stream(served, frames_of([GOOD_IMAGE, data, GOOD_IMAGE], topk=topk, first_id=7))
    assert [a.frame_id for a in answers] == [7, 8, 9]
    for good in (answers[0], answers[2]):
        assert not good.HasField("error") and len(good.topk) == (topk or 5)
    bad = answers[1]
    assert bad.HasField("error") and not bad.topk
    return _entry_outcome(bad.error)


async def assert_rejected(
    served: Served, outcome: Outcome, status: grpc.StatusCode, code: ErrorCode, *fragments: str
) -> str:
    """`outcome` has this status, this code (where the method carries one) and every fragment; then a
    good request must still succeed."""
    assert outcome.status == status, outcome
    assert outcome.code in (None, code.value), outcome
    assert_message(outcome.message, *fragments)
    await assert_serving(served)
    return outcome.message


class GatedRuntime(FakeRuntime):
    """FakeRuntime whose `load` waits until the test opens the gate (bounded)."""

    def __init__(self, model: ModelEntry):
        super().__init__(model)
        self.gate = threading.Event()

    def load(self) -> None:
        self.gate.wait(timeout=20)
        super().load()


class CountingSlowRuntime(SlowRuntime):
    """SlowRuntime that counts the batches it has started (not only those it finished), and warms up
    at once (SlowRuntime's warm-up runs three slow batches)."""

    def __init__(self, model: ModelEntry, *, batch_s: float):
        super().__init__(model, batch_s=batch_s)
        self.started = 0

    def warmup(self, iterations: int = 3) -> None:
        FakeRuntime.predict_batch(self, np.zeros((1, 3, *self.model.config.input.size), np.float32))

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        self.started += 1
        return super().predict_batch(batch)


def count_predictions(served: Served) -> dict[str, int]:
    """Wrap the service's `predict` to count calls started, in flight now, and most in flight."""
    counts = {"started": 0, "in_flight": 0, "max_in_flight": 0}
    service = served.server.registry.default
    original = service.predict

    async def counting(*args: Any, **kwargs: Any) -> Any:
        counts["started"] += 1
        counts["in_flight"] += 1
        counts["max_in_flight"] = max(counts["max_in_flight"], counts["in_flight"])
        try:
            return await original(*args, **kwargs)
        finally:
            counts["in_flight"] -= 1

    service.predict = counting  # type: ignore[method-assign]
    return counts


def live_tasks() -> Counter[str]:
    """The event loop's unfinished tasks, by coroutine name. (Compared by name, not identity: the
    server's accept loop replaces its own waiting task with a new one after every call.)"""
    return Counter(
        getattr(task.get_coro(), "__qualname__", type(task.get_coro()).__name__)
        for task in asyncio.all_tasks()
        if not task.done()
    )


def new_tasks(before: Counter[str]) -> Counter[str]:
    """Tasks running now that were not running at `before`."""
    return live_tasks() - before


async def runtime_idle(served: Served) -> None:
    """Wait until every job queued so far on the preprocess pool and the runtime thread has run
    (the runtime thread is one FIFO worker: a no-op submitted now runs after all of them)."""
    loop = asyncio.get_running_loop()
    service = served.server.registry.default
    await loop.run_in_executor(service.pipeline.preprocess_pool, lambda: None)
    await loop.run_in_executor(service.runtime_threads, lambda: None)


# --- unary and batch ----------------------------------------------------------------------------


def test_predict(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            assert_good(await served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)))
            assert_good(await served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE, topk=3)), topk=3)
            # proto3: topk 0 is "not set" -> the server's default
            assert_good(await served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE, topk=0)), topk=5)
            assert_good(await served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE, model="fake")))

    run(scenario())


def test_predict_uses_the_configured_default_topk(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry), default_topk=2) as served:
            assert_good(await served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)), topk=2)

    run(scenario())


def test_predict_batch_with_bad_images_among_good_ones(fake_entry: ModelEntry) -> None:
    images = [GOOD_IMAGE, b"not an image", GOOD_IMAGE, crafted_png(20000, 20000), b"", GOOD_IMAGE]

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            response = await served.stub.PredictBatch(pb.PredictBatchRequest(images=images, topk=2))
            assert response.model == "fake"
            kinds = [r.WhichOneof("outcome") for r in response.results]
            assert kinds == ["result", "error", "result", "error", "error", "result"]
            for index in (0, 2, 5):
                assert_good(response.results[index].result, topk=2)
            codes = [(r.error.code, r.error.message) for r in response.results if r.HasField("error")]
            assert [code for code, _ in codes] == ["invalid_image", "image_too_large", "invalid_image"]
            assert_message(codes[0][1], "not an image")
            assert_message(codes[1][1], "VISION_MAX_IMAGE_PIXELS")
            assert_message(codes[2][1], "empty")
            await assert_serving(served)

    run(scenario())


def test_predict_batch_refuses_the_whole_call_for_request_errors(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            batch = served.stub.PredictBatch
            error = await rpc_error(batch(pb.PredictBatchRequest(images=[])))
            assert_status(error, StatusCode.INVALID_ARGUMENT, "`images`", "empty")
            error = await rpc_error(batch(pb.PredictBatchRequest(images=[GOOD_IMAGE], model="resnet9000")))
            assert_status(error, StatusCode.NOT_FOUND, "'resnet9000'", "'fake'")
            error = await rpc_error(batch(pb.PredictBatchRequest(images=[GOOD_IMAGE], topk=11)))
            assert_status(error, StatusCode.INVALID_ARGUMENT, "topk", "10", "11")
            response = await batch(pb.PredictBatchRequest(images=[GOOD_IMAGE], model="fake"))
            assert_good(response.results[0].result)
            await assert_serving(served)

    run(scenario())


# --- streaming ----------------------------------------------------------------------------------


def test_stream_of_100_frames_keeps_order_answers_a_bad_frame_and_ends_on_half_close(
    fake_entry: ModelEntry,
) -> None:
    # Frame ids are not monotonic, so the order of answers can only come from the order of frames.
    # The bad frame fails at once in decoding, while the good frames before it still wait for the
    # runtime: its answer is ready first and must still come back in its place.
    ids = [(i * 37) % 101 + 1000 for i in range(100)]
    images = [GOOD_IMAGE] * 100
    images[50] = b"\x89PNG\r\n\x1a\n broken"

    async def scenario() -> None:
        async with serving(SlowRuntime(fake_entry, batch_s=0.002)) as served:
            frames = [
                pb.Frame(image=image, frame_id=fid, topk=3) for image, fid in zip(images, ids, strict=True)
            ]
            answers = await stream(served, frames)  # the call ends OK after the client half-closes
            assert [a.frame_id for a in answers] == ids
            for i, answer in enumerate(answers):
                if i == 50:
                    assert answer.HasField("error") and not answer.topk
                    assert answer.error.code == "invalid_image"
                    assert_message(answer.error.message, "not an image")
                else:
                    assert not answer.HasField("error"), (i, answer.error)
                    assert [p.index for p in answer.topk] == [9, 8, 7]
                    assert answer.latency_ms > 0
            await assert_serving(served)

    run(scenario())


def test_stream_with_a_request_iterator_and_an_empty_stream(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:

            async def frames() -> AsyncIterator[pb.Frame]:
                for frame in frames_of([GOOD_IMAGE] * 5):
                    yield frame

            answers = [a async for a in served.stub.PredictStream(frames())]
            assert [a.frame_id for a in answers] == [0, 1, 2, 3, 4]
            assert await stream(served, []) == []  # half-close at once: no answers, status OK

    run(scenario())


def test_stream_read_ahead_bounds_the_frames_in_flight(fake_entry: ModelEntry) -> None:
    """A client that sends 60 frames at once never has more than read_ahead + 2 of them in flight on
    the server: read_ahead queued, one held by the reader while the queue is full, and the one whose
    answer is being sent."""
    read_ahead = 2

    async def scenario() -> None:
        async with serving(
            SlowRuntime(fake_entry, batch_s=0.003), grpc_settings={"stream_read_ahead": read_ahead}
        ) as served:
            counts = count_predictions(served)
            answers = await stream(served, frames_of([GOOD_IMAGE] * 60))
            assert len(answers) == 60 and counts["started"] == 60
            assert 2 <= counts["max_in_flight"] <= read_ahead + 2, counts

    run(scenario())


def test_stream_read_ahead_makes_the_server_wait_for_a_slow_reader(fake_entry: ModelEntry) -> None:
    """A client that sends 200 frames but reads slowly: the server stops reading frames once
    read-ahead and the transport's window of answers are full, instead of computing the whole
    stream. (HTTP/2 flow control buffers answers too: the client's receive window is made small
    here so that the server's own bound shows; with the default 64 KiB window and tiny answers,
    the transport alone holds hundreds of them.)"""
    read_ahead = 2
    # client receive window ~1 KiB (about 5 answers of topk=10), without BDP probing growing it
    small_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]

    async def scenario() -> None:
        async with serving(
            SlowRuntime(fake_entry, batch_s=0.001),
            grpc_settings={"stream_read_ahead": read_ahead},
            channel_options=small_window,
        ) as served:
            counts = count_predictions(served)

            async def frames() -> AsyncIterator[pb.Frame]:
                for frame in frames_of([GOOD_IMAGE] * 200, topk=10):
                    yield frame

            call = served.stub.PredictStream(frames())
            consumed = 3
            for expected in range(consumed):
                assert (await call.read()).frame_id == expected
            # NOTE: a negative check needs some wait: an unbounded server computes all 200 frames
            # (1 ms each) well within 0.5 s here.
            await asyncio.sleep(0.5)
            # read_ahead queued + 1 held by the reader + 1 being sent + about 5 answers in the window
            assert counts["started"] <= consumed + read_ahead + 2 + 8, counts
            rest = []  # the server resumes as the client reads
            while (answer := await call.read()) is not grpc.aio.EOF:
                rest.append(answer.frame_id)
            assert rest == list(range(consumed, 200))
            assert await call.code() == StatusCode.OK
            assert counts["started"] == 200

    run(scenario())


def test_cancelled_stream_frees_its_work_and_leaves_no_tasks(fake_entry: ModelEntry) -> None:
    """The client cancels after 3 answers, with read_ahead frames started behind them: the server
    cancels those frames (they never reach the runtime), and no task of the stream is left."""
    read_ahead = 16

    async def scenario() -> None:
        runtime = CountingSlowRuntime(fake_entry, batch_s=0.05)
        async with serving(runtime, grpc_settings={"stream_read_ahead": read_ahead}) as served:
            await assert_serving(served)
            await stream(served, frames_of([GOOD_IMAGE]))  # grpc's lazily created tasks exist now
            before = live_tasks()
            counts = count_predictions(served)
            computed_before = runtime.started

            async def frames() -> AsyncIterator[pb.Frame]:
                for frame in frames_of([GOOD_IMAGE] * 100):
                    yield frame

            call = served.stub.PredictStream(frames())
            for expected in range(3):
                assert (await call.read()).frame_id == expected
            assert counts["started"] >= 3 + read_ahead, "the test needs frames waiting behind the answers"
            assert call.cancel()
            assert await call.code() == StatusCode.CANCELLED

            await until(
                lambda: not new_tasks(before), lambda: f"the stream's tasks to end: {new_tasks(before)}"
            )
            assert counts["in_flight"] == 0, counts
            await runtime_idle(served)  # whatever was already running in a worker thread has finished
            computed = runtime.started - computed_before
            # 3 read, a few answered but not read yet (the server does not wait for the client here),
            # 1 running when the cancel came; the other frames queued behind them must have been
            # cancelled, not computed for nobody
            assert computed <= 3 + 5, f"{computed} frames computed for 3 answers: queued frames ran on"
            assert counts["started"] <= 3 + read_ahead + 2 + 8, counts  # a stream that went on: all 100
            await assert_serving(served)
            assert runtime.started == computed_before + computed + 1, "the cancelled stream kept running"
            await until(lambda: not new_tasks(before), lambda: f"no tasks left: {new_tasks(before)}")

    run(scenario())


def test_stream_broken_by_the_client_iterator_leaves_no_tasks(fake_entry: ModelEntry) -> None:
    """A request iterator that raises aborts the call on the client side; the server side ends too."""

    async def scenario() -> None:
        async with serving(SlowRuntime(fake_entry, batch_s=0.005)) as served:
            await stream(served, frames_of([GOOD_IMAGE]))
            before = live_tasks()

            async def frames() -> AsyncIterator[pb.Frame]:
                for frame in frames_of([GOOD_IMAGE] * 5):
                    yield frame
                raise ValueError("the camera fell over")

            call = served.stub.PredictStream(frames())
            with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):  # grpc raises the former
                async for _ in call:
                    pass
            assert await call.code() == StatusCode.CANCELLED
            await until(
                lambda: not new_tasks(before), lambda: f"the stream's tasks to end: {new_tasks(before)}"
            )
            await assert_serving(served)

    run(scenario())


# --- health and reflection ----------------------------------------------------------------------


def test_health_not_serving_while_loading_then_serving(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = GatedRuntime(fake_entry)
        async with serving(runtime, ready=False) as served:
            assert await health_of(served) == NOT_SERVING
            assert await health_of(served, SERVICE) == NOT_SERVING
            error = await rpc_error(served.health.Check(health_pb2.HealthCheckRequest(service="nope.Nope")))
            assert error.code() == StatusCode.NOT_FOUND
            runtime.gate.set()
            assert served.server.loaded is not None
            await served.server.loaded
            await until(lambda: served.server.registry.default.ready, "the service to be ready")
            assert await health_of(served) == SERVING
            assert await health_of(served, SERVICE) == SERVING
            await assert_serving(served)

    run(scenario())


def test_health_not_serving_from_the_moment_stop_begins(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(CountingSlowRuntime(fake_entry, batch_s=0.2)) as served:
            watches = {
                name: served.health.Watch(health_pb2.HealthCheckRequest(service=name))
                for name in ("", SERVICE)
            }
            for watch in watches.values():
                assert (await watch.read()).status == SERVING
            counts = count_predictions(served)
            in_flight = asyncio.ensure_future(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)))
            await until(lambda: counts["started"] == 1, "the call to reach the service")
            stopping = asyncio.create_task(served.server.stop(grace_s=5))
            for watch in watches.values():
                assert (await watch.read()).status == NOT_SERVING
                assert not stopping.done()
                watch.cancel()  # else the server waits its grace for this open stream
            assert_good(await in_flight)
            await stopping

    run(scenario())


def _http_health(served: Served, path: str) -> tuple[int, dict[str, str]]:
    """GET `path` on the gRPC process's metrics port: (status, JSON body)."""
    url = f"http://127.0.0.1:{served.server.metrics_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def test_http_readiness_beside_the_metrics_follows_grpc_health(fake_entry: ModelEntry) -> None:
    """/health/ready on the metrics port (for HAProxy, which cannot send a gRPC health check) says
    what gRPC health says: 503 while loading, 200 when SERVING, 503 `stopping` once stop begins;
    no API key needed even when /metrics needs one."""

    async def scenario() -> None:
        runtime = GatedRuntime(fake_entry)
        security = SecuritySettings(api_key="k" * 32, tls_cert_file=None, tls_key_file=None)
        async with serving(runtime, ready=False, security=security) as served:
            assert await asyncio.to_thread(_http_health, served, "/health/live") == (200, {"status": "live"})
            status, body = await asyncio.to_thread(_http_health, served, "/health/ready")
            assert status == 503 and "not ready" in body["detail"], body
            runtime.gate.set()
            assert served.server.loaded is not None
            await served.server.loaded
            assert await health_of(served) == SERVING
            assert await asyncio.to_thread(_http_health, served, "/health/ready") == (
                200,
                {"status": "ready"},
            )
            with pytest.raises(urllib.error.HTTPError) as refused:  # the metrics keep their key
                await asyncio.to_thread(
                    urllib.request.urlopen, f"http://127.0.0.1:{served.server.metrics_port}/metrics", None, 5
                )
            assert refused.value.code == 401
            refused.value.close()
            await served.server.begin_shutdown()
            assert await health_of(served) == NOT_SERVING
            status, body = await asyncio.to_thread(_http_health, served, "/health/ready")
            assert (status, body["status"]) == (503, "stopping"), body

    run(scenario())


def test_health_stays_not_serving_when_stopped_during_loading(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = GatedRuntime(fake_entry)
        async with serving(runtime, ready=False) as served:
            watch = served.health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            assert (await watch.read()).status == NOT_SERVING
            stopping = asyncio.create_task(served.server.stop(grace_s=0.2))
            loaded = served.server.loaded
            assert loaded is not None
            await until(loaded.done, "stop() to cancel the loading")
            runtime.gate.set()  # the runtime finishes loading after the stop began
            await stopping
            assert runtime.loaded, "the load did not finish: the test proves nothing"
            assert served.server.registry.default.state == "stopped"
            statuses = []
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                while (response := await watch.read()) is not grpc.aio.EOF:
                    statuses.append(response.status)
            assert SERVING not in statuses, statuses

    run(scenario())


def test_health_and_calls_after_a_failed_load(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FailingRuntime(fake_entry, fail_on_load=True), ready=False) as served:
            assert served.server.loaded is not None
            with pytest.raises(RuntimeError, match="0xdeadbeef"):
                await served.server.loaded
            assert await health_of(served) == NOT_SERVING
            assert await health_of(served, SERVICE) == NOT_SERVING
            for call in (
                served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)),
                served.stub.PredictBatch(pb.PredictBatchRequest(images=[GOOD_IMAGE])),
            ):
                error = await rpc_error(call)
                assert_status(error, StatusCode.UNAVAILABLE, "failed to load")
                assert "retry-after" not in dict(error.trailing_metadata() or ())  # retrying will not help
            error = await rpc_error(served.stub.PredictStream(iter(frames_of([GOOD_IMAGE]))))
            assert_status(error, StatusCode.UNAVAILABLE, "failed to load")

    run(scenario())


def test_reflection_lists_the_services_and_describes_inference(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
            ]
            listed, described = [r async for r in stub.ServerReflectionInfo(iter(requests))]
            names = {s.name for s in listed.list_services_response.service}
            assert {SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE} <= names, names
            files = [
                descriptor_pb2.FileDescriptorProto.FromString(raw)
                for raw in described.file_descriptor_response.file_descriptor_proto
            ]
            (inference,) = [f for f in files if f.name == "visionserve/v1/inference.proto"]
            (service,) = inference.service
            methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.method}
            assert methods == {
                "Predict": (False, False),
                "PredictBatch": (False, False),
                "PredictStream": (True, True),
                "PredictLive": (True, True),
            }

    run(scenario())


# --- deadlines ----------------------------------------------------------------------------------


def test_expired_deadline_gets_deadline_exceeded(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            for call in (
                served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE), timeout=0),
                served.stub.PredictBatch(pb.PredictBatchRequest(images=[GOOD_IMAGE] * 3), timeout=0),
                # (not PredictStream: the client library fails its own first write on an expired
                # call and reports INTERNAL "Internal error from Core", before the server has a say)
            ):
                error = await rpc_error(call)
                assert error.code() == StatusCode.DEADLINE_EXCEEDED, error
            await assert_serving(served)

    run(scenario())


def test_call_whose_deadline_passed_before_the_server_got_to_it_is_not_computed(
    fake_entry: ModelEntry,
) -> None:
    """The server's event loop is busy past the calls' deadlines: when it gets to them, it must not
    compute them. (With `timeout=0` alone the server may still see a few microseconds left.)"""

    async def scenario() -> None:
        runtime = FakeRuntime(fake_entry)
        async with serving(runtime) as served:
            warmed = len(runtime.batches)
            port = served.server.port

            def call_from_another_thread() -> list[grpc.StatusCode]:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    grpc.channel_ready_future(channel).result(timeout=5)
                    stub = pb_grpc.InferenceStub(channel)
                    codes = []
                    for method, request in (
                        (stub.Predict, pb.PredictRequest(image=GOOD_IMAGE)),
                        (stub.PredictBatch, pb.PredictBatchRequest(images=[GOOD_IMAGE] * 3)),
                    ):
                        with pytest.raises(grpc.RpcError) as info:
                            method(request, timeout=0.05)
                        codes.append(info.value.code())
                    return codes

            client = threading.Thread(target=lambda: results.append(call_from_another_thread()))
            results: list[list[grpc.StatusCode]] = []
            client.start()
            # NOTE: blocks the event loop on purpose (a server too busy to get to the calls in time)
            # until the client has given up on both calls.
            client.join(timeout=10)
            assert results == [[StatusCode.DEADLINE_EXCEEDED] * 2], results
            # NOTE: nothing to poll for (gRPC core drops such calls, or the servicer refuses them):
            # give the server a moment to get to them before checking that it computed nothing
            await asyncio.sleep(0.1)
            await runtime_idle(served)
            assert len(runtime.batches) == warmed, "a call whose deadline had passed was computed"
            await assert_serving(served)

    run(scenario())


class ExpiredContext:
    """A servicer context whose deadline has passed; `abort` raises like grpc's."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float:
        return -0.5

    def set_trailing_metadata(self, metadata: object) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def test_servicer_refuses_a_call_whose_deadline_passed_before_computing(fake_entry: ModelEntry) -> None:
    """The servicer's own check (end to end, the client or gRPC core often sees the deadline first)."""

    async def scenario() -> None:
        runtime = FakeRuntime(fake_entry)
        async with serving(runtime) as served:
            warmed = len(runtime.batches)
            servicer = served.server.servicer
            for method, request in (
                (servicer.Predict, pb.PredictRequest(image=GOOD_IMAGE)),
                (servicer.PredictBatch, pb.PredictBatchRequest(images=[GOOD_IMAGE])),
            ):
                context = ExpiredContext()
                with pytest.raises(grpc.aio.AbortError):
                    await method(request, context)  # type: ignore[operator]
                assert context.aborted is not None
                assert context.aborted[0] == StatusCode.DEADLINE_EXCEEDED
                assert_message(context.aborted[1], "deadline")
            await runtime_idle(served)
            assert len(runtime.batches) == warmed

    run(scenario())


def test_deadline_passing_while_queued_is_not_computed(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = CountingSlowRuntime(fake_entry, batch_s=0.3)
        async with serving(runtime) as served:
            warmed = runtime.started
            first = asyncio.ensure_future(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)))
            await until(lambda: runtime.started > warmed, "the first call to reach the runtime")
            error = await rpc_error(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE), timeout=0.1))
            assert error.code() == StatusCode.DEADLINE_EXCEEDED
            assert_good(await first)
            await runtime_idle(served)
            assert runtime.started == warmed + 1, "the call that timed out while queued was computed"

    run(scenario())


# --- graceful shutdown --------------------------------------------------------------------------


def test_graceful_shutdown_completes_calls_in_flight_and_refuses_new_ones(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = CountingSlowRuntime(fake_entry, batch_s=0.2)
        async with serving(runtime) as served:
            counts = count_predictions(served)
            watch = served.health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            assert (await watch.read()).status == SERVING
            unary = [
                asyncio.ensure_future(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)))
                for _ in range(2)
            ]
            batch = asyncio.ensure_future(
                served.stub.PredictBatch(pb.PredictBatchRequest(images=[GOOD_IMAGE] * 2))
            )
            streamed = asyncio.ensure_future(stream(served, frames_of([GOOD_IMAGE] * 2)))
            await until(lambda: counts["started"] == 6, "every call to be in flight")

            transport = served.server.server
            transport_stop = transport.stop
            closing = asyncio.Event()

            async def stop(grace: float | None) -> None:
                closing.set()
                await transport_stop(grace)

            transport.stop = stop  # type: ignore[method-assign]
            started = time.monotonic()
            stopping = asyncio.create_task(served.server.stop(grace_s=5))
            assert (await watch.read()).status == NOT_SERVING
            watch.cancel()  # else the server waits its grace for this open stream
            await closing.wait()
            refused = await rpc_error(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)))
            assert refused.code() == StatusCode.UNAVAILABLE, refused
            assert not all(call.done() for call in (*unary, batch, streamed)), "no call was in flight"

            for call in unary:
                assert_good(await call)
            response = await batch
            assert [r.WhichOneof("outcome") for r in response.results] == ["result", "result"]
            answers = await streamed
            assert [a.frame_id for a in answers] == [0, 1] and not any(a.HasField("error") for a in answers)
            await stopping
            assert time.monotonic() - started < 4, "stop waited for its whole grace"
            assert runtime.closed and served.server.registry.default.state == "stopped"

    run(scenario())


def test_shutdown_grace_expiry_cancels_the_rest(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = CountingSlowRuntime(fake_entry, batch_s=0.2)
        async with serving(runtime) as served:
            warmed = runtime.started
            calls = [
                asyncio.ensure_future(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)))
                for _ in range(10)
            ]
            await until(lambda: runtime.started > warmed, "the first call to reach the runtime")
            started = time.monotonic()
            await served.server.stop(grace_s=0.3)
            elapsed = time.monotonic() - started
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            failed = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert failed and all(o.code() in (StatusCode.CANCELLED, StatusCode.UNAVAILABLE) for o in failed)
            assert elapsed < 1.5, f"stop took {elapsed:.2f} s with a 0.3 s grace"
            assert runtime.started - warmed < 10, "calls cancelled at the grace's end were still computed"

    run(scenario())


# --- bad input (tests/integration/test_http_bad_input.py, over gRPC) ----------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("data", list(NOT_IMAGES.values()), ids=list(NOT_IMAGES))
def test_not_an_image(fake_entry: ModelEntry, method: str, data: bytes) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            outcome = await rejection(served, method, data)
            await assert_rejected(
                served, outcome, StatusCode.INVALID_ARGUMENT, ErrorCode.INVALID_IMAGE, "not an image", "JPEG"
            )

    run(scenario())


@pytest.mark.parametrize("method", METHODS)
def test_empty_image(fake_entry: ModelEntry, method: str) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            outcome = await rejection(served, method, b"")
            await assert_rejected(
                served, outcome, StatusCode.INVALID_ARGUMENT, ErrorCode.INVALID_IMAGE, "empty"
            )

    run(scenario())


@pytest.mark.parametrize("method", METHODS)
def test_unsupported_formats_and_truncated_jpeg(fake_entry: ModelEntry, method: str) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            for fmt in ("ICO", "PPM", "PDF"):
                outcome = await rejection(served, method, encode(Image.new("RGB", (32, 32), RED), fmt))
                await assert_rejected(
                    served, outcome, StatusCode.INVALID_ARGUMENT, ErrorCode.INVALID_IMAGE, "supported format"
                )
            outcome = await rejection(served, method, truncated_jpeg())
            await assert_rejected(
                served, outcome, StatusCode.INVALID_ARGUMENT, ErrorCode.INVALID_IMAGE, "JPEG", "truncated"
            )

    run(scenario())


@pytest.mark.parametrize("method", METHODS)
def test_pixels_over_the_setting(fake_entry: ModelEntry, method: str) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry), max_image_pixels=10_000) as served:
            outcome = await rejection(served, method, encode(Image.new("RGB", (200, 100), RED), "JPEG"))
            await assert_rejected(
                served,
                outcome,
                StatusCode.RESOURCE_EXHAUSTED,
                ErrorCode.IMAGE_TOO_LARGE,
                "200x100",
                "10,000",
                "VISION_MAX_IMAGE_PIXELS",
            )

    run(scenario())


@pytest.mark.parametrize("method", METHODS)
def test_crafted_bomb_is_refused_before_decoding(
    fake_entry: ModelEntry, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    decoded: list[str] = []
    original_load = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> object:
        if self.size[0] * self.size[1] < 1_000_000:
            return original_load(self)  # the good neighbours in a batch or a stream
        decoded.append(f"{self.format} {self.size}")
        raise AssertionError("the pixels of a bomb were decoded")

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            for size in ((8000, 8000), (20000, 20000)):
                with monkeypatch.context() as patch:
                    patch.setattr(ImageFile.ImageFile, "load", load)
                    outcome = await rejection(served, method, crafted_png(*size))
                assert decoded == [], "refused only after decoding"
                await assert_rejected(
                    served,
                    outcome,
                    StatusCode.RESOURCE_EXHAUSTED,
                    ErrorCode.IMAGE_TOO_LARGE,
                    "VISION_MAX_IMAGE_PIXELS",
                    "40,000,000",
                )

    run(scenario())


def test_message_over_the_limit_names_the_setting(fake_entry: ModelEntry) -> None:
    payload = np.random.default_rng(4).bytes(LIMIT + 500)  # over the limit, under the transport's 2x

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry), grpc_settings={"max_message_bytes": LIMIT}) as served:
            request = pb.PredictRequest(image=payload)
            error = await rpc_error(served.stub.Predict(request))
            assert_status(
                error, StatusCode.RESOURCE_EXHAUSTED, SIZE_SETTING, "4,096", f"{request.ByteSize():,}"
            )
            await assert_serving(served)
            batch = pb.PredictBatchRequest(images=[GOOD_IMAGE, payload[: LIMIT // 2], payload[: LIMIT // 2]])
            error = await rpc_error(served.stub.PredictBatch(batch))
            assert_status(error, StatusCode.RESOURCE_EXHAUSTED, SIZE_SETTING, f"{batch.ByteSize():,}")
            await assert_serving(served)
            # in a stream, the frame over the limit gets its own error; the stream goes on
            outcome = await rejection(served, "PredictStream", payload)
            await assert_rejected(
                served, outcome, StatusCode.RESOURCE_EXHAUSTED, ErrorCode.PAYLOAD_TOO_LARGE, SIZE_SETTING
            )

    run(scenario())


def test_message_far_over_the_limit_is_refused_by_the_transport(fake_entry: ModelEntry) -> None:
    payload = b"x" * (3 * LIMIT)  # over twice the limit: gRPC core refuses it before it takes memory

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry), grpc_settings={"max_message_bytes": LIMIT}) as served:
            error = await rpc_error(served.stub.Predict(pb.PredictRequest(image=payload)))
            assert error.code() == StatusCode.RESOURCE_EXHAUSTED, error
            await assert_serving(served)
            error = await rpc_error(served.stub.PredictStream(iter(frames_of([GOOD_IMAGE, payload]))))
            assert error.code() == StatusCode.RESOURCE_EXHAUSTED, error
            await assert_serving(served)

    run(scenario())


@pytest.mark.parametrize("topk", [-1, FAKE_CLASSES + 1, 1000])
def test_topk_out_of_range(fake_entry: ModelEntry, topk: int) -> None:
    def check(message: str) -> None:
        assert_message(message, "topk", "between 1 and")
        if topk > FAKE_CLASSES:
            assert str(FAKE_CLASSES) in message and str(topk) in message, message

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            error = await rpc_error(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE, topk=topk)))
            check(assert_status(error, StatusCode.INVALID_ARGUMENT))
            await assert_serving(served)
            request = pb.PredictBatchRequest(images=[GOOD_IMAGE], topk=topk)
            error = await rpc_error(served.stub.PredictBatch(request))
            check(assert_status(error, StatusCode.INVALID_ARGUMENT))
            await assert_serving(served)
            good = pb.Frame(image=GOOD_IMAGE, frame_id=1)
            answers = await stream(served, [good, pb.Frame(image=GOOD_IMAGE, frame_id=2, topk=topk), good])
            assert [a.HasField("error") for a in answers] == [False, True, False]
            assert answers[1].error.code == "invalid_argument"
            check(answers[1].error.message)
            await assert_serving(served)

    run(scenario())


@pytest.mark.parametrize("topk", [1, FAKE_CLASSES])
def test_topk_bounds_are_inclusive(fake_entry: ModelEntry, topk: int) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            assert_good(await served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE, topk=topk)), topk)
            response = await served.stub.PredictBatch(pb.PredictBatchRequest(images=[GOOD_IMAGE], topk=topk))
            assert_good(response.results[0].result, topk)
            (answer,) = await stream(served, [pb.Frame(image=GOOD_IMAGE, topk=topk)])
            assert len(answer.topk) == topk

    run(scenario())


def test_unknown_model(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            error = await rpc_error(
                served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE, model="resnet9000"))
            )
            assert_status(error, StatusCode.NOT_FOUND, "'resnet9000'", "'fake'")
            # the model is checked before the image is decoded
            error = await rpc_error(served.stub.Predict(pb.PredictRequest(image=b"junk", model="resnet9000")))
            assert error.code() == StatusCode.NOT_FOUND
            assert_good(await served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE, model="fake")))

    run(scenario())


def test_unknown_method_and_a_message_that_does_not_parse(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            nope = served.channel.unary_unary(f"/{SERVICE}/Nope")
            assert (await rpc_error(nope(b""))).code() == StatusCode.UNIMPLEMENTED
            raw_predict = served.channel.unary_unary(f"/{SERVICE}/Predict")
            error = await rpc_error(raw_predict(b"\xff\xff\xff\xff not a PredictRequest"))
            # every method, both services, streams: tests/integration/test_grpc_bad_input.py
            assert_status(
                error,
                StatusCode.INVALID_ARGUMENT,
                "not a valid visionserve.v1.PredictRequest message (Wire format was corrupt)",
            )
            await assert_serving(served)

    run(scenario())


@pytest.mark.parametrize("mode", list(MODES))
def test_image_modes_are_converted(fake_entry: ModelEntry, mode: str) -> None:
    make, colour = MODES[mode]

    async def scenario() -> None:
        runtime = RecordingRuntime(fake_entry)
        async with serving(runtime) as served:
            for method in METHODS:
                runtime.last = None
                if method == "Predict":
                    await served.stub.Predict(pb.PredictRequest(image=make()))
                elif method == "PredictBatch":
                    response = await served.stub.PredictBatch(pb.PredictBatchRequest(images=[make()]))
                    assert response.results[0].HasField("result"), response
                else:
                    (answer,) = await stream(served, frames_of([make()]))
                    assert not answer.HasField("error"), answer
                pixels = runtime.last_pixels()
                np.testing.assert_allclose(
                    pixels, np.broadcast_to(colour, pixels.shape), atol=4, err_msg=method
                )

    run(scenario())


@pytest.mark.parametrize(("orientation", "corner"), [(1, (2, 2)), (3, (29, 29)), (6, (2, 29)), (8, (29, 2))])
def test_exif_orientation_is_honoured(
    fake_entry: ModelEntry, orientation: int, corner: tuple[int, int]
) -> None:
    image = Image.new("RGB", (48, 48), WHITE)
    image.paste(RED, (0, 0, 12, 12))  # stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(image, "JPEG", exif=exif, quality=95)

    async def scenario() -> None:
        runtime = RecordingRuntime(fake_entry)
        async with serving(runtime) as served:
            for method in ("Predict", "PredictStream"):
                runtime.last = None
                if method == "Predict":
                    await served.stub.Predict(pb.PredictRequest(image=data))
                else:
                    await stream(served, frames_of([data]))
                pixels = runtime.last_pixels()
                red = [
                    (row, col)
                    for row in (2, 29)
                    for col in (2, 29)
                    if pixels[row, col, 0] > 200 and pixels[row, col, 1] < 60 and pixels[row, col, 2] < 60
                ]
                assert red == [corner], f"{method}, orientation {orientation}: marker at {red}"

    run(scenario())


# --- failures inside the service ----------------------------------------------------------------


def test_runtime_failure_is_a_generic_internal_error(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = FailingRuntime(fake_entry, failures=None)
        async with serving(runtime) as served:
            for _ in range(2):
                error = await rpc_error(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)))
                assert_status(error, StatusCode.INTERNAL)
                assert "kernel" not in (error.details() or "")
            response = await served.stub.PredictBatch(pb.PredictBatchRequest(images=[GOOD_IMAGE] * 2))
            for result in response.results:
                assert result.error.code == "internal"
                assert_message(result.error.message)
            answers = await stream(served, frames_of([GOOD_IMAGE] * 2))
            assert [a.error.code for a in answers] == ["internal", "internal"]
            for answer in answers:
                assert_message(answer.error.message)
            runtime.failures_left = 0
            await assert_serving(served)

    run(scenario())


def test_runtime_that_fails_once(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FailingRuntime(fake_entry, failures=1)) as served:
            assert_status(
                await rpc_error(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE))), StatusCode.INTERNAL
            )
            await assert_serving(served)
            (answer,) = await stream(served, frames_of([GOOD_IMAGE]))
            assert not answer.HasField("error")

    run(scenario())


def test_malformed_runtime_output_is_internal(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(WrongShapeRuntime(fake_entry)) as served:
            error = await rpc_error(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)))
            assert_status(error, StatusCode.INTERNAL, "malformed")

    run(scenario())


def test_unexpected_exception_is_a_generic_internal_error(
    fake_entry: ModelEntry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(data: bytes) -> np.ndarray:
        raise ValueError("secret internal detail at 0xdeadbeef")

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            with monkeypatch.context() as patch:
                patch.setattr(served.server.registry.default.task, "preprocessor", broken)
                error = await rpc_error(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)))
                assert_status(error, StatusCode.INTERNAL)
                assert error.details() == GENERIC_INTERNAL_MESSAGE
                response = await served.stub.PredictBatch(pb.PredictBatchRequest(images=[GOOD_IMAGE]))
                assert response.results[0].error == pb.Error(
                    code="internal", message=GENERIC_INTERNAL_MESSAGE
                )
                (answer,) = await stream(served, frames_of([GOOD_IMAGE]))
                assert answer.error == pb.Error(code="internal", message=GENERIC_INTERNAL_MESSAGE)
            await assert_serving(served)

    run(scenario())


# --- not ready ----------------------------------------------------------------------------------


def test_not_ready_then_ready(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = GatedRuntime(fake_entry)
        async with serving(runtime, ready=False) as served:
            calls = {
                "Predict": lambda image: served.stub.Predict(pb.PredictRequest(image=image)),
                "PredictBatch": lambda image: served.stub.PredictBatch(
                    pb.PredictBatchRequest(images=[image])
                ),
                "PredictStream": lambda image: served.stub.PredictStream(iter(frames_of([image]))),
            }
            for method, call in calls.items():
                error = await rpc_error(call(GOOD_IMAGE))
                assert_status(error, StatusCode.UNAVAILABLE, "not ready", "'fake'")
                assert dict(error.trailing_metadata() or ()).get("retry-after") == "5", method
                # readiness is checked before the image is decoded
                assert (await rpc_error(call(b"@@@"))).code() == StatusCode.UNAVAILABLE, method
            runtime.gate.set()
            assert served.server.loaded is not None
            await served.server.loaded
            await assert_serving(served)
            (answer,) = await stream(served, frames_of([GOOD_IMAGE]))
            assert not answer.HasField("error")

    run(scenario())


# --- the real model -----------------------------------------------------------------------------

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def _check_real(label: str, prob: float, photo: str) -> None:
    if photo == "chelsea.png":
        assert label in CATS, label
    elif photo == "coffee.png":
        assert label == "espresso" and prob > 0.9, (label, prob)
    else:
        assert label == "daisy", label


@pytest.mark.real_model
def test_real_model_over_grpc(real_entry: ModelEntry) -> None:
    from visionserve.runtimes.onnx import OnnxRuntime

    photos = ["chelsea.png", "coffee.png", "flower.jpg"]
    images = {name: photo_bytes(name) for name in photos}

    async def scenario() -> None:
        async with serving(OnnxRuntime(real_entry, threads=2)) as served:
            for name in photos:
                response = await served.stub.Predict(pb.PredictRequest(image=images[name], topk=3))
                assert response.model == real_entry.name and len(response.topk) == 3
                _check_real(response.prediction, response.probability, name)
            batch = await served.stub.PredictBatch(
                pb.PredictBatchRequest(images=[*images.values(), b"not an image"])
            )
            assert [r.WhichOneof("outcome") for r in batch.results] == ["result"] * 3 + ["error"]
            for name, result in zip(photos, batch.results, strict=False):
                _check_real(result.result.prediction, result.result.probability, name)
            order = photos * 4
            answers = await stream(served, frames_of([images[name] for name in order], topk=1))
            assert [a.frame_id for a in answers] == list(range(len(order)))
            for name, answer in zip(order, answers, strict=True):
                _check_real(answer.topk[0].label, answer.topk[0].prob, name)

    run(scenario(), timeout_s=120)


def test_concurrent_calls_are_computed_in_one_batch(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = CountingSlowRuntime(fake_entry, batch_s=0.2)
        async with serving(runtime) as served:
            replies = await asyncio.gather(
                *(served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE)) for _ in range(4))
            )
            assert all(reply.topk for reply in replies)
            sizes = served.server.registry.default.batcher.batch_sizes
            assert max(sizes) >= 2, sizes  # one ran alone (idle fast path), the rest in one batch
            text = await asyncio.to_thread(_scrape, served)
            assert 'visionserve_batch_size_sum{model="fake"} 4.0' in text
            await until(lambda: _grpc_ok_count(served) == 4, "the interceptor to count 4 OK calls")

    run(scenario())


def test_metrics_endpoint_stops_with_the_server_and_a_taken_port_is_a_clear_error(
    fake_entry: ModelEntry,
) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            port = served.server.metrics_port
            assert 'visionserve_queue_depth{model="fake"} 0.0' in await asyncio.to_thread(_scrape, served)
            taken = grpc_server_of(
                GrpcSettings(host="127.0.0.1", port=0, metrics_port=port),
                ServerSettings(),
                FakeRuntime(fake_entry),
            )
            with pytest.raises(ConfigurationError, match="VISION_GRPC_METRICS_PORT"):
                await taken.start()
            await taken.stop(grace_s=0)
        with pytest.raises(OSError):  # refused: the endpoint closed with the server
            await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/metrics", None, 2)
        async with serving(FakeRuntime(fake_entry), grpc_settings={"metrics": False}) as served:
            assert served.server.metrics_port == 0

    run(scenario())


def _scrape(served: Served) -> str:
    """GET /metrics from the gRPC process's metrics endpoint, as Prometheus would."""
    port = served.server.metrics_port
    assert port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return str(reply.read().decode())


def _grpc_ok_count(served: Served) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = _scrape(served)
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "visionserve_requests_total"
        and sample.labels
        == {
            "protocol": "grpc",
            "endpoint": "/visionserve.v1.Inference/Predict",
            "status": "OK",
            "model": "fake",
        }
    )


@pytest.mark.parametrize("access_log", [False, True])
def test_one_log_line_per_call_only_with_the_access_log_on(
    fake_entry: ModelEntry, access_log: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry), access_log=access_log) as served:
            with caplog.at_level("INFO", logger="grpc_server.interceptors"):
                await served.stub.Predict(pb.PredictRequest(image=GOOD_IMAGE))
                await until(lambda: _grpc_ok_count(served) == 1, "the call to be counted")

    run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "grpc_server.interceptors"]
    if access_log:
        assert len(lines) == 1 and lines[0].startswith("/visionserve.v1.Inference/Predict OK ")
    else:
        assert lines == []
