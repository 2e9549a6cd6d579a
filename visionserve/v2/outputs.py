"""The Open Inference Protocol's outputs: which a request asks for (and how), and the tensors
answered, built from a served model's task results. Shared by the HTTP routes and the gRPC
servicer; checked before anything is computed, so that both protocols refuse exactly the same
requests, with the same messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from visionserve.postprocessing import softmax
from visionserve.tasks.classification import Classification
from visionserve.tasks.detection import Detections
from visionserve.tasks.faces import EXPRESSIONS, Faces
from visionserve.v2.codec import invalid, pack_bytes
from visionserve.v2.signature import Signature


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for: its name, `classification` (0: the tensor itself, N: the
    top N classes as strings) and, over HTTP, whether it wants it binary (None: the default)."""

    name: str
    classification: int = 0
    binary: bool | None = None


@dataclass(frozen=True)
class OutputTensor:
    """One output of a response: FP32 scores, or BYTES classification strings."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray | list[bytes]

    def raw(self) -> bytes:
        """Little-endian row-major bytes (BYTES: each element prefixed by its 4-byte length)."""
        if isinstance(self.values, np.ndarray):
            wire = "<i4" if self.datatype == "INT32" else "<f4"
            return self.values.astype(wire, copy=False).tobytes()
        return pack_bytes(self.values)

    def json_data(self) -> list[object]:
        """The elements as a flat JSON list (BYTES as UTF-8 text)."""
        if isinstance(self.values, np.ndarray):
            data: list[object] = self.values.reshape(-1).tolist()
            return data
        return [value.decode("utf-8") for value in self.values]


# --- outputs ------------------------------------------------------------------------------------


def _int_parameter(value: object, *, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{what} must be an integer, got {value!r}")
    return value


def requested_output(
    signature: Signature, name: object, parameters: Mapping[str, object] | None = None
) -> RequestedOutput:
    """One entry of the request's `outputs` -> a checked `RequestedOutput`."""
    if not isinstance(name, str) or signature.output(name) is None:
        names = ", ".join(repr(spec.name) for spec in signature.outputs)
        raise invalid(f"unknown output {name!r}; this model has {names}")
    parameters = parameters or {}
    classification = parameters.get("classification", 0)
    classes = _int_parameter(classification, what=f"output {name!r}: classification")
    if classes and signature.task != "classification":
        raise invalid(
            f"output {name!r}: the classification parameter applies to classification models; "
            f"model {signature.model!r} is a {signature.task} model"
        )
    if not 0 <= classes <= signature.classes:
        raise invalid(
            f"output {name!r}: classification must be between 1 and {signature.classes} (the "
            f"model's classes); got {classes}"
        )
    binary = parameters.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise invalid(f"output {name!r}: binary_data must be true or false, got {binary!r}")
    return RequestedOutput(name=name, classification=classes, binary=binary)


def default_outputs(signature: Signature) -> list[RequestedOutput]:
    """Every output, as tensors (what a request that names no outputs gets)."""
    return [RequestedOutput(spec.name) for spec in signature.outputs]


def check_output_count(signature: Signature, count: int) -> None:
    """Refuse more requested outputs than the model has before looking at any (each may be asked
    for once): a request of a million `outputs` costs nothing to refuse."""
    if count > len(signature.outputs):
        names = ", ".join(repr(spec.name) for spec in signature.outputs)
        raise invalid(
            f"{count:,} outputs are requested; this model has {len(signature.outputs)} ({names}): ask "
            "for each no more than once"
        )


def check_outputs(requested: Sequence[RequestedOutput]) -> None:
    """Each output may be asked for once."""
    # NOTE: linear; `names.count` per name was quadratic (20,000 outputs: 0.65 s on the event loop)
    seen: set[str] = set()
    duplicated: set[str] = set()
    for output in requested:
        (duplicated if output.name in seen else seen).add(output.name)
    if duplicated:
        raise invalid(f"outputs {sorted(duplicated)} are requested more than once")


def classification_strings(values: np.ndarray, count: int, labels: Sequence[str]) -> list[bytes]:
    """The top `count` classes of each row as `value:index:label`, most probable first (ties: lower
    index first), row after row."""
    strings: list[bytes] = []
    for row in values:
        order = np.argsort(-row, kind="stable")[:count]
        strings.extend(f"{row[i]:f}:{i}:{labels[i]}".encode() for i in order)
    return strings


def build_outputs(
    signature: Signature, scores: np.ndarray, requested: Sequence[RequestedOutput]
) -> list[OutputTensor]:
    """The model's scores (N, classes) -> the requested outputs, in the order requested."""
    probabilities: np.ndarray | None = None
    outputs: list[OutputTensor] = []
    for output in requested:
        if output.name == signature.raw_output:
            values = scores.astype(np.float32, copy=False)
        else:  # the derived probabilities
            if probabilities is None:
                probabilities = softmax(scores)
            values = probabilities
        if output.classification:
            strings = classification_strings(values, output.classification, signature.labels)
            shape = (len(values), output.classification)
            outputs.append(OutputTensor(output.name, "BYTES", shape, strings))
        else:
            outputs.append(OutputTensor(output.name, "FP32", tuple(values.shape), values))
    return outputs


def detection_outputs(
    signature: Signature, results: Sequence[Detections], requested: Sequence[RequestedOutput]
) -> list[OutputTensor]:
    """Each image's objects -> the fixed-shape outputs (K = the model's max_detections rows per
    image, zeros after its `num_detections`), in the order requested."""
    k = signature.max_detections
    count = len(results)
    boxes = np.zeros((count, k, 4), dtype=np.float32)
    scores = np.zeros((count, k), dtype=np.float32)
    classes = np.zeros((count, k), dtype=np.int32)
    found = np.zeros((count, 1), dtype=np.int32)
    landmarks_spec = signature.output("landmarks")
    landmarks = np.zeros((count, k, landmarks_spec.shape[2] if landmarks_spec else 0), dtype=np.float32)
    for i, result in enumerate(results):
        objects = result.detections[:k]
        found[i, 0] = len(objects)
        for j, obj in enumerate(objects):
            boxes[i, j] = (obj.box.x1, obj.box.y1, obj.box.x2, obj.box.y2)
            scores[i, j] = obj.score
            classes[i, j] = obj.index
            if obj.landmarks and landmarks.shape[2]:
                landmarks[i, j] = np.asarray(obj.landmarks, dtype=np.float32).reshape(-1)
    arrays = {
        "boxes": boxes,
        "scores": scores,
        "classes": classes,
        "landmarks": landmarks,
        "num_detections": found,
    }
    return _tensors(arrays, requested)


def face_outputs(
    signature: Signature, results: Sequence[Faces], requested: Sequence[RequestedOutput]
) -> list[OutputTensor]:
    """Each image's faces -> the fixed-shape outputs (K = the pipeline's max_faces rows per image,
    zeros after its `num_faces`), in the order requested."""
    k = signature.max_detections
    count = len(results)
    boxes = np.zeros((count, k, 4), dtype=np.float32)
    scores = np.zeros((count, k), dtype=np.float32)
    expressions = np.zeros((count, k, len(EXPRESSIONS)), dtype=np.float32)
    landmarks = np.zeros((count, k, 10), dtype=np.float32)
    found = np.zeros((count, 1), dtype=np.int32)
    for i, result in enumerate(results):
        faces = result.faces[:k]
        found[i, 0] = len(faces)
        for j, face in enumerate(faces):
            boxes[i, j] = (face.box.x1, face.box.y1, face.box.x2, face.box.y2)
            scores[i, j] = face.score
            expressions[i, j] = [face.expression[name] for name in EXPRESSIONS]
            if len(face.landmarks) == 5:
                landmarks[i, j] = np.asarray(face.landmarks, dtype=np.float32).reshape(-1)
    arrays = {
        "boxes": boxes,
        "scores": scores,
        "expressions": expressions,
        "landmarks": landmarks,
        "num_faces": found,
    }
    return _tensors(arrays, requested)


def _tensors(arrays: Mapping[str, np.ndarray], requested: Sequence[RequestedOutput]) -> list[OutputTensor]:
    outputs = []
    for output in requested:
        values = arrays[output.name]
        datatype = "INT32" if values.dtype == np.int32 else "FP32"
        outputs.append(OutputTensor(output.name, datatype, tuple(values.shape), values))
    return outputs


def outputs_for(
    signature: Signature, results: Sequence[object], requested: Sequence[RequestedOutput]
) -> list[OutputTensor]:
    """A served model's task results (one per image) -> the requested outputs."""
    if signature.task == "detection":
        return detection_outputs(signature, [r for r in results if isinstance(r, Detections)], requested)
    if signature.task == "face_expression":
        return face_outputs(signature, [r for r in results if isinstance(r, Faces)], requested)
    scores = np.stack([r.scores for r in results if isinstance(r, Classification)])
    return build_outputs(signature, scores, requested)
