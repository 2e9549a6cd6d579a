"""Detection helpers: letterbox geometry, box mapping and clipping, NMS, decoding a detector's output."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from visionserve.tasks.boxes import Letterbox, batched_nms, decode_detections, letterbox, nms

PAD = np.float32(114 / 255)


def _solid(width: int, height: int, colour: tuple[int, int, int] = (255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def _content_rows(x: np.ndarray) -> np.ndarray:
    return np.flatnonzero(~np.all(x == PAD, axis=(0, 2)))


def _content_cols(x: np.ndarray) -> np.ndarray:
    return np.flatnonzero(~np.all(x == PAD, axis=(0, 1)))


# --- letterbox ---------------------------------------------------------------------------------


def test_wide_photo_is_centred_vertically_with_pad_rows_above_and_below() -> None:
    x, box = letterbox(_solid(200, 100), (64, 64))
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    assert box == Letterbox(scale=0.32, pad_x=0.0, pad_y=16.0, width=200, height=100)
    assert np.all(x[:, :16] == PAD) and np.all(x[:, 48:] == PAD)
    np.testing.assert_array_equal(
        x[:, 16:48], np.broadcast_to(np.array([1, 0, 0], np.float32)[:, None, None], (3, 32, 64))
    )


def test_tall_photo_is_centred_horizontally() -> None:
    x, box = letterbox(_solid(100, 200, (0, 255, 0)), (64, 64))
    assert (box.pad_x, box.pad_y) == (16.0, 0.0)
    assert _content_cols(x).tolist() == list(range(16, 48))
    assert _content_rows(x).tolist() == list(range(64))


def test_odd_padding_puts_the_extra_row_below() -> None:
    x, box = letterbox(_solid(128, 62), (64, 64))  # resized to 64x31: 33 pad rows
    assert box.pad_y == 16.0
    assert _content_rows(x).tolist() == list(range(16, 47))


def test_non_square_target_is_height_then_width() -> None:
    x, box = letterbox(_solid(100, 100), (32, 64))
    assert x.shape == (3, 32, 64)
    assert (box.scale, box.pad_x, box.pad_y) == (0.32, 16.0, 0.0)


def test_pixels_convert_exactly_when_no_resize_is_needed() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(32, 64, 3), dtype=np.uint8)
    x, box = letterbox(Image.fromarray(pixels), (64, 64))
    assert box.scale == 1.0
    np.testing.assert_allclose(x[:, 16:48], pixels.transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-7)


def test_pad_value_and_range() -> None:
    x, _ = letterbox(_solid(50, 10, (255, 255, 255)), (32, 32), pad_value=0)
    assert np.all(x[:, 0] == 0.0) and x.max() == 1.0 and x.min() == 0.0
    with pytest.raises(ValueError, match="pad_value"):
        letterbox(_solid(5, 5), (32, 32), pad_value=300)


def test_greyscale_and_rgba_photos_become_rgb() -> None:
    grey, _ = letterbox(Image.new("L", (40, 40), 200), (32, 32))
    rgba, _ = letterbox(Image.new("RGBA", (40, 40), (10, 20, 30, 0)), (32, 32))
    assert grey.shape == rgba.shape == (3, 32, 32)
    np.testing.assert_allclose(grey[:, 16, 16], [200 / 255] * 3, atol=1e-6)
    np.testing.assert_allclose(rgba[:, 16, 16], np.array([10, 20, 30]) / 255, atol=1e-6)


def test_small_photos_are_scaled_up_to_fit() -> None:
    x, box = letterbox(_solid(10, 20), (64, 64))
    assert box.scale == 3.2 and _content_cols(x).tolist() == list(range(16, 48))


def test_a_drawn_rectangle_maps_back_to_where_it_was_drawn() -> None:
    image = Image.new("RGB", (300, 200), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((60, 40, 179, 139), fill=(255, 255, 255))  # pixels 60..179, 40..139
    x, box = letterbox(image, (160, 160))
    bright = x[0] > 0.5
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    found = np.array([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]], np.float32)
    np.testing.assert_allclose(box.to_original(found), [[60, 40, 180, 140]], atol=2.0)


def test_to_original_inverts_the_placement_and_clips_to_the_photo() -> None:
    box = Letterbox(scale=0.5, pad_x=10.0, pad_y=20.0, width=100, height=60)
    inside = np.array([[20, 30, 40, 50]], np.float32)
    np.testing.assert_allclose(box.to_original(inside), [[20, 20, 60, 60]])
    spilling = np.array([[0, 0, 100, 100], [-5, 25, 15, 30]], np.float32)
    np.testing.assert_allclose(box.to_original(spilling), [[0, 0, 100, 60], [0, 10, 10, 20]])
    assert box.to_original(np.empty((0, 4), np.float32)).shape == (0, 4)


# --- NMS ---------------------------------------------------------------------------------------


def test_nms_suppresses_overlap_above_the_threshold_only() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10]], np.float32)  # IoU(0,1)=9/11
    scores = np.array([0.9, 0.8, 0.1], np.float32)
    assert nms(boxes[:2], scores[:2], 0.9).tolist() == [0, 1]
    assert nms(boxes[:2], scores[:2], 0.8).tolist() == [0]
    assert nms(boxes, scores, 0.5).tolist() == [0]


def test_nms_iou_equal_to_threshold_does_not_suppress() -> None:
    boxes = np.array([[0, 0, 3, 1], [1, 0, 4, 1]], np.float32)  # IoU exactly 2/4
    assert nms(boxes, np.array([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms(boxes, np.array([0.9, 0.8]), 0.49).tolist() == [0]


def test_nms_is_greedy_and_orders_by_score() -> None:
    # B overlaps A and C, A and C are apart: A suppresses B, so C survives.
    boxes = np.array([[10, 0, 20, 10], [0, 0, 10, 10], [5, 0, 15, 10]], np.float32)
    scores = np.array([0.5, 0.9, 0.7], np.float32)
    assert nms(boxes, scores, 0.3).tolist() == [1, 0]


def test_nms_ties_keep_the_lower_index_first() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.5, 0.5, 0.5], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]


def test_nms_empty_and_degenerate_boxes() -> None:
    empty = nms(np.empty((0, 4), np.float32), np.empty(0, np.float32), 0.5)
    assert empty.shape == (0,) and empty.dtype == np.intp
    points = np.array([[1, 1, 1, 1], [1, 1, 1, 1]], np.float32)  # zero area: IoU 0, both kept
    assert nms(points, np.array([0.9, 0.8]), 0.5).tolist() == [0, 1]
    with pytest.raises(ValueError, match="scores"):
        nms(points, np.array([0.9]), 0.5)


def test_batched_nms_classes_do_not_suppress_each_other() -> None:
    # Far below zero: a per-class offset of only max(coordinate) would make the classes collide.
    boxes = np.array([[-100, -100, 1, 1], [-100, -100, 1, 1], [-99, -100, 1, 1]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert batched_nms(boxes, scores, np.array([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, np.array([0, 0, 0]), 0.5).tolist() == [0]
    assert batched_nms(np.empty((0, 4)), np.empty(0), np.empty(0, np.int32), 0.5).tolist() == []


# --- decode_detections ---------------------------------------------------------------------------


def _row(boxes_cxcywh: list[list[float]], probabilities: list[list[float]]) -> np.ndarray:
    return np.concatenate([np.array(boxes_cxcywh), np.array(probabilities)], axis=1).astype(np.float32)


def _decode(row: np.ndarray, **kwargs: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    options: dict[str, object] = {"score_threshold": 0.5, "iou_threshold": 0.5, "max_detections": 100}
    options.update(kwargs)
    return decode_detections(row, **options)  # type: ignore[arg-type]


def test_decode_converts_centre_boxes_and_takes_the_best_class() -> None:
    row = _row([[50, 40, 20, 10], [10, 10, 4, 4]], [[0.1, 0.7, 0.6], [0.2, 0.1, 0.3]])
    boxes, scores, classes = _decode(row)
    np.testing.assert_array_equal(boxes, [[40, 35, 60, 45]])
    np.testing.assert_allclose(scores, [0.7])
    assert classes.tolist() == [1]
    assert (boxes.dtype, scores.dtype, classes.dtype) == (np.float32, np.float32, np.int32)


def test_decode_threshold_is_inclusive_and_drops_everything_below() -> None:
    row = _row([[10, 10, 4, 4], [50, 50, 4, 4]], [[0.5, 0.0], [0.0, 0.4999]])
    boxes, scores, classes = _decode(row)
    assert classes.tolist() == [0] and scores.tolist() == [0.5]
    boxes, scores, classes = _decode(row, score_threshold=0.9)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.shape == (0,)


def test_decode_runs_class_aware_nms_highest_score_first() -> None:
    row = _row(
        [[50, 50, 20, 20], [51, 50, 20, 20], [50, 50, 20, 20], [200, 200, 10, 10]],
        [[0.8, 0.0], [0.9, 0.0], [0.0, 0.7], [0.95, 0.0]],
    )
    _, scores, classes = _decode(row)
    np.testing.assert_allclose(scores, [0.95, 0.9, 0.7])
    assert classes.tolist() == [0, 0, 1]


def test_decode_class_filter_keeps_a_subset_of_the_unfiltered_answer() -> None:
    """An anchor whose best class is filtered out is dropped, not relabelled with its second best
    (a person's box must not come back as a 0.6 `dog` when only dogs are asked for)."""
    row = _row([[10, 10, 4, 4], [50, 50, 4, 4]], [[0.9, 0.6, 0.0], [0.0, 0.0, 0.8]])
    _, scores, classes = _decode(row, class_filter=np.array([1, 2]))
    assert classes.tolist() == [2]
    np.testing.assert_allclose(scores, [0.8])
    _, scores, classes = _decode(row, class_filter=np.array([0]))
    assert classes.tolist() == [0]
    np.testing.assert_allclose(scores, [0.9])
    assert _decode(row, class_filter=np.array([], np.int32))[2].tolist() == []
    with pytest.raises(ValueError, match="class_filter"):
        _decode(row, class_filter=np.array([3]))


def test_decode_cuts_to_max_detections() -> None:
    centres = [[i * 100.0, 0, 10, 10] for i in range(6)]
    row = _row(centres, [[0.5 + i / 20] for i in range(6)])
    boxes, scores, classes = _decode(row, max_detections=3)
    assert boxes[:, 0].tolist() == [495, 395, 295]
    np.testing.assert_allclose(scores, [0.75, 0.7, 0.65])
    assert classes.tolist() == [0, 0, 0]
    assert _decode(row, max_detections=0)[0].shape == (0, 4)


def test_decode_rejects_a_batch_or_a_row_without_classes() -> None:
    with pytest.raises(ValueError, match="anchors"):
        _decode(np.zeros((2, 10, 6), np.float32))
    with pytest.raises(ValueError, match="anchors"):
        _decode(np.zeros((10, 4), np.float32))
