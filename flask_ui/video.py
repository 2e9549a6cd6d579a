"""`video_events`: what the video page shows while a clip streams through the model, as events.

Each answered frame's event carries what the page needs to draw it in step with its answer: the
model's classes or boxes, the frame's size as the server saw it (what the boxes refer to) and,
when asked for, the frame itself as a small JPEG data URL (`frames.PREVIEW_SIDE`). The previews
of frames sent but not yet answered wait here, at most `grpc_client.MAX_IN_FLIGHT` of them.

Live mode plays the clip at its own frame rate into `PredictLive`, as a camera would send it: the
server computes the newest frame whenever the model is free and answers the others as skipped.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any

from flask_ui.errors import UIError
from flask_ui.frames import VideoFrame, VideoSource
from flask_ui.grpc_client import VideoClient
from flask_ui.overlay import drawing
from flask_ui.params import TaskParams
from flask_ui.results import CLASSIFICATION, FrameResult, ModelInfo

logger = logging.getLogger(__name__)

# Per-frame errors that would repeat on every frame: the stream stops at the first, saying why.
_SETTINGS_ERRORS = {
    "invalid_argument": "The model cannot take these settings",
    "model_not_found": "There is no such model",
}


def _rate(count: int, elapsed: float) -> float:
    return round(count / elapsed, 1) if elapsed > 0 else 0.0


def _data_url(jpeg: bytes | None) -> str | None:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii") if jpeg else None


def _frame_event(result: FrameResult, preview: bytes | None) -> dict[str, Any]:
    """The part of a `frame` event that describes the answer itself."""
    event: dict[str, Any] = {"frame_id": result.frame_id, "task": result.task}
    if result.skipped:
        return event | {"skipped": True}
    event["server_ms"] = round(result.server_ms, 1)
    if result.error:
        return event | {"error": result.error, "error_code": result.error_code}
    event |= drawing(
        result.task,
        width=result.width,
        height=result.height,
        detections=result.detections,
        faces=result.faces,
        topk=result.topk,
    )
    image = _data_url(preview)
    if image:
        event["image"] = image
    return event


def _paced(frames: Iterator[VideoFrame], stop: threading.Event) -> Iterator[VideoFrame]:
    """`frames`, each no earlier than its time in the clip after the first (live mode)."""
    started: float | None = None
    for frame in frames:
        now = time.monotonic()
        if started is None:
            started = now - frame.time_s
        wait = started + frame.time_s - now
        if wait > 0 and stop.wait(wait):
            return
        yield frame


def video_events(
    source: VideoSource,
    client: VideoClient,
    *,
    every: int,
    max_frames: int,
    model: ModelInfo | None = None,
    requested_model: str = "",
    params: TaskParams | None = None,
    live: bool = False,
    previews: bool = True,
) -> Generator[dict[str, Any]]:
    """`start`, one `frame` per answer (with the running counts and computed frames per second),
    then `end`, or `error` when the stream fails. `model` is the chosen served model (None: the
    API's list was unknown, `requested_model` is sent as it is); `params` are a detector's or a
    face model's settings; `previews` adds each answered frame's small JPEG to its event."""
    name = model.name if model else requested_model
    task = model.task if model else None
    yield {
        "event": "start",
        "kind": source.kind,
        "frames": source.frame_count,
        "every": every,
        "model": name,
        "task": task,
        "mode": "live" if live else "stream",
    }
    waiting: dict[int, bytes | None] = {}  # previews of frames sent and not yet answered
    stop = threading.Event()

    def outgoing() -> Iterator[tuple[int, bytes]]:
        frames = source.frames(every=every, max_frames=max_frames, previews=previews)
        for frame in _paced(frames, stop) if live else frames:
            waiting[frame.index] = frame.preview
            yield frame.index, frame.jpeg

    count = computed = skipped = 0
    started = time.perf_counter()
    results = client.stream(
        outgoing(),
        model=name,
        topk=1 if task == CLASSIFICATION else 0,
        params=params,
        live=live,
    )
    try:
        for result in results:
            preview = waiting.pop(result.frame_id, None)
            if result.error_code in _SETTINGS_ERRORS:
                yield {
                    "event": "error",
                    "title": _SETTINGS_ERRORS[result.error_code],
                    "message": result.error[:1].upper() + result.error[1:],
                    "count": count,
                }
                return
            count += 1
            skipped += result.skipped
            computed += not result.skipped
            event = {"event": "frame", "count": count, "skipped_count": skipped}
            event |= _frame_event(result, preview)
            event["fps"] = _rate(computed, time.perf_counter() - started)
            yield event
    except UIError as exc:
        yield {"event": "error", "title": exc.title, "message": exc.message, "count": count}
        return
    except Exception:
        logger.exception("video stream failed")
        yield {
            "event": "error",
            "title": "The video failed",
            "message": "The UI's log says why.",
            "count": count,
        }
        return
    finally:
        # NOTE: when the browser goes away, the server closes this generator at a `yield`; closing
        # the stream here cancels the gRPC call at once, so the model stops working for nobody.
        stop.set()
        results.close()
        waiting.clear()
    elapsed = time.perf_counter() - started
    end: dict[str, Any] = {
        "event": "end",
        "count": count,
        "computed": computed,
        "skipped_count": skipped,
        "elapsed_s": round(elapsed, 2),
        "fps": _rate(computed, elapsed),
    }
    if source.truncated:
        end["note"] = f"Stopped at {max_frames} frames (VISION_UI_MAX_VIDEO_FRAMES)."
    yield end
