"""Property tests of the image decoding path (`ImagePreprocessor`, bytes -> model input) with random
bytes and mutated real images: truncated, corrupted, spliced, with huge or zero declared sizes,
animated, 16-bit, CMYK, every Pillow mode a file can carry, odd TIFFs, garbage EXIF.

The property: the call returns the model's input (float32, (3, H, W), finite) or raises
`VisionError` with a client-error code and a message a person can read; never another exception,
and never the memory a declared size would take to decode.

NOTE: the service runs with Python's default warning filters, where a warning (Pillow's on a
malformed EXIF block, numpy's on an invalid cast) is printed and the work goes on; pytest here
turns every warning into an error. `decode_like_the_service` runs the call under the default
filters and records the warnings, so that the test sees what a client gets. A warning that the
service's own code provokes is checked separately (`test_float_images_with_nan_and_inf`).

Bounded: a fixed number of examples per property, derandomized, no example database.
"""

from __future__ import annotations

import io
import resource
import struct
import warnings
from collections.abc import Callable, Iterator
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, TiffImagePlugin

from tests.conftest import encode, photo_bytes
from tests.fixtures import crafted_png
from visionserve.errors import ErrorCode, VisionError
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import InputSpec

SPEC = InputSpec(size=(32, 32), resize=36)
MAX_PIXELS = 4_000_000
"""The pixel limit in these tests (the service's default is 40 Mpx): the real photos pass it."""
CLIENT_ERRORS = {ErrorCode.INVALID_IMAGE, ErrorCode.IMAGE_TOO_LARGE, ErrorCode.INVALID_ARGUMENT}
RUNS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PREPROCESSOR = ImagePreprocessor(SPEC, max_image_pixels=MAX_PIXELS)
CALLS = {"ok": 0, "rejected": 0}
"""Outcomes of every call, printed at the end (`-s`)."""


@pytest.fixture(scope="module", autouse=True)
def _report_calls() -> Iterator[None]:
    yield
    total = CALLS["ok"] + CALLS["rejected"]
    print(
        f"\ndecode fuzz: {total} inputs, {CALLS['ok']} decoded, {CALLS['rejected']} rejected with VisionError"
    )


def decode_like_the_service(data: bytes) -> np.ndarray | VisionError:
    """Run the decoding path as the service does; check the property; return what it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            array = PREPROCESSOR(data)
        except VisionError as error:
            array = error
    # NOTE: numpy's RuntimeWarnings (invalid value in a cast, overflow) mean undefined pixels;
    # Pillow's DecompressionBombWarning, a subclass, only says an image is big (ours is lower).
    numeric = [w for w in caught if w.category is RuntimeWarning]
    assert not numeric, [str(w.message) for w in numeric]
    if isinstance(array, VisionError):
        error = array
        CALLS["rejected"] += 1
        assert error.code in CLIENT_ERRORS, error
        message = error.message
        assert message.strip() and len(message) < 400 and "Traceback" not in message, message
        assert message[0].islower() and message.isprintable(), message
        return error
    CALLS["ok"] += 1
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.float32 and array.shape == (3, *SPEC.size), (array.dtype, array.shape)
    assert np.isfinite(array).all()
    return array


# --- the seed corpus ----------------------------------------------------------------------------


def _photo() -> Image.Image:
    """A real photo (scikit-image's chelsea), cropped small so that mutating it stays fast."""
    with Image.open(io.BytesIO(photo_bytes("chelsea.png"))) as image:
        return image.convert("RGB").crop((100, 50, 196, 122))


def _tiff_with_photometric(value: int) -> bytes:
    """A small RGB TIFF whose PhotometricInterpretation tag says `value`."""
    image = _photo().resize((24, 18))
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[262] = value
    data = encode(image, "TIFF", tiffinfo=info)
    return data


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(_photo(), "JPEG", exif=exif.tobytes())


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (20, 16), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    params: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 40, "loop": 0}
    return encode(frames[0], fmt, **params)


def _crafted_gif(width: int, height: int) -> bytes:
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def _crafted_bmp(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def _crafted_jpeg(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to declare `width` x `height`."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 60, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _crafted_webp(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header declares `width` x `height` (at most 16384 each)."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (1, 2, 3)), "WEBP", lossless=True))
    start = data.index(b"VP8L") + 8 + 1  # chunk header, then the signature byte 0x2f
    bits = struct.unpack("<I", data[start : start + 4])[0]
    bits = (bits & ~0xFFFFFFF) | ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
    data[start : start + 4] = struct.pack("<I", bits)
    return bytes(data)


def _png_16bit() -> bytes:
    values = np.linspace(0, 65535, 24 * 18, dtype=np.uint16).reshape(18, 24)
    return encode(Image.fromarray(values), "PNG")


def _apng() -> bytes:
    return _animated("PNG")


HUGE: dict[str, tuple[Callable[[int, int], bytes], int, int]] = {
    "huge png": (crafted_png, 100_000, 100_000),
    "wide png": (crafted_png, 10_000_000, 40),
    "huge gif": (_crafted_gif, 65535, 65535),
    "huge bmp": (_crafted_bmp, 100_000, 100_000),
    "huge jpeg": (_crafted_jpeg, 65000, 65000),
    "huge webp": (_crafted_webp, 16384, 16384),
    "huge under pillow's limit": (crafted_png, 12_000, 7_000),
}
"""Headers declaring sizes over the limit: (how to craft it, width, height)."""


@cache
def seeds() -> dict[str, bytes]:
    """Named image files to mutate: real photos in every accepted format, every mode a file
    carries, animations, odd TIFFs and EXIF, and crafted headers."""
    photo = _photo()
    corpus: dict[str, bytes] = {
        "chelsea.png": photo_bytes("chelsea.png"),
        "rocket.jpg": photo_bytes("rocket.jpg"),
        "jpeg": encode(photo, "JPEG", quality=80),
        "progressive jpeg": encode(photo, "JPEG", progressive=True),
        "png": encode(photo, "PNG"),
        "webp": encode(photo, "WEBP"),
        "webp lossless": encode(photo, "WEBP", lossless=True),
        "gif": encode(photo.convert("P"), "GIF"),
        "bmp": encode(photo, "BMP"),
        "tiff": encode(photo, "TIFF"),
        "tiff deflate": encode(photo, "TIFF", compression="tiff_adobe_deflate"),
        "cmyk jpeg": encode(photo.convert("CMYK"), "JPEG"),
        "cmyk tiff": encode(photo.convert("CMYK"), "TIFF"),
        "16-bit png": _png_16bit(),
        "I;16 tiff": encode(Image.fromarray(np.full((9, 7), 40000, dtype=np.uint16)), "TIFF"),
        "I tiff": encode(Image.fromarray(np.arange(63, dtype=np.int32).reshape(9, 7) * 1000), "TIFF"),
        "F tiff": encode(Image.fromarray(np.linspace(-5, 900, 63, dtype=np.float32).reshape(9, 7)), "TIFF"),
        "LAB tiff": encode(photo.convert("LAB"), "TIFF"),
        "1 png": encode(photo.convert("1"), "PNG"),
        "L png": encode(photo.convert("L"), "PNG"),
        "LA png": encode(photo.convert("LA"), "PNG"),
        "P png transparency": encode(photo.convert("P"), "PNG", transparency=3),
        "RGBA png": encode(photo.convert("RGBA"), "PNG"),
        "RGBA webp": encode(photo.convert("RGBA"), "WEBP"),
        "P gif transparency": encode(photo.convert("P"), "GIF", transparency=0),
        "animated gif": _animated("GIF"),
        "animated webp": _animated("WEBP"),
        "apng": _apng(),
        "1x1 png": encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "1x1 jpeg": encode(Image.new("L", (1, 1), 9), "JPEG"),
        "1x1 gif": encode(Image.new("P", (1, 1)), "GIF"),
        "1x1000 png": encode(Image.new("L", (1, 1000), 128), "PNG"),
        "tiff photometric 0": _tiff_with_photometric(0),
        "tiff photometric 5": _tiff_with_photometric(5),
        "tiff photometric 6": _tiff_with_photometric(6),
        "tiff photometric 8": _tiff_with_photometric(8),
        "tiff photometric 32844": _tiff_with_photometric(32844),
        "exif orientation 0": _exif_jpeg(0),
        "exif orientation 6": _exif_jpeg(6),
        "exif orientation 9": _exif_jpeg(9),
        "exif orientation 65535": _exif_jpeg(65535),
        "exif garbage": encode(
            photo, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x01" * 40
        ),
        **{name: craft(width, height) for name, (craft, width, height) in HUGE.items()},
        "zero png": crafted_png(0, 10),
        "zero gif": _crafted_gif(0, 0),
        "zero bmp": _crafted_bmp(0, 5),
        "zero jpeg": _crafted_jpeg(0, 16),
    }
    return corpus


SEED_NAMES = sorted(seeds())


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed file, mutated one to four times: truncated, bytes overwritten, bytes inserted, a
    range deleted or duplicated, or spliced with another seed."""
    data = bytearray(seeds()[draw(st.sampled_from(SEED_NAMES))])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "delete", "duplicate", "splice"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            del data[at:]
        elif kind == "overwrite":
            patch = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(patch)] = patch
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 256))]
        elif kind == "duplicate":
            end = min(len(data), at + draw(st.integers(1, 256)))
            data[at:at] = data[at:end]
        else:
            other = seeds()[draw(st.sampled_from(SEED_NAMES))]
            data[at:] = other[draw(st.integers(0, len(other) - 1)) :]
    return bytes(data)


# --- properties ---------------------------------------------------------------------------------


@RUNS
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    """Random bytes."""
    decode_like_the_service(data)


MAGIC = [
    b"\xff\xd8\xff\xe0",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",
]


@RUNS
@given(st.sampled_from(MAGIC), st.binary(max_size=2048))
def test_random_bytes_after_a_magic_number(magic: bytes, rest: bytes) -> None:
    decode_like_the_service(magic + rest)


@pytest.mark.parametrize("name", SEED_NAMES)
def test_every_seed_unmutated(name: str) -> None:
    """Each seed alone: the valid ones decode, the crafted ones are refused."""
    result = decode_like_the_service(seeds()[name])
    if name in HUGE:
        assert isinstance(result, VisionError) and result.code == ErrorCode.IMAGE_TOO_LARGE, result
    elif name.startswith("zero"):
        assert isinstance(result, VisionError), result
    elif not name.startswith("tiff photometric"):
        # NOTE: a TIFF whose photometric tag contradicts its samples may or may not decode
        assert isinstance(result, np.ndarray), f"{name}: {result!r}"


@settings(RUNS, max_examples=400)
@given(mutated())
def test_mutated_images(data: bytes) -> None:
    decode_like_the_service(data)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _pillow_image_bytes() -> int:
    """Bytes Pillow has allocated for image pixels so far (its block allocator's count)."""
    stats = Image.core.get_stats()
    return int(stats["allocated_blocks"]) * int(Image.core.get_block_size())


@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_declared_sizes_take_no_memory(name: str) -> None:
    """A header declaring hundreds of megapixels or more is refused before a pixel is decoded:
    Pillow allocates no pixel memory for it, and the process's peak memory does not move by a
    fraction of what decoding would take.

    NOTE: Pillow's allocator count is the sharp measure (the process's peak, ru_maxrss, may
    already be above the smaller bombs' size in a long test session); the peak catches the rest.
    """
    _, width, height = HUGE[name]
    data = seeds()[name]
    decoded_bytes = width * height  # one byte a pixel: the least any mode takes
    assert decoded_bytes > 50_000_000, f"{name} declares too little to tell: {width}x{height}"
    peak_before, pillow_before = _max_rss_bytes(), _pillow_image_bytes()
    for _ in range(3):
        result = decode_like_the_service(data)
        assert isinstance(result, VisionError) and result.code == ErrorCode.IMAGE_TOO_LARGE
    pillow = _pillow_image_bytes() - pillow_before
    peak = _max_rss_bytes() - peak_before
    assert pillow < decoded_bytes / 50, f"Pillow allocated {pillow:,} bytes of pixels for {name}"
    assert peak < decoded_bytes / 10, f"peak memory grew {peak:,} bytes for {name}"


def test_the_memory_measure_sees_a_decode() -> None:
    """The allocator count used above does see pixels being decoded (so its zero means something):
    the same bomb header, under a limit that lets it through, makes Pillow allocate its pixels."""
    lenient = ImagePreprocessor(SPEC, max_image_pixels=89_000_000)
    before = _pillow_image_bytes()
    with pytest.raises(VisionError):  # the crafted file holds almost no pixel data
        lenient(crafted_png(12_000, 7_000))
    assert _pillow_image_bytes() - before >= 12_000 * 7_000


@RUNS
@given(
    st.sampled_from([crafted_png, _crafted_gif, _crafted_bmp, _crafted_jpeg]),
    st.integers(0, 65535),
    st.integers(0, 65535),
)
def test_declared_sizes(craft: object, width: int, height: int) -> None:
    """Any declared size: refused as too large over the limit, as empty at zero, else decoded or
    refused as corrupt (the crafted files hold almost no pixel data)."""
    result = decode_like_the_service(craft(width, height))  # type: ignore[operator]
    if width * height > MAX_PIXELS:
        assert isinstance(result, VisionError) and result.code == ErrorCode.IMAGE_TOO_LARGE, result
    elif width * height == 0:
        assert isinstance(result, VisionError), result


SHAPES = st.tuples(st.integers(1, 12), st.integers(1, 12))
FLOAT_PIXELS = hnp.arrays(
    np.float32, SHAPES, elements=st.floats(width=32) | st.sampled_from([np.nan, np.inf, -np.inf])
)
INTEGER_PIXELS = hnp.arrays(st.sampled_from([np.int32, np.uint16, np.uint8]), SHAPES)  # any value


@RUNS
@given(FLOAT_PIXELS | INTEGER_PIXELS, st.sampled_from(["TIFF", "PNG"]))
def test_any_pixel_values(values: np.ndarray, fmt: str) -> None:
    """Every pixel value a high-bit-depth file can hold (float NaN and infinities, negative and
    extreme integers) in the modes they open as (F, I, I;16, L): decoded to finite values."""
    image = Image.fromarray(values)
    if fmt == "PNG" and image.mode not in ("I;16", "L"):
        fmt = "TIFF"  # PNG holds only integer modes up to 16 bits
    result = decode_like_the_service(encode(image, fmt))
    assert isinstance(result, np.ndarray), result


def test_corpus_is_real() -> None:
    """The corpus holds what the test claims (so that a Pillow change cannot empty it silently)."""
    modes = set()
    for name in SEED_NAMES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on the seed with corrupt EXIF
            try:
                with Image.open(io.BytesIO(seeds()[name])) as image:
                    modes.add(image.mode)
                    if name.startswith("animated") or name == "apng":
                        assert getattr(image, "n_frames", 1) == 3, name
            except Image.DecompressionBombError:
                assert name in HUGE, name
            except OSError:
                assert name.startswith(("zero", "tiff photometric")), name
    assert {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LAB"} <= modes, modes


# --- failures the fuzzing found, as explicit regression tests -------------------------------------


def test_float_images_with_nan_and_inf() -> None:
    """A float (mode F) TIFF with NaN and infinite pixels: decoded, finite, without numpy's
    invalid-cast warnings (pytest turns them into errors here)."""
    values = np.array([[np.nan, np.inf, -np.inf, 1.0], [0.0, 255.0, 600.0, np.nan]], dtype=np.float32)
    data = encode(Image.fromarray(values, mode="F"), "TIFF")
    array = PREPROCESSOR(data)
    assert np.isfinite(array).all()
    assert array.shape == (3, *SPEC.size)
