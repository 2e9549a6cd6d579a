"""gRPC bad input on the raw channel, over a real grpc.aio server on 127.0.0.1 (port 0): bytes that
do not parse on every method of visionserve.v1.Inference and inference.GRPCInferenceService, empty
messages, messages over the size limit, empty images, out-of-range topk / classification and an
unknown model; after each bad call a good call is still answered correctly.

What tests/integration/test_grpc.py and test_v2_grpc.py already cover is not repeated here: the
empty image, topk out of range and unknown model on visionserve.v1 Predict, messages just over
VISION_GRPC_MAX_MESSAGE_BYTES on all three visionserve.v1 methods and far over it on Predict and
PredictStream, and V2 requests that parse but are inconsistent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from tests.fixtures import FAKE_CLASSES, FakeRuntime, grpc_server_of
from tests.integration.test_grpc import (
    GOOD_IMAGE,
    LIMIT,
    SIZE_SETTING,
    Served,
    assert_serving,
    assert_status,
    frames_of,
    rpc_error,
    run,
    serving,
    until,
)
from tests.integration.test_v2_grpc import constant_batch, expected, logits, tensor_request, v2_stub
from visionserve.repository import ModelEntry
from visionserve.settings import GrpcSettings, SecuritySettings, ServerSettings
from visionserve.v1 import inference_pb2 as v1
from visionserve.v2 import grpc_service_pb2 as v2
from visionserve.v2.codec import pack_bytes

StatusCode = grpc.StatusCode
Tensor = v2.ModelInferRequest.InferInputTensor

SERVICES = {
    service.full_name: service
    for service in (
        v1.DESCRIPTOR.services_by_name["Inference"],
        v2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    )
}
METHODS = [f"/{name}/{method.name}" for name, service in SERVICES.items() for method in service.methods]
"""Every method of both services, and of the health and reflection services on the same port."""
MALFORMED = {
    "corrupt": b"\xff\xff\xff\xff not a protobuf message",
    "truncated": b"\x0a\x64only three",  # field 1, length 100, 11 bytes follow
}


def _method(path: str) -> tuple[bool, bool, str]:
    """(whether requests stream, whether answers stream, the request type's full name) for
    `/service/Method`."""
    service, name = path.strip("/").split("/")
    method = SERVICES[service].methods_by_name[name]
    assert not (method.client_streaming and not method.server_streaming), "no stream-unary methods here"
    return method.client_streaming, method.server_streaming, method.input_type.full_name


async def raw_call(
    served: Served, path: str, messages: Sequence[bytes]
) -> tuple[list[bytes], grpc.StatusCode, str]:
    """Send `messages` as they are (one for a unary method); return the raw answers, the status and
    its details."""
    streaming, answers_stream, _ = _method(path)
    answers: list[bytes] = []
    try:
        if streaming:
            call = served.channel.stream_stream(path)(iter(messages), timeout=10)
            async for answer in call:
                answers.append(answer)
        elif answers_stream:  # health Watch: only ever called here with a message that does not parse
            (message,) = messages
            async for answer in served.channel.unary_stream(path)(message, timeout=10):
                answers.append(answer)
        else:
            (message,) = messages
            answers.append(await served.channel.unary_unary(path)(message, timeout=10))
    except grpc.aio.AioRpcError as error:
        return answers, error.code(), error.details() or ""
    return answers, StatusCode.OK, ""


def image_request(image: bytes, **output_parameters: int) -> v2.ModelInferRequest:
    """A V2 request for one encoded image; `classification=k` asks for the top k."""
    request = v2.ModelInferRequest(
        model_name="fake",
        inputs=[Tensor(name="image", datatype="BYTES", shape=[1])],
        raw_input_contents=[pack_bytes([image])],
    )
    for name, value in output_parameters.items():
        request.outputs.append(
            v2.ModelInferRequest.InferRequestedOutputTensor(
                name="probabilities", parameters={name: v2.InferParameter(int64_param=value)}
            )
        )
    return request


async def assert_both_serving(served: Served) -> None:
    """A good visionserve.v1 call and a good V2 call are both answered correctly."""
    await assert_serving(served)
    answer = await v2_stub(served).ModelInfer(image_request(GOOD_IMAGE, classification=1), timeout=10)
    assert f"class_{FAKE_CLASSES - 1}".encode() in answer.raw_output_contents[0], answer


# --- messages that do not parse -----------------------------------------------------------------


@pytest.mark.parametrize("path", METHODS)
def test_bytes_that_do_not_parse_are_invalid_argument_on_every_method(
    fake_entry: ModelEntry, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    requests_stream, answers_stream, type_name = _method(path)

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry), access_log=True) as served:
            for kind, raw in MALFORMED.items():
                caplog.clear()
                with caplog.at_level(logging.INFO):
                    answers, status, details = await raw_call(served, path, [raw])
                    assert (answers, status) == ([], StatusCode.INVALID_ARGUMENT), (kind, status, details)
                    assert f"the request is not a valid {type_name} message" in details, details
                    assert "Wire format was corrupt" in details, details
                    if requests_stream or not answers_stream:  # NOTE: the log skips unary-stream (Watch)
                        # the call is counted with its status (the log line comes after the status)
                        await until(lambda: f"{path} INVALID_ARGUMENT" in caplog.text, "the access log line")
                # not a server bug: no traceback logged
                assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
                await assert_both_serving(served)

    run(scenario())


def test_without_the_api_key_a_message_that_does_not_parse_is_unauthenticated(fake_entry: ModelEntry) -> None:
    # NOTE: the key is checked before the message is looked at: a caller without it learns nothing
    key = "k" * 32
    security = SecuritySettings(api_key=key)  # type: ignore[arg-type]
    settings = GrpcSettings(host="127.0.0.1", port=0, metrics=False)

    async def scenario() -> None:
        server = grpc_server_of(settings, ServerSettings(), FakeRuntime(fake_entry), security=security)
        port = await server.start()
        try:
            assert server.loaded is not None
            await server.loaded
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for path in (
                    "/visionserve.v1.Inference/Predict",
                    "/inference.GRPCInferenceService/ModelStreamInfer",
                ):
                    streaming = "Stream" in path
                    for metadata, status in (
                        ((), StatusCode.UNAUTHENTICATED),
                        ((("authorization", f"Bearer {key}"),), StatusCode.INVALID_ARGUMENT),
                    ):
                        raw = MALFORMED["corrupt"]
                        call = (
                            channel.stream_stream(path)(iter([raw]), metadata=metadata)
                            if streaming
                            else channel.unary_unary(path)(raw, metadata=metadata)
                        )
                        assert (await rpc_error(call)).code() == status, (path, metadata)
        finally:
            await server.stop(grace_s=1)

    run(scenario())


@pytest.mark.parametrize(
    "path, raw, type_name",
    [
        ("/visionserve.v1.Inference/Predict", b"\x1a\x02\xff\xfe", "visionserve.v1.PredictRequest"),
        ("/visionserve.v1.Inference/PredictBatch", b"\x1a\x02\xff\xfe", "visionserve.v1.PredictBatchRequest"),
        ("/inference.GRPCInferenceService/ModelInfer", b"\x0a\x02\xff\xfe", "inference.ModelInferRequest"),
        (
            "/inference.GRPCInferenceService/ModelStreamInfer",
            b"\x0a\x02\xff\xfe",
            "inference.ModelInferRequest",
        ),
    ],
)
def test_a_model_name_that_is_not_utf8_is_invalid_argument(
    fake_entry: ModelEntry, path: str, raw: bytes, type_name: str
) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            answers, status, details = await raw_call(served, path, [raw])
            assert (answers, status) == ([], StatusCode.INVALID_ARGUMENT), details
            assert f"not a valid {type_name} message (String field had bad UTF-8)" in details
            await assert_both_serving(served)

    run(scenario())


def test_a_frame_that_does_not_parse_ends_predict_stream_after_the_frames_before_it(
    fake_entry: ModelEntry,
) -> None:
    good = [frame.SerializeToString() for frame in frames_of([GOOD_IMAGE] * 3, first_id=1)]

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            messages = [good[0], good[1], MALFORMED["corrupt"], good[2]]
            answers, status, details = await raw_call(
                served, "/visionserve.v1.Inference/PredictStream", messages
            )
            assert_status_parts(status, details, StatusCode.INVALID_ARGUMENT, "visionserve.v1.Frame")
            predictions = [v1.FramePrediction.FromString(answer) for answer in answers]
            assert [(p.frame_id, len(p.topk), p.HasField("error")) for p in predictions] == [
                (1, 5, False),
                (2, 5, False),
            ]
            await assert_both_serving(served)

    run(scenario())


def test_a_request_that_does_not_parse_ends_model_stream_infer_after_the_requests_before_it(
    fake_entry: ModelEntry,
) -> None:
    good = [tensor_request(constant_batch(v), id=str(v)).SerializeToString() for v in (1.0, 2.0, 3.0)]

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            messages = [good[0], good[1], MALFORMED["truncated"], good[2]]
            answers, status, details = await raw_call(
                served, "/inference.GRPCInferenceService/ModelStreamInfer", messages
            )
            assert_status_parts(status, details, StatusCode.INVALID_ARGUMENT, "inference.ModelInferRequest")
            responses = [v2.ModelStreamInferResponse.FromString(answer) for answer in answers]
            assert [r.error_message for r in responses] == ["", ""]
            assert [r.infer_response.id for r in responses] == ["1.0", "2.0"]
            for response, value in zip(responses, (1.0, 2.0), strict=True):
                np.testing.assert_allclose(logits(response.infer_response), expected(value), rtol=1e-6)
            await assert_both_serving(served)

    run(scenario())


def assert_status_parts(
    status: grpc.StatusCode, details: str, want: grpc.StatusCode, *fragments: str
) -> None:
    assert status == want, (status, details)
    for fragment in fragments:
        assert fragment in details, (fragment, details)


# --- empty messages (valid in proto3: every field unset) ----------------------------------------


@pytest.mark.parametrize(
    "path, want, fragment",
    [
        ("/visionserve.v1.Inference/Predict", StatusCode.INVALID_ARGUMENT, "the image is empty"),
        ("/visionserve.v1.Inference/PredictBatch", StatusCode.INVALID_ARGUMENT, "`images` is empty"),
        ("/inference.GRPCInferenceService/ModelInfer", StatusCode.INVALID_ARGUMENT, "names no model"),
        ("/inference.GRPCInferenceService/ModelMetadata", StatusCode.INVALID_ARGUMENT, "names no model"),
        ("/inference.GRPCInferenceService/ModelConfig", StatusCode.INVALID_ARGUMENT, "names no model"),
    ],
)
def test_an_empty_message_is_refused_for_what_it_lacks(
    fake_entry: ModelEntry, path: str, want: grpc.StatusCode, fragment: str
) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            answers, status, details = await raw_call(served, path, [b""])
            assert answers == []
            assert_status_parts(status, details, want, fragment)
            await assert_both_serving(served)

    run(scenario())


def test_empty_messages_in_streams_are_answered_in_the_stream(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            good = v1.Frame(image=GOOD_IMAGE, frame_id=5).SerializeToString()
            answers, status, _ = await raw_call(
                served, "/visionserve.v1.Inference/PredictStream", [b"", good]
            )
            assert status == StatusCode.OK
            empty, answered = (v1.FramePrediction.FromString(a) for a in answers)
            assert (empty.frame_id, empty.error.code, list(empty.topk)) == (0, "invalid_image", [])
            assert "the image is empty" in empty.error.message
            assert (answered.frame_id, len(answered.topk)) == (5, 5)
            good_v2 = tensor_request(constant_batch(2.0)).SerializeToString()
            answers, status, _ = await raw_call(
                served, "/inference.GRPCInferenceService/ModelStreamInfer", [b"", good_v2]
            )
            assert status == StatusCode.OK
            empty_v2, answered_v2 = (v2.ModelStreamInferResponse.FromString(a) for a in answers)
            assert "names no model" in empty_v2.error_message and "'fake'" in empty_v2.error_message
            np.testing.assert_allclose(logits(answered_v2.infer_response), expected(2.0), rtol=1e-6)
            await assert_both_serving(served)

    run(scenario())


def test_empty_messages_where_every_field_is_optional_are_answered(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            prefix = "/inference.GRPCInferenceService/"
            for method, response_type, check in (
                ("ServerLive", v2.ServerLiveResponse, lambda r: r.live),
                ("ServerReady", v2.ServerReadyResponse, lambda r: r.ready),
                ("ModelReady", v2.ModelReadyResponse, lambda r: not r.ready),  # no model named
                ("ServerMetadata", v2.ServerMetadataResponse, lambda r: r.name == "visionserve"),
                ("ModelStatistics", v2.ModelStatisticsResponse, lambda r: r.model_stats[0].name == "fake"),
            ):
                answers, status, details = await raw_call(served, prefix + method, [b""])
                assert status == StatusCode.OK, (method, details)
                assert check(response_type.FromString(answers[0])), method

    run(scenario())


# --- V2 image input: empty image, classification out of range -----------------------------------


def test_v2_empty_image_and_classification_out_of_range(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            stub = v2_stub(served)
            error = await rpc_error(stub.ModelInfer(image_request(b"")))
            assert_status(error, StatusCode.INVALID_ARGUMENT, "empty")
            await assert_both_serving(served)
            for classes in (-1, FAKE_CLASSES + 1):
                error = await rpc_error(stub.ModelInfer(image_request(GOOD_IMAGE, classification=classes)))
                assert_status(
                    error, StatusCode.INVALID_ARGUMENT, "classification", f"between 1 and {FAKE_CLASSES}"
                )
                await assert_both_serving(served)

    run(scenario())


def test_predict_batch_unknown_model_is_not_found_before_decoding(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = FakeRuntime(fake_entry)
        async with serving(runtime) as served:
            computed = len(runtime.batches)
            request = v1.PredictBatchRequest(images=[GOOD_IMAGE, b"junk"], model="resnet9000")
            error = await rpc_error(served.stub.PredictBatch(request))
            assert_status(error, StatusCode.NOT_FOUND, "'resnet9000'", "'fake'")
            assert len(runtime.batches) == computed
            await assert_both_serving(served)

    run(scenario())


def test_predict_batch_of_more_images_than_the_queue_holds_is_refused_whole(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = FakeRuntime(fake_entry)
        async with serving(runtime, max_queue_size=16) as served:
            computed = len(runtime.batches)
            error = await rpc_error(
                served.stub.PredictBatch(v1.PredictBatchRequest(images=[GOOD_IMAGE] * 17))
            )
            assert_status(
                error, StatusCode.INVALID_ARGUMENT, "17 images", "holds 16 (setting VISION_MAX_QUEUE_SIZE)"
            )
            # 100,000 empty images in 200 KB: refused at once, none decoded or answered one by one
            request = v1.PredictBatchRequest(images=[b""] * 100_000)
            assert request.ByteSize() == 200_000
            error = await rpc_error(served.stub.PredictBatch(request))
            assert_status(error, StatusCode.INVALID_ARGUMENT, "100,000 images", "send fewer at once")
            assert len(runtime.batches) == computed
            response = await served.stub.PredictBatch(v1.PredictBatchRequest(images=[GOOD_IMAGE] * 16))
            assert [r.WhichOneof("outcome") for r in response.results] == ["result"] * 16
            await assert_both_serving(served)

    run(scenario())


@pytest.mark.parametrize("name", ["x" * 100_000, "\U0001f600" * 30_000], ids=["ascii", "emoji"])
def test_an_error_quoting_a_long_name_keeps_its_status(fake_entry: ModelEntry, name: str) -> None:
    # NOTE: a status message travels in a trailer that clients cap at 8-16 KiB; quoting a 100 KB name
    # whole, these calls got RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"
    long_output = image_request(GOOD_IMAGE)
    long_output.outputs.add(name=name)
    cases = [
        (v1.PredictRequest(image=GOOD_IMAGE, model=name), StatusCode.NOT_FOUND, "this server serves 'fake'"),
        (v2.ModelInferRequest(model_name=name), StatusCode.NOT_FOUND, "this server serves 'fake'"),
        (
            v2.ModelInferRequest(model_name="fake", inputs=[Tensor(name=name, datatype="BYTES", shape=[1])]),
            StatusCode.INVALID_ARGUMENT,
            "this model takes",
        ),
        (long_output, StatusCode.INVALID_ARGUMENT, "this model has 'logits', 'probabilities'"),
        (v2.ModelMetadataRequest(name=name), StatusCode.NOT_FOUND, "this server serves 'fake'"),
    ]

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            stub = v2_stub(served)
            calls = {
                v1.PredictRequest: served.stub.Predict,
                v2.ModelInferRequest: stub.ModelInfer,
                v2.ModelMetadataRequest: stub.ModelMetadata,
            }
            for request, status, advice in cases:
                error = await rpc_error(calls[type(request)](request))
                details = assert_status(error, status, "bytes cut", advice)
                assert advice in details[-200:], details[-200:]  # the advice, at the end, is kept
                assert len(details.encode()) <= 1024
                await assert_both_serving(served)

    run(scenario())


def test_a_request_for_a_huge_list_of_outputs_is_refused_at_once(fake_entry: ModelEntry) -> None:
    # NOTE: the duplicate check was quadratic, on the event loop: 200,000 outputs (2 MB) held every
    # call on the server for about a minute
    request = image_request(GOOD_IMAGE)
    for _ in range(200_000):
        request.outputs.add(name="logits")

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry)) as served:
            error = await rpc_error(v2_stub(served).ModelInfer(request))
            assert_status(
                error, StatusCode.INVALID_ARGUMENT, "200,000 outputs are requested", "this model has 2"
            )
            answers = [a async for a in v2_stub(served).ModelStreamInfer(iter([request]))]
            assert "200,000 outputs are requested" in answers[0].error_message
            await assert_both_serving(served)

    run(scenario())


# --- messages far over VISION_GRPC_MAX_MESSAGE_BYTES ----------------------------------------------


@pytest.mark.parametrize("path", ["PredictBatch", "ModelInfer", "ModelStreamInfer"])
def test_a_message_far_over_the_limit_is_refused_by_the_transport(fake_entry: ModelEntry, path: str) -> None:
    # NOTE: Predict and PredictStream: test_grpc.py test_message_far_over_the_limit_*
    payload = b"x" * (3 * LIMIT)  # over the transport's 2x the setting
    message = {
        "PredictBatch": v1.PredictBatchRequest(images=[GOOD_IMAGE, payload]),
        "ModelInfer": image_request(payload),
        "ModelStreamInfer": image_request(payload),
    }[path].SerializeToString()
    full = (
        "/visionserve.v1.Inference/" if path == "PredictBatch" else "/inference.GRPCInferenceService/"
    ) + path

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry), grpc_settings={"max_message_bytes": LIMIT}) as served:
            answers, status, details = await raw_call(served, full, [message])
            assert (answers, status) == ([], StatusCode.RESOURCE_EXHAUSTED), details
            await assert_both_serving(served)

    run(scenario())


@pytest.mark.parametrize(
    "path", ["/visionserve.v1.Inference/Predict", "/inference.GRPCInferenceService/ModelStreamInfer"]
)
def test_a_compressed_message_that_inflates_far_over_the_limit_is_refused_by_the_transport(
    fake_entry: ModelEntry, path: str
) -> None:
    # 1 MiB of zeros: about 1 KB gzipped, well under the transport's 2x the setting on the wire
    image = bytes(1024 * 1024)
    message = (
        v1.PredictRequest(image=image) if "Predict" in path else image_request(image)
    ).SerializeToString()

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry), grpc_settings={"max_message_bytes": LIMIT}) as served:
            streaming, _, _ = _method(path)
            call = (
                served.channel.stream_stream(path)(iter([message]), compression=grpc.Compression.Gzip)
                if streaming
                else served.channel.unary_unary(path)(message, compression=grpc.Compression.Gzip)
            )
            error = await rpc_error(call)
            assert error.code() == StatusCode.RESOURCE_EXHAUSTED, error
            await assert_both_serving(served)

    run(scenario())


def test_model_stream_infer_answers_a_request_over_the_limit_and_goes_on(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry), grpc_settings={"max_message_bytes": LIMIT}) as served:
            large = image_request(b"\x00" * (LIMIT + 100))  # over the setting, under the transport's 2x
            requests = [image_request(GOOD_IMAGE), large, image_request(GOOD_IMAGE)]
            for index, request in enumerate(requests):
                request.id = str(index)
            answers = [a async for a in v2_stub(served).ModelStreamInfer(iter(requests))]
            assert [a.error_message == "" for a in answers] == [True, False, True]
            assert SIZE_SETTING in answers[1].error_message
            assert f"{large.ByteSize():,}" in answers[1].error_message
            assert [answers[0].infer_response.id, answers[2].infer_response.id] == ["0", "2"]
            await assert_both_serving(served)

    run(scenario())
