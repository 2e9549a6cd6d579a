"""What a served model looks like through the Open Inference Protocol: its inputs, outputs,
metadata and (Triton's extension) model configuration. Shared by the HTTP routes and the gRPC
servicer; imports neither FastAPI nor grpc.

Every model is offered two ways in, and a client sends exactly one of them:
- the model's own input name (`input`, `images`): FP32 `[-1, 3, H, W]`, already preprocessed
  (resized, cropped or letterboxed, normalised as the model's config.json says);
- `image`: BYTES `[-1]`, one encoded image (JPEG, PNG, ...) per element, decoded and preprocessed
  by the server exactly as the project's own API does.

A classifier's outputs, FP32 `[-1, classes]`: the model's own output (`logits` for the default
model, its config.json `output.kind` says which) and, for a model that outputs logits,
`probabilities` (softmax of the logits). Either can be asked for as a classification instead
(`"classification": N`): N `"value:index:label"` strings per image, most probable first.

A detector's outputs have fixed shapes, K being the model's `max_detections`: `boxes` FP32
`[-1, K, 4]` (x1, y1, x2, y2 in the photo's pixels; for a preprocessed input, in the input's),
`scores` FP32 `[-1, K]`, `classes` INT32 `[-1, K]` and `num_detections` INT32 `[-1, 1]`: the first
`num_detections` rows of each image are its objects, highest score first, the rest zeros.
A face detector adds `landmarks` FP32 `[-1, K, 10]` (x1, y1, ..., x5, y5).

A face_expression pipeline takes the encoded `image` only (it crops the faces out of the photo),
and answers, K being its `max_faces`: `boxes` FP32 `[-1, K, 4]`, `scores` FP32 `[-1, K]`,
`expressions` FP32 `[-1, K, 7]` (seed 003's order: neutral, anger, disgust, fear, happiness,
sadness, surprise), `landmarks` FP32 `[-1, K, 10]` and `num_faces` INT32 `[-1, 1]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from visionserve import __version__
from visionserve.errors import ErrorCode, VisionError
from visionserve.repository import FACE_EXPRESSIONS, ModelEntry, PipelineEntry

if TYPE_CHECKING:
    from visionserve.serving.registry import AnyModel

SERVER_NAME = "visionserve"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics")
"""The protocol extensions served (Triton's names), as `GET /v2` and ServerMetadata list them."""

IMAGE_INPUT = "image"
PROBABILITIES_OUTPUT = "probabilities"
DETECTION_OUTPUTS = ("boxes", "scores", "classes", "num_detections")
FACE_OUTPUTS = ("boxes", "scores", "expressions", "landmarks", "num_faces")

_PLATFORMS = {"onnx": "onnxruntime_onnx", "torch": "pytorch_torch_export"}
_CONFIG_TYPES = {"FP32": "TYPE_FP32", "INT32": "TYPE_INT32", "BYTES": "TYPE_STRING"}
"""Protocol datatype -> Triton model-configuration DataType name."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, protocol datatype and shape (-1: the batch dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        """`'input' (FP32 [-1, 3, 224, 224])`, for error messages."""
        return f"{self.name!r} ({self.datatype} {list(self.shape)})"

    def metadata(self) -> dict[str, object]:
        """The model-metadata entry `{name, datatype, shape}`."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    """The served model's protocol view: built once per server from its model entry."""

    model: str
    version: str
    task: str
    platform: str
    backend: str
    max_batch_size: int
    max_queue_delay_us: int
    instances: int
    device: str
    tensor_input: TensorSpec | None
    """The preprocessed input (None: a pipeline, which takes encoded images only)."""
    image_input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    raw_output: str
    """Classification: the output that is the model's own scores (the others are derived from
    it); detection: none of the outputs (the model's own is postprocessed)."""
    output_kind: str
    """`logits`, `probabilities` or `boxes`: what the model itself outputs."""
    labels: tuple[str, ...]
    max_detections: int = 0
    """Detection and face_expression: K, the fixed number of rows of each image's outputs."""

    @classmethod
    def of(
        cls,
        entry: ModelEntry,
        *,
        backend: str,
        max_batch_size: int,
        max_queue_delay_us: int,
        instances: int = 1,
        device: str = "cpu",
    ) -> Signature:
        """The signature of `entry` served by `backend`, batches of at most `max_batch_size`."""
        config = entry.config
        height, width = config.input.size
        classes = config.output.classes
        image_name = IMAGE_INPUT if config.input.name != IMAGE_INPUT else f"{IMAGE_INPUT}_bytes"
        outputs = [TensorSpec(config.output.name, "FP32", (-1, classes))]
        max_detections = 0
        if config.task == "detection":
            max_detections = config.detection.max_detections if config.detection else 100
            k = max_detections
            outputs = [
                TensorSpec("boxes", "FP32", (-1, k, 4)),
                TensorSpec("scores", "FP32", (-1, k)),
                TensorSpec("classes", "INT32", (-1, k)),
                TensorSpec("num_detections", "INT32", (-1, 1)),
            ]
            if config.output.landmarks:
                outputs.insert(3, TensorSpec("landmarks", "FP32", (-1, k, 2 * config.output.landmarks)))
        elif config.output.kind == "logits":
            derived = (
                PROBABILITIES_OUTPUT
                if config.output.name != PROBABILITIES_OUTPUT
                else f"{PROBABILITIES_OUTPUT}_softmax"
            )
            outputs.append(TensorSpec(derived, "FP32", (-1, classes)))
        return cls(
            model=entry.name,
            version=str(config.version),
            task=config.task,
            platform=_PLATFORMS.get(backend, backend),
            backend=backend,
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            instances=instances,
            device=device,
            tensor_input=TensorSpec(config.input.name, "FP32", (-1, 3, height, width)),
            image_input=TensorSpec(image_name, "BYTES", (-1,)),
            outputs=tuple(outputs),
            raw_output=config.output.name,
            output_kind=config.output.kind,
            labels=entry.labels,
            max_detections=max_detections,
        )

    @classmethod
    def of_pipeline(cls, entry: PipelineEntry, *, max_batch_size: int, device: str) -> Signature:
        """The signature of a face_expression pipeline: encoded images in, K faces out."""
        k = entry.config.faces.max_faces
        return cls(
            model=entry.name,
            version=str(entry.config.version),
            task=entry.config.task,
            platform="ensemble",
            backend="",
            max_batch_size=max_batch_size,
            max_queue_delay_us=0,
            instances=1,
            device=device,
            tensor_input=None,
            image_input=TensorSpec(IMAGE_INPUT, "BYTES", (-1,)),
            outputs=(
                TensorSpec("boxes", "FP32", (-1, k, 4)),
                TensorSpec("scores", "FP32", (-1, k)),
                TensorSpec("expressions", "FP32", (-1, k, len(FACE_EXPRESSIONS))),
                TensorSpec("landmarks", "FP32", (-1, k, 10)),
                TensorSpec("num_faces", "INT32", (-1, 1)),
            ),
            raw_output="",
            output_kind="faces",
            labels=FACE_EXPRESSIONS,
            max_detections=k,
        )

    @classmethod
    def of_model(cls, model: AnyModel) -> Signature:
        """The signature of a served model, with the batching it was built with."""
        if isinstance(model.entry, PipelineEntry):
            stage = model.detector  # type: ignore[union-attr]
            return cls.of_pipeline(
                model.entry, max_batch_size=stage.batcher.max_batch_size, device=stage.runtime.device
            )
        batcher = model.batcher
        return cls.of(
            model.entry,
            backend=model.runtime.backend,
            max_batch_size=batcher.max_batch_size,
            max_queue_delay_us=round(batcher.max_queue_delay_s * 1e6),
            instances=model.runtime.instances,
            device=model.runtime.device,
        )

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The ways in, preprocessed tensor first (a pipeline has the encoded image only)."""
        return (self.image_input,) if self.tensor_input is None else (self.tensor_input, self.image_input)

    @property
    def classes(self) -> int:
        """Number of classes (the outputs' second dimension)."""
        return len(self.labels)

    def output(self, name: str) -> TensorSpec | None:
        """The output called `name`, if there is one."""
        return next((spec for spec in self.outputs if spec.name == name), None)

    def check_model(self, name: str, version: str | None = None) -> None:
        """Raise MODEL_NOT_FOUND unless `name` (and `version`, if given) is the served model;
        INVALID_ARGUMENT when `name` is empty (a gRPC request without its model_name)."""
        if not name:
            raise VisionError(
                ErrorCode.INVALID_ARGUMENT,
                f"the request names no model; set the model name (e.g. {self.model!r})",
            )
        if name != self.model:
            raise VisionError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model {name!r} is not served here; this server serves {self.model!r}",
            )
        if version and version != self.version:
            raise VisionError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model {name!r} has no version {version!r}; the version served is {self.version!r}",
            )

    def server_metadata(self) -> dict[str, object]:
        """`GET /v2`: `{name, version, extensions}` (the same for every model)."""
        return server_metadata()

    def metadata(self) -> dict[str, object]:
        """`GET /v2/models/{name}`: `{name, versions, platform, inputs, outputs}`."""
        return {
            "name": self.model,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [spec.metadata() for spec in self.inputs],
            "outputs": [spec.metadata() for spec in self.outputs],
        }

    def config(self) -> dict[str, object]:
        """Triton's model configuration as JSON (`GET /v2/models/{name}/config`, and the fields of
        the gRPC ModelConfig): enough for perf_analyzer and clients that read it.

        Dims leave out the batch dimension (max_batch_size > 0). The image input is declared as
        Triton declares a batch-only tensor: dims `[1]`, reshaped to `[]`; a request may send it as
        `[N]` or `[N, 1]`. Both inputs are `optional`: a request sends one of them.
        """
        tensor = self.tensor_input
        tensor_config = (
            []
            if tensor is None
            else [
                {
                    "name": tensor.name,
                    "data_type": _CONFIG_TYPES[tensor.datatype],
                    "format": "FORMAT_NCHW",
                    "dims": list(tensor.shape[1:]),
                    "optional": True,
                }
            ]
        )
        return {
            "name": self.model,
            "platform": self.platform,
            "backend": self.backend,
            "max_batch_size": self.max_batch_size,
            "input": [
                *tensor_config,
                {
                    "name": self.image_input.name,
                    "data_type": _CONFIG_TYPES[self.image_input.datatype],
                    "format": "FORMAT_NONE",
                    "dims": [1],
                    "reshape": {"shape": []},
                    "optional": True,
                },
            ],
            "output": [
                {
                    "name": spec.name,
                    "data_type": _CONFIG_TYPES[spec.datatype],
                    "dims": list(spec.shape[1:]),
                    # NOTE: Triton's classification reads labels from this file in the model folder
                    **({"label_filename": "labels.txt"} if self.task == "classification" else {}),
                }
                for spec in self.outputs
            ],
            "instance_group": [
                {
                    "name": self.model,
                    "count": self.instances,
                    "kind": "KIND_GPU" if self.device.startswith("cuda") else "KIND_CPU",
                }
            ],
            "dynamic_batching": {
                "preferred_batch_size": [self.max_batch_size],
                "max_queue_delay_microseconds": self.max_queue_delay_us,
                "preserve_ordering": False,
            },
        }


def server_metadata() -> dict[str, object]:
    """`GET /v2` and ServerMetadata: `{name, version, extensions}`."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}
