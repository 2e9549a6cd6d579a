"""Detection helpers in numpy and Pillow: letterbox, box mapping, NMS, decoding a detector's output.

No torch here: the ONNX image and the HTTP/gRPC front doors use these too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int32]
IndexArray = npt.NDArray[np.intp]

_RESAMPLE = Image.Resampling.BILINEAR


@dataclass(frozen=True)
class Letterbox:
    """How a photo was placed on the model input: scale, padding, and the photo's own size."""

    scale: float
    """Model-input pixels per original pixel (the same on both axes)."""
    pad_x: float
    """Left padding in model-input pixels (where the photo's column 0 starts)."""
    pad_y: float
    """Top padding in model-input pixels (where the photo's row 0 starts)."""
    width: int
    """The original photo's width in pixels."""
    height: int
    """The original photo's height in pixels."""

    def to_original(self, boxes_xyxy: npt.NDArray[np.floating]) -> FloatArray:
        """(K, 4) x1, y1, x2, y2 in model-input pixels -> original-photo pixels, clipped to the photo."""
        boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
        out = np.empty_like(boxes)
        out[:, 0::2] = (boxes[:, 0::2] - self.pad_x) / self.scale
        out[:, 1::2] = (boxes[:, 1::2] - self.pad_y) / self.scale
        np.clip(out[:, 0::2], 0.0, float(self.width), out=out[:, 0::2])
        np.clip(out[:, 1::2], 0.0, float(self.height), out=out[:, 1::2])
        return out

    def points_to_original(self, points: npt.NDArray[np.floating]) -> FloatArray:
        """(..., 2) x, y points in model-input pixels -> original-photo pixels, clipped to the photo."""
        out = np.asarray(points, dtype=np.float32).copy()
        out[..., 0] = np.clip((out[..., 0] - self.pad_x) / self.scale, 0.0, float(self.width))
        out[..., 1] = np.clip((out[..., 1] - self.pad_y) / self.scale, 0.0, float(self.height))
        return out


def letterbox(
    image: Image.Image, size: tuple[int, int], pad_value: int = 114
) -> tuple[FloatArray, Letterbox]:
    """RGB photo -> float32 (3, H, W) in [0, 1], scaled to fit `size` = (height, width), centred, padded.

    The photo keeps its aspect ratio (one bilinear resample), the rest is `pad_value`.
    """
    target_h, target_w = size
    if target_h <= 0 or target_w <= 0:
        raise ValueError(f"letterbox size must be positive, got {size}")
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be in 0..255, got {pad_value}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    scale = min(target_w / width, target_h / height)
    new_w = min(target_w, max(1, round(width * scale)))
    new_h = min(target_h, max(1, round(height * scale)))
    left = (target_w - new_w) // 2
    top = (target_h - new_h) // 2
    resized = image if (new_w, new_h) == (width, height) else image.resize((new_w, new_h), _RESAMPLE)

    # NOTE: the padding is written once as a float and only the photo's pixels are converted:
    # one uint8 -> float32 copy into the preallocated CHW array, one in-place multiply.
    out = np.full((3, target_h, target_w), pad_value / 255.0, dtype=np.float32)
    region = out[:, top : top + new_h, left : left + new_w]
    np.copyto(region, np.asarray(resized).transpose(2, 0, 1), casting="unsafe")
    region *= np.float32(1.0 / 255.0)
    return out, Letterbox(scale=scale, pad_x=float(left), pad_y=float(top), width=width, height=height)


def _areas(boxes: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0.0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0.0, None)


def nms(
    boxes: npt.NDArray[np.floating], scores: npt.NDArray[np.floating], iou_threshold: float
) -> IndexArray:
    """Greedy NMS on (K, 4) xyxy boxes: indices kept, highest score first; IoU > threshold suppresses.

    Equal scores keep the lower index first (stable order).
    """
    boxes64 = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores_arr = np.asarray(scores).reshape(-1)
    if len(boxes64) != len(scores_arr):
        raise ValueError(f"{len(boxes64)} boxes but {len(scores_arr)} scores")
    order = np.argsort(-scores_arr, kind="stable")
    areas = _areas(boxes64)
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        if not rest.size:
            break
        x1 = np.maximum(boxes64[best, 0], boxes64[rest, 0])
        y1 = np.maximum(boxes64[best, 1], boxes64[rest, 1])
        x2 = np.minimum(boxes64[best, 2], boxes64[rest, 2])
        y2 = np.minimum(boxes64[best, 3], boxes64[rest, 3])
        inter = np.clip(x2 - x1, 0.0, None) * np.clip(y2 - y1, 0.0, None)
        union = areas[best] + areas[rest] - inter
        # NOTE: two empty boxes have union 0: IoU 0 (neither suppresses the other), not NaN.
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


def batched_nms(
    boxes: npt.NDArray[np.floating],
    scores: npt.NDArray[np.floating],
    classes: npt.NDArray[np.integer],
    iou_threshold: float,
) -> IndexArray:
    """Class-aware NMS: boxes of different classes never suppress each other."""
    boxes64 = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes64):
        return np.empty(0, dtype=np.intp)
    # NOTE: shift each class to its own region of the plane so no two classes overlap (the
    # coordinate-offset trick); float64 keeps the shifted IoUs as exact as the originals.
    span = float(boxes64.max() - min(boxes64.min(), 0.0)) + 1.0
    offsets = np.asarray(classes, dtype=np.float64).reshape(-1, 1) * span
    return nms(boxes64 + offsets, scores, iou_threshold)


def decode_detections(
    row: npt.NDArray[np.floating],
    *,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    class_filter: npt.NDArray[np.integer] | None = None,
    classes: int | None = None,
) -> tuple[FloatArray, FloatArray, IntArray]:
    """One image's (A, 4 + C) output (cx, cy, w, h, class probabilities) -> boxes, scores, classes.

    Returns xyxy float32 (K, 4) in model-input pixels, float32 (K,) scores, int32 (K,) classes,
    highest score first: best class per anchor, score >= threshold, only the classes in
    `class_filter` (an anchor whose best class is another is dropped, not relabelled: the filter
    keeps a subset of what the unfiltered answer has), class-aware NMS, first `max_detections`.
    `classes` (C) is given when more columns follow the class scores (landmarks).
    """
    boxes, scores, labels, _ = select_detections(
        row,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        class_filter=class_filter,
        classes=classes,
    )
    return boxes, scores, labels


def select_detections(
    row: npt.NDArray[np.floating],
    *,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    class_filter: npt.NDArray[np.integer] | None = None,
    classes: int | None = None,
) -> tuple[FloatArray, FloatArray, IntArray, IndexArray]:
    """`decode_detections`, plus the row index (anchor) of each box kept, to read the columns that
    follow the class scores (landmarks)."""
    if row.ndim != 2 or row.shape[1] < 5:
        raise ValueError(f"expected (anchors, 4 + classes), got shape {row.shape}")
    if classes is not None and not 1 <= classes <= row.shape[1] - 4:
        raise ValueError(f"{classes} classes do not fit rows of {row.shape[1]} columns")
    class_scores = row[:, 4:] if classes is None else row[:, 4 : 4 + classes]
    if max_detections <= 0:
        return _empty()
    # NOTE: one cheap pass (max per anchor) selects the few candidates; argmax and the
    # box conversion then touch only those rows, not all A (8400 at 640x640).
    candidates = np.flatnonzero(class_scores.max(axis=1) >= score_threshold)
    if not candidates.size:
        return _empty()
    best = class_scores[candidates].argmax(axis=1)
    if class_filter is not None:
        wanted = np.unique(np.asarray(class_filter, dtype=np.intp))
        if wanted.size and (wanted[0] < 0 or wanted[-1] >= class_scores.shape[1]):
            raise ValueError(f"class_filter must be in 0..{class_scores.shape[1] - 1}")
        kept = np.isin(best, wanted)
        candidates, best = candidates[kept], best[kept]
        if not candidates.size:
            return _empty()
    scores = class_scores[candidates, best].astype(np.float32)
    labels = best.astype(np.int32)
    centre = row[candidates, 0:2].astype(np.float32)
    half = row[candidates, 2:4].astype(np.float32) * np.float32(0.5)
    boxes = np.concatenate((centre - half, centre + half), axis=1)
    keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
    return boxes[keep], scores[keep], labels[keep], candidates[keep].astype(np.intp)


def _empty() -> tuple[FloatArray, FloatArray, IntArray, IndexArray]:
    return np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.int32), np.empty(0, np.intp)
