"""What the APIs answer, as the pages use it: the served models, a classifier's classes, a
detector's boxes (with a colour per class), for a photo (HTTP) or a video frame (gRPC)."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

CLASSIFICATION = "classification"
DETECTION = "detection"


def colour_for(index: int) -> str:
    """The colour of class `index`'s boxes, as `#rrggbb`: the same for a class on every photo,
    frame and page (hues a golden angle apart, so neighbouring classes differ)."""
    hue = (index * 137.508) % 360 / 360
    red, green, blue = colorsys.hls_to_rgb(hue, 0.45, 0.85)
    return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


def ink_for(index: int) -> str:
    """The colour of text on class `index`'s colour: black on light colours, white on dark."""
    colour = colour_for(index)
    red, green, blue = (int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    luminance = 0.2126 * red**2.2 + 0.7152 * green**2.2 + 0.0722 * blue**2.2
    return "#000000" if luminance > 0.25 else "#ffffff"


@dataclass(frozen=True)
class ClassScore:
    """One class of a prediction."""

    label: str
    prob: float
    index: int


@dataclass(frozen=True)
class Box:
    """A box's corners in the photo's own pixels (after its EXIF orientation)."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        """x2 - x1 (never negative)."""
        return max(0.0, self.x2 - self.x1)

    @property
    def height(self) -> float:
        """y2 - y1 (never negative)."""
        return max(0.0, self.y2 - self.y1)


@dataclass(frozen=True)
class Detection:
    """One object a detector found."""

    label: str
    index: int
    score: float
    box: Box

    @property
    def colour(self) -> str:
        """Its class's colour (`colour_for`)."""
        return colour_for(self.index)

    @property
    def ink(self) -> str:
        """The colour of its label's text (`ink_for`)."""
        return ink_for(self.index)

    def to_event(self) -> dict[str, object]:
        """The detection as the video page's script reads it (JSON)."""
        box = self.box
        return {
            "label": self.label,
            "index": self.index,
            "score": round(self.score, 4),
            "box": [round(box.x1, 1), round(box.y1, 1), round(box.x2, 1), round(box.y2, 1)],
            "colour": self.colour,
            "ink": self.ink,
        }


@dataclass(frozen=True)
class ImagePrediction:
    """A classifier's answer for one photo, with the time it took as seen from here."""

    topk: list[ClassScore]
    model: str
    server_ms: float
    """`latency_ms` of the answer: the API's own time for the request."""
    round_trip_ms: float
    """From sending the upload to the API until its answer was read, measured by the UI."""
    task: str = CLASSIFICATION


@dataclass(frozen=True)
class DetectionPrediction:
    """A detector's answer for one photo: boxes in the photo's pixels, highest score first."""

    detections: list[Detection]
    width: int
    """The photo's width as the API saw it (after EXIF orientation): what the boxes refer to."""
    height: int
    model: str
    server_ms: float
    round_trip_ms: float
    task: str = DETECTION


Prediction = ImagePrediction | DetectionPrediction


@dataclass(frozen=True)
class DetectionDefaults:
    """A detector's own settings, used when a request does not set them."""

    score_threshold: float
    iou_threshold: float
    max_detections: int


@dataclass(frozen=True)
class ModelInfo:
    """What `GET /models` says about one served model."""

    name: str
    task: str
    runtime: str
    device: str
    ready: bool
    default: bool = False
    parameters: tuple[str, ...] = ()
    detection: DetectionDefaults | None = None

    @property
    def is_detector(self) -> bool:
        """True for an object detector (boxes), False for a classifier (classes)."""
        return self.task == DETECTION


@dataclass(frozen=True)
class FrameResult:
    """The answer for one video frame: its classes or boxes, `skipped` (live mode: a newer frame
    was computed instead), or the error the server gave for it alone (`error_code`, `error`)."""

    frame_id: int
    task: str = CLASSIFICATION
    topk: list[ClassScore] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    width: int = 0
    """The frame's size as the server saw it: what the boxes refer to."""
    height: int = 0
    server_ms: float = 0.0
    skipped: bool = False
    error: str = ""
    error_code: str = ""
