"""`InferenceServicer`: visionserve.v1.Inference over the core's model registry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeAlias

import grpc

from grpc_server.encode import task_parameters, to_frame, to_response
from grpc_server.status import abort, check_message_size, check_response_size, error_message
from grpc_server.streams import Skipped, answered_in_order, answered_live
from visionserve.deadlines import expired
from visionserve.errors import ErrorCode, VisionError
from visionserve.serving.pipeline import InferenceResult
from visionserve.serving.registry import ModelRegistry
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext  # type: ignore[type-arg]
_ANSWER_HINT = "ask for fewer classes (topk) or fewer detections (max_detections)"


def call_deadline(context: Context) -> float | None:
    """The call's deadline on the monotonic clock (for the batcher's queue); DEADLINE_EXCEEDED if
    it has already passed."""
    remaining = context.time_remaining()
    expired(remaining)
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(pb_grpc.InferenceServicer):
    """Translates calls to and from the registry's models; no inference logic of its own."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_message_bytes: int,
        stream_read_ahead: int,
        live_in_flight: int = 2,
    ):
        self.registry = registry
        self.max_message_bytes = max_message_bytes
        self.stream_read_ahead = stream_read_ahead
        self.live_in_flight = live_in_flight

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:  # noqa: N802
        """One image."""
        try:
            check_message_size(request, self.max_message_bytes)
            deadline = call_deadline(context)
            served = self.registry.get(request.model)
            result = await served.predict(request.image, task_parameters(request), deadline=deadline)
            response = to_response(result)
            check_response_size(response, self.max_message_bytes, _ANSWER_HINT)
        except Exception as exc:
            await abort(context, exc)
            raise  # unreachable: abort raises
        return response

    async def PredictBatch(  # noqa: N802
        self, request: pb.PredictBatchRequest, context: Context
    ) -> pb.PredictBatchResponse:
        """Several images; each slot gets its result or its own error."""
        try:
            check_message_size(request, self.max_message_bytes)
            deadline = call_deadline(context)
            served = self.registry.get(request.model)
            parameters = task_parameters(request)
            served.parameters(parameters)
            served.check_ready()
            if not request.images:
                raise VisionError(ErrorCode.INVALID_ARGUMENT, "`images` is empty: send at least one image")
            # NOTE: as for a V2 batch: images beyond what the queue holds could only ever be answered
            # "at capacity", and each costs a slot in the answer (100,000 empty images, 200 KB sent,
            # took seconds and hundreds of MB to answer)
            served.admission.check_count(len(request.images))
        except Exception as exc:
            await abort(context, exc)
            raise
        outcomes = await asyncio.gather(
            *(served.predict(image, parameters, deadline=deadline) for image in request.images),
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
        response = pb.PredictBatchResponse(results=results, model=served.name)
        try:
            check_response_size(
                response, self.max_message_bytes, f"send fewer images per call, or {_ANSWER_HINT}"
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
            self.registry.default.check_ready()
        except Exception as exc:
            await abort(context, exc)
        answers = answered_in_order(
            request_iterator, self._timed(self._predict_frame), self.stream_read_ahead
        )
        async with contextlib.aclosing(answers):
            async for frame, outcome in answers:
                yield self._frame_answer(frame, outcome)

    async def PredictLive(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.Frame], context: Context
    ) -> AsyncIterator[pb.FramePrediction]:
        """Live video: the newest frame is computed whenever the model is free; the frames it
        supersedes are answered `skipped`. Answers come in frame order, one per frame."""
        try:
            self.registry.default.check_ready()
        except Exception as exc:
            await abort(context, exc)
        timed = self._timed(self._predict_frame)
        answers = answered_live(request_iterator, timed, self.live_in_flight)
        async with contextlib.aclosing(answers):
            async for frame, outcome in answers:
                if isinstance(outcome, Skipped):
                    yield pb.FramePrediction(frame_id=frame.frame_id, model=frame.model, skipped=True)
                else:
                    yield self._frame_answer(frame, outcome)

    @staticmethod
    def _timed(
        predict: Callable[[pb.Frame], Awaitable[InferenceResult]],
    ) -> Callable[[pb.Frame], Awaitable[tuple[InferenceResult, float]]]:
        """`predict`, with the time from the frame's arrival to its result."""

        async def timed(frame: pb.Frame) -> tuple[InferenceResult, float]:
            arrived = time.perf_counter()
            result = await predict(frame)
            return result, (time.perf_counter() - arrived) * 1e3

        return timed

    def _frame_answer(
        self, frame: pb.Frame, outcome: tuple[InferenceResult, float] | Exception
    ) -> pb.FramePrediction:
        """A frame's result, or its error (an answer over the size limit is one)."""
        if not isinstance(outcome, Exception):
            result, latency_ms = outcome
            answer = to_frame(frame.frame_id, result, latency_ms)
            try:
                check_response_size(answer, self.max_message_bytes, _ANSWER_HINT)
                return answer
            except VisionError as exc:
                outcome = exc
        return pb.FramePrediction(frame_id=frame.frame_id, model=frame.model, error=error_message(outcome))

    async def _predict_frame(self, frame: pb.Frame) -> InferenceResult:
        check_message_size(frame, self.max_message_bytes)
        served = self.registry.get(frame.model)
        return await served.predict(frame.image, task_parameters(frame))
