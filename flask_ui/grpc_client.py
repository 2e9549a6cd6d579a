"""`VideoClient`: frames to the gRPC API's `PredictStream` (every frame answered) or
`PredictLive` (the newest frame computed, superseded ones answered as skipped), answers back in
frame order; and the standard gRPC health check for the status page.

The stream is bounded on both sides: frames are produced lazily, at most `max_in_flight` of them
sent and not yet answered (so what the caller keeps per unanswered frame stays bounded), and the
call has a deadline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flask_ui.client import Readiness
from flask_ui.errors import Problem, UIError
from flask_ui.params import DetectionParams, FaceParams, TaskParams
from flask_ui.results import (
    DETECTION,
    EXPRESSIONS,
    FACE_EXPRESSION,
    Box,
    ClassScore,
    Detection,
    Face,
    FrameResult,
)
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = "visionserve.v1.Inference"
MAX_IN_FLIGHT = 16
"""Frames sent and not yet answered, at most: twice the server's default read-ahead
(VISION_GRPC_STREAM_READ_AHEAD=8), so the model is never starved, yet few enough that the page's
previews of unanswered frames stay small (16 x about 20 KB)."""
_POLL_S = 0.25


def _box(box: pb.Box) -> Box:
    return Box(box.x1, box.y1, box.x2, box.y2)


def _face(face: pb.Face) -> Face:
    expression = {name: float(getattr(face.expression, name)) for name in EXPRESSIONS}
    return Face(
        box=_box(face.box),
        score=face.score,
        landmarks=tuple((p.x, p.y) for p in face.landmarks),
        expression=expression,
        top=face.top or max(expression, key=expression.__getitem__),
    )


def frame_result(answer: pb.FramePrediction) -> FrameResult:
    """One `FramePrediction` as the pages use it."""
    if answer.skipped:
        return FrameResult(answer.frame_id, task=answer.task, skipped=True)
    if answer.HasField("error") and answer.error.code:
        return FrameResult(
            answer.frame_id,
            task=answer.task,
            server_ms=answer.latency_ms,
            error=answer.error.message,
            error_code=answer.error.code,
        )
    if answer.task == FACE_EXPRESSION:
        return FrameResult(
            answer.frame_id,
            task=FACE_EXPRESSION,
            faces=[_face(face) for face in answer.faces],
            width=answer.image.width,
            height=answer.image.height,
            server_ms=answer.latency_ms,
        )
    if answer.task == DETECTION:
        detections = [
            Detection(d.label, d.index, d.score, _box(d.box), tuple((p.x, p.y) for p in d.landmarks))
            for d in answer.detections
        ]
        return FrameResult(
            answer.frame_id,
            task=DETECTION,
            detections=detections,
            width=answer.image.width,
            height=answer.image.height,
            server_ms=answer.latency_ms,
        )
    scores = [ClassScore(p.label, p.prob, p.index) for p in answer.topk]
    return FrameResult(
        answer.frame_id, task=answer.task or "classification", topk=scores, server_ms=answer.latency_ms
    )


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
        return UIError(Problem.BAD_INPUT, "The model cannot take these settings", details)
    if code == grpc.StatusCode.NOT_FOUND:
        return UIError(Problem.BAD_INPUT, "There is no such model", details)
    logger.warning("gRPC stream to %s failed: %s %s", target, code, details)
    return UIError(Problem.API_ERROR, "The gRPC service failed", "Its log says why. Try again.")


def _frame_template(model: str, topk: int, params: TaskParams | None) -> pb.Frame:
    """What every frame of a stream carries besides its image: the model and its settings (unset
    ones left out: the model's own apply)."""
    template = pb.Frame(model=model, topk=topk)
    if params is not None and params.score_threshold is not None:
        template.score_threshold = params.score_threshold
    if isinstance(params, DetectionParams):
        if params.iou_threshold is not None:
            template.iou_threshold = params.iou_threshold
        if params.max_detections is not None:
            template.max_detections = params.max_detections
        template.classes.extend(params.classes)
    elif isinstance(params, FaceParams):
        if params.min_face_size is not None:
            template.min_face_size = params.min_face_size
        if params.max_faces is not None:
            template.max_faces = params.max_faces
    return template


def windowed(
    frames: Iterable[tuple[int, bytes]],
    template: pb.Frame,
    window: threading.Semaphore,
    done: threading.Event,
) -> Iterator[pb.Frame]:
    """`frames` as `Frame`s like `template`, each once `window` has a free slot (the reader of
    the answers frees one per answer); ends when `done` is set.

    NOTE: gRPC reads this on its own thread: it must not wait forever once nobody reads the
    answers any more, hence the polling of `done`.
    """
    for frame_id, image in frames:
        while not window.acquire(timeout=_POLL_S):
            if done.is_set():
                return
        if done.is_set():
            return
        frame = pb.Frame(image=image, frame_id=frame_id)
        frame.MergeFrom(template)
        yield frame


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

    def stream(
        self,
        frames: Iterable[tuple[int, bytes]],
        *,
        model: str = "",
        topk: int = 0,
        params: TaskParams | None = None,
        live: bool = False,
    ) -> Generator[FrameResult]:
        """Send `(frame_id, encoded image)` pairs to `model` (empty: the default) as one
        PredictStream, or PredictLive when `live`; yield each answer as it arrives, in frame order.
        `topk` (0: the server's default) is a classifier's, `params` a detector's or face model's
        settings.
        Raises UIError when the call fails (a bad frame does not: it comes back as a FrameResult
        with `error`). Closing the iterator early cancels the call."""
        template = _frame_template(model, topk, params)
        window = threading.Semaphore(MAX_IN_FLIGHT)
        done = threading.Event()

        channel = self._channel(self._options)
        stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]  # generated stub
        method = stub.PredictLive if live else stub.PredictStream
        requests = windowed(frames, template, window, done)
        call = method(requests, timeout=self.timeout_s, metadata=self._metadata)
        try:
            for answer in call:
                window.release()
                yield frame_result(answer)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.target, self.timeout_s) from None
        finally:
            done.set()
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
