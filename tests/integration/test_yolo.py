"""The YOLO11n rebuild with the pinned COCO weights finds the right objects where they are in real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from export.checkpoint import load_ultralytics_checkpoint
from export.weights import WEIGHTS, fetch
from export.yolo import SEGMENTATION_ONLY, build_yolo11n
from visionserve.photos import packaged_photo
from visionserve.tasks.boxes import decode_detections, letterbox

pytestmark = pytest.mark.real_model

# Hand-measured on the photos (original pixels, x1, y1, x2, y2): the object's full extent.
EXPECTED = [
    ("motorcycle_left.png", "motorcycle", (100, 45, 685, 457)),  # tail light to front tyre, mirror to tyres
    ("astronaut.png", "person", (15, 15, 365, 512)),  # hair to the bottom edge; the helmet is not her
    ("coffee.png", "cup", (172, 18, 413, 305)),  # rim to the handle's bottom, spoon outside
    ("chelsea.png", "cat", (0, 0, 405, 300)),  # the window on the right is not cat
]

Detections = list[tuple[str, float, np.ndarray]]


@pytest.fixture(scope="module")
def yolo640() -> tuple[nn.Module, list[str], dict[str, object]]:
    return build_yolo11n(640)


@pytest.fixture(scope="module")
def yolo320() -> tuple[nn.Module, list[str], dict[str, object]]:
    return build_yolo11n(320)


def _detect(model: nn.Module, names: list[str], photo: str, size: int) -> Detections:
    x, placement = letterbox(Image.open(packaged_photo(photo)), (size, size))
    with torch.inference_mode():
        out = model(torch.from_numpy(x[None])).numpy()
    boxes, scores, classes = decode_detections(
        out[0], score_threshold=0.25, iou_threshold=0.45, max_detections=100
    )
    return [
        (names[c], float(s), b) for c, s, b in zip(classes, scores, placement.to_original(boxes), strict=True)
    ]


def _iou(a: np.ndarray, b: tuple[int, int, int, int]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union)


def test_names_and_provenance(yolo640: tuple[nn.Module, list[str], dict[str, object]]) -> None:
    model, names, provenance = yolo640
    assert len(names) == 80 and names[:3] == ["person", "bicycle", "car"]
    assert not model.training
    assert provenance["sha256"] == WEIGHTS["yolo11n"].sha256
    assert provenance["license"] == "AGPL-3.0" and provenance["input_size"] == 640
    assert provenance["architecture"] == "YOLO11n (visionserve's own torch rebuild)"


def test_layer_settings_match_the_checkpoint(yolo640: tuple[nn.Module, list[str], dict[str, object]]) -> None:
    """Strides, padding, groups and BatchNorm eps do not show in tensor shapes; compare them."""
    recorded = load_ultralytics_checkpoint(fetch(WEIGHTS["yolo11n"])).modules
    checked = 0
    for name, module in yolo640[0].named_modules():
        if isinstance(module, nn.Conv2d):
            attributes = recorded[name][1]
            for key in ("kernel_size", "stride", "padding", "dilation", "groups"):
                assert attributes[key] == (list(v) if isinstance(v := getattr(module, key), tuple) else v), (
                    name,
                    key,
                )
            checked += 1
        elif isinstance(module, nn.BatchNorm2d):
            assert recorded[name][1]["eps"] == module.eps, name
            checked += 1
    detection_layers = [
        name
        for name, (kind, _) in recorded.items()
        if kind.endswith((".Conv2d", ".BatchNorm2d")) and not f"{name}.".startswith(SEGMENTATION_ONLY)
    ]
    assert checked == len(detection_layers) == 169


@pytest.mark.parametrize(("size", "anchors"), [(640, 8400), (480, 4725), (320, 2100)])
def test_output_layout(
    yolo640: tuple[nn.Module, list[str], dict[str, object]], size: int, anchors: int
) -> None:
    x = torch.from_numpy(letterbox(Image.open(packaged_photo("coffee.png")), (size, size))[0])
    with torch.inference_mode():
        out = yolo640[0](torch.stack([x, x]))
    assert out.shape == (2, anchors, 84) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], out[1])
    probabilities = out[..., 4:]
    assert probabilities.min() >= 0 and probabilities.max() <= 1
    best = out[0, probabilities[0].max(dim=1).values.argmax()]
    cx, cy, w, h = best[:4].tolist()
    assert 0 < cx < size and 0 < cy < size and 0 < w <= size and 0 < h <= size


def test_input_not_a_multiple_of_32_is_refused(
    yolo640: tuple[nn.Module, list[str], dict[str, object]],
) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        yolo640[0](torch.zeros(1, 3, 640, 600))


@pytest.mark.parametrize(("photo", "label", "region"), EXPECTED, ids=[e[0] for e in EXPECTED])
def test_finds_the_object_where_it_is(
    yolo640: tuple[nn.Module, list[str], dict[str, object]],
    photo: str,
    label: str,
    region: tuple[int, int, int, int],
) -> None:
    model, names, _ = yolo640
    detections = _detect(model, names, photo, 640)
    top_label, top_score, top_box = detections[0]
    assert top_label == label, detections
    assert top_score > 0.6, detections
    assert _iou(top_box, region) > 0.85, (top_box, region)


@pytest.mark.parametrize(("photo", "label", "region"), EXPECTED, ids=[e[0] for e in EXPECTED])
def test_a_320_input_gives_the_same_top_labels(
    yolo320: tuple[nn.Module, list[str], dict[str, object]],
    photo: str,
    label: str,
    region: tuple[int, int, int, int],
) -> None:
    model, names, provenance = yolo320
    assert provenance["input_size"] == 320
    top_label, _, top_box = _detect(model, names, photo, 320)[0]
    assert top_label == label
    assert _iou(top_box, region) > 0.7, (top_box, region)
