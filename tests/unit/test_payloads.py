"""Base64 payload decoding (visionserve/payloads.py)."""

from __future__ import annotations

import base64

import pytest

from visionserve.errors import ErrorCode, VisionError
from visionserve.payloads import decode_base64

# every byte value, so that '+', '/' and '=' padding all occur in the encoding
DATA = bytes(range(256)) + b"\x89PNG\r\n\x1a\n" + bytes(range(255, -1, -1)) + b"x"
ENCODED = base64.b64encode(DATA).decode("ascii")


def test_plain() -> None:
    assert "+" in ENCODED
    assert "/" in ENCODED
    assert ENCODED.endswith("=")
    assert decode_base64(ENCODED) == DATA


@pytest.mark.parametrize(
    "media_type", ["image/png", "image/jpeg", "image/svg+xml", "application/octet-stream"]
)
def test_data_url_prefix(media_type: str) -> None:
    assert decode_base64(f"data:{media_type};base64,{ENCODED}") == DATA


def test_data_url_prefix_only_at_the_start() -> None:
    with pytest.raises(VisionError) as info:
        decode_base64(f"{ENCODED[:8]}data:image/png;base64,{ENCODED}")
    assert info.value.code is ErrorCode.INVALID_BASE64


@pytest.mark.parametrize(
    "wrapped",
    [
        base64.encodebytes(DATA).decode("ascii"),  # 76-character lines, trailing newline (`base64`)
        base64.encodebytes(DATA).decode("ascii").replace("\n", "\r\n"),  # Windows line ends
        "\n".join(ENCODED[i : i + 64] for i in range(0, len(ENCODED), 64)),  # PEM-style
        f"  {ENCODED}\n",  # surrounding whitespace
    ],
)
def test_line_wrapped(wrapped: str) -> None:
    assert "\n" in wrapped or " " in wrapped
    assert decode_base64(wrapped) == DATA


def test_data_url_with_line_wrapped_payload() -> None:
    assert decode_base64("data:image/png;base64," + base64.encodebytes(DATA).decode("ascii")) == DATA


def test_empty_is_empty_bytes() -> None:
    # valid base64 of nothing; the image decoder then says "the image is empty"
    assert decode_base64("") == b""


@pytest.mark.parametrize(
    "text",
    [
        "aGVs$bG8=",  # a character outside the alphabet
        "aGVs-_8=",  # the URL-safe alphabet
        "not base64 at all!",
        "aGVsbG8=aGVsbG8=",  # data after the padding
        "=aGVsbG8",
        "%PDF-1.4",
    ],
)
def test_invalid_characters(text: str) -> None:
    with pytest.raises(VisionError) as info:
        decode_base64(text)
    assert info.value.code is ErrorCode.INVALID_BASE64
    assert "`image` is not valid base64" in info.value.message


@pytest.mark.parametrize("text", ["aGVsbG8=é", "ÿÿÿÿ", "aGVs\u2028bG8=\u00e9", "🐱🐱🐱🐱"])
def test_non_ascii(text: str) -> None:
    with pytest.raises(VisionError) as info:
        decode_base64(text)
    assert info.value.code is ErrorCode.INVALID_BASE64


@pytest.mark.parametrize("text", ["aGVsbG8", "aGVsbG8==", "aGVsbA", "aGVsbA=", "aGVsbA===", "a"])
def test_wrong_padding(text: str) -> None:
    with pytest.raises(VisionError) as info:
        decode_base64(text)
    assert info.value.code is ErrorCode.INVALID_BASE64
    assert "padding" in info.value.message


def test_message_names_the_field_and_the_length() -> None:
    with pytest.raises(VisionError) as info:
        decode_base64("abc$", field="image_base64")
    message = info.value.message
    assert "`image_base64`" in message
    assert "(4 characters received)" in message


def test_error_does_not_chain_the_binascii_error() -> None:
    # `from None`: the client-facing error carries no internal exception context
    with pytest.raises(VisionError) as info:
        decode_base64("abc$")
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ is True
