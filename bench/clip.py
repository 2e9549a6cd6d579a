"""The clip a detector is measured with: frames of a short video made from the packaged photos.

No video ships with the project's dependencies, so the clip is made from real photos, the way a
camera sweeping a scene sees it: for each photo in turn (a shot), a 4:3 window covering most of
it pans slowly from one corner to the other over `FRAMES_PER_SHOT` frames, each frame scaled to
640x480 (a webcam's VGA) and encoded as JPEG quality `CLIP_QUALITY`. Consecutive frames differ
a little, as in a video, so no answer can be a cache hit; the photos have people, a motorcycle,
a cat, a cup, ..., so the detector finds objects. Made in memory, once per run.

Every frame of a detector's rows comes from this clip: the in-process limit, the closed-loop
requests (each sender sends the clip's frames in turn) and the streams.
"""

from __future__ import annotations

import io

from PIL import Image

from bench.images import BenchImage
from visionserve.photos import packaged_photo

CLIP_PHOTOS = (
    "motorcycle_left.png",
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "china.jpg",
    "flower.jpg",
)
"""The shots, in order (those installed: scikit-image's, then scikit-learn's)."""
CLIP_SIZE = (640, 480)
"""Width and height of every frame."""
FRAMES_PER_SHOT = 12
"""Frames of each photo's pan (0.4 s at 30 frames/s)."""
CLIP_QUALITY = 85
"""JPEG quality of the frames."""
WINDOW = 0.85
"""The pan's window, as a fraction of the largest 4:3 window the photo holds."""


def pan(image: Image.Image, frames: int, size: tuple[int, int] = CLIP_SIZE) -> list[Image.Image]:
    """`frames` views of `image` through a 4:3 window sliding from its top-left to its
    bottom-right corner, each scaled to `size`."""
    if frames < 1:
        raise ValueError(f"a shot needs at least 1 frame, got {frames}")
    aspect = size[0] / size[1]
    width = WINDOW * min(image.width, image.height * aspect)
    height = width / aspect
    spare_x, spare_y = image.width - width, image.height - height
    views = []
    for i in range(frames):
        step = i / (frames - 1) if frames > 1 else 0.0
        left, top = spare_x * step, spare_y * step
        box = (left, top, left + width, top + height)
        views.append(image.resize(size, Image.Resampling.BILINEAR, box=box))
    return views


def make_clip(
    *,
    photos: tuple[str, ...] = CLIP_PHOTOS,
    frames_per_shot: int = FRAMES_PER_SHOT,
    size: tuple[int, int] = CLIP_SIZE,
    quality: int = CLIP_QUALITY,
) -> list[BenchImage]:
    """The clip's frames as JPEGs, shot after shot; the photos not installed are left out
    (FileNotFoundError when none is)."""
    frames: list[BenchImage] = []
    for name in photos:
        try:
            path = packaged_photo(name)
        except FileNotFoundError:
            continue
        with Image.open(path) as opened:
            photo = opened.convert("RGB")
        for number, view in enumerate(pan(photo, frames_per_shot, size)):
            buffer = io.BytesIO()
            view.save(buffer, format="JPEG", quality=quality)
            frames.append(
                BenchImage(
                    name=f"{path.stem}-{number:02d}.jpg",
                    data=buffer.getvalue(),
                    width=size[0],
                    height=size[1],
                    format="JPEG",
                    source=f"{path}, frame {number + 1} of a {frames_per_shot}-frame pan",
                )
            )
    if not frames:
        raise FileNotFoundError(
            "no packaged photos found for the clip (they ship with scikit-image and scikit-learn): "
            "install requirements/dev.txt, or pass --image FILE"
        )
    return frames


def describe_clip(frames: list[BenchImage], fps: float | None = None) -> str:
    """e.g. `84 frames 640x480 JPEG (7 shots of 12 frames: motorcycle_left, ...), 41-63 KB`."""
    shots = list(dict.fromkeys(frame.name.rsplit("-", 1)[0] for frame in frames))
    sizes = [len(frame.data) for frame in frames]
    first = frames[0]
    rate = f", {fps:g} frames/s when paced" if fps else ""
    return (
        f"{len(frames)} frames {first.width}x{first.height} {first.format} ({len(shots)} shots of "
        f"{len(frames) // max(1, len(shots))} frames panning over {', '.join(shots)}), "
        f"{min(sizes) // 1000}-{max(sizes) // 1000} KB{rate}"
    )
