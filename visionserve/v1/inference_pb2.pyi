from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("image", "topk", "model")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    topk: int
    model: str
    def __init__(self, image: _Optional[bytes] = ..., topk: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "prob", "index")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    label: str
    prob: float
    index: int
    def __init__(self, label: _Optional[str] = ..., prob: _Optional[float] = ..., index: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("topk", "model", "prediction", "probability", "latency_ms")
    TOPK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    topk: _containers.RepeatedCompositeFieldContainer[Prediction]
    model: str
    prediction: str
    probability: float
    latency_ms: float
    def __init__(self, topk: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model: _Optional[str] = ..., prediction: _Optional[str] = ..., probability: _Optional[float] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PredictBatchRequest(_message.Message):
    __slots__ = ("images", "topk", "model")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    topk: int
    model: str
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., topk: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("image", "frame_id", "topk")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    frame_id: int
    topk: int
    def __init__(self, image: _Optional[bytes] = ..., frame_id: _Optional[int] = ..., topk: _Optional[int] = ...) -> None: ...

class FramePrediction(_message.Message):
    __slots__ = ("frame_id", "topk", "error", "latency_ms")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    topk: _containers.RepeatedCompositeFieldContainer[Prediction]
    error: Error
    latency_ms: float
    def __init__(self, frame_id: _Optional[int] = ..., topk: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., latency_ms: _Optional[float] = ...) -> None: ...
