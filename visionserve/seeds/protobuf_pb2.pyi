from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BBox(_message.Message):
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

class Result(_message.Message):
    __slots__ = ("bbox", "expression")
    BBOX_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    bbox: BBox
    expression: Expression
    def __init__(self, bbox: _Optional[_Union[BBox, _Mapping]] = ..., expression: _Optional[_Union[Expression, _Mapping]] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    def __init__(self, image: _Optional[bytes] = ...) -> None: ...

class Response(_message.Message):
    __slots__ = ("response",)
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    response: _containers.RepeatedCompositeFieldContainer[Result]
    def __init__(self, response: _Optional[_Iterable[_Union[Result, _Mapping]]] = ...) -> None: ...
