"""The seed articles' own gRPC services, served verbatim beside visionserve.v1 and V2 on one port, so
that a client generated from a seed's .proto (protos/seeds/) works unmodified:

- seed 000 `classify.Classifier/Predict`: one image -> its top `topk` classes (0: the server's
  default, VISION_DEFAULT_TOPK, 5 as in the seed), on the default classification model;
- seed 001 `InferenceServer/inference`: N images -> N top-1 class indices, in order, on the same
  model, through its batch path (the N images are batched together);
- seed 003 `Pipeline/run_pipeline`: one image -> a box and the seven expressions of every face, on
  the `face_expression` model.

Like the own API's servicer, these only translate: the checks (message size, image, parameters,
queue room) and their messages are the core's and `grpc_server.status`'s, answered with the same
status codes; the server's interceptors (API key, metrics, malformed messages) apply to them too.
"""

from __future__ import annotations

import contextlib
import logging

import grpc

from grpc_server.servicer import Context, call_deadline
from grpc_server.status import abort, check_message_size, check_response_size
from visionserve.errors import ErrorCode, VisionError
from visionserve.seeds import (
    classify_pb2,
    classify_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    protobuf_pb2,
    protobuf_pb2_grpc,
)
from visionserve.serving.model import ServedModel
from visionserve.serving.registry import AnyModel, ModelRegistry
from visionserve.tasks.classification import Classification
from visionserve.tasks.faces import EXPRESSIONS, Faces

logger = logging.getLogger(__name__)

CLASSIFIER_SERVICE = classify_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
INFERENCE_SERVER_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceServer"].full_name
PIPELINE_SERVICE = protobuf_pb2.DESCRIPTOR.services_by_name["Pipeline"].full_name
SEED_SERVICES = (CLASSIFIER_SERVICE, INFERENCE_SERVER_SERVICE, PIPELINE_SERVICE)
"""`classify.Classifier`, `InferenceServer`, `Pipeline`: their full names, as reflection lists them."""

CLASSIFICATION = "classification"
FACE_MODEL = "face_expression"
"""The model seed 003's `Pipeline` runs."""


def default_classifier(registry: ModelRegistry, method: str) -> ServedModel:
    """The default model if it classifies, else the first model that does; NOT_FOUND, saying what
    is served, when none does."""
    for model in registry:  # NOTE: the default first
        if isinstance(model, ServedModel) and model.task.name == CLASSIFICATION:
            return model
    served = ", ".join(f"{m.name!r} ({m.task.name})" for m in registry)
    raise VisionError(
        ErrorCode.MODEL_NOT_FOUND,
        f"{method} runs on the server's classification model, and this server serves none ({served}); "
        "serve one beside them (VISION_MODELS, or every model in the repository)",
    )


def face_model(registry: ModelRegistry) -> AnyModel:
    """The `face_expression` model; NOT_FOUND, saying how to serve it, when it is not served."""
    if FACE_MODEL not in registry.names:
        served = ", ".join(repr(name) for name in registry.names)
        raise VisionError(
            ErrorCode.MODEL_NOT_FOUND,
            f"Pipeline.run_pipeline runs on model {FACE_MODEL!r}, which is not served here (this "
            f"server serves {served}); export it with its stages (`python -m export --model "
            f"{FACE_MODEL}`) and serve it (VISION_MODELS, or every model in the repository)",
        )
    return registry.get(FACE_MODEL)


def served_seed_services(registry: ModelRegistry) -> tuple[str, ...]:
    """The seed services whose model this registry serves (the others answer NOT_FOUND): what
    health checking reports as SERVING once the models are ready."""
    names: list[str] = []
    if any(isinstance(model, ServedModel) and model.task.name == CLASSIFICATION for model in registry):
        names += [CLASSIFIER_SERVICE, INFERENCE_SERVER_SERVICE]
    if FACE_MODEL in registry.names:
        names.append(PIPELINE_SERVICE)
    return tuple(names)


def seed_method_models(registry: ModelRegistry) -> dict[str, str]:
    """Each seed method (`/classify.Classifier/Predict`) and the model it runs on here: its
    messages name none, so the metrics' `model` label comes from this."""
    models: dict[str, str] = {}
    for service, method in ((CLASSIFIER_SERVICE, "Predict"), (INFERENCE_SERVER_SERVICE, "inference")):
        # NOTE: none served: the call answers NOT_FOUND, labelled with no model
        with contextlib.suppress(VisionError):
            models[f"/{service}/{method}"] = default_classifier(registry, method).name
    if FACE_MODEL in registry.names:
        models[f"/{PIPELINE_SERVICE}/run_pipeline"] = FACE_MODEL
    return models


# --- encoders: the core's typed results -> the seeds' messages ---------------------------------------


def _classification(output: object) -> Classification:
    if not isinstance(output, Classification):
        raise TypeError(f"expected a Classification, got {type(output).__name__}")
    return output


def prediction_response(output: object) -> classify_pb2.PredictionResponse:
    """A `Classification` -> seed 000's `PredictionResponse` (label and probability per class)."""
    return classify_pb2.PredictionResponse(
        topk=[
            classify_pb2.Prediction(label=p.label, prob=p.prob) for p in _classification(output).predictions
        ]
    )


def pipeline_response(output: object) -> protobuf_pb2.Response:
    """`Faces` -> seed 003's `Response`: per face, its box (photo pixels) and its expressions."""
    if not isinstance(output, Faces):
        raise TypeError(f"expected Faces, got {type(output).__name__}")
    return protobuf_pb2.Response(
        response=[
            protobuf_pb2.Result(
                bbox=protobuf_pb2.BBox(x1=face.box.x1, y1=face.box.y1, x2=face.box.x2, y2=face.box.y2),
                expression=protobuf_pb2.Expression(
                    **{name: face.expression.get(name, 0.0) for name in EXPRESSIONS}
                ),
            )
            for face in output.faces
        ]
    )


# --- servicers -----------------------------------------------------------------------------------------


class SeedClassifierServicer(classify_pb2_grpc.ClassifierServicer):
    """Seed 000's `classify.Classifier`."""

    def __init__(self, registry: ModelRegistry, *, max_message_bytes: int):
        self.registry = registry
        self.max_message_bytes = max_message_bytes

    async def Predict(  # noqa: N802
        self, request: classify_pb2.ImageRequest, context: Context
    ) -> classify_pb2.PredictionResponse:
        """One image -> its top `topk` classes (0: the server's default, as the seed's `or 5`)."""
        try:
            check_message_size(request, self.max_message_bytes)
            deadline = call_deadline(context)
            served = default_classifier(self.registry, "Classifier.Predict")
            # NOTE: topk is passed as it is: a negative one is refused by the task's own check,
            # with the message the own API gives ("`topk` must be between 1 and ...")
            result = await served.predict(request.image, {"topk": request.topk or None}, deadline=deadline)
            response = prediction_response(result.output)
            check_response_size(response, self.max_message_bytes, "ask for fewer classes (topk)")
        except Exception as exc:
            await abort(context, exc)
            raise  # unreachable: abort raises
        return response


class SeedInferenceServerServicer(inference_pb2_grpc.InferenceServerServicer):
    """Seed 001's `InferenceServer`."""

    def __init__(self, registry: ModelRegistry, *, max_message_bytes: int):
        self.registry = registry
        self.max_message_bytes = max_message_bytes

    async def inference(
        self, request: inference_pb2.InferenceRequest, context: Context
    ) -> inference_pb2.InferenceReply:
        """N images -> N top-1 class indices, in order. All N are decoded before any is queued
        (one bad image fails the call, naming `image[i]`), then batched together."""
        try:
            check_message_size(request, self.max_message_bytes)
            deadline = call_deadline(context)
            served = default_classifier(self.registry, "InferenceServer.inference")
            params = served.parameters({"topk": 1})
            served.check_ready()
            if not request.image:
                raise VisionError(ErrorCode.INVALID_ARGUMENT, "`image` is empty: send at least one image")
            outputs = await served.infer_images(list(request.image), params, deadline=deadline)
            response = inference_pb2.InferenceReply(
                pred=[_classification(output).predictions[0].index for output in outputs]
            )
            check_response_size(response, self.max_message_bytes, "send fewer images per call")
        except Exception as exc:
            await abort(context, exc)
            raise
        return response


class SeedPipelineServicer(protobuf_pb2_grpc.PipelineServicer):
    """Seed 003's `Pipeline`."""

    def __init__(self, registry: ModelRegistry, *, max_message_bytes: int):
        self.registry = registry
        self.max_message_bytes = max_message_bytes

    async def run_pipeline(self, request: protobuf_pb2.Request, context: Context) -> protobuf_pb2.Response:
        """One image -> every face's box and expressions (an empty `response` when there is none)."""
        try:
            check_message_size(request, self.max_message_bytes)
            deadline = call_deadline(context)
            served = face_model(self.registry)
            result = await served.predict(request.image, {}, deadline=deadline)
            response = pipeline_response(result.output)
            check_response_size(response, self.max_message_bytes, "send a photo with fewer faces")
        except Exception as exc:
            await abort(context, exc)
            raise
        return response


def add_seed_services(server: grpc.aio.Server, registry: ModelRegistry, *, max_message_bytes: int) -> None:
    """Register the three seed services on `server` (reflection and health are the caller's)."""
    classify_pb2_grpc.add_ClassifierServicer_to_server(
        SeedClassifierServicer(registry, max_message_bytes=max_message_bytes), server
    )
    inference_pb2_grpc.add_InferenceServerServicer_to_server(
        SeedInferenceServerServicer(registry, max_message_bytes=max_message_bytes), server
    )
    protobuf_pb2_grpc.add_PipelineServicer_to_server(
        SeedPipelineServicer(registry, max_message_bytes=max_message_bytes), server
    )
