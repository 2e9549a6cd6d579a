"""Image bytes -> model input (visionserve/preprocessing.py), on ImagePreprocessor directly."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile, ImageOps

from tests.conftest import encode
from tests.fixtures import crafted_png
from visionserve.errors import ErrorCode, VisionError
from visionserve.preprocessing import ACCEPTED_FORMATS, ImagePreprocessor
from visionserve.repository import InputSpec

SPEC = InputSpec(size=(32, 32), resize=36)
MEAN = np.asarray(SPEC.mean, dtype=np.float32)
STD = np.asarray(SPEC.std, dtype=np.float32)
ORIENTATION = 0x0112
RED = (255, 0, 0)
WHITE = (255, 255, 255)


@pytest.fixture
def preprocessor() -> ImagePreprocessor:
    return ImagePreprocessor(SPEC, max_image_pixels=1_000_000)


def to_pixels(tensor: np.ndarray) -> np.ndarray:
    """Undo the normalization: (3, H, W) model input -> (H, W, 3) pixel values 0..255."""
    return (tensor.transpose(1, 2, 0) * STD + MEAN) * 255.0


def rgb_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image, dtype=np.int16)


def crafted_bmp(width: int, height: int) -> bytes:
    """A BMP header declaring `width` x `height` (24-bit) with no pixel data at all."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def crafted_gif(width: int, height: int) -> bytes:
    """A one-pixel-of-data GIF whose screen and frame declare `width` x `height`."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def noise_jpeg(size: tuple[int, int] = (200, 160)) -> bytes:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


@pytest.fixture
def no_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any pixel decode fail loudly; returns the list of images that tried."""
    calls: list[str] = []
    original = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> object:
        calls.append(f"{self.format} {self.size}")
        raise AssertionError("decoded the pixels of an image that should have been rejected first")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    assert ImageFile.ImageFile.load is not original
    return calls


# --- shape, normalization, geometry -------------------------------------------------------------


def test_output_shape_and_dtype(preprocessor: ImagePreprocessor) -> None:
    tensor = preprocessor(encode(Image.new("RGB", (50, 40), (10, 20, 30))))
    assert tensor.shape == (3, 32, 32)
    assert tensor.dtype == np.float32
    assert tensor.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("value", [0, 128, 255])
def test_normalization_of_uniform_gray(value: int) -> None:
    spec = InputSpec(size=(8, 8), resize=10, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    tensor = ImagePreprocessor(spec, max_image_pixels=10_000)(
        encode(Image.new("RGB", (12, 10), (value,) * 3))
    )
    expected = (value / 255.0 - np.asarray(spec.mean)) / np.asarray(spec.std)
    for channel in range(3):
        np.testing.assert_allclose(tensor[channel], expected[channel], atol=1e-5)


def test_default_imagenet_normalization_and_size() -> None:
    tensor = ImagePreprocessor(InputSpec(), max_image_pixels=1_000_000)(
        encode(Image.new("RGB", (300, 260), (128, 128, 128)))
    )
    assert tensor.shape == (3, 224, 224)
    expected = (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(tensor.mean(axis=(1, 2)), expected, atol=1e-5)


def test_channels_are_rgb_order(preprocessor: ImagePreprocessor) -> None:
    pixels = to_pixels(preprocessor(encode(Image.new("RGB", (40, 40), (250, 120, 5)))))
    np.testing.assert_allclose(pixels.mean(axis=(0, 1)), [250, 120, 5], atol=0.01)


def test_landscape_side_bands_are_cropped_away(preprocessor: ImagePreprocessor) -> None:
    # shorter side 100 -> 36, so 300 -> 108 and the 32-wide center crop keeps x in ~[105, 195]
    image = Image.new("RGB", (300, 100), (0, 255, 0))
    image.paste(RED, (0, 0, 100, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    pixels = to_pixels(preprocessor(encode(image)))
    np.testing.assert_allclose(pixels, np.broadcast_to([0, 255, 0], pixels.shape), atol=0.01)


def test_portrait_top_and_bottom_bands_are_cropped_away(preprocessor: ImagePreprocessor) -> None:
    image = Image.new("RGB", (90, 270), (0, 0, 255))
    image.paste(RED, (0, 0, 90, 90))
    image.paste((0, 255, 0), (0, 180, 90, 270))
    pixels = to_pixels(preprocessor(encode(image)))
    np.testing.assert_allclose(pixels, np.broadcast_to([0, 0, 255], pixels.shape), atol=0.01)


def test_crop_without_resize_is_exact(preprocessor: ImagePreprocessor) -> None:
    # already at the resize size (36x36): the crop is the inner 32x32, pixel for pixel
    rng = np.random.default_rng(3)
    source = rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)
    pixels = to_pixels(preprocessor(encode(Image.fromarray(source))))
    np.testing.assert_allclose(pixels, source[2:34, 2:34], atol=1e-3)


def test_small_image_is_upscaled(preprocessor: ImagePreprocessor) -> None:
    image = Image.new("RGB", (9, 6), (0, 0, 255))
    tensor = preprocessor(encode(image))
    assert tensor.shape == (3, 32, 32)
    np.testing.assert_allclose(to_pixels(tensor), np.broadcast_to([0, 0, 255], (32, 32, 3)), atol=0.01)


@pytest.mark.parametrize("size", [(1, 1), (1000, 2), (3, 700)])
def test_extreme_shapes(preprocessor: ImagePreprocessor, size: tuple[int, int]) -> None:
    tensor = preprocessor(encode(Image.new("RGB", size, (200, 100, 50))))
    assert tensor.shape == (3, 32, 32)
    np.testing.assert_allclose(to_pixels(tensor).mean(axis=(0, 1)), [200, 100, 50], atol=0.01)


# --- colour modes: converted, not rejected --------------------------------------------------------


def _palette_image(transparent: bool) -> bytes:
    image = Image.new("P", (40, 30), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * (3 * 254))
    image.paste(0, (0, 0, 20, 30))  # left half: index 0 (black, or transparent)
    if transparent:
        return encode(image, "PNG", transparency=0)
    return encode(image, "PNG")


def _sixteen_bit(value: int) -> bytes:
    image = Image.fromarray(np.full((30, 40), value, dtype=np.uint16))
    assert image.mode == "I;16"
    return encode(image, "PNG")


MODE_CASES: dict[str, tuple[Callable[[], bytes], tuple[int, int, int], tuple[int, int, int]]] = {
    # name: (bytes, expected left-half pixel, expected right-half pixel)
    "L": (lambda: encode(Image.new("L", (40, 30), 100)), (100,) * 3, (100,) * 3),
    "P": (lambda: _palette_image(False), (0, 0, 0), RED),
    "P+transparency": (lambda: _palette_image(True), WHITE, RED),
    "RGBA transparent": (lambda: encode(Image.new("RGBA", (40, 30), (0, 0, 0, 0))), WHITE, WHITE),
    "RGBA opaque": (lambda: encode(Image.new("RGBA", (40, 30), (0, 0, 255, 255))), (0, 0, 255), (0, 0, 255)),
    "RGBA half": (lambda: encode(Image.new("RGBA", (40, 30), (0, 0, 0, 128))), (127,) * 3, (127,) * 3),
    "LA transparent": (lambda: encode(Image.new("LA", (40, 30), (0, 0))), WHITE, WHITE),
    "LA opaque": (lambda: encode(Image.new("LA", (40, 30), (60, 255))), (60,) * 3, (60,) * 3),
    "CMYK JPEG": (lambda: encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), RED, RED),
    "1-bit": (lambda: encode(Image.new("1", (40, 30), 1)), WHITE, WHITE),
    "I;16 full scale": (lambda: _sixteen_bit(65535), WHITE, WHITE),
    "I;16 half scale": (lambda: _sixteen_bit(128 * 257), (128,) * 3, (128,) * 3),
    "I;16 200/255": (lambda: _sixteen_bit(200 * 257), (200,) * 3, (200,) * 3),
    # a dark 16-bit image stays dark: 255 of 65535 is 0.4 % of full scale, not white
    "I;16 dark": (lambda: _sixteen_bit(255), (1,) * 3, (1,) * 3),
    "BMP": (lambda: encode(Image.new("RGB", (40, 30), RED), "BMP"), RED, RED),
    "TIFF": (lambda: encode(Image.new("RGB", (40, 30), RED), "TIFF"), RED, RED),
    "WEBP lossless": (
        lambda: encode(Image.new("RGBA", (40, 30), (0, 0, 0, 0)), "WEBP", lossless=True),
        WHITE,
        WHITE,
    ),
    "GIF": (lambda: encode(Image.new("RGB", (40, 30), RED), "GIF"), RED, RED),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_modes_are_converted(preprocessor: ImagePreprocessor, case: str) -> None:
    make, left, right = MODE_CASES[case]
    image = preprocessor.decode(make())
    assert image.size == (40, 30)
    pixels = rgb_array(image)
    np.testing.assert_allclose(pixels[:, :20], np.broadcast_to(left, (30, 20, 3)), atol=3)
    np.testing.assert_allclose(pixels[:, 20:], np.broadcast_to(right, (30, 20, 3)), atol=3)
    assert preprocessor.preprocess(image).shape == (3, 32, 32)


def test_sixteen_bit_ramp_is_scaled_not_clipped(preprocessor: ImagePreprocessor) -> None:
    ramp = np.linspace(0, 65535, 256, dtype=np.float64).round().astype(np.uint16)
    data = encode(Image.fromarray(np.tile(ramp, (8, 1))), "PNG")
    pixels = rgb_array(preprocessor.decode(data))[0, :, 0]
    assert (np.diff(pixels) >= 0).all(), "the ramp must stay monotonic"
    assert pixels[0] == 0
    assert pixels[-1] >= 254
    np.testing.assert_allclose(pixels, np.arange(256), atol=1)
    assert (pixels == 255).sum() <= 2, "values were clipped to white instead of scaled"


def test_sixteen_bit_scaling_is_monotonic_across_255(preprocessor: ImagePreprocessor) -> None:
    # one image with both 255 and 256 in it, and one with only 255: each pixel maps the same way
    dark = rgb_array(preprocessor.decode(_sixteen_bit(255)))[0, 0, 0]
    mixed = Image.fromarray(np.array([[255, 256] * 20] * 30, dtype=np.uint16))
    pixels = rgb_array(preprocessor.decode(encode(mixed, "PNG")))[0, :2, 0]
    assert dark == pixels[0]
    assert pixels[0] <= pixels[1] <= 1


def test_animated_gif_uses_first_frame(preprocessor: ImagePreprocessor) -> None:
    frames = [Image.new("RGB", (40, 30), colour) for colour in (RED, (0, 0, 255), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(buffer.getvalue())), "n_frames", 1) == 3
    pixels = rgb_array(preprocessor.decode(buffer.getvalue()))
    np.testing.assert_allclose(pixels, np.broadcast_to(RED, pixels.shape), atol=2)


# --- EXIF orientation ---------------------------------------------------------------------------


def _marked(size: tuple[int, int] = (60, 40)) -> Image.Image:
    """White, with a red square in the top-left corner (a quarter of the shorter side)."""
    image = Image.new("RGB", size, WHITE)
    marker = min(size) // 4
    image.paste(RED, (0, 0, marker, marker))
    return image


def _with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(image, "JPEG", exif=exif, quality=95)


def _is_red(pixel: np.ndarray) -> bool:
    return bool(pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60)


@pytest.mark.parametrize(
    ("orientation", "size", "marker_at"),
    [
        (1, (60, 40), (5, 5)),  # as stored
        (3, (60, 40), (54, 34)),  # rotated 180: marker bottom-right
        (6, (40, 60), (34, 5)),  # rotate 90 clockwise to view: marker top-right
        (8, (40, 60), (5, 54)),  # rotate 90 counter-clockwise to view: marker bottom-left
    ],
)
def test_exif_orientation_is_honoured(
    preprocessor: ImagePreprocessor, orientation: int, size: tuple[int, int], marker_at: tuple[int, int]
) -> None:
    image = preprocessor.decode(_with_orientation(_marked(), orientation))
    assert image.size == size
    pixels = rgb_array(image)
    x, y = marker_at
    assert _is_red(pixels[y, x]), f"marker not at {marker_at}"
    red_corners = [(cx, cy) for cx in (5, size[0] - 6) for cy in (5, size[1] - 6) if _is_red(pixels[cy, cx])]
    assert red_corners == [marker_at]


def test_exif_orientation_reaches_the_model_input(preprocessor: ImagePreprocessor) -> None:
    square = _marked((48, 48))  # square, so the whole marker survives the crop
    tensor = preprocessor(_with_orientation(square, 6))
    pixels = to_pixels(tensor)
    assert _is_red(pixels[2, 29])  # top-right
    assert not _is_red(pixels[2, 2])  # not where it was stored


def test_exif_orientation_with_draft_decode(preprocessor: ImagePreprocessor) -> None:
    data = _with_orientation(_marked((600, 400)), 6)
    image = preprocessor.decode(data)
    width, height = image.size
    assert height > width, "not rotated"
    assert width * height <= 400 * 600 // 16, "the reduced-scale decode was not used"
    assert min(width, height) >= SPEC.resize
    pixels = rgb_array(image)
    assert _is_red(pixels[2, width - 3])
    assert not _is_red(pixels[2, 2])


# --- colour JPEGs decoded by libjpeg-turbo through simplejpeg --------------------------------------

PHOTO_SPEC = InputSpec(size=(224, 224), resize=256)  # efficientnet_lite0's


@pytest.fixture
def photo_preprocessor() -> ImagePreprocessor:
    return ImagePreprocessor(PHOTO_SPEC, max_image_pixels=40_000_000)


def _gradient_photo(size: tuple[int, int] = (600, 400)) -> Image.Image:
    """Smooth colours with a red marker top-left: JPEG-friendly, and easy to compare."""
    x = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, size[1], dtype=np.float32)[:, None, None]
    pixels = np.concatenate(
        [np.broadcast_to(x, (size[1], size[0], 1)), np.broadcast_to(y, (size[1], size[0], 1)), (x + y) / 2],
        axis=2,
    )
    image = Image.fromarray(pixels.astype(np.uint8))
    image.paste(RED, (0, 0, 100, 100))
    return image


def _pillow(data: bytes) -> Image.Image:
    """Pillow's own decode, upright: what the preprocessor decoded before simplejpeg."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return ImageOps.exif_transpose(image).convert("RGB")


@pytest.mark.parametrize("size", [(600, 400), (400, 600), (511, 300), (300, 300)])
@pytest.mark.parametrize("quality", [75, 95])
def test_a_colour_jpeg_decodes_to_exactly_pillows_pixels(
    photo_preprocessor: ImagePreprocessor, size: tuple[int, int], quality: int
) -> None:
    """Decoded whole (Pillow's draft cannot reduce these for a 256 px resize): libjpeg-turbo
    through simplejpeg, with Pillow's settings, so every pixel and every answer stay the same."""
    data = encode(_gradient_photo(size), "JPEG", quality=quality)
    image, original = photo_preprocessor.decode_sized(data)
    assert original == size and image.size == size
    assert np.array_equal(np.asarray(image), np.asarray(_pillow(data)))


def test_real_photos_decode_to_exactly_pillows_pixels(photo_preprocessor: ImagePreprocessor) -> None:
    from bench.images import default_images  # the benchmark's ~600x400 JPEGs of the packaged photos

    for photo in default_images():
        decoded = photo_preprocessor.decode(photo.data)
        reference = Image.open(io.BytesIO(photo.data))
        width, height = reference.size
        scale = PHOTO_SPEC.resize / min(width, height)
        reference.draft("RGB", (int(width * scale), int(height * scale)))  # as before simplejpeg
        reference.load()
        assert np.array_equal(np.asarray(decoded), np.asarray(reference.convert("RGB"))), photo.name


@pytest.mark.parametrize(
    ("orientation", "upright"), [(1, (600, 400)), (3, (600, 400)), (6, (400, 600)), (8, (400, 600))]
)
def test_the_simplejpeg_decode_honours_exif_orientation(
    photo_preprocessor: ImagePreprocessor, orientation: int, upright: tuple[int, int]
) -> None:
    data = _with_orientation(_gradient_photo(), orientation)
    image, original = photo_preprocessor.decode_sized(data)
    assert image.size == original == upright
    assert np.array_equal(np.asarray(image), np.asarray(_pillow(data)))


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_a_truncated_colour_jpeg_is_invalid_image(
    photo_preprocessor: ImagePreprocessor, fraction: float
) -> None:
    data = encode(_gradient_photo(), "JPEG", quality=90)
    with pytest.raises(VisionError) as info:
        photo_preprocessor(data[: int(len(data) * fraction)])
    assert info.value.code is ErrorCode.INVALID_IMAGE
    assert "corrupt or truncated" in info.value.message


def test_grey_and_reducible_jpegs_keep_pillows_decode(photo_preprocessor: ImagePreprocessor) -> None:
    """Grey JPEGs, and JPEGs Pillow's draft decodes at a reduced scale, are Pillow's as before."""
    grey = encode(_gradient_photo().convert("L"), "JPEG", quality=90)
    assert photo_preprocessor.decode_sized(grey)[0].size == (600, 400)
    half = encode(_gradient_photo((1024, 600)), "JPEG", quality=90)  # needs 436x256: 1/2 = 512x300
    assert photo_preprocessor.decode_sized(half)[0].size == (512, 300)


# --- invalid input ------------------------------------------------------------------------------


def _expect(code: ErrorCode, preprocessor: ImagePreprocessor, data: bytes) -> VisionError:
    with pytest.raises(VisionError) as info:
        preprocessor(data)
    assert info.value.code is code, info.value.message
    assert info.value.message
    return info.value


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_jpeg(preprocessor: ImagePreprocessor, fraction: float) -> None:
    data = noise_jpeg()
    error = _expect(ErrorCode.INVALID_IMAGE, preprocessor, data[: int(len(data) * fraction)])
    assert "corrupt or truncated" in error.message
    assert "JPEG" in error.message


def test_jpeg_truncated_inside_its_header(preprocessor: ImagePreprocessor) -> None:
    _expect(ErrorCode.INVALID_IMAGE, preprocessor, noise_jpeg()[:40])


def test_truncated_png(preprocessor: ImagePreprocessor) -> None:
    rng = np.random.default_rng(5)
    data = encode(Image.fromarray(rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)), "PNG")
    _expect(ErrorCode.INVALID_IMAGE, preprocessor, data[: len(data) // 2])


def test_empty_bytes(preprocessor: ImagePreprocessor) -> None:
    error = _expect(ErrorCode.INVALID_IMAGE, preprocessor, b"")
    assert "empty" in error.message


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(1).bytes(4096),
        b"hello, this is plain text and certainly not an image\n" * 20,
        b'{"image": "aGVsbG8="}',
        b"\x00",
        b"\xff\xd8\xff",  # a JPEG signature and nothing else
        b"\x89PNG\r\n\x1a\n",  # a PNG signature and nothing else
        b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
    ],
    ids=["random", "text", "json", "one-byte", "jpeg-magic", "png-magic", "svg"],
)
def test_not_an_image(preprocessor: ImagePreprocessor, data: bytes) -> None:
    error = _expect(ErrorCode.INVALID_IMAGE, preprocessor, data)
    assert "not an image in a supported format" in error.message
    for fmt in ACCEPTED_FORMATS:
        assert fmt in error.message


@pytest.mark.parametrize(
    "data",
    [
        encode(Image.new("RGB", (32, 32), RED), "ICO"),
        encode(Image.new("RGB", (32, 32), RED), "PPM"),
        encode(Image.new("RGB", (32, 32), RED), "TGA"),
        encode(Image.new("RGB", (32, 32), RED), "PCX"),
        encode(Image.new("RGB", (32, 32), RED), "PDF"),
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n",
    ],
    ids=["ico", "ppm", "tga", "pcx", "pdf", "eps"],
)
def test_real_but_unsupported_format(
    preprocessor: ImagePreprocessor, data: bytes, no_decode: list[str]
) -> None:
    error = _expect(ErrorCode.INVALID_IMAGE, preprocessor, data)
    assert "not an image in a supported format" in error.message
    assert no_decode == []


@pytest.mark.parametrize(
    "data",
    [crafted_png(0, 10), crafted_png(10, 0), crafted_png(0, 0), crafted_gif(0, 0), crafted_bmp(0, 10)],
    ids=["png-0x10", "png-10x0", "png-0x0", "gif-0x0", "bmp-0x10"],
)
def test_zero_size(preprocessor: ImagePreprocessor, data: bytes, no_decode: list[str]) -> None:
    _expect(ErrorCode.INVALID_IMAGE, preprocessor, data)
    assert no_decode == []


# --- decompression bombs: refused from the header, before decoding --------------------------------


@pytest.mark.parametrize(
    "data",
    [crafted_png(20000, 20000), crafted_bmp(20000, 20000), crafted_png(100_000, 100_000)],
    ids=["png-20k", "bmp-20k", "png-100k"],
)
def test_bomb_over_pillows_limit(preprocessor: ImagePreprocessor, data: bytes, no_decode: list[str]) -> None:
    assert len(data) < 200
    error = _expect(ErrorCode.IMAGE_TOO_LARGE, preprocessor, data)
    assert "VISION_MAX_IMAGE_PIXELS" in error.message
    assert "1,000,000" in error.message
    assert no_decode == []


@pytest.mark.parametrize("data", [crafted_png(5000, 5000), crafted_bmp(5000, 5000), crafted_gif(5000, 5000)])
def test_bomb_under_pillows_limit(preprocessor: ImagePreprocessor, data: bytes, no_decode: list[str]) -> None:
    error = _expect(ErrorCode.IMAGE_TOO_LARGE, preprocessor, data)
    assert "5000x5000" in error.message
    assert "25,000,000" in error.message
    assert "1,000,000" in error.message
    assert "VISION_MAX_IMAGE_PIXELS" in error.message
    assert no_decode == []


def test_real_image_over_the_limit_is_not_decoded(no_decode: list[str]) -> None:
    data = encode(Image.new("RGB", (200, 100), RED), "JPEG")
    preprocessor = ImagePreprocessor(SPEC, max_image_pixels=19_999)
    error = _expect(ErrorCode.IMAGE_TOO_LARGE, preprocessor, data)
    assert "200x100" in error.message
    assert no_decode == []


def test_pixel_limit_is_inclusive() -> None:
    data = encode(Image.new("RGB", (20, 10), RED))
    assert ImagePreprocessor(SPEC, max_image_pixels=200)(data).shape == (3, 32, 32)
    with pytest.raises(VisionError) as info:
        ImagePreprocessor(SPEC, max_image_pixels=199)(data)
    assert info.value.code is ErrorCode.IMAGE_TOO_LARGE


def test_no_decode_fixture_catches_a_decode(no_decode: list[str]) -> None:
    # the guard used above does fire when pixels are decoded
    with pytest.raises(VisionError) as info:
        ImagePreprocessor(SPEC, max_image_pixels=1_000_000)(encode(Image.new("RGB", (20, 10), RED)))
    assert info.value.code is ErrorCode.INVALID_IMAGE
    assert no_decode == ["PNG (20, 10)"]


# --- large JPEGs: reduced-scale decode ----------------------------------------------------------


@pytest.fixture(scope="module")
def large_photo() -> Image.Image:
    """3000x2000: smooth gradients with some hard-edged shapes (a stand-in for a camera photo)."""
    width, height = 3000, 2000
    x = np.linspace(0, 255, width, dtype=np.float32)[np.newaxis, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, np.newaxis]
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.broadcast_to(x, (height, width))
    pixels[..., 1] = np.broadcast_to(y, (height, width))
    pixels[..., 2] = np.broadcast_to((x + y) / 2, (height, width))
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((1000, 500, 2000, 1500), fill=(240, 30, 30))
    draw.rectangle((1300, 800, 1700, 1200), fill=(20, 20, 200))
    draw.line((0, 0, 3000, 2000), fill=(0, 0, 0), width=40)
    return image


def test_large_jpeg_uses_reduced_decode_and_matches_full_decode(large_photo: Image.Image) -> None:
    preprocessor = ImagePreprocessor(SPEC, max_image_pixels=40_000_000)
    jpeg = encode(large_photo, "JPEG", quality=92)

    decoded = preprocessor.decode(jpeg)
    assert decoded.size[0] * decoded.size[1] <= 3000 * 2000 // 16, "the reduced-scale decode was not used"
    assert min(decoded.size) >= SPEC.resize
    assert decoded.size[0] / decoded.size[1] == pytest.approx(1.5, rel=0.01)

    fast = preprocessor(jpeg)
    full = Image.open(io.BytesIO(jpeg))
    full.load()
    reference = preprocessor.preprocess(full.convert("RGB"))
    lossless = preprocessor(encode(large_photo, "PNG", compress_level=1))
    assert fast.shape == reference.shape == (3, 32, 32)
    # in normalized units (1.0 is ~57 gray levels): within a gray level or two on average
    assert np.abs(fast - reference).mean() < 0.03
    assert np.abs(fast - lossless).mean() < 0.03
    # and the comparison can fail: another image is far away
    other = preprocessor(encode(large_photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG"))
    assert np.abs(other - reference).mean() > 0.3


def test_large_jpeg_default_spec(large_photo: Image.Image) -> None:
    preprocessor = ImagePreprocessor(InputSpec(), max_image_pixels=40_000_000)
    jpeg = encode(large_photo, "JPEG", quality=92)
    decoded = preprocessor.decode(jpeg)
    assert decoded.size == (750, 500)  # 1/4 scale: the smallest that keeps the shorter side >= 256
    tensor = preprocessor(jpeg)
    assert tensor.shape == (3, 224, 224)
    full = Image.open(io.BytesIO(jpeg))
    full.load()
    assert np.abs(tensor - preprocessor.preprocess(full.convert("RGB"))).mean() < 0.03


def test_large_mpo_uses_reduced_decode(large_photo: Image.Image) -> None:
    # Phones write JPEGs with a multi-picture index (depth map, preview); Pillow calls them MPO.
    buffer = io.BytesIO()
    large_photo.save(buffer, "MPO", save_all=True, append_images=[Image.new("RGB", (300, 200), (0, 0, 255))])
    mpo = buffer.getvalue()
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    preprocessor = ImagePreprocessor(SPEC, max_image_pixels=40_000_000)
    decoded = preprocessor.decode(mpo)
    assert decoded.size[0] * decoded.size[1] <= 3000 * 2000 // 16, "the reduced-scale decode was not used"
    reference = preprocessor(encode(large_photo, "PNG", compress_level=1))
    assert np.abs(preprocessor.preprocess(decoded) - reference).mean() < 0.03  # the first picture
