"""A small JPEG of an uploaded photo, as a data URL, so the result page can show what was sent
without storing the upload anywhere."""

from __future__ import annotations

import base64
import io
import logging

from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

PREVIEW_SIDE = 480
DETECTION_PREVIEW_SIDE = 960
"""A detector's photo is shown across the whole card, its boxes over it: larger than a classifier's."""


def preview_data_url(data: bytes, side: int = PREVIEW_SIDE) -> str | None:
    """`data:image/jpeg;base64,...` of the photo scaled to at most `side` pixels, upright (EXIF
    applied, as the API applies it: boxes drawn over it land where the API found them); None when
    Pillow cannot read it (the API may read formats this preview does not)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # NOTE: draft() lets a large JPEG decode at a fraction of its size (8x faster for a
            # 12-megapixel photo); only called after the API accepted the image, so within its
            # pixel limit.
            image.draft("RGB", (side * 2, side * 2))
            frame = ImageOps.exif_transpose(image).convert("RGB")
            frame.thumbnail((side, side))
            buffer = io.BytesIO()
            frame.save(buffer, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        logger.info("no preview for an upload: %s", exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
