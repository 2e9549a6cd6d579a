"""What the APIs answer, as the pages use it: the served models, a classifier's classes, a
detector's boxes (with a colour per class), a face_expression pipeline's faces (box, landmarks,
seven expressions), for a photo (HTTP) or a video frame (gRPC)."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

CLASSIFICATION = "classification"
DETECTION = "detection"
FACE_EXPRESSION = "face_expression"
EXPRESSIONS = ("neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise")
"""Seed 003's seven expressions, in its order (the API's `expression` object and the bars)."""

Point = tuple[float, float]
"""x, y in the photo's own pixels."""


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
    """One object a detector found (a face detector's also carry five landmarks: eyes, nose tip,
    mouth corners)."""

    label: str
    index: int
    score: float
    box: Box
    landmarks: tuple[Point, ...] = ()

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
            "points": [[round(x, 1), round(y, 1)] for x, y in self.landmarks],
        }


@dataclass(frozen=True)
class Face:
    """One face of a face_expression answer: the detector's box, score and landmarks, the seven
    expressions' probabilities (by seed 003's names) and the most probable one (`top`)."""

    box: Box
    score: float
    landmarks: tuple[Point, ...]
    expression: dict[str, float]
    top: str

    @property
    def top_prob(self) -> float:
        """The top expression's probability."""
        return self.expression.get(self.top, 0.0)

    def bars(self) -> list[ClassScore]:
        """The seven expressions in seed 003's order (its index is the colour's), then any other
        the API names."""
        names = [*EXPRESSIONS, *(name for name in self.expression if name not in EXPRESSIONS)]
        return [ClassScore(name, self.expression.get(name, 0.0), i) for i, name in enumerate(names)]

    def as_detection(self) -> Detection:
        """The face as a box to draw: labelled with its top expression and that one's
        probability, in the expression's colour, with the landmarks."""
        index = EXPRESSIONS.index(self.top) if self.top in EXPRESSIONS else len(EXPRESSIONS)
        return Detection(self.top, index, self.top_prob, self.box, self.landmarks)

    def to_event(self) -> dict[str, object]:
        """The face as the pages' scripts list it (JSON): top expression, its probability, the
        detector's score and the seven probabilities in order."""
        return {
            "top": self.top,
            "prob": round(self.top_prob, 4),
            "score": round(self.score, 4),
            "expression": [[bar.label, round(bar.prob, 4)] for bar in self.bars()],
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


@dataclass(frozen=True)
class FacesPrediction:
    """A face_expression pipeline's answer for one photo: faces in the photo's pixels, highest
    detector score first."""

    faces: list[Face]
    width: int
    """The photo's width as the API saw it (after EXIF orientation): what the boxes refer to."""
    height: int
    model: str
    server_ms: float
    round_trip_ms: float
    task: str = FACE_EXPRESSION


Prediction = ImagePrediction | DetectionPrediction | FacesPrediction


@dataclass(frozen=True)
class DetectionDefaults:
    """A detector's own settings, used when a request does not set them."""

    score_threshold: float
    iou_threshold: float
    max_detections: int


@dataclass(frozen=True)
class FaceDefaults:
    """A face_expression model's own settings, used when a request does not set them."""

    score_threshold: float | None = None
    min_face_size: float | None = None
    max_faces: int | None = None


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
    faces: FaceDefaults | None = None

    @property
    def is_detector(self) -> bool:
        """True for an object detector (boxes), False for a classifier (classes)."""
        return self.task == DETECTION

    @property
    def is_faces(self) -> bool:
        """True for a face_expression pipeline (faces and their expressions)."""
        return self.task == FACE_EXPRESSION


@dataclass(frozen=True)
class FrameResult:
    """The answer for one video frame: its classes, boxes or faces, `skipped` (live mode: a newer
    frame was computed instead), or the error the server gave for it alone (`error_code`, `error`)."""

    frame_id: int
    task: str = CLASSIFICATION
    topk: list[ClassScore] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    faces: list[Face] = field(default_factory=list)
    width: int = 0
    """The frame's size as the server saw it: what the boxes refer to."""
    height: int = 0
    server_ms: float = 0.0
    skipped: bool = False
    error: str = ""
    error_code: str = ""
