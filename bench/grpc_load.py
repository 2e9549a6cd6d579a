"""gRPC load over grpc.aio: unary `Predict` (and the health check, the gRPC floor) in a closed
loop, and one `PredictStream`'s frames/s.

Everything goes over one channel (one HTTP/2 connection), built once per server; the request
messages are built once too, so the client's per-request cost is the call itself. The unary sender
plugs into `closed_loop.run_closed_loop`; a stream is measured by `measure_stream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.closed_loop import RequestFailed, SendOnce
from bench.stats import Measurement
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
"""As the server's default limit (`VISION_GRPC_MAX_MESSAGE_BYTES`); gRPC's own 4 MiB is too small."""

UNARY = "Inference/Predict (unary)"
HEALTH = "Health/Check (gRPC floor)"
STREAM = "Inference/PredictStream (1 stream)"
V2_UNARY = "GRPCInferenceService/ModelInfer (V2, BYTES)"
GRPC_ENDPOINTS = {"grpc": UNARY, "health": HEALTH, "stream": STREAM, "v2grpc": V2_UNARY}
"""The CLI's gRPC endpoint names -> what the report calls them."""

Metadata = tuple[tuple[str, str], ...]
"""gRPC metadata sent with every call (the API key: `Access.metadata()`)."""

CheckOutcome = Callable[[Any], None]
"""Called with a unary call's reply, or its `grpc.aio.AioRpcError`, before the outcome is counted;
it may raise `RequestFailed` to count the call as a failure of its own kind (a test verifies
answers with it)."""


def grpc_channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to `host:port` with 32 MiB messages, over TLS with `credentials`, plain
    without; proxies from the environment are ignored (a benchmark of localhost must not go
    through one)."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_http_proxy", 0),
    ]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


def grpc_sender(
    channel: grpc.aio.Channel,
    image: bytes,
    *,
    topk: int = 5,
    timeout_s: float = 30.0,
    check: CheckOutcome | None = None,
    metadata: Metadata = (),
) -> SendOnce:
    """A `send` for `run_closed_loop`: one `Predict` of `image` with `metadata` (e.g. the API
    key), the answer read; a failed call raises `RequestFailed("gRPC <STATUS>")`."""
    predict = pb_grpc.InferenceStub(channel).Predict  # type: ignore[no-untyped-call]
    return _unary_sender(predict, pb.PredictRequest(image=image, topk=topk), timeout_s, check, metadata)


def v2_grpc_sender(
    channel: grpc.aio.Channel,
    image: bytes,
    model: str,
    *,
    topk: int = 5,
    timeout_s: float = 30.0,
    check: CheckOutcome | None = None,
    metadata: Metadata = (),
) -> SendOnce:
    """A `send` for `run_closed_loop`: one Open Inference Protocol `ModelInfer` with the image as a
    BYTES element in `raw_input_contents` (as tritonclient sends it), the top-k asked for as a
    classification; a failed call raises `RequestFailed("gRPC <STATUS>")`."""
    from visionserve.v2 import grpc_service_pb2 as v2
    from visionserve.v2 import grpc_service_pb2_grpc as v2_grpc

    infer = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer  # type: ignore[no-untyped-call]
    request = v2.ModelInferRequest(
        model_name=model,
        inputs=[v2.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])],
        outputs=[
            v2.ModelInferRequest.InferRequestedOutputTensor(
                name="probabilities", parameters={"classification": v2.InferParameter(int64_param=topk)}
            )
        ],
        raw_input_contents=[struct.pack("<I", len(image)) + image],
    )
    return _unary_sender(infer, request, timeout_s, check, metadata)


def _unary_sender(
    call: Any,
    request: Any,
    timeout_s: float,
    check: CheckOutcome | None = None,
    metadata: Metadata = (),
) -> SendOnce:
    """A `send` that makes one unary `call` with `request` (built once) and `metadata`; a failed
    call raises `RequestFailed("gRPC <STATUS>")`; `check` sees the reply or the error first."""

    async def send() -> None:
        try:
            reply = await call(request, timeout=timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if check is not None:
                check(exc)
            raise RequestFailed(f"gRPC {exc.code().name}") from exc
        if check is not None:
            check(reply)

    return send


def health_sender(channel: grpc.aio.Channel, *, timeout_s: float = 30.0) -> SendOnce:
    """A `send` for `run_closed_loop`: one standard health check (`grpc.health.v1.Health/Check`),
    which runs no model, so its latency is the gRPC floor (client + server); an answer other than
    SERVING raises `RequestFailed("health <STATUS>")`, a failed call `RequestFailed("gRPC <STATUS>")`."""
    check = health_pb2_grpc.HealthStub(channel).Check
    request = health_pb2.HealthCheckRequest()
    serving = health_pb2.HealthCheckResponse.SERVING

    async def send() -> None:
        try:
            reply = await check(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(f"gRPC {exc.code().name}") from exc
        if reply.status != serving:
            raise RequestFailed(f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")

    return send


async def measure_stream(
    channel: grpc.aio.Channel,
    image: bytes | Sequence[bytes],
    *,
    frames: int | None = None,
    duration_s: float | None = None,
    window: int | None = None,
    topk: int = 5,
    frame_timeout_s: float = 30.0,
    metadata: Metadata = (),
) -> Measurement:
    """One `PredictStream` call: `image` (or several, in turn) sent as frames back to back until
    `frames` and/or `duration_s` run out, then the answers awaited. With `window`, at most that
    many frames are written and not yet answered; without, frames go as fast as the server's
    read-ahead and HTTP/2 flow control take them.

    A frame's latency runs from just before it is written to its answer, so it includes waiting
    behind the frames ahead of it; frames/s is `throughput_rps` (answered frames / wall time,
    first write to last answer). Error answers count as failures `frame <code>`; frames written
    but never answered (the call failed) as `gRPC <STATUS>`. The call's deadline is
    `frame_timeout_s` per frame bound plus the duration bound.
    """
    if frames is None and duration_s is None:
        raise ValueError("bound the stream: give a number of frames, a duration, or both")
    if frames is not None and frames < 0:
        raise ValueError(f"frames must not be negative, got {frames}")
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if frames == 0:
        return Measurement(latencies_s=(), wall_s=0.0)
    limit = math.inf if frames is None else frames
    images = [image] if isinstance(image, bytes) else list(image)
    if not images:
        raise ValueError("no images to stream")
    timeout_s = frame_timeout_s * (1 + (frames or 0)) + (duration_s or 0.0)
    stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
    call = stub.PredictStream(timeout=timeout_s, metadata=metadata)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    started = time.perf_counter()
    deadline = math.inf if duration_s is None else started + duration_s
    room = asyncio.Semaphore(window) if window is not None else None

    async def write() -> None:
        frame_id = 0
        try:
            while frame_id < limit and time.perf_counter() < deadline:
                if room is not None:
                    await room.acquire()
                    if time.perf_counter() >= deadline:
                        break
                sent_at[frame_id] = time.perf_counter()
                frame = pb.Frame(image=images[frame_id % len(images)], frame_id=frame_id, topk=topk)
                await call.write(frame)
                frame_id += 1
            await call.done_writing()
        except BaseException:
            call.cancel()  # the reader must not wait for answers that will not come
            raise

    writer = asyncio.create_task(write())
    last = started
    try:
        while (answer := await call.read()) is not grpc.aio.EOF:
            last = time.perf_counter()
            if room is not None:
                room.release()
            sent = sent_at.pop(answer.frame_id, None)
            if answer.HasField("error"):
                errors[f"frame {answer.error.code}"] += 1
            elif sent is not None:
                latencies.append(last - sent)
        await writer
    except grpc.aio.AioRpcError as exc:
        last = time.perf_counter()
        errors[f"gRPC {exc.code().name}"] += len(sent_at)  # written and never answered
        sent_at.clear()
    finally:
        writer.cancel()
        # the call's failure is counted above; the writer only saw it too
        with contextlib.suppress(asyncio.CancelledError, asyncio.InvalidStateError, grpc.aio.AioRpcError):
            await writer
        call.cancel()
    return Measurement(latencies_s=tuple(latencies), wall_s=last - started, errors=dict(errors))
