"""Streams over grpc.aio: one `PredictStream` fed back to back (frames/s), and one `PredictStream`
or `PredictLive` fed like a camera (frames at a fixed rate, latency from each frame's capture).

- `measure_stream`: frames written as fast as the call takes them, at most `window` unanswered;
  a frame's latency runs from its write to its answer, so it includes waiting behind the frames
  ahead of it. The throughput mode: its frames/s is held against the in-process limit.
- `measure_paced`: frame i is captured at `start + i / fps` and written then (or as soon as the
  call takes it: a camera's frames queue up in the client while the call's flow control holds
  them back). A frame's latency runs from its capture to its answer, the delay a viewer sees.
  In order (`PredictStream`) a model slower than the camera falls further behind with every
  frame; live (`PredictLive`) the server computes the newest frame whenever the model is free and
  answers the frames it superseded `skipped` (counted apart, never timed).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from bench.grpc_load import Metadata, message_fields
from bench.http_load import CLASSIFY
from bench.stats import Measurement
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc


def _images(image: bytes | Sequence[bytes]) -> list[bytes]:
    images = [image] if isinstance(image, bytes) else list(image)
    if not images:
        raise ValueError("no images to stream")
    return images


def _check_bounds(frames: int | None, duration_s: float | None) -> None:
    if frames is None and duration_s is None:
        raise ValueError("bound the stream: give a number of frames, a duration, or both")
    if frames is not None and frames < 0:
        raise ValueError(f"frames must not be negative, got {frames}")


async def measure_stream(
    channel: grpc.aio.Channel,
    image: bytes | Sequence[bytes],
    *,
    frames: int | None = None,
    duration_s: float | None = None,
    window: int | None = None,
    model: str = "",
    params: Mapping[str, object] = CLASSIFY,
    frame_timeout_s: float = 30.0,
    metadata: Metadata = (),
) -> Measurement:
    """One `PredictStream` call: `image` (or several, in turn) sent as frames back to back until
    `frames` and/or `duration_s` run out, then the answers awaited. With `window`, at most that
    many frames are written and not yet answered; without, frames go as fast as the server's
    read-ahead and HTTP/2 flow control take them.

    frames/s is `throughput_rps` (answered frames / wall time, first write to last answer). Error
    answers count as failures `frame <code>`; frames written but never answered (the call failed)
    as `gRPC <STATUS>`. The call's deadline is `frame_timeout_s` per frame bound plus the duration
    bound.
    """
    _check_bounds(frames, duration_s)
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if frames == 0:
        return Measurement(latencies_s=(), wall_s=0.0)
    images = _images(image)
    room = asyncio.Semaphore(window) if window is not None else None
    return await _run_call(
        pb_grpc.InferenceStub(channel).PredictStream,  # type: ignore[no-untyped-call]
        images,
        frames=frames,
        duration_s=duration_s,
        fields=message_fields(model, params),
        timeout_s=frame_timeout_s * (1 + (frames or 0)) + (duration_s or 0.0),
        metadata=metadata,
        room=room,
        fps=None,
    )


async def measure_paced(
    channel: grpc.aio.Channel,
    image: bytes | Sequence[bytes],
    *,
    fps: float,
    live: bool,
    frames: int | None = None,
    duration_s: float | None = None,
    model: str = "",
    params: Mapping[str, object] = CLASSIFY,
    frame_timeout_s: float = 30.0,
    metadata: Metadata = (),
) -> Measurement:
    """One `PredictLive` (`live`) or `PredictStream` call fed like a camera at `fps`: `image` (or
    several, in turn) captured one frame every 1/fps s until `frames` and/or `duration_s` run out.

    A frame's latency runs from its capture to its answer; frames answered `skipped` are counted
    in `skipped`. `throughput_rps` is the frames computed per second of wall time (first capture
    to last answer). Failures are counted as in `measure_stream`."""
    _check_bounds(frames, duration_s)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"the frame rate must be positive, got {fps}")
    if frames == 0:
        return Measurement(latencies_s=(), wall_s=0.0)
    stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
    span_s = (frames / fps) if frames is not None else (duration_s or 0.0)
    return await _run_call(
        stub.PredictLive if live else stub.PredictStream,
        _images(image),
        frames=frames,
        duration_s=duration_s,
        fields=message_fields(model, params),
        timeout_s=frame_timeout_s * (1 + (frames or 0)) + span_s,
        metadata=metadata,
        room=None,
        fps=fps,
    )


async def _run_call(
    method: grpc.aio.StreamStreamMultiCallable,
    images: list[bytes],
    *,
    frames: int | None,
    duration_s: float | None,
    fields: Mapping[str, Any],
    timeout_s: float,
    metadata: Metadata,
    room: asyncio.Semaphore | None,
    fps: float | None,
) -> Measurement:
    """Write frames (back to back within `room`, or at `fps`), read every answer, measure."""
    limit = math.inf if frames is None else frames
    call = method(timeout=timeout_s, metadata=metadata)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    skipped = 0
    started = time.perf_counter()
    deadline = math.inf if duration_s is None else started + duration_s

    async def write() -> None:
        frame_id = 0
        try:
            while frame_id < limit and time.perf_counter() < deadline:
                if fps is not None:
                    captured = started + frame_id / fps
                    if captured >= deadline:
                        break
                    await asyncio.sleep(max(0.0, captured - time.perf_counter()))
                    sent_at[frame_id] = captured
                else:
                    if room is not None:
                        await room.acquire()
                        if time.perf_counter() >= deadline:
                            break
                    sent_at[frame_id] = time.perf_counter()
                image = images[frame_id % len(images)]
                await call.write(pb.Frame(image=image, frame_id=frame_id, **fields))
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
            if answer.skipped:
                skipped += 1
            elif answer.HasField("error"):
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
    return Measurement(
        latencies_s=tuple(latencies), wall_s=last - started, errors=dict(errors), skipped=skipped
    )
