"""inference.GRPCInferenceService over the fake runtimes, with the project's generated V2 stubs: what
tritonclient cannot send (typed `contents`, inconsistent `raw_input_contents`, a request that is
not a message it would build), readiness, reflection, health, streaming errors, and V2 and own-API
calls sharing a batch with each answer its own (FakeRuntime scores class j as
j * (1 + 0.1 * mean of the input)).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.fixtures import FAKE_CLASSES, FakeRuntime
from tests.integration.test_grpc import (
    GOOD_IMAGE,
    CountingSlowRuntime,
    ExpiredContext,
    GatedRuntime,
    Served,
    assert_status,
    health_of,
    rpc_error,
    run,
    serving,
    until,
)
from visionserve.repository import ModelEntry
from visionserve.v1 import inference_pb2 as v1
from visionserve.v2 import grpc_service_pb2 as pb
from visionserve.v2 import grpc_service_pb2_grpc as pb_grpc
from visionserve.v2.codec import pack_bytes

V2_SERVICE = "inference.GRPCInferenceService"
SHAPE = (3, 32, 32)
RAMP = np.arange(FAKE_CLASSES, dtype=np.float32)
StatusCode = grpc.StatusCode
Tensor = pb.ModelInferRequest.InferInputTensor


def v2_stub(served: Served) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(served.channel)


def constant_batch(*values: float) -> np.ndarray:
    return np.stack([np.full(SHAPE, v, dtype=np.float32) for v in values])


def tensor_request(batch: np.ndarray, **fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name="fake",
        inputs=[Tensor(name="input", datatype="FP32", shape=list(batch.shape))],
        raw_input_contents=[batch.astype("<f4").tobytes()],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")],
    )
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def logits(response: pb.ModelInferResponse) -> np.ndarray:
    (output,) = response.outputs
    assert output.name == "logits" and output.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(output.shape))


def expected(*values: float) -> list[np.ndarray]:
    return [RAMP * (1.0 + 0.1 * v) for v in values]


def test_typed_contents_and_raw_contents_give_the_same_answer(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            stub = v2_stub(served)
            batch = constant_batch(0.5, 2.0)
            raw = await stub.ModelInfer(tensor_request(batch, id="raw"))
            typed = pb.ModelInferRequest(
                model_name="fake",
                model_version="1",
                id="typed",
                inputs=[
                    Tensor(
                        name="input",
                        datatype="FP32",
                        shape=list(batch.shape),
                        contents=pb.InferTensorContents(fp32_contents=batch.ravel().tolist()),
                    )
                ],
            )
            answer = await stub.ModelInfer(typed)
            assert (raw.id, answer.id, answer.model_name, answer.model_version) == (
                "raw",
                "typed",
                "fake",
                "1",
            )
            np.testing.assert_allclose(logits(raw), expected(0.5, 2.0), rtol=1e-6)
            assert [o.name for o in answer.outputs] == ["logits", "probabilities"]  # every output by default
            np.testing.assert_allclose(
                np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(2, -1),
                expected(0.5, 2.0),
                rtol=1e-6,
            )
            images = pb.ModelInferRequest(
                model_name="fake",
                inputs=[
                    Tensor(
                        name="image",
                        datatype="BYTES",
                        shape=[2],
                        contents=pb.InferTensorContents(bytes_contents=[GOOD_IMAGE, GOOD_IMAGE]),
                    )
                ],
                outputs=[
                    pb.ModelInferRequest.InferRequestedOutputTensor(
                        name="probabilities", parameters={"classification": pb.InferParameter(int64_param=2)}
                    )
                ],
            )
            answer = await stub.ModelInfer(images)
            (output,) = answer.outputs
            assert (output.datatype, list(output.shape)) == ("BYTES", [2, 2])
            assert answer.raw_output_contents[0][4:].startswith(b"0.")  # "value:index:label", length-prefixed

    run(scenario())


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (
            pb.ModelInferRequest(
                model_name="fake",
                inputs=[Tensor(name="input", datatype="FP32", shape=[1, *SHAPE])],
                raw_input_contents=[b"\x00" * 12288, b"\x00" * 12288],
            ),
            "raw_input_contents has 2 entries for 1 input(s)",
        ),
        (
            pb.ModelInferRequest(
                model_name="fake",
                inputs=[
                    Tensor(
                        name="input",
                        datatype="FP32",
                        shape=[1, *SHAPE],
                        contents=pb.InferTensorContents(fp32_contents=[0.0]),
                    )
                ],
                raw_input_contents=[b"\x00" * 12288],
            ),
            "data in both raw_input_contents and contents",
        ),
        (
            pb.ModelInferRequest(
                model_name="fake",
                inputs=[
                    Tensor(
                        name="input",
                        datatype="FP32",
                        shape=[1, *SHAPE],
                        contents=pb.InferTensorContents(fp32_contents=[0.0] * 12287),
                    )
                ],
            ),
            "needs 3,072 elements; 12,287 were sent",
        ),
        (
            pb.ModelInferRequest(
                model_name="fake",
                inputs=[
                    Tensor(
                        name="input",
                        datatype="FP32",
                        shape=[1, *SHAPE],
                        contents=pb.InferTensorContents(int_contents=[0] * 3072),
                    )
                ],
            ),
            "needs 3,072 elements; 0 were sent",
        ),
        (
            pb.ModelInferRequest(
                model_name="fake", inputs=[Tensor(name="input", datatype="FP32", shape=[1, *SHAPE])]
            ),
            "input 'input' carries no data",
        ),
        (
            pb.ModelInferRequest(
                model_name="fake",
                inputs=[Tensor(name="image", datatype="BYTES", shape=[2])],
                raw_input_contents=[pack_bytes([GOOD_IMAGE])],
            ),
            "declares 2 element(s) but its raw data holds 1",
        ),
        (pb.ModelInferRequest(model_name="fake"), "the request has no inputs"),
        (
            pb.ModelInferRequest(
                model_name="fake",
                inputs=[Tensor(name="image", datatype="BYTES", shape=[1])],
                raw_input_contents=[pack_bytes([GOOD_IMAGE])],
                parameters={"timeout": pb.InferParameter(int64_param=-1)},
            ),
            "timeout must be a positive number of microseconds",
        ),
    ],
)
def test_malformed_requests_are_invalid_argument(
    fake_entry: ModelEntry, request_: pb.ModelInferRequest, fragment: str
) -> None:
    async def scenario() -> None:
        runtime = FakeRuntime(fake_entry)
        async with serving(runtime) as served:
            computed = len(runtime.batches)
            error = await rpc_error(v2_stub(served).ModelInfer(request_))
            assert_status(error, StatusCode.INVALID_ARGUMENT, fragment)
            assert len(runtime.batches) == computed
            np.testing.assert_allclose(
                logits(await v2_stub(served).ModelInfer(tensor_request(constant_batch(1.0)))),
                expected(1.0),
                rtol=1e-6,
            )

    run(scenario())


def test_unknown_model_message_size_and_a_passed_deadline(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry), grpc_settings={"max_message_bytes": 4096}) as served:
            stub = v2_stub(served)
            large = pb.ModelInferRequest(
                model_name="fake",
                inputs=[Tensor(name="image", datatype="BYTES", shape=[1])],
                raw_input_contents=[pack_bytes([b"\x00" * 5000])],
            )
            assert_status(
                await rpc_error(stub.ModelInfer(large)),
                StatusCode.RESOURCE_EXHAUSTED,
                "VISION_GRPC_MAX_MESSAGE_BYTES",
            )
            small = pb.ModelInferRequest(
                model_name="other",
                inputs=[Tensor(name="image", datatype="BYTES", shape=[1])],
                raw_input_contents=[pack_bytes([GOOD_IMAGE])],
            )
            assert_status(
                await rpc_error(stub.ModelInfer(small)), StatusCode.NOT_FOUND, "'other' is not served here"
            )
            small.model_name, small.model_version = "fake", "7"
            assert_status(await rpc_error(stub.ModelInfer(small)), StatusCode.NOT_FOUND, "no version '7'")
            for call, request_type in (
                (stub.ModelMetadata, pb.ModelMetadataRequest),
                (stub.ModelConfig, pb.ModelConfigRequest),
                (stub.ModelStatistics, pb.ModelStatisticsRequest),
            ):
                assert_status(
                    await rpc_error(call(request_type(name="other"))), StatusCode.NOT_FOUND, "'other'"
                )
            assert not (await stub.ModelReady(pb.ModelReadyRequest(name="other"))).ready
            small.model_version = ""
            # a deadline already passed: the servicer's own check (end to end, whether the client,
            # gRPC core or the servicer sees it first is a race)
            context = ExpiredContext()
            with pytest.raises(grpc.aio.AbortError):
                await served.server.v2_servicer.ModelInfer(small, context)  # type: ignore[arg-type]
            assert context.aborted is not None and context.aborted[0] == StatusCode.DEADLINE_EXCEEDED

    run(scenario())


def test_readiness_reflection_and_health(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = GatedRuntime(fake_entry)
        async with serving(runtime, ready=False) as served:
            stub = v2_stub(served)
            assert (await stub.ServerLive(pb.ServerLiveRequest())).live
            assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
            assert not (await stub.ModelReady(pb.ModelReadyRequest(name="fake"))).ready
            error = await rpc_error(stub.ModelInfer(tensor_request(constant_batch(1.0))))
            assert_status(error, StatusCode.UNAVAILABLE, "not ready")
            assert await health_of(served, V2_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            runtime.gate.set()
            assert served.server.loaded is not None
            await served.server.loaded
            assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="fake", version="1"))).ready
            assert await health_of(served, V2_SERVICE) == health_pb2.HealthCheckResponse.SERVING
            metadata = await stub.ServerMetadata(pb.ServerMetadataRequest())
            assert metadata.name == "visionserve" and "classification" in metadata.extensions
            reflection = reflection_pb2_grpc.ServerReflectionStub(served.channel)
            requests = [reflection_pb2.ServerReflectionRequest(list_services="")]
            (listed,) = [r async for r in reflection.ServerReflectionInfo(iter(requests))]
            assert V2_SERVICE in {s.name for s in listed.list_services_response.service}

    run(scenario())


def test_stream_answers_in_order_and_goes_on_after_a_bad_request(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            values = [float(i) for i in range(12)]
            requests = [tensor_request(constant_batch(v), id=str(i)) for i, v in enumerate(values)]
            requests.insert(5, tensor_request(constant_batch(1.0), model_name="other", id="bad"))

            async def send() -> AsyncIterator[pb.ModelInferRequest]:
                for request in requests:
                    yield request

            answers = [a async for a in v2_stub(served).ModelStreamInfer(send())]
            assert len(answers) == len(requests)
            assert "'other' is not served here" in answers[5].error_message
            good = answers[:5] + answers[6:]
            assert [a.infer_response.id for a in good] == [str(i) for i in range(12)]
            for answer, value in zip(good, values, strict=True):
                assert answer.error_message == ""
                np.testing.assert_allclose(logits(answer.infer_response), expected(value), rtol=1e-6)

    run(scenario())


def test_v2_and_own_api_calls_share_a_batch_and_each_gets_its_own_answer(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = CountingSlowRuntime(fake_entry, batch_s=0.3)
        async with serving(runtime) as served:
            stub = v2_stub(served)
            first = asyncio.ensure_future(stub.ModelInfer(tensor_request(constant_batch(0.0))))
            await until(lambda: runtime.started == 1, "the first call to hold the instance")
            values = [(1.0, 2.0), (3.0,), (-4.0, 5.0, 6.0)]
            calls = [stub.ModelInfer(tensor_request(constant_batch(*v))) for v in values]
            mis_sized = tensor_request(constant_batch(7.0))
            mis_sized.raw_input_contents[0] += b"\x00" * 4
            replies = await asyncio.gather(
                *calls,
                rpc_error(stub.ModelInfer(mis_sized)),
                served.stub.Predict(v1.PredictRequest(image=GOOD_IMAGE)),
            )
            await first
            for reply, v in zip(replies[:3], values, strict=True):
                np.testing.assert_allclose(logits(reply), expected(*v), rtol=1e-6)
            assert_status(replies[3], StatusCode.INVALID_ARGUMENT, "needs 12,288 bytes; 12,292 were sent")
            assert replies[4].topk
            sizes = [shape[0] for shape in runtime.batches[1:]]  # after the warm-up
            assert sizes[0] == 1 and sum(sizes) == 1 + 6 + 1 and max(sizes) >= 4, sizes

    run(scenario())


def test_a_call_whose_deadline_passes_while_queued_is_never_computed(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = CountingSlowRuntime(fake_entry, batch_s=0.4)
        async with serving(runtime) as served:
            stub = v2_stub(served)
            first = asyncio.ensure_future(stub.ModelInfer(tensor_request(constant_batch(0.0))))
            await until(lambda: runtime.started == 1, "the first call to hold the instance")
            error = await rpc_error(stub.ModelInfer(tensor_request(constant_batch(1.0)), timeout=0.1))
            assert error.code() == StatusCode.DEADLINE_EXCEEDED
            late = tensor_request(constant_batch(1.0))
            late.parameters["timeout"].int64_param = 100_000  # microseconds, as tritonclient sends it
            error = await rpc_error(stub.ModelInfer(late))
            assert_status(error, StatusCode.DEADLINE_EXCEEDED, "deadline passed")
            await first
            assert runtime.started == 1

    run(scenario())
