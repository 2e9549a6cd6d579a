"""`VideoClient`: frames to the gRPC API's `PredictStream`, answers back in frame order; and the
standard gRPC health check for the status page.

The stream is bounded on both sides: frames are produced lazily (decoded only as gRPC's flow
control and the server's read-ahead take them), and the call has a deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flask_ui.client import ClassScore, Readiness
from flask_ui.errors import Problem, UIError
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = "visionserve.v1.Inference"


@dataclass(frozen=True)
class FrameResult:
    """The answer for one frame: its classes, or the error the server gave for it alone."""

    frame_id: int
    topk: list[ClassScore]
    server_ms: float
    error: str = ""


def error_from_rpc(exc: grpc.RpcError, target: str, timeout_s: float) -> UIError:  # noqa: PLR0911
    """Map a failed gRPC call to what the page says."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE and "not ready" in details.lower():
        return UIError(
            Problem.NOT_READY,
            "The model is not ready yet",
            "The gRPC service is still loading its model; try again in a few seconds.",
        )
    if code == grpc.StatusCode.UNAVAILABLE and "at capacity" in details:
        return UIError(Problem.BUSY, "The model is busy", "Too many frames at once; try again in a moment.")
    if code == grpc.StatusCode.UNAVAILABLE:
        return UIError(
            Problem.UNREACHABLE,
            "The gRPC service is not reachable",
            f"Nothing serves at {target}. Start it (`make run` starts everything) or point "
            "VISION_UI_GRPC_TARGET at it.",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return UIError(
            Problem.TIMEOUT,
            "The video took too long",
            f"It was not done within {timeout_s:g} s (VISION_UI_VIDEO_TIMEOUT_S); try a shorter clip "
            "or a larger 'every Nth frame'.",
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UIError(
            Problem.API_ERROR,
            "The gRPC service refused this page's key",
            "It needs an API key and the UI's is missing or wrong: set VISION_UI_API_KEY to the "
            "API's VISION_API_KEY.",
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return UIError(Problem.TOO_LARGE, "A frame is too large", details or "Try a smaller video.")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return UIError(Problem.BAD_INPUT, "The video cannot be classified", details)
    logger.warning("gRPC stream to %s failed: %s %s", target, code, details)
    return UIError(Problem.API_ERROR, "The gRPC service failed", "Its log says why. Try again.")


class VideoClient:
    """Streams frames to the gRPC API at `target`. One channel per stream, so that a restarted
    server or a changed address never leaves a stale connection behind."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float,
        status_timeout_s: float,
        max_message_bytes: int,
        api_key: str | None = None,
        tls: bool = False,
        ca_file: Path | None = None,
    ):
        self.target = target
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes() if ca_file else None)
            if tls
            else None
        )
        self.timeout_s = timeout_s
        self.status_timeout_s = status_timeout_s
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]

    def _channel(self, options: list[tuple[str, int]] | None = None) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(self.target, self._credentials, options=options)
        return grpc.insecure_channel(self.target, options=options)

    def stream(self, frames: Iterable[tuple[int, bytes]], *, topk: int = 3) -> Generator[FrameResult]:
        """Send `(frame_id, encoded image)` pairs as one PredictStream; yield each answer as it
        arrives, in frame order. Raises UIError when the call fails (a bad frame does not: it
        comes back as a FrameResult with `error`). Closing the iterator early cancels the call."""
        requests = (pb.Frame(image=image, frame_id=frame_id, topk=topk) for frame_id, image in frames)
        channel = self._channel(self._options)
        stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]  # generated stub
        call = stub.PredictStream(requests, timeout=self.timeout_s, metadata=self._metadata)
        try:
            for answer in call:
                if answer.HasField("error") and answer.error.code:
                    yield FrameResult(answer.frame_id, [], answer.latency_ms, answer.error.message)
                else:
                    scores = [ClassScore(p.label, p.prob, p.index) for p in answer.topk]
                    yield FrameResult(answer.frame_id, scores, answer.latency_ms)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.target, self.timeout_s) from None
        finally:
            call.cancel()  # a no-op when the call is done; stops it when the page went away
            channel.close()

    def health(self) -> Readiness:
        """The standard health check for the Inference service: SERVING, NOT_SERVING or down."""
        with self._channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=self.status_timeout_s
                )
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return Readiness("down", f"nothing answers at {self.target}")
                return Readiness("down", f"health check failed: {code.name if code else exc}")
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return Readiness("ready", f"{SERVICE_NAME} answers health checks: SERVING")
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return Readiness("not_ready", name.replace("_", " "))
