"""Tensors into the Open Inference Protocol, checked against the model's `Signature` (the outputs
are `visionserve.v2.outputs`).

The HTTP routes and the gRPC servicer each pull a request apart into `InputTensor`s (name,
datatype, shape, and the data as the wire carried it: raw little-endian bytes, or a list of
elements) and requested outputs; everything from there on is here, so that both protocols accept
and refuse exactly the same requests, with the same messages.

Every check runs before anything is queued for the model. In particular a tensor's byte count
must match its shape exactly: a mis-sized tensor is refused, never padded, truncated or allowed to
run into a neighbour's data (Triton once let one leak data between batched requests,
triton-inference-server/server#7171; a negative dimension crashed it, server#1649).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from visionserve.errors import ErrorCode, VisionError
from visionserve.tasks.base import ALL_PARAMETERS
from visionserve.v2.signature import Signature, TensorSpec

DATATYPE_SIZES = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
    "BF16": 2,
}
"""Bytes per element of each fixed-size protocol datatype (BYTES elements have their own length)."""
DATATYPES = (*DATATYPE_SIZES, "BYTES")

_LENGTH = struct.Struct("<I")


def invalid(message: str) -> VisionError:
    """A 400 / INVALID_ARGUMENT with `message`."""
    return VisionError(ErrorCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class InputTensor:
    """One input as a protocol layer received it, not yet checked.

    `data` is raw bytes (the binary extension, gRPC `raw_input_contents`), a list of elements (JSON
    `data`, gRPC typed `contents`), or None when the request carried none for it.
    """

    name: object
    datatype: object
    shape: object
    data: bytes | Sequence[object] | None


@dataclass(frozen=True)
class ImageBatch:
    """N encoded images (bytes, or base64 text from a JSON request), to be decoded by the server."""

    images: list[bytes | str]


@dataclass(frozen=True)
class TensorBatch:
    """N preprocessed images: float32, C-contiguous, shape (N, 3, H, W)."""

    array: np.ndarray


ModelInput = ImageBatch | TensorBatch


# --- BYTES elements --------------------------------------------------------------------------------


def pack_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements -> the protocol's raw form: each one's 4-byte little-endian length, then it."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def unpack_bytes(raw: bytes, *, name: str, expected: int) -> list[bytes]:
    """The raw form of a BYTES tensor -> its `expected` elements; anything else is an error that
    says where the data went wrong."""
    elements: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if len(elements) == expected:
            raise invalid(
                f"input {name!r}: its raw data holds more than the {expected} element(s) its shape "
                f"declares ({len(raw) - offset:,} bytes left after element {expected - 1})"
            )
        if offset + 4 > len(raw):
            raise invalid(
                f"input {name!r}: element {len(elements)} is cut short: {len(raw) - offset} byte(s) "
                "left where its 4-byte little-endian length should be"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise invalid(
                f"input {name!r}: element {len(elements)} declares {length:,} bytes but only "
                f"{len(raw) - offset:,} remain; each BYTES element is its 4-byte little-endian "
                "length followed by that many bytes"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if len(elements) != expected:
        raise invalid(
            f"input {name!r}: its shape declares {expected} element(s) but its raw data holds {len(elements)}"
        )
    return elements


# --- inputs -------------------------------------------------------------------------------------


def _shape(tensor: InputTensor, name: str) -> tuple[int, ...]:
    shape = tensor.shape
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise invalid(f"input {name!r}: shape must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise invalid(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return tuple(shape)


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], max_batch_size: int) -> int:
    """Check `shape` against `spec` (-1: the batch dimension); return the batch size."""
    accepted = [spec.shape]
    if spec.datatype == "BYTES":
        accepted.append((*spec.shape, 1))  # Triton's batch-only tensors are often sent as [N, 1]
    if len(shape) not in {len(s) for s in accepted}:
        raise invalid(
            f"input {spec.name!r}: shape {list(shape)} has rank {len(shape)}; expected "
            + " or ".join(str(list(s)) for s in accepted)
            + " (-1: the batch size)"
        )
    expected = next(s for s in accepted if len(s) == len(shape))
    for axis, (got, want) in enumerate(zip(shape, expected, strict=True)):
        if want not in (-1, got):
            raise invalid(
                f"input {spec.name!r}: shape {list(shape)} has {got} at dimension {axis}; expected "
                f"{list(expected)} (-1: the batch size)"
            )
    batch = shape[0]
    if batch < 1:
        raise invalid(f"input {spec.name!r}: the batch is empty (shape {list(shape)})")
    if batch > max_batch_size:
        raise invalid(
            f"input {spec.name!r}: a batch of {batch} is over this model's max_batch_size "
            f"{max_batch_size}; split the request"
        )
    return batch


def _tensor_batch(spec: TensorSpec, shape: tuple[int, ...], data: bytes | Sequence[object]) -> TensorBatch:
    count = math.prod(shape)
    if isinstance(data, bytes | bytearray | memoryview):
        expected = count * DATATYPE_SIZES["FP32"]
        if len(data) != expected:
            raise invalid(
                f"input {spec.name!r}: FP32 shape {list(shape)} needs {expected:,} bytes; "
                f"{len(data):,} were sent"
            )
        array = np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(shape)
    else:
        try:
            # NOTE: a number past FP32's range becomes infinity, refused below; numpy need not warn
            with np.errstate(over="ignore", invalid="ignore"):
                array = np.asarray(data, dtype=np.float32)
        except (ValueError, TypeError):
            raise invalid(
                f"input {spec.name!r}: data must be numbers (FP32), as a flat or nested row-major list"
            ) from None
        except OverflowError:  # a JSON integer too large for any float (Python's ints are unbounded)
            raise invalid(f"input {spec.name!r}: the data holds a number too large for FP32") from None
        if array.size != count:
            raise invalid(
                f"input {spec.name!r}: shape {list(shape)} needs {count:,} elements; {array.size:,} were sent"
            )
        array = np.ascontiguousarray(array.reshape(shape))
    if not np.isfinite(array).all():
        raise invalid(f"input {spec.name!r}: the data holds NaN or infinity")
    return TensorBatch(array)


def _image_batch(spec: TensorSpec, batch: int, data: bytes | Sequence[object]) -> ImageBatch:
    if isinstance(data, bytes | bytearray | memoryview):
        return ImageBatch(list(unpack_bytes(bytes(data), name=spec.name, expected=batch)))
    elements = list(data)
    if len(elements) != batch:
        raise invalid(
            f"input {spec.name!r}: its shape declares {batch} image(s) but {len(elements)} were sent"
        )
    images: list[bytes | str] = []
    for index, item in enumerate(elements):
        element = item[0] if isinstance(item, list) and len(item) == 1 else item  # nested [N, 1]
        if not isinstance(element, bytes | str):
            raise invalid(
                f"input {spec.name!r}: element {index} is {type(element).__name__}; each element is "
                "one encoded image (base64 text in JSON)"
            )
        images.append(element)
    return ImageBatch(images)


def parse_inputs(signature: Signature, tensors: Sequence[InputTensor]) -> ModelInput:
    """The request's inputs -> what the model is given, or a 400 naming what is wrong.

    A request sends exactly one input: the preprocessed tensor or the encoded images.
    """
    offered = " or ".join(spec.describe() for spec in signature.inputs)
    if not tensors:
        raise invalid(f"the request has no inputs; send one: {offered}")
    if len(tensors) > 1:
        names = [t.name for t in tensors]
        raise invalid(f"the request has {len(tensors)} inputs {names}; send exactly one: {offered}")
    (tensor,) = tensors
    spec = next((s for s in signature.inputs if s.name == tensor.name), None)
    if spec is None:
        raise invalid(f"unknown input {tensor.name!r}; this model takes {offered}")
    if tensor.datatype != spec.datatype:
        raise invalid(f"input {spec.name!r} must be {spec.datatype}; got {tensor.datatype!r}")
    shape = _shape(tensor, spec.name)
    batch = _check_shape(spec, shape, signature.max_batch_size)
    if tensor.data is None:
        raise invalid(f"input {spec.name!r} carries no data")
    if spec.datatype == "BYTES":
        return _image_batch(spec, batch, tensor.data)
    return _tensor_batch(spec, shape, tensor.data)


# --- request parameters -------------------------------------------------------------------------

_TOPK_HINT = (
    "over the Open Inference Protocol a classifier's top classes are asked for per output, with "
    'the output parameter "classification": N'
)


def task_parameters(signature: Signature, parameters: Mapping[str, object]) -> dict[str, object]:
    """The request-level parameters that are the model's task parameters (`score_threshold`,
    `iou_threshold`, `max_detections`, `classes` as comma-separated labels), for the task to
    check; the protocol's own (`binary_data_output`, `timeout`) and unknown ones are left out."""
    chosen = {name: parameters[name] for name in ALL_PARAMETERS if name in parameters}
    if "topk" in chosen and signature.task == "classification":
        raise invalid(f"parameter topk: {_TOPK_HINT}")
    return chosen
