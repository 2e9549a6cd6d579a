"""gRPC load over grpc.aio: unary `Predict` (and the health check, the gRPC floor, and the Open
Inference Protocol's `ModelInfer`) in a closed loop. Streams are `stream_load`'s.

Everything goes over one channel (one HTTP/2 connection), built once per server; the request
messages are built once too, so the client's per-request cost is the call itself. The senders
plug into `closed_loop.run_closed_loop`. A request names its model and carries the task's
parameters (`topk` for a classifier, none for a detector), as the HTTP requests do.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.closed_loop import RequestFailed, SendOnce
from bench.http_load import CLASSIFY
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
"""As the server's default limit (`VISION_GRPC_MAX_MESSAGE_BYTES`); gRPC's own 4 MiB is too small."""

UNARY = "Inference/Predict (unary)"
HEALTH = "Health/Check (gRPC floor)"
STREAM = "Inference/PredictStream (1 stream)"
PACED = "Inference/PredictStream (1 stream, paced)"
LIVE = "Inference/PredictLive (1 stream, paced)"
V2_UNARY = "GRPCInferenceService/ModelInfer (V2, BYTES)"
GRPC_ENDPOINTS = {
    "grpc": UNARY,
    "health": HEALTH,
    "stream": STREAM,
    "pacedstream": PACED,
    "livestream": LIVE,
    "v2grpc": V2_UNARY,
}
"""The CLI's gRPC endpoint names -> what the report calls them."""
STREAM_ENDPOINTS = ("stream", "pacedstream", "livestream")
"""The gRPC endpoints that are one streaming call per round (not closed-loop senders)."""
CLASSIFIER_ONLY = ("v2grpc",)
"""gRPC endpoints that ask for a classification (the V2 request's `classification` output)."""


def message_fields(model: str, params: Mapping[str, object]) -> dict[str, Any]:
    """The fields of a `PredictRequest` or `Frame` that name the model and carry the task's
    parameters (`topk`, `score_threshold`, ..., `classes` as a list)."""
    fields: dict[str, Any] = {"model": model} if model else {}
    for key, value in params.items():
        fields[key] = list(value) if isinstance(value, list | tuple) else value
    return fields


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
    model: str = "",
    params: Mapping[str, object] = CLASSIFY,
    timeout_s: float = 30.0,
    check: CheckOutcome | None = None,
    metadata: Metadata = (),
) -> SendOnce:
    """A `send` for `run_closed_loop`: one `Predict` of `image` for `model` (empty: the server's
    default) with the task's `params` and `metadata` (e.g. the API key), the answer read; a failed
    call raises `RequestFailed("gRPC <STATUS>")`."""
    predict = pb_grpc.InferenceStub(channel).Predict  # type: ignore[no-untyped-call]
    request = pb.PredictRequest(image=image, **message_fields(model, params))
    return _unary_sender(predict, request, timeout_s, check, metadata)


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
