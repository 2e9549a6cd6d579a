"""Decoding of client payload encodings (base64 text, data URLs)."""

from __future__ import annotations

import base64
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
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    compact = _WHITESPACE.sub("", text)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise VisionError(
            ErrorCode.INVALID_BASE64,
            f"`{field}` is not valid base64: use the standard alphabet (A-Z a-z 0-9 + /) with '=' "
            f"padding, e.g. the output of `base64 -w0 photo.jpg` ({len(text)} characters received)",
        ) from None
