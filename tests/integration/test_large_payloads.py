"""Large payloads at the configured limits, over real sockets (uvicorn and grpc.aio on 127.0.0.1,
port 0): a request of exactly the limit is served, one byte more is refused naming the setting.

- HTTP: a body of exactly VISION_MAX_REQUEST_BYTES on /predict/file (multipart), /predict (JSON,
  base64) and /v2/models/{name}/infer (binary tensor extension), sent with Content-Length and
  chunked; one byte more gets 413 naming the setting.
- gRPC: a message whose serialized size (what the servicer measures, `ByteSize()`) is exactly
  VISION_GRPC_MAX_MESSAGE_BYTES on each inference method of both services; one byte more gets
  RESOURCE_EXHAUSTED naming the setting (a stream frame: its own error, the stream goes on).
- Pixels: an image of exactly VISION_MAX_IMAGE_PIXELS pixels is served, one pixel more is refused.

Images are brought to an exact size by a private ancillary PNG chunk of filler bytes, which
decoders skip: the pixels, and so the answer, are those of the unpadded image. The real model
classifies a real photo padded to a 2 MiB limit as it classifies the photo itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import uvicorn
from google.protobuf.message import Message
from PIL import Image

from tests.conftest import encode, photo_bytes
from tests.fixtures import FAKE_CLASSES, FakeRuntime, app_of, write_fake_entry
from tests.integration.test_grpc import (
    CATS,
    SIZE_SETTING,
    assert_good,
    assert_status,
    rpc_error,
    run,
    serving,
    stream,
)
from tests.integration.test_grpc_bad_input import image_request
from tests.integration.test_v2_grpc import v2_stub
from visionserve.repository import ModelEntry
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import GrpcSettings, ServerSettings
from visionserve.v1 import inference_pb2 as v1
from visionserve.v2.rest import HEADER_LENGTH

MiB = 1024 * 1024
BODY_SETTING = "VISION_MAX_REQUEST_BYTES"
PIXELS_SETTING = "VISION_MAX_IMAGE_PIXELS"
FAKE_LIMIT = 256 * 1024
REAL_LIMIT = 2 * MiB
TOP = f"class_{FAKE_CLASSES - 1}"  # FakeRuntime's answer
PNG = encode(Image.new("RGB", (64, 48), (20, 120, 220)))
BOUNDARY = "visionserve-large-payload"
INFER = "/v2/models/{}/infer"
StatusCode = grpc.StatusCode


# --- images of an exact size ----------------------------------------------------------------------


def pad_png(png: bytes, extra: int) -> bytes:
    """`png` made `extra` bytes longer (0, or at least 12: a chunk's framing) by a private
    ancillary chunk of zeros before IEND."""
    if extra == 0:
        return png
    assert extra >= 12, extra
    assert png[-12:-8] == b"\x00\x00\x00\x00" and png[-8:-4] == b"IEND", "IEND is not last"
    kind, data = b"vsPd", bytes(extra - 12)
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return png[:-12] + chunk + png[-12:]


def fill(png: bytes, size_of: Callable[[bytes], int], target: int) -> bytes:
    """`png`, padded so that `size_of(it)` is exactly `target`."""
    extra = 0
    for _ in range(8):
        size = size_of(pad_png(png, extra))
        if size == target:
            return pad_png(png, extra)
        extra += target - size
    raise AssertionError(f"cannot pad to exactly {target:,} bytes (at {size:,})")


# --- HTTP bodies of an exact size -----------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """A request body, its headers, and the image in it."""

    path: str
    content: bytes
    headers: dict[str, str]
    image: bytes


def multipart_body(image: bytes, model: str) -> Body:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="photo.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    content = head + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    return Body(
        "/predict/file", content, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, image
    )


def v2_body(image: bytes, model: str) -> Body:
    raw = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
        }
    ).encode()
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
    return Body(INFER.format(model), header + raw, headers, image)


def body_of(endpoint: str, png: bytes, target: int | None, model: str) -> Body:
    """A request to `endpoint` for `png` whose body is exactly `target` bytes (`png` as it is when
    `target` is None)."""
    if target is None:
        if endpoint == "json":
            content = json.dumps({"image": base64.b64encode(png).decode()}).encode()
            return Body("/predict", content, {"Content-Type": "application/json"}, png)
        return (multipart_body if endpoint == "file" else v2_body)(png, model)
    if endpoint == "json":
        # base64 grows in steps of 4 bytes: the image fills all but 0-3 bytes, JSON spaces the rest
        start, end = b'{"image": "', b'"}'
        room = target - len(start) - len(end)
        image = pad_png(png, room // 4 * 3 - len(png))
        text = base64.b64encode(image)
        content = start + text + b'"' + b" " * (room - len(text)) + b"}"
        body = Body("/predict", content, {"Content-Type": "application/json"}, image)
    else:
        build = multipart_body if endpoint == "file" else v2_body
        image = fill(png, lambda padded: len(build(padded, model).content), target)
        body = build(image, model)
    assert len(body.content) == target
    return body


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> dict[str, object]:
        return json.loads(self.body)  # type: ignore[no-any-return]


async def post(port: int, body: Body, *, chunked: bool) -> Answer:
    """POST `body` on a fresh connection, with Content-Length or chunked (64 KiB chunks)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = [f"POST {body.path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        head += [f"{name}: {value}" for name, value in body.headers.items()]
        content = body.content
        if chunked:
            head.append("Transfer-Encoding: chunked")
            step = 64 * 1024
            parts = [content[i : i + step] for i in range(0, len(content), step)]
            payload = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
        else:
            head.append(f"Content-Length: {len(content)}")
            payload = content
        # NOTE: no drain: a server that answers before reading the body must not stall the client
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        response_head = await reader.readuntil(b"\r\n\r\n")
        lines = response_head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        length = int(next(value for name, value in headers.items() if name.lower() == "content-length"))
        return Answer(int(lines[0].split()[1]), await reader.readexactly(length))
    finally:
        writer.transport.abort()


@contextlib.asynccontextmanager
async def http_serving(runtime: ModelRuntime, **settings: object) -> AsyncIterator[int]:
    """The HTTP app on uvicorn, 127.0.0.1, port 0, its model loaded; yields the port."""
    app = app_of(ServerSettings(**settings), runtime)  # type: ignore[arg-type]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
    serving_task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving_task.done(), "uvicorn stopped while starting"
            await asyncio.sleep(0.01)
        while not app.state.registry.default.ready:
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await serving_task


def top_label(endpoint: str, answer: Answer) -> tuple[str, float]:
    """The top class and its probability, from either API's answer."""
    assert answer.status == 200, answer
    data = answer.json()
    if endpoint == "v2":
        (output,) = data["outputs"]  # type: ignore[call-overload]
        score, _, label = output["data"][0].split(":", 2)
        return label, float(score)
    return data["prediction"], data["probability"]  # type: ignore[return-value]


def assert_body_too_large(endpoint: str, answer: Answer, limit: int, *, declared: int | None) -> None:
    """413 in the endpoint's error shape, naming the setting, the limit and the size declared."""
    assert answer.status == 413, answer
    error = answer.json()["error"]
    message = error if endpoint == "v2" else error["message"]  # type: ignore[index]
    assert isinstance(message, str), answer
    assert BODY_SETTING in message and f"{limit:,} bytes" in message, message
    assert (f"is {declared:,} bytes" if declared else f"more than {limit:,} bytes") in message, message
    if endpoint != "v2":
        assert error["code"] == "payload_too_large", answer  # type: ignore[index]


ENDPOINTS = ["file", "json", "v2"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_http_body_of_exactly_the_limit_is_served_and_one_byte_more_is_413(
    fake_entry: ModelEntry, endpoint: str
) -> None:
    exact = body_of(endpoint, PNG, FAKE_LIMIT, "fake")
    over = body_of(endpoint, PNG, FAKE_LIMIT + 1, "fake")

    async def scenario() -> None:
        async with http_serving(FakeRuntime(fake_entry), max_request_bytes=FAKE_LIMIT) as port:
            for chunked in (False, True):
                assert top_label(endpoint, await post(port, exact, chunked=chunked))[0] == TOP
                answer = await post(port, over, chunked=chunked)
                assert_body_too_large(
                    endpoint, answer, FAKE_LIMIT, declared=None if chunked else FAKE_LIMIT + 1
                )
                assert top_label(endpoint, await post(port, exact, chunked=chunked))[0] == TOP

    run(scenario())


def test_http_v2_gzip_body_inflating_to_exactly_the_limit_is_served_and_one_byte_more_is_413(
    fake_entry: ModelEntry,
) -> None:
    def gzipped(body: Body, *, members: int = 1, after: bytes = b"") -> Body:
        """`body` gzipped, in `members` gzip members one after another (RFC 1952), then `after`."""
        headers = {**body.headers, "Content-Encoding": "gzip"}
        step = -(-len(body.content) // members)
        parts = [body.content[i : i + step] for i in range(0, len(body.content), step)]
        return Body(body.path, b"".join(map(gzip.compress, parts)) + after, headers, body.image)

    exact, over = body_of("v2", PNG, FAKE_LIMIT, "fake"), body_of("v2", PNG, FAKE_LIMIT + 1, "fake")
    assert len(gzipped(over).content) < FAKE_LIMIT // 10  # the limit is on what the body inflates to

    async def scenario() -> None:
        async with http_serving(FakeRuntime(fake_entry), max_request_bytes=FAKE_LIMIT) as port:
            for members in (1, 3):  # several members: read them all (only the first was, before)
                assert (
                    top_label("v2", await post(port, gzipped(exact, members=members), chunked=False))[0]
                    == TOP
                )
                answer = await post(port, gzipped(over, members=members), chunked=True)
                assert answer.status == 413, answer
                message = answer.json()["error"]
                assert f"decompresses to more than {FAKE_LIMIT:,} bytes" in message, message
                assert BODY_SETTING in message
            # bytes after the compressed data that are not gzip: refused (they were ignored before)
            answer = await post(port, gzipped(exact, after=b"trailing bytes"), chunked=False)
            assert answer.status == 400, answer
            assert "has 14 bytes after the end of its compressed data" in answer.json()["error"]  # type: ignore[operator]
            assert top_label("v2", await post(port, gzipped(exact), chunked=True))[0] == TOP

    run(scenario())


def test_http_v2_request_for_a_huge_list_of_outputs_is_refused_at_once(fake_entry: ModelEntry) -> None:
    # NOTE: the duplicate check was quadratic: 200,000 outputs (a 4 MB body) took about a minute
    image = base64.b64encode(PNG).decode()
    content = json.dumps(
        {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}],
            "outputs": [{"name": "logits"}] * 200_000,
        }
    ).encode()
    body = Body(INFER.format("fake"), content, {"Content-Type": "application/json"}, PNG)

    async def scenario() -> None:
        async with http_serving(FakeRuntime(fake_entry)) as port:
            answer = await post(port, body, chunked=False)
            assert answer.status == 400, answer
            assert "200,000 outputs are requested" in answer.json()["error"]  # type: ignore[operator]
            assert top_label("v2", await post(port, v2_body(PNG, "fake"), chunked=False))[0] == TOP

    run(scenario())


@pytest.mark.real_model
def test_http_real_photo_padded_to_the_limit_classifies_as_the_photo(real_entry: ModelEntry) -> None:
    from visionserve.runtimes.onnx import OnnxRuntime

    photo = photo_bytes("chelsea.png")

    async def scenario() -> None:
        async with http_serving(OnnxRuntime(real_entry, threads=2), max_request_bytes=REAL_LIMIT) as port:
            for endpoint in ENDPOINTS:
                plain = body_of(endpoint, photo, None, real_entry.name)
                label, prob = top_label(endpoint, await post(port, plain, chunked=False))
                assert label in CATS, label
                exact = body_of(endpoint, photo, REAL_LIMIT, real_entry.name)
                assert len(exact.image) > 1.4 * MiB
                for chunked in (False, True):
                    padded = top_label(endpoint, await post(port, exact, chunked=chunked))
                    assert padded[0] == label and padded[1] == pytest.approx(prob, abs=1e-5), (
                        endpoint,
                        padded,
                    )
                over = body_of(endpoint, photo, REAL_LIMIT + 1, real_entry.name)
                answer = await post(port, over, chunked=False)
                assert_body_too_large(endpoint, answer, REAL_LIMIT, declared=REAL_LIMIT + 1)

    run(scenario(), timeout_s=60)


# --- gRPC messages of an exact size ---------------------------------------------------------------


def message_of(build: Callable[[bytes], Message], png: bytes, target: int) -> Message:
    """`build(png padded)` whose serialized size is exactly `target` bytes."""
    message = build(fill(png, lambda padded: build(padded).ByteSize(), target))
    assert message.ByteSize() == target
    return message


def assert_message_too_large(message: str, size: int, limit: int) -> None:
    for fragment in (SIZE_SETTING, f"is {size:,} bytes", f"limit is {limit:,} bytes"):
        assert fragment in message, (fragment, message)


def v2_top(response: object) -> tuple[str, float]:
    raw = response.raw_output_contents[0]  # type: ignore[attr-defined]
    (length,) = struct.unpack("<I", raw[:4])
    score, _, label = raw[4 : 4 + length].decode().split(":", 2)
    return label, float(score)


def test_grpc_message_of_exactly_the_limit_is_served_and_one_byte_more_is_refused(
    fake_entry: ModelEntry,
) -> None:
    limit = FAKE_LIMIT
    builders: dict[str, Callable[[bytes], Message]] = {
        "Predict": lambda image: v1.PredictRequest(image=image, topk=3),
        "PredictBatch": lambda image: v1.PredictBatchRequest(images=[image], topk=3),
        "PredictStream": lambda image: v1.Frame(image=image, frame_id=42, topk=3),
        "ModelInfer": lambda image: image_request(image, classification=1),
        "ModelStreamInfer": lambda image: image_request(image, classification=1),
    }

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry), grpc_settings={"max_message_bytes": limit}) as served:
            stub, v2 = served.stub, v2_stub(served)
            for method, build in builders.items():
                exact, over = message_of(build, PNG, limit), message_of(build, PNG, limit + 1)
                if method == "Predict":
                    assert_good(await stub.Predict(exact), 3)
                    error = await rpc_error(stub.Predict(over))
                    assert_status(error, StatusCode.RESOURCE_EXHAUSTED)
                    assert_message_too_large(error.details() or "", limit + 1, limit)
                    # compressed on the wire: the limit is on the message, not on what was sent
                    assert_good(await stub.Predict(exact, compression=grpc.Compression.Gzip), 3)
                    error = await rpc_error(stub.Predict(over, compression=grpc.Compression.Gzip))
                elif method == "PredictBatch":
                    assert_good((await stub.PredictBatch(exact)).results[0].result, 3)
                    error = await rpc_error(stub.PredictBatch(over))
                elif method == "ModelInfer":
                    assert v2_top(await v2.ModelInfer(exact))[0] == TOP
                    error = await rpc_error(v2.ModelInfer(over))
                elif method == "PredictStream":
                    good, bad = await stream(served, [exact, over])
                    assert (good.frame_id, good.topk[0].label, good.HasField("error")) == (42, TOP, False)
                    assert bad.error.code == "payload_too_large" and not bad.topk
                    assert_message_too_large(bad.error.message, limit + 1, limit)
                    continue
                else:
                    good, bad = [a async for a in v2.ModelStreamInfer(iter([exact, over]))]
                    assert good.error_message == "" and v2_top(good.infer_response)[0] == TOP
                    assert_message_too_large(bad.error_message, limit + 1, limit)
                    continue
                assert_status(error, StatusCode.RESOURCE_EXHAUSTED)
                assert_message_too_large(error.details() or "", limit + 1, limit)

    run(scenario())


def test_grpc_server_starts_and_serves_at_the_largest_message_limit_allowed(fake_entry: ModelEntry) -> None:
    # NOTE: the transport takes up to 2x the setting; 2x its largest value (1 GiB) overflowed gRPC's
    # C int channel argument and the server could not start (OverflowError)
    (largest,) = (m.le for m in GrpcSettings.model_fields["max_message_bytes"].metadata if hasattr(m, "le"))
    image = pad_png(PNG, 5 * MiB)  # over gRPC's own 4 MiB default

    async def scenario() -> None:
        async with serving(FakeRuntime(fake_entry), grpc_settings={"max_message_bytes": largest}) as served:
            assert_good(await served.stub.Predict(v1.PredictRequest(image=image)))

    run(scenario())


def test_grpc_answer_over_the_limit_is_refused_naming_the_setting(tmp_path: Path) -> None:
    # NOTE: the server sends at most VISION_GRPC_MAX_MESSAGE_BYTES too: 300 classes with topk=300
    # are ~7 KB, over a 4,096-byte limit, from a request of ~100 bytes
    entry = write_fake_entry(tmp_path, classes=300)
    limit = 4096
    small, large = {"topk": 5}, {"topk": 300}

    def assert_refused(message: str) -> None:
        for fragment in ("the response would be", f"limit is {limit:,} bytes", SIZE_SETTING):
            assert fragment in message, (fragment, message)

    async def scenario() -> None:
        async with serving(FakeRuntime(entry), grpc_settings={"max_message_bytes": limit}) as served:
            stub, v2 = served.stub, v2_stub(served)
            assert len((await stub.Predict(v1.PredictRequest(image=PNG, **small))).topk) == 5
            error = await rpc_error(stub.Predict(v1.PredictRequest(image=PNG, **large)))
            assert_status(error, StatusCode.RESOURCE_EXHAUSTED, "topk")
            assert_refused(error.details() or "")
            error = await rpc_error(stub.PredictBatch(v1.PredictBatchRequest(images=[PNG, PNG], **large)))
            assert_status(error, StatusCode.RESOURCE_EXHAUSTED, "fewer images")
            assert_refused(error.details() or "")
            frames = [v1.Frame(image=PNG, frame_id=i, **kind) for i, kind in enumerate((small, large, small))]
            answers = await stream(served, frames)
            assert [(a.frame_id, len(a.topk)) for a in answers] == [(0, 5), (1, 0), (2, 5)]
            assert answers[1].error.code == "payload_too_large"
            assert_refused(answers[1].error.message)
            good, bad = image_request(PNG, classification=5), image_request(PNG, classification=300)
            assert (await v2.ModelInfer(good)).raw_output_contents
            error = await rpc_error(v2.ModelInfer(bad))
            assert_status(error, StatusCode.RESOURCE_EXHAUSTED, "fewer outputs")
            assert_refused(error.details() or "")
            answers = [a async for a in v2.ModelStreamInfer(iter([good, bad, good]))]
            assert [a.error_message == "" for a in answers] == [True, False, True]
            assert_refused(answers[1].error_message)
            assert len((await stub.Predict(v1.PredictRequest(image=PNG, **small))).topk) == 5

    run(scenario())


@pytest.mark.real_model
def test_grpc_real_photo_padded_to_the_limit_classifies_as_the_photo(real_entry: ModelEntry) -> None:
    from visionserve.runtimes.onnx import OnnxRuntime

    photo = photo_bytes("chelsea.png")

    async def scenario() -> None:
        runtime = OnnxRuntime(real_entry, threads=2)
        async with serving(runtime, grpc_settings={"max_message_bytes": REAL_LIMIT}) as served:
            stub, v2 = served.stub, v2_stub(served)
            plain = await stub.Predict(v1.PredictRequest(image=photo))
            assert plain.prediction in CATS, plain.prediction

            def predict(image: bytes) -> Message:
                return v1.PredictRequest(image=image)

            exact = await stub.Predict(message_of(predict, photo, REAL_LIMIT))
            assert exact.prediction == plain.prediction
            assert exact.probability == pytest.approx(plain.probability, abs=1e-5)
            error = await rpc_error(stub.Predict(message_of(predict, photo, REAL_LIMIT + 1)))
            assert_status(error, StatusCode.RESOURCE_EXHAUSTED)
            assert_message_too_large(error.details() or "", REAL_LIMIT + 1, REAL_LIMIT)

            def infer(image: bytes) -> Message:
                request = image_request(image, classification=1)
                request.model_name = real_entry.name
                return request

            label, score = v2_top(await v2.ModelInfer(message_of(infer, photo, REAL_LIMIT)))
            assert label == plain.prediction and score == pytest.approx(plain.probability, abs=1e-5)
            error = await rpc_error(v2.ModelInfer(message_of(infer, photo, REAL_LIMIT + 1)))
            assert_status(error, StatusCode.RESOURCE_EXHAUSTED)
            assert_message_too_large(error.details() or "", REAL_LIMIT + 1, REAL_LIMIT)

    run(scenario(), timeout_s=60)


# --- pixels ---------------------------------------------------------------------------------------


def test_image_of_exactly_the_pixel_limit_is_served_and_one_pixel_more_is_refused(
    fake_entry: ModelEntry,
) -> None:
    exact = encode(Image.new("RGB", (100, 100), (200, 30, 30)))  # 10,000 pixels
    over = encode(Image.new("RGB", (137, 73), (200, 30, 30)))  # 10,001 pixels
    limit = {"max_image_pixels": 10_000}
    fragments = (PIXELS_SETTING, "137x73 = 10,001 pixels", "limit is 10,000 pixels")

    async def scenario() -> None:
        async with http_serving(FakeRuntime(fake_entry), **limit) as port:
            for endpoint in ENDPOINTS:
                answer = await post(port, body_of(endpoint, exact, None, "fake"), chunked=False)
                assert top_label(endpoint, answer)[0] == TOP
                answer = await post(port, body_of(endpoint, over, None, "fake"), chunked=False)
                assert answer.status == 413, answer
                error = answer.json()["error"]
                message = error if endpoint == "v2" else error["message"]  # type: ignore[index]
                assert all(fragment in message for fragment in fragments), message
        async with serving(FakeRuntime(fake_entry), **limit) as served:
            assert_good(await served.stub.Predict(v1.PredictRequest(image=exact)))
            error = await rpc_error(served.stub.Predict(v1.PredictRequest(image=over)))
            assert_status(error, StatusCode.RESOURCE_EXHAUSTED, *fragments)
            assert v2_top(await v2_stub(served).ModelInfer(image_request(exact, classification=1)))[0] == TOP
            error = await rpc_error(v2_stub(served).ModelInfer(image_request(over, classification=1)))
            assert_status(error, StatusCode.RESOURCE_EXHAUSTED, *fragments)

    run(scenario())
