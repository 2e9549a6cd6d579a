"""Uploaded videos as frames: animated images (GIF, APNG, WebP) with Pillow, video files (MP4,
WebM, MOV, MKV, AVI) with PyAV, whose wheels carry FFmpeg.

`open_video` checks the upload before anything is streamed, so that a file that is not a video
gets a plain error instead of a stream that fails at its first frame. `VideoSource.frames` then
decodes lazily: a frame is decoded only when the gRPC stream takes it, and encoded twice from
that one decode: a JPEG for the model and, for the page, a small JPEG to show (`preview`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import av
from PIL import Image, ImageSequence, UnidentifiedImageError

from flask_ui.errors import Problem, UIError

logger = logging.getLogger(__name__)

MAX_SIDE = 1024
"""Frames are scaled down to this many pixels on their longer side before they are sent: the
model sees 224x224, and a 4K frame would cost the network and the server's decoder for nothing."""

PREVIEW_SIDE = 384
"""The frames the page shows are scaled to this many pixels on their longer side (JPEG quality
PREVIEW_QUALITY): about 20 KB each, 1-2 ms to encode here (docs/ui.md has the figures)."""
PREVIEW_QUALITY = 70

DEFAULT_FRAME_S = 0.1
"""A frame's duration when the file does not say (GIFs without one; browsers show them at 10/s)."""

MAX_FRAME_PIXELS = 40_000_000
"""Larger frames (width x height) are refused before decoding (the API's own default limit)."""

# FFmpeg demuxers accepted for video files. FFmpeg probes leniently (it reads some text files as
# "tty" art, a lone JPEG as "image2"); anything else is refused with a plain message.
_VIDEO_FORMATS = {
    "mov",
    "mp4",
    "m4a",
    "3gp",
    "3g2",
    "mj2",
    "matroska",
    "webm",
    "avi",
    "mpegts",
    "mpeg",
    "gif",
}


def _not_a_video() -> UIError:
    return UIError(
        Problem.BAD_INPUT,
        "That file is not a video we can read",
        "Choose an animated GIF or a short MP4 (WebM, MOV, MKV and AVI work too).",
    )


def _jpeg(image: Image.Image, side: int, quality: int) -> bytes:
    """`image` (RGB) as a JPEG of at most `side` pixels a side."""
    if max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class VideoFrame:
    """One frame to send: its index in the file, when the file shows it (seconds from the
    start), the JPEG for the model, and the small JPEG for the page (None when not asked for)."""

    index: int
    time_s: float
    jpeg: bytes
    preview: bytes | None = None


@dataclass
class VideoSource:
    """An upload that holds frames: its kind ("GIF", "MP4", ...), its frame count when the file
    says (else None), and the bytes to decode."""

    kind: str
    frame_count: int | None
    data: bytes
    animated_image: bool
    truncated: bool = False
    """Set by `frames` when it stopped at `max_frames` with frames left."""

    def frames(self, *, every: int, max_frames: int, previews: bool = False) -> Iterator[VideoFrame]:
        """Every `every`-th frame, at most `max_frames` of them, in order; with `previews`, each
        also as a small JPEG for the page.

        Frame indices count every frame of the file, so `every=3` yields 0, 3, 6, ...
        """
        sent = 0
        for index, (time_s, image) in enumerate(self._decode()):
            if index % every:
                continue
            if sent >= max_frames:
                self.truncated = True
                return
            frame = image.convert("RGB")
            if max(frame.size) > MAX_SIDE:
                frame.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BILINEAR)
            # NOTE: the preview is scaled from the frame that is sent, so it has the same aspect
            # ratio as the frame the boxes refer to.
            preview = _jpeg(frame, PREVIEW_SIDE, PREVIEW_QUALITY) if previews else None
            yield VideoFrame(index, time_s, _jpeg(frame, MAX_SIDE, 90), preview)
            sent += 1

    def _decode(self) -> Iterator[tuple[float, Image.Image]]:
        """`(seconds from the start, frame)` of every frame."""
        if self.animated_image:
            time_s = 0.0
            with Image.open(io.BytesIO(self.data)) as image:
                for frame in ImageSequence.Iterator(image):
                    yield time_s, frame
                    duration_ms = frame.info.get("duration") or DEFAULT_FRAME_S * 1000
                    time_s += float(duration_ms) / 1000
            return
        with av.open(io.BytesIO(self.data), mode="r") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate) if stream.average_rate else 1 / DEFAULT_FRAME_S
            try:
                for n, decoded in enumerate(container.decode(stream)):
                    time_s = float(decoded.time) if decoded.time is not None else n / rate
                    yield time_s, decoded.to_image()  # type: ignore[no-untyped-call]  # PyAV stubs
            except av.FFmpegError as exc:
                # A clip cut short still gives the frames before the damage.
                logger.info("video decoding stopped: %s", exc)


def open_video(data: bytes) -> VideoSource:
    """Check that `data` is an animated image or a video file; UIError (bad input) if not."""
    if not data:
        raise UIError(Problem.BAD_INPUT, "The file is empty", "Choose an animated GIF or a short MP4.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_FRAME_PIXELS:
                raise _too_large(width, height)
            count = int(getattr(image, "n_frames", 1))
            return VideoSource(str(image.format or "image"), count, data, animated_image=True)
    except Image.DecompressionBombError:
        raise UIError(
            Problem.TOO_LARGE, "The video's frames are too large", "Choose a video of a usual size."
        ) from None
    except UnidentifiedImageError:
        pass  # not an image: maybe a video file
    except OSError as exc:
        logger.info("unreadable image upload: %s", exc)
        raise _not_a_video() from None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            formats = set(container.format.name.split(","))
            if not formats & _VIDEO_FORMATS or not container.streams.video:
                raise _not_a_video()
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > MAX_FRAME_PIXELS:
                raise _too_large(width, height)
            kind = "MP4" if "mp4" in formats else container.format.long_name or container.format.name
            return VideoSource(kind, int(stream.frames) or None, data, animated_image=False)
    except av.FFmpegError as exc:
        logger.info("unreadable video upload: %s", exc)
        raise _not_a_video() from None


def _too_large(width: int, height: int) -> UIError:
    return UIError(
        Problem.TOO_LARGE,
        "The video's frames are too large",
        f"Its frames are {width}x{height} pixels; at most {MAX_FRAME_PIXELS:,} pixels each are accepted.",
    )
