"""Where a detector's boxes and their labels go on the photo, in the photo's own pixels.

The pages draw them as an SVG laid over the photo whose `viewBox` is the photo's size as the API
saw it (`image.width` x `image.height`), so the browser scales every box with the photo, whatever
size it is shown at. The image page's template and the video page's script both draw from these
shapes, so a box looks the same on both.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask_ui.results import Detection

FONT_PER_SIDE = 1 / 55
"""Label text height as a share of the photo's longer side (about 16 px on the image page)."""
CHAR_WIDTH = 0.6
"""Average width of a label character, in text heights (a sans-serif font, generous)."""


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
