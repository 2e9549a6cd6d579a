"""Where a detector's boxes (or a face model's faces) and their labels go on the photo, in the
photo's own pixels.

The pages draw them as an SVG laid over the photo whose `viewBox` is the photo's size as the API
saw it (`image.width` x `image.height`), so the browser scales every box with the photo, whatever
size it is shown at. The image page's template and the video and live pages' script
(`static/overlay.js`) all draw from these shapes, so a box looks the same on every page. A face
is drawn as a box labelled with its top expression and that one's probability, its landmarks
(and a face detector's) as dots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flask_ui.results import DETECTION, FACE_EXPRESSION, ClassScore, Detection, Face

FONT_PER_SIDE = 1 / 55
"""Label text height as a share of the photo's longer side (about 16 px on the image page)."""
CHAR_WIDTH = 0.65
"""Average width of a label character, in text heights (a sans-serif font, generous)."""
POINT_PER_FONT = 0.22
"""A landmark dot's radius, in label text heights (about 3.5 px on the image page)."""


@dataclass(frozen=True)
class BoxShape:
    """One detection's outline, its label tag and the tag's text, in photo pixels."""

    detection: Detection
    x: float
    y: float
    width: float
    height: float
    tag: tuple[float, float, float, float]
    """The label's background: x, y, width, height."""
    text_at: tuple[float, float]
    """Where the label's text starts (its baseline)."""
    text: str

    def to_event(self) -> dict[str, object]:
        """The shape as the video page's script draws it (JSON)."""
        return self.detection.to_event() | {"tag": self.tag, "text_at": self.text_at, "text": self.text}


def font_size(width: int, height: int) -> float:
    """Label text height for a photo of this size, in its pixels."""
    return round(max(width, height, 1) * FONT_PER_SIDE, 1)


def point_radius(width: int, height: int) -> float:
    """A landmark dot's radius for a photo of this size, in its pixels."""
    return round(font_size(width, height) * POINT_PER_FONT, 2)


def face_shapes(faces: list[Face], width: int, height: int) -> list[BoxShape]:
    """The shapes of `faces`: each a box labelled with its top expression, with its landmarks."""
    return box_shapes([face.as_detection() for face in faces], width, height)


def drawing(
    task: str,
    *,
    width: int = 0,
    height: int = 0,
    detections: Sequence[Detection] = (),
    faces: Sequence[Face] = (),
    topk: Sequence[ClassScore] = (),
) -> dict[str, Any]:
    """What the pages' script draws for one answer (JSON): boxes as shapes in the photo's pixels
    (`width` x `height`) for a detector or a face model (with each face's expressions), the top
    classes for a classifier."""
    if task in (DETECTION, FACE_EXPRESSION):
        boxes = [face.as_detection() for face in faces] if task == FACE_EXPRESSION else list(detections)
        event: dict[str, Any] = {
            "detections": [shape.to_event() for shape in box_shapes(boxes, width, height)],
            "width": width,
            "height": height,
            "font_size": font_size(width, height),
            "point_radius": point_radius(width, height),
        }
        if task == FACE_EXPRESSION:
            event["faces"] = [face.to_event() for face in faces]
        return event
    if topk:
        top = topk[0]
        return {
            "label": top.label,
            "prob": round(top.prob, 4),
            "topk": [[score.label, round(score.prob, 4)] for score in topk],
        }
    return {}


def box_shapes(detections: list[Detection], width: int, height: int) -> list[BoxShape]:
    """The shapes of `detections` on a `width` x `height` photo. A label sits above its box, or
    inside its top edge when the box touches the top of the photo, and never runs off the side."""
    size = font_size(width, height)
    pad = size * 0.3
    tag_height = size * 1.3
    shapes = []
    for detection in detections:
        box = detection.box
        text = f"{detection.label} {detection.score * 100:.0f}%"
        tag_width = len(text) * size * CHAR_WIDTH + 2 * pad
        tag_x = max(0.0, min(box.x1, width - tag_width))
        tag_y = box.y1 - tag_height if box.y1 >= tag_height else box.y1
        shapes.append(
            BoxShape(
                detection=detection,
                x=round(box.x1, 1),
                y=round(box.y1, 1),
                width=round(box.width, 1),
                height=round(box.height, 1),
                tag=(round(tag_x, 1), round(tag_y, 1), round(tag_width, 1), round(tag_height, 1)),
                text_at=(round(tag_x + pad, 1), round(tag_y + tag_height - pad * 1.2, 1)),
                text=text,
            )
        )
    return shapes
