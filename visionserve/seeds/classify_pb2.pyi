from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageRequest(_message.Message):
    __slots__ = ("image", "topk")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    topk: int
    def __init__(self, image: _Optional[bytes] = ..., topk: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "prob")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    label: str
    prob: float
    def __init__(self, label: _Optional[str] = ..., prob: _Optional[float] = ...) -> None: ...

class PredictionResponse(_message.Message):
    __slots__ = ("topk",)
    TOPK_FIELD_NUMBER: _ClassVar[int]
    topk: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, topk: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...
