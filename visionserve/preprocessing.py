"""Image bytes -> model input: decode, resize the shorter side, center crop, normalize.

Shared by every runtime and protocol (numpy and Pillow only). Every failure on client input is a
`VisionError` with a message the client can act on; nothing here trusts the bytes it is given.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from visionserve.errors import ErrorCode, VisionError
from visionserve.repository import InputSpec

logger = logging.getLogger(__name__)

# NOTE: only these decoders are reachable from client bytes. Pillow can open dozens of formats,
# some through external programs (EPS runs Ghostscript); a serving endpoint needs none of them.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}

_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# EXIF orientation -> the transposition that makes the image upright (as ImageOps.exif_transpose)
_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImagePreprocessor:
    """Turns encoded image bytes into one normalized CHW float32 array for a model's input spec.

    Thread-safe: it holds only read-only state, so one instance serves every worker thread.
    """

    def __init__(self, spec: InputSpec, *, max_image_pixels: int):
        self.spec = spec
        self.max_image_pixels = max_image_pixels
        mean = np.asarray(spec.mean, dtype=np.float32) * 255.0
        std = np.asarray(spec.std, dtype=np.float32) * 255.0
        # (pixel - mean) / std == pixel * scale + offset, computed once, per channel (CHW)
        self._scale = (1.0 / std).reshape(3, 1, 1)
        self._offset = (-mean / std).reshape(3, 1, 1)
        self._resample = _RESAMPLE[spec.interpolation]

    def __call__(self, data: bytes) -> np.ndarray:
        """Decode and preprocess: bytes -> float32 array of shape (3, H, W)."""
        return self.preprocess(self.decode(data))

    def decode(self, data: bytes) -> Image.Image:
        """Bytes -> an RGB image, EXIF orientation applied.

        JPEGs larger than needed are decoded at a reduced scale (`Image.draft`), which cuts the
        decode of a 12-megapixel photo several times over.
        """
        return self.decode_sized(data)[0]

    def decode_sized(self, data: bytes) -> tuple[Image.Image, tuple[int, int]]:
        """`decode`, and the photo's own upright width and height (a JPEG decoded at a reduced
        scale is smaller than the photo: boxes are answered in the photo's pixels)."""
        if not data:
            raise VisionError(ErrorCode.INVALID_IMAGE, "the image is empty (0 bytes)")
        try:
            # NOTE: Pillow checks its own global limit (Image.MAX_IMAGE_PIXELS, ~89 Mpx) in open();
            # ours is capped below it by the settings, so Pillow's only fires on images we reject.
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except Image.DecompressionBombError:
            raise self._too_large(None) from None
        except Exception as exc:  # Pillow raises many types on hostile input
            raise VisionError(
                ErrorCode.INVALID_IMAGE,
                f"the data is not an image in a supported format ({', '.join(ACCEPTED_FORMATS)})",
            ) from exc

        width, height = image.size
        if width < 1 or height < 1:
            raise VisionError(ErrorCode.INVALID_IMAGE, f"the image has no pixels ({width}x{height})")
        if width * height > self.max_image_pixels:
            raise self._too_large((width, height))

        original = (width, height)
        # NOTE: phone photos with a multi-picture index open as MPO, a JPEG subclass: same draft.
        if image.format in ("JPEG", "MPO"):
            scale = self._draft_scale(width, height)
            needed = (int(width * scale), int(height * scale))
            if image.mode == "RGB" and _draft_reduction(width, height, needed) == 1:
                decoded = _decode_jpeg(data, image.format)
                method = _UPRIGHT.get(_orientation(image))
                upright = decoded if method is None else decoded.transpose(method)
                return upright, original if upright.size == decoded.size else (height, width)
            image.draft(image.mode, needed)
        try:
            image.load()  # first frame only for animated formats
            size = image.size
            # NOTE: in place: without, exif_transpose copies every pixel of an upright photo
            ImageOps.exif_transpose(image, in_place=True)
        except Exception as exc:
            raise _corrupt(image.format) from exc
        if image.size != size:  # rotated a quarter turn by its EXIF orientation
            original = (height, width)
        return _to_rgb(image), original

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) RGB pixels -> float32 (3, H, W), normalised as the input spec says."""
        array = np.empty((3, *rgb.shape[:2]), dtype=np.float32)
        np.copyto(array, rgb.transpose(2, 0, 1))
        array *= self._scale
        array += self._offset
        return array

    def _draft_scale(self, width: int, height: int) -> float:
        """The factor the photo will be resized by (the draft decodes JPEGs at no less)."""
        if self.spec.fit == "letterbox":
            target_h, target_w = self.spec.size
            return min(target_w / width, target_h / height)
        return self.spec.resize / min(width, height)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> float32 (3, H, W): shorter side to `resize`, center crop, normalize.

        The crop box is mapped back to the source image so that one resampling pass produces the
        crop directly (the same as resize-then-crop, without resizing pixels that are cut away).
        """
        crop_h, crop_w = self.spec.size
        width, height = image.size
        scale = self.spec.resize / min(width, height)
        resized_w = max(crop_w, round(width * scale))
        resized_h = max(crop_h, round(height * scale))
        left = (resized_w - crop_w) // 2
        top = (resized_h - crop_h) // 2
        sx = width / resized_w
        sy = height / resized_h
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        cropped = image.resize((crop_w, crop_h), self._resample, box=box)
        # NOTE: HWC uint8 -> CHW float32 in one copy, then scale and shift in place, per channel
        # plane. Broadcasting over the size-3 last axis of HWC instead cost ~0.75 ms a 224x224
        # image here, a fifth of the whole decode + preprocess.
        array = np.empty((3, crop_h, crop_w), dtype=np.float32)
        np.copyto(array, np.asarray(cropped).transpose(2, 0, 1))
        array *= self._scale
        array += self._offset
        return array

    def _too_large(self, size: tuple[int, int] | None) -> VisionError:
        declared = (
            f" declares {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels;" if size else " is too large;"
        )
        return VisionError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"the image{declared} the limit is {self.max_image_pixels:,} pixels "
            "(setting VISION_MAX_IMAGE_PIXELS)",
        )


def _decode_jpeg(data: bytes, image_format: str | None) -> Image.Image:
    """A colour JPEG that Pillow's draft would decode whole, decoded by libjpeg-turbo through
    simplejpeg instead (the caller turns it upright by its EXIF orientation).

    NOTE: the same library and settings as Pillow's decoder (accurate DCT, smooth chroma
    upsampling): the pixels are identical (tested), sooner (a 600x400 photo: 0.86 ms against
    ~1.0). Its M/8 scaled decode (6/8 for a 600x400 photo and a 256 px resize) was tried: a
    slower decode (libjpeg-turbo's SIMD paths are the 1/1, 1/2, 1/4, 1/8 scales) but a smaller
    resize after it, ~0.1 ms sooner in all, yet different pixels and probabilities moved by up
    to 0.04 from every offline pipeline's: not worth it (docs/benchmarks.md).
    """
    try:
        return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    except ValueError as exc:  # simplejpeg's error for corrupt or truncated data (strict)
        raise _corrupt(image_format) from exc


def _corrupt(image_format: str | None) -> VisionError:
    return VisionError(
        ErrorCode.INVALID_IMAGE, f"the {image_format} image is corrupt or truncated and cannot be decoded"
    )


def _draft_reduction(width: int, height: int, needed: tuple[int, int]) -> int:
    """The factor (8, 4, 2 or 1) by which Pillow's `draft` decodes a JPEG of `width` x `height`
    asked for at least `needed` (the rule of Pillow's JpegImageFile.draft)."""
    scale = min(width // max(1, needed[0]), height // max(1, needed[1]))
    return next(factor for factor in (8, 4, 2, 1) if scale >= factor or factor == 1)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened (not yet decoded) image; 1 when absent or unreadable."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is ignored, as ImageOps.exif_transpose does
        return 1
    return value if isinstance(value, int) else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparent pixels become white, 16-bit values are scaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float32)
        if mode == "F":
            # NOTE: float pixels may be NaN or infinite (a TIFF says what it likes); they count as
            # black. Left in, they made the peak NaN or infinite and the cast to uint8 undefined.
            values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(values.max()) if values.size else 0.0
        if mode.startswith("I;16"):
            # NOTE: I;16 pixels are 16-bit by definition (0..65535), whatever the peak: guessing
            # from the peak turned a dark image (every value <= 255) up to 257x brighter, white.
            values = values * (255.0 / 65535.0)
        elif peak > 255.0:
            values = values * (255.0 / (65535.0 if peak <= 65535.0 else peak))
        gray = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
