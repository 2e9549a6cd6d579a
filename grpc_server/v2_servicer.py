"""`V2InferenceServicer`: inference.GRPCInferenceService (the Open Inference Protocol, "KServe V2")
over the core's model registry, on the same server and port as visionserve.v1.Inference.

Requests are pulled apart into the codec's `InputTensor`s (from `raw_input_contents` or the typed
`contents`) and checked there, exactly as the HTTP routes' are; outputs go back in
`raw_output_contents`, which is where tritonclient's `as_numpy` reads them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TypeAlias, TypeVar

import grpc
from google.protobuf import json_format

from grpc_server.status import abort, check_message_size, check_response_size
from grpc_server.streams import answered_in_order
from visionserve.deadlines import deadline_after, expired, microseconds_parameter
from visionserve.errors import GENERIC_INTERNAL_MESSAGE, VisionError
from visionserve.serving.registry import ModelRegistry
from visionserve.v2 import grpc_service_pb2 as pb
from visionserve.v2 import grpc_service_pb2_grpc as pb_grpc
from visionserve.v2.codec import ImageBatch, InputTensor, invalid, parse_inputs, task_parameters
from visionserve.v2.models import V2Models
from visionserve.v2.outputs import (
    RequestedOutput,
    check_output_count,
    check_outputs,
    default_outputs,
    outputs_for,
    requested_output,
)
from visionserve.v2.signature import Signature, server_metadata
from visionserve.v2.statistics import model_statistics

logger = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext  # type: ignore[type-arg]
MessageT = TypeVar("MessageT")
RESPONSE_HINT = "send fewer images per request, or ask for fewer outputs (or a classification)"


def from_dict(values: Mapping[str, object], message: MessageT) -> MessageT:
    """Fill `message` from the JSON form the HTTP routes answer with (one builder for both)."""
    json_format.ParseDict(values, message)
    return message


def parameter_values(parameters: Mapping[str, pb.InferParameter]) -> dict[str, object]:
    """A protobuf parameter map -> plain values (bool, int, str or float)."""
    values: dict[str, object] = {}
    for key, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, which) if which else None
    return values


def _typed_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> Sequence[object]:
    """The typed `contents` field that matches the tensor's datatype (the codec refuses the others
    by their datatype before it looks at any data)."""
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        return list(contents.bytes_contents)
    if tensor.datatype == "FP32":
        return contents.fp32_contents  # type: ignore[no-any-return]
    return []


def input_tensors(request: pb.ModelInferRequest) -> list[InputTensor]:
    """The request's inputs, each with its data from `raw_input_contents` or its `contents`."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} input(s); send one "
            "entry per input, in the order of `inputs`, or none"
        )
    tensors = []
    for index, tensor in enumerate(request.inputs):
        data: bytes | Sequence[object] | None = None
        if raw:
            if tensor.HasField("contents"):
                raise invalid(
                    f"input {tensor.name!r} has data in both raw_input_contents and contents; send one"
                )
            data = raw[index]
        elif tensor.HasField("contents"):
            data = _typed_contents(tensor)
        tensors.append(InputTensor(tensor.name, tensor.datatype, list(tensor.shape), data))
    return tensors


def requested_outputs(signature: Signature, request: pb.ModelInferRequest) -> list[RequestedOutput]:
    """The outputs asked for (every output, as tensors, when none is named)."""
    if not request.outputs:
        return default_outputs(signature)
    check_output_count(signature, len(request.outputs))
    outputs = [
        requested_output(signature, output.name, parameter_values(output.parameters))
        for output in request.outputs
    ]
    check_outputs(outputs)
    return outputs


class V2InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Translates V2 calls to and from the registry's models; the checks live in `visionserve.v2`."""

    def __init__(self, registry: ModelRegistry, *, max_message_bytes: int, stream_read_ahead: int):
        self.registry = registry
        self.models = V2Models(registry)
        self.max_message_bytes = max_message_bytes
        self.stream_read_ahead = stream_read_ahead

    # --- health and metadata ----------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:  # noqa: N802
        """True while the process answers."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        """True once every model is loaded and warmed, until shutdown begins."""
        return pb.ServerReadyResponse(ready=self.registry.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:  # noqa: N802
        """Whether the model (and version) can serve; false for one not served here, as a client's
        `is_model_ready` expects a yes or no rather than an error."""
        try:
            served, _ = self.models.get(request.name, request.version)
        except VisionError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=served.ready)

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        """Server name, version and the protocol extensions served."""
        return from_dict(server_metadata(), pb.ServerMetadataResponse())

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        """The model's versions, platform, inputs and outputs."""
        try:
            _, signature = self.models.get(request.name, request.version)
        except VisionError as exc:
            await abort(context, exc)
            raise
        return from_dict(signature.metadata(), pb.ModelMetadataResponse())

    async def ModelConfig(  # noqa: N802
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        """Triton's model configuration: what perf_analyzer reads."""
        try:
            _, signature = self.models.get(request.name, request.version)
        except VisionError as exc:
            await abort(context, exc)
            raise
        return from_dict({"config": signature.config()}, pb.ModelConfigResponse())

    async def ModelStatistics(  # noqa: N802
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        """Images and batches computed, time queued and computing (every model when unnamed)."""
        try:
            models = [self.models.get(request.name, request.version)[0]] if request.name else self.registry
        except VisionError as exc:
            await abort(context, exc)
            raise
        return from_dict(model_statistics(models), pb.ModelStatisticsResponse())

    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        """Every model served, with its version and state (only the ready ones with `ready`)."""
        index = self.models.repository_index(ready_only=request.ready)
        return from_dict({"models": index}, pb.RepositoryIndexResponse())

    # --- inference --------------------------------------------------------------------------------

    @staticmethod
    def _deadline(context: Context, request: pb.ModelInferRequest) -> float | None:
        """The earlier of the call's deadline and the request's `timeout` parameter
        (microseconds, as Triton's clients send it), on the monotonic clock."""
        remaining = context.time_remaining()
        expired(remaining)
        timeout = parameter_values(request.parameters).get("timeout")
        timeout_s = None if timeout is None else microseconds_parameter(timeout)
        return deadline_after(time.monotonic(), remaining, timeout_s)

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        check_message_size(request, self.max_message_bytes)
        served, signature = self.models.get(request.model_name, request.model_version)
        params = served.parameters(task_parameters(signature, parameter_values(request.parameters)))
        served.check_ready()
        model_input = parse_inputs(signature, input_tensors(request))
        outputs = requested_outputs(signature, request)
        if isinstance(model_input, ImageBatch):
            results = await served.infer_images(
                model_input.images, params, field=signature.image_input.name, deadline=deadline
            )
        else:
            results = await served.infer_tensor(model_input.array, params, deadline=deadline)
        tensors = outputs_for(signature, results, outputs)
        return pb.ModelInferResponse(
            model_name=signature.model,
            model_version=signature.version,
            id=request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in tensors
            ],
            raw_output_contents=[t.raw() for t in tensors],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:  # noqa: N802
        """One request: a batch of preprocessed tensors or of encoded images."""
        try:
            response = await self._infer(request, self._deadline(context, request))
            check_response_size(response, self.max_message_bytes, RESPONSE_HINT)
            return response
        except Exception as exc:
            await abort(context, exc)
            raise  # unreachable: abort raises

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests in, answers out in request order; a failed request is answered with its
        `error_message` and the stream goes on. At most `stream_read_ahead` requests in flight.
        A message that does not parse ends the call with INVALID_ARGUMENT once the requests before
        it are answered (grpc_server/messages.py)."""

        async def start(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
            return await self._infer(request, self._deadline(context, request))

        answers = answered_in_order(request_iterator, start, self.stream_read_ahead)
        async with contextlib.aclosing(answers):
            async for _, outcome in answers:
                yield self._stream_answer(outcome)

    def _stream_answer(self, outcome: pb.ModelInferResponse | Exception) -> pb.ModelStreamInferResponse:
        """A stream entry: the response, or its error (a response over the size limit is one)."""
        if not isinstance(outcome, Exception):
            answer = pb.ModelStreamInferResponse(infer_response=outcome)
            try:
                check_response_size(answer, self.max_message_bytes, RESPONSE_HINT)
                return answer
            except VisionError as exc:
                outcome = exc
        return pb.ModelStreamInferResponse(error_message=_message(outcome))


def _message(exc: BaseException) -> str:
    """A stream entry's `error_message`; internals never leak."""
    if isinstance(exc, VisionError):
        return exc.message
    logger.error("unexpected error on one stream request", exc_info=exc)
    return GENERIC_INTERNAL_MESSAGE
