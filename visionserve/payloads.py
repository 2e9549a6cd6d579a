"""Decoding of client payload encodings (base64 text, data URLs)."""

from __future__ import annotations

import binascii
import re

from visionserve.errors import ErrorCode, VisionError

_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,", re.ASCII)
_WHITESPACE = re.compile(r"\s+")


def decode_base64(text: str, *, field: str = "image") -> bytes:
    """Standard base64 (padding required) -> bytes.

    Accepts a `data:image/...;base64,` prefix (what a browser's FileReader gives) and line breaks
    (what `base64` prints); anything else that is not base64 is an error naming the field.
    """
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end() :]
    # NOTE: a2b_base64's strict mode validates in C; b64decode(validate=True) first runs a regex
    # over the whole text, 40% slower on a 320 KB image (measured 1.26 vs 0.90 ms).
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        pass
    compact = _WHITESPACE.sub("", text)
    try:
        return binascii.a2b_base64(compact, strict_mode=True)
    except (binascii.Error, ValueError):
        raise VisionError(
            ErrorCode.INVALID_BASE64,
            f"`{field}` is not valid base64: use the standard alphabet (A-Z a-z 0-9 + /) with '=' "
            f"padding, e.g. the output of `base64 -w0 photo.jpg` ({len(text)} characters received)",
        ) from None
