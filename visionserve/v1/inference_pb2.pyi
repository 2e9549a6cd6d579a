from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("image", "topk", "model", "score_threshold", "iou_threshold", "max_detections", "classes", "min_face_size", "max_faces")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IOU_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MIN_FACE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_FACES_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    topk: int
    model: str
    score_threshold: float
    iou_threshold: float
    max_detections: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    min_face_size: float
    max_faces: int
    def __init__(self, image: _Optional[bytes] = ..., topk: _Optional[int] = ..., model: _Optional[str] = ..., score_threshold: _Optional[float] = ..., iou_threshold: _Optional[float] = ..., max_detections: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., min_face_size: _Optional[float] = ..., max_faces: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "prob", "index")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    label: str
    prob: float
    index: int
    def __init__(self, label: _Optional[str] = ..., prob: _Optional[float] = ..., index: _Optional[int] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("label", "index", "score", "box", "landmarks")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    score: float
    box: Box
    landmarks: _containers.RepeatedCompositeFieldContainer[Point]
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., score: _Optional[float] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., landmarks: _Optional[_Iterable[_Union[Point, _Mapping]]] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class Expression(_message.Message):
    __slots__ = ("neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise")
    NEUTRAL_FIELD_NUMBER: _ClassVar[int]
    ANGER_FIELD_NUMBER: _ClassVar[int]
    DISGUST_FIELD_NUMBER: _ClassVar[int]
    FEAR_FIELD_NUMBER: _ClassVar[int]
    HAPPINESS_FIELD_NUMBER: _ClassVar[int]
    SADNESS_FIELD_NUMBER: _ClassVar[int]
    SURPRISE_FIELD_NUMBER: _ClassVar[int]
    neutral: float
    anger: float
    disgust: float
    fear: float
    happiness: float
    sadness: float
    surprise: float
    def __init__(self, neutral: _Optional[float] = ..., anger: _Optional[float] = ..., disgust: _Optional[float] = ..., fear: _Optional[float] = ..., happiness: _Optional[float] = ..., sadness: _Optional[float] = ..., surprise: _Optional[float] = ...) -> None: ...

class Face(_message.Message):
    __slots__ = ("box", "score", "landmarks", "expression", "top")
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    box: Box
    score: float
    landmarks: _containers.RepeatedCompositeFieldContainer[Point]
    expression: Expression
    top: str
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ..., landmarks: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., expression: _Optional[_Union[Expression, _Mapping]] = ..., top: _Optional[str] = ...) -> None: ...

class ImageSize(_message.Message):
    __slots__ = ("width", "height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("topk", "model", "prediction", "probability", "latency_ms", "task", "detections", "image", "faces")
    TOPK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    topk: _containers.RepeatedCompositeFieldContainer[Prediction]
    model: str
    prediction: str
    probability: float
    latency_ms: float
    task: str
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    image: ImageSize
    faces: _containers.RepeatedCompositeFieldContainer[Face]
    def __init__(self, topk: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model: _Optional[str] = ..., prediction: _Optional[str] = ..., probability: _Optional[float] = ..., latency_ms: _Optional[float] = ..., task: _Optional[str] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., image: _Optional[_Union[ImageSize, _Mapping]] = ..., faces: _Optional[_Iterable[_Union[Face, _Mapping]]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PredictBatchRequest(_message.Message):
    __slots__ = ("images", "topk", "model", "score_threshold", "iou_threshold", "max_detections", "classes", "min_face_size", "max_faces")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IOU_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MIN_FACE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_FACES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    topk: int
    model: str
    score_threshold: float
    iou_threshold: float
    max_detections: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    min_face_size: float
    max_faces: int
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., topk: _Optional[int] = ..., model: _Optional[str] = ..., score_threshold: _Optional[float] = ..., iou_threshold: _Optional[float] = ..., max_detections: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., min_face_size: _Optional[float] = ..., max_faces: _Optional[int] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("result", "error")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result: PredictResponse
    error: Error
    def __init__(self, result: _Optional[_Union[PredictResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class PredictBatchResponse(_message.Message):
    __slots__ = ("results", "model")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchResult]
    model: str
    def __init__(self, results: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("image", "frame_id", "topk", "model", "score_threshold", "iou_threshold", "max_detections", "classes", "min_face_size", "max_faces")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IOU_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MIN_FACE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_FACES_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    frame_id: int
    topk: int
    model: str
    score_threshold: float
    iou_threshold: float
    max_detections: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    min_face_size: float
    max_faces: int
    def __init__(self, image: _Optional[bytes] = ..., frame_id: _Optional[int] = ..., topk: _Optional[int] = ..., model: _Optional[str] = ..., score_threshold: _Optional[float] = ..., iou_threshold: _Optional[float] = ..., max_detections: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., min_face_size: _Optional[float] = ..., max_faces: _Optional[int] = ...) -> None: ...

class FramePrediction(_message.Message):
    __slots__ = ("frame_id", "topk", "error", "latency_ms", "model", "task", "detections", "image", "skipped", "faces")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    topk: _containers.RepeatedCompositeFieldContainer[Prediction]
    error: Error
    latency_ms: float
    model: str
    task: str
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    image: ImageSize
    skipped: bool
    faces: _containers.RepeatedCompositeFieldContainer[Face]
    def __init__(self, frame_id: _Optional[int] = ..., topk: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., latency_ms: _Optional[float] = ..., model: _Optional[str] = ..., task: _Optional[str] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., image: _Optional[_Union[ImageSize, _Mapping]] = ..., skipped: _Optional[bool] = ..., faces: _Optional[_Iterable[_Union[Face, _Mapping]]] = ...) -> None: ...
