"""`InferenceServicer`: visionserve.v1.Inference over the core `InferenceService`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from grpc_server.status import abort, error_message
from grpc_server.streams import answered_in_order
from visionserve.errors import ErrorCode, VisionError
from visionserve.service import InferenceResult, InferenceService
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext  # type: ignore[type-arg]
SIZE_SETTING = "VISION_GRPC_MAX_MESSAGE_BYTES"


def check_response_size(response: object, limit: int, hint: str) -> None:
    """Refuse an answer over the limit with a message naming the setting (PAYLOAD_TOO_LARGE).

    NOTE: the server sends at most VISION_GRPC_MAX_MESSAGE_BYTES too; without this check, an answer
    over it (many small images with a large topk) ends the call with gRPC core's RESOURCE_EXHAUSTED
    "Sent message larger than max", which names nothing a client can change.
    """
    size = response.ByteSize()  # type: ignore[attr-defined]
    if size > limit:
        raise VisionError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the response would be {size:,} bytes; the limit is {limit:,} bytes (setting "
            f"{SIZE_SETTING}): {hint}",
        )


def to_predictions(result: InferenceResult) -> list[pb.Prediction]:
    """Core predictions -> protobuf."""
    return [pb.Prediction(label=p.label, prob=p.prob, index=p.index) for p in result.predictions]


def to_response(result: InferenceResult) -> pb.PredictResponse:
    """A core result -> `PredictResponse` (the same fields as the HTTP API's)."""
    top = result.predictions[0]
    return pb.PredictResponse(
        topk=to_predictions(result),
        model=result.model,
        prediction=top.label,
        probability=top.prob,
        latency_ms=result.total_ms,
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    """Translates calls to and from `InferenceService`; no inference logic of its own."""

    def __init__(self, service: InferenceService, *, max_message_bytes: int, stream_read_ahead: int):
        self.service = service
        self.max_message_bytes = max_message_bytes
        self.stream_read_ahead = stream_read_ahead

    def _check_size(self, message: object) -> None:
        size = message.ByteSize()  # type: ignore[attr-defined]
        if size > self.max_message_bytes:
            raise VisionError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the message is {size:,} bytes; the limit is {self.max_message_bytes:,} bytes "
                f"(setting {SIZE_SETTING})",
            )

    @staticmethod
    def _check_deadline(context: Context) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise VisionError(
                ErrorCode.DEADLINE_EXCEEDED, "the call's deadline passed before it was computed"
            )

    @staticmethod
    def _deadline(context: Context) -> float | None:
        """The call's deadline on the monotonic clock, for the batcher's queue."""
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    @staticmethod
    def _topk(value: int) -> int | None:
        return value if value != 0 else None  # proto3: 0 means "not set"

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:  # noqa: N802
        """One image."""
        try:
            self._check_size(request)
            self._check_deadline(context)
            result = await self.service.predict(
                request.image,
                topk=self._topk(request.topk),
                model=request.model or None,
                deadline=self._deadline(context),
            )
            response = to_response(result)
            check_response_size(response, self.max_message_bytes, "ask for fewer classes (topk)")
        except Exception as exc:
            await abort(context, exc)
            raise  # unreachable: abort raises
        return response

    async def PredictBatch(  # noqa: N802
        self, request: pb.PredictBatchRequest, context: Context
    ) -> pb.PredictBatchResponse:
        """Several images; each slot gets its result or its own error."""
        try:
            self._check_size(request)
            self._check_deadline(context)
            self.service.check_model(request.model or None)
            topk = self.service.resolve_topk(self._topk(request.topk))
            self.service.check_ready()
            if not request.images:
                raise VisionError(ErrorCode.INVALID_ARGUMENT, "`images` is empty: send at least one image")
            # NOTE: as for a V2 batch: images beyond what the queue holds could only ever be answered
            # "at capacity", and each costs a slot in the answer (100,000 empty images, 200 KB sent,
            # took seconds and hundreds of MB to answer)
            queue = self.service.batcher.max_queue_size
            if len(request.images) > queue:
                raise VisionError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"`images` has {len(request.images):,} images; a call can never have more queued "
                    f"than the queue holds ({queue}, setting VISION_MAX_QUEUE_SIZE): send fewer at once",
                )
        except Exception as exc:
            await abort(context, exc)
            raise
        deadline = self._deadline(context)
        outcomes = await asyncio.gather(
            *(self.service.predict(image, topk=topk, deadline=deadline) for image in request.images),
            return_exceptions=True,
        )
        results = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                results.append(pb.BatchResult(error=error_message(outcome)))
            else:
                results.append(pb.BatchResult(result=to_response(outcome)))
        response = pb.PredictBatchResponse(results=results, model=self.service.model.name)
        try:
            check_response_size(
                response, self.max_message_bytes, "send fewer images per call or ask for fewer classes (topk)"
            )
        except VisionError as exc:
            await abort(context, exc)
        return response

    async def PredictStream(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.Frame], context: Context
    ) -> AsyncIterator[pb.FramePrediction]:
        """Frames in, answers out in frame order; at most `stream_read_ahead` frames in flight.

        A frame whose image is bad is answered with its `error` and the stream goes on; a frame that
        is not a valid `Frame` message ends the call with INVALID_ARGUMENT once the frames before it
        are answered (grpc_server/messages.py)."""
        try:
            self.service.check_ready()
        except Exception as exc:
            await abort(context, exc)
        answers = answered_in_order(request_iterator, self._predict_frame, self.stream_read_ahead)
        async with contextlib.aclosing(answers):
            async for frame, outcome in answers:
                yield self._frame_answer(frame, outcome)

    def _frame_answer(self, frame: pb.Frame, outcome: InferenceResult | Exception) -> pb.FramePrediction:
        """A frame's predictions, or its error (an answer over the size limit is one)."""
        if not isinstance(outcome, Exception):
            answer = pb.FramePrediction(
                frame_id=frame.frame_id, topk=to_predictions(outcome), latency_ms=outcome.total_ms
            )
            try:
                check_response_size(answer, self.max_message_bytes, "ask for fewer classes (topk)")
                return answer
            except VisionError as exc:
                outcome = exc
        return pb.FramePrediction(frame_id=frame.frame_id, error=error_message(outcome))

    async def _predict_frame(self, frame: pb.Frame) -> InferenceResult:
        self._check_size(frame)
        return await self.service.predict(frame.image, topk=self._topk(frame.topk))
