"""Refusals answered by the HTTP protocol before the app (issue 15), against real uvicorn servers on
loopback with the project's configuration (`uvicorn_config`): the answer is the route's byte for
byte (the same request to a server with VISION_EARLY_REFUSAL off gets the same bytes, but for the
`date`), counted in the same metrics; it comes before the body is read, the connection stays open
for the next request, the API key is checked first, and every request the app would answer
otherwise (another status, an admitted request, a model named only in a JSON body on a server of
several) still reaches the app."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures import FailingRuntime, FakeRuntime, app_of, write_fake_entry
from tests.integration.test_http_bad_input import GOOD_IMAGE
from visionserve.http.server import bind, uvicorn_config
from visionserve.runtimes.base import ModelRuntime
from visionserve.serving.lifecycle import ServiceState
from visionserve.serving.registry import AnyModel, ModelRegistry
from visionserve.settings import SecuritySettings, ServerSettings

KEY = "k" * 32
MAX_BYTES = 16 * 2**20
IMAGE = base64.b64encode(GOOD_IMAGE).decode()
COUNTED = (
    "visionserve_requests_total",
    "visionserve_rejected_total",
    "visionserve_request_latency_seconds_count",
)
"""The metrics a refusal moves (compared across the two paths)."""
QUEUE_FULL = ("visionserve_rejected_total", (("model", "fake"), ("reason", "queue_full")))


def run(scenario: Coroutine[Any, Any, None], timeout_s: float = 60.0) -> None:
    """One scenario in a fresh event loop, bounded so that a hang fails instead of stalling."""

    async def bounded() -> None:
        await asyncio.wait_for(scenario, timeout_s)

    asyncio.run(bounded())


@dataclass
class Served:
    """A running server: its port, registry, and the paths of the requests that reached the app."""

    port: int
    registry: ModelRegistry
    reached: list[str] = field(default_factory=list)

    def model(self, name: str | None = None) -> AnyModel:
        return self.registry.get(name)

    def inference_reached(self) -> int:
        """Requests that reached the app, but the health checks `exchange` probes with."""
        return sum(path != "/health/live" for path in self.reached)

    def counted(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = self.registry.metrics.render()[0].decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name in COUNTED
        }


@contextlib.asynccontextmanager
async def serving(
    runtimes: Iterable[ModelRuntime], *, early: bool, api_key: str | None = None, **settings: Any
) -> AsyncIterator[Served]:
    """The app over `runtimes`, served by uvicorn as `serve` does, on 127.0.0.1:0; the app's own
    entry records every HTTP request that reaches it."""
    server_settings = ServerSettings(
        host="127.0.0.1", port=0, early_refusal=early, max_request_bytes=MAX_BYTES, **settings
    )
    app = app_of(server_settings, *runtimes, api_key=api_key)
    registry = app.state.registry
    config = uvicorn_config(app, registry, server_settings, SecuritySettings())
    config.load()
    served = Served(0, registry)
    inner = config.loaded_app

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            served.reached.append(scope["path"])
        await inner(scope, receive, send)

    config.loaded_app = recording
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started or any(
            m.state in (ServiceState.CREATED, ServiceState.LOADING) for m in registry
        ):
            await asyncio.sleep(0.01)
        served.port = sock.getsockname()[1]
        yield served
    finally:
        server.should_exit = True
        await task


def fill(model: AnyModel) -> None:
    """The model's queue counts as full: as many requests as it holds are being decoded for it."""
    model.admission.preparing = model.batcher.max_queue_size  # type: ignore[union-attr]


def empty(model: AnyModel) -> None:
    model.admission.preparing = 0  # type: ignore[union-attr]


# --- raw HTTP -------------------------------------------------------------------------------------


def request(
    method: str,
    target: str,
    body: bytes = b"",
    *,
    headers: dict[str, str] | None = None,
    version: str = "1.1",
    length: int | None = None,
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if method == "POST" and "Transfer-Encoding" not in (headers or {}):
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_body(**fields: object) -> bytes:
    return json.dumps({"image": IMAGE, **fields}).encode()


def v2_body() -> bytes:
    return json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [IMAGE]}]}
    ).encode()


def multipart_body() -> tuple[bytes, dict[str, str]]:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + GOOD_IMAGE + b"\r\n--b--\r\n"
    )
    return body, {"Content-Type": "multipart/form-data; boundary=b"}


MULTIPART, MULTIPART_HEADERS = multipart_body()


def upload(target: str) -> bytes:
    """A multipart upload of a small image to `target`."""
    return request("POST", target, MULTIPART, headers=MULTIPART_HEADERS)


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One whole answer: its head and its body (Content-Length, or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    found = re.search(rb"\r\ncontent-length: (\d+)\r\n", head, re.IGNORECASE)
    if found is not None:
        return head + await reader.readexactly(int(found[1]))
    if re.search(rb"\r\ntransfer-encoding: chunked\r\n", head, re.IGNORECASE):
        body = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:size]
        await reader.readline()
        return head + body
    return head


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def without_date(answer: bytes) -> bytes:
    return re.sub(rb"\r\ndate: [^\r]*", b"\r\ndate: -", answer)


def body_of(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


PROBE = b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n"


async def exchange(port: int, data: bytes, *, probe: bool = True) -> tuple[bytes, bool | None]:
    """Send `data` on a fresh connection; the answer, and (`probe`: with a health check sent next
    on the same connection) whether the server closed the connection after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        answer = await asyncio.wait_for(read_answer(reader), 10)
        if not probe:
            return answer, None
        try:
            writer.write(PROBE)
            follow = await asyncio.wait_for(read_answer(reader), 10)
        except (asyncio.IncompleteReadError, ConnectionError):
            return answer, True
        assert status(follow) == 200, follow
        return answer, False
    finally:
        writer.close()


# --- the same answer, the same counts -------------------------------------------------------------

REFUSED = {
    "JSON, model in the query": request("POST", "/predict?model=fake", json_body()),
    "JSON, the only model": request("POST", "/predict", json_body()),
    "JSON b64": request("POST", "/predict/b64?model=fake", json.dumps({"image_base64": IMAGE}).encode()),
    "multipart": upload("/predict/file?model=fake&topk=3&score_threshold=0.25&classes=a,b&unknown=x"),
    "multipart, default model": upload("/predict/file"),
    "V2": request("POST", "/v2/models/fake/infer", v2_body()),
    "V2 versioned": request("POST", "/v2/models/fake/versions/1/infer", v2_body()),
    "V2, version in the query": request("POST", "/v2/models/fake/infer?model_version=1", v2_body()),
    "HTTP/1.0": request("POST", "/predict?model=fake", json_body(), version="1.0"),
    "Connection: close": request("POST", "/predict?model=fake", json_body(), headers={"Connection": "close"}),
    "a valid X-Request-Timeout": request(
        "POST", "/predict", json_body(), headers={"X-Request-Timeout": "2.5"}
    ),
    "chunked": request(
        "POST", "/predict?model=fake", chunked(json_body()), headers={"Transfer-Encoding": "chunked"}
    ),
    "Expect: 100-continue": request("POST", "/predict", json_body(), headers={"Expect": "100-continue"}),
}
"""Requests the route refuses before reading their body when the queue is full."""

FILE = "/predict/file?model=fake"
ANSWERED_BY_THE_APP = {
    "413, Content-Length over the limit": request("POST", "/predict", length=MAX_BYTES + 1),
    "400, a bad X-Request-Timeout": request(
        "POST", "/predict", json_body(), headers={"X-Request-Timeout": "soon"}
    ),
    "404, unknown model": request("POST", "/predict?model=nope", json_body()),
    "404, unknown multipart model": upload("/predict/file?model=nope"),
    "404, V2 unknown model": request("POST", "/v2/models/nope/infer", v2_body()),
    "404, V2 unknown version": request("POST", "/v2/models/fake/versions/9/infer", v2_body()),
    "404, V2 unknown version in the query": request(
        "POST", "/v2/models/fake/infer?model_version=9", v2_body()
    ),
    "422, topk=0": upload(f"{FILE}&topk=0"),
    "422, topk=abc": upload(f"{FILE}&topk=abc"),
    "422, topk empty": upload(f"{FILE}&topk="),
    "422, score_threshold=2": upload(f"{FILE}&score_threshold=2"),
    "422, max_faces=1.5": upload(f"{FILE}&max_faces=1.5"),
    "unusual, topk=5.0 (FastAPI takes it: the route refuses it)": upload(f"{FILE}&topk=5.0"),
    "405": request("GET", "/predict"),
    "health": request("GET", "/health/ready"),
    "V2 health": request("GET", "/v2/health/ready"),
    "a trailing slash": request("POST", "/predict/", json_body()),
    "another POST route": request("POST", "/v2/repository/index", b"{}"),
}
"""Requests that the app answers otherwise (or may: the protocol's checks are conservative),
however full the queue: left to the app."""


def test_a_refusal_is_the_routes_answer_byte_for_byte_and_counted_the_same(tmp_path: Any) -> None:
    async def scenario() -> None:
        async with (
            serving([FakeRuntime(write_fake_entry(tmp_path / "a"))], early=False) as app_path,
            serving([FakeRuntime(write_fake_entry(tmp_path / "b"))], early=True) as early_path,
        ):
            fill(app_path.model())
            fill(early_path.model())
            for name, data in {**REFUSED, **ANSWERED_BY_THE_APP}.items():
                reached = early_path.inference_reached()
                probe = not name.startswith("413")  # the server waits for that body: no next request
                expected, expected_closed = await exchange(app_path.port, data, probe=probe)
                answer, closed = await exchange(early_path.port, data, probe=probe)
                assert without_date(answer) == without_date(expected), name
                assert closed == expected_closed, name
                if name in REFUSED:
                    assert status(answer) == 503 and b"\r\nretry-after: 1\r\n" in answer, (name, answer)
                    error = body_of(answer)["error"]
                    if name.startswith("V2"):  # the Open Inference Protocol's shape
                        assert isinstance(error, str) and "at capacity" in error, name
                    else:
                        assert error["code"] == "overloaded" and "at capacity" in error["message"], name
                    assert early_path.inference_reached() == reached, f"{name}: reached the app"
                    assert closed == (name in ("HTTP/1.0", "Connection: close")), name
                else:
                    assert name.startswith("unusual") or status(answer) != 503, (name, answer)
                    assert early_path.inference_reached() == reached + 1, f"{name}: answered before the app"
            assert early_path.counted() == app_path.counted()
            counted = early_path.counted()
            refusals = len(REFUSED) + 1  # and topk=5.0's, by the route
            assert counted[QUEUE_FULL] == refusals
            endpoint = (("endpoint", "/v2/models/{model_name}/versions/{model_version}/infer"),)
            labels = (*endpoint, ("model", "fake"), ("protocol", "http"), ("status", "503"))
            assert counted[("visionserve_requests_total", labels)] == 1

    run(scenario())


@pytest.mark.parametrize("state", ["failed", "draining", "shutting down"])
def test_not_ready_and_draining_answers_are_the_routes_too(tmp_path: Any, state: str) -> None:
    """Not ready (no Retry-After after a failed load), and during shutdown `Connection: close`
    (CloseWhileDraining's) on a full queue's refusal and on "shutting down"."""

    async def scenario() -> None:
        def runtime(folder: str) -> ModelRuntime:
            entry = write_fake_entry(tmp_path / folder)
            return FailingRuntime(entry, fail_on_load=True) if state == "failed" else FakeRuntime(entry)

        async with (
            serving([runtime("a")], early=False) as app_path,
            serving([runtime("b")], early=True) as early_path,
        ):
            for served in (app_path, early_path):
                fill(served.model())
                if state == "draining":
                    served.registry.begin_shutdown()
                elif state == "shutting down":
                    served.registry.refuse_new_requests()
            for data in (REFUSED["JSON, model in the query"], REFUSED["V2"], REFUSED["multipart"]):
                expected, expected_closed = await exchange(app_path.port, data)
                answer, closed = await exchange(early_path.port, data)
                assert without_date(answer) == without_date(expected)
                assert status(answer) == 503 and closed == expected_closed == (state != "failed")
                assert (b"\r\nretry-after: " in answer) == (state != "failed")
                assert (b"\r\nconnection: close\r\n" in answer) == (state != "failed")
            assert early_path.inference_reached() == 0
            assert early_path.counted() == app_path.counted()

    run(scenario())


# --- before the body, and the connection kept -----------------------------------------------------


def test_the_refusal_comes_before_the_body_and_the_connection_serves_the_next_request(tmp_path: Any) -> None:
    async def scenario() -> None:
        async with serving([FakeRuntime(write_fake_entry(tmp_path))], early=True) as served:
            model = served.model()
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            huge = 12 * 2**20
            for head in (
                request("POST", "/predict?model=fake", length=huge),
                request("POST", "/predict", headers={"Transfer-Encoding": "chunked"}),
            ):
                fill(model)
                started = time.monotonic()
                writer.write(head)  # the headers alone: the body follows only once answered
                answer = await asyncio.wait_for(read_answer(reader), 5)
                assert status(answer) == 503 and body_of(answer)["error"]["code"] == "overloaded"
                assert time.monotonic() - started < 2.0
                if b"chunked" in head:
                    for _ in range(12):
                        writer.write(b"%x\r\n%s\r\n" % (2**20, b"x" * 2**20))
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"x" * huge)  # read and discarded by the server
                await writer.drain()
                empty(model)
                # the same connection: an inference served, and a health check
                writer.write(request("POST", "/predict", json_body()))
                served_answer = await asyncio.wait_for(read_answer(reader), 10)
                assert status(served_answer) == 200, served_answer
                assert body_of(served_answer)["prediction"] == "class_9"
                writer.write(request("GET", "/health/live"))
                assert status(await asyncio.wait_for(read_answer(reader), 10)) == 200
            writer.close()
            assert served.reached == ["/predict", "/health/live"] * 2

    run(scenario())


def test_pipelined_requests_are_answered_in_order(tmp_path: Any) -> None:
    async def scenario() -> None:
        async with serving([FakeRuntime(write_fake_entry(tmp_path))], early=True) as served:
            fill(served.model())
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            refused = REFUSED["JSON, model in the query"]
            writer.write(refused + request("GET", "/health/live") + refused + refused)
            answers = [await asyncio.wait_for(read_answer(reader), 10) for _ in range(4)]
            writer.close()
            assert [status(answer) for answer in answers] == [503, 200, 503, 503]
            assert {body_of(answers[i])["error"]["code"] for i in (0, 2, 3)} == {"overloaded"}
            # the first refused as its headers came; those behind the health check's answer, by the app
            assert served.reached == ["/health/live", "/predict", "/predict"]
            rejected = served.counted()[QUEUE_FULL]
            assert rejected == 3

    run(scenario())


# --- the API key first ----------------------------------------------------------------------------


def test_the_api_key_is_checked_before_the_load_is_told(tmp_path: Any) -> None:
    async def scenario() -> None:
        async with serving([FakeRuntime(write_fake_entry(tmp_path))], early=True, api_key=KEY) as served:
            fill(served.model())
            data = json_body()
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"X-API-Key": "wrong"},
                {"Authorization": KEY},
            ):
                answer, _ = await exchange(
                    served.port, request("POST", "/predict?model=fake", data, headers=headers)
                )
                assert status(answer) == 401 and b"\r\nwww-authenticate: Bearer\r\n" in answer, headers
                assert b"capacity" not in answer
            assert served.inference_reached() == 4
            assert served.counted().get(QUEUE_FULL, 0) == 0
            for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
                for target in ("/predict?model=fake", "/v2/models/fake/infer"):
                    answer, _ = await exchange(served.port, request("POST", target, data, headers=headers))
                    assert status(answer) == 503, answer
            assert served.inference_reached() == 4  # refused before the app
            assert served.counted()[QUEUE_FULL] == 4

    run(scenario())


# --- several models -------------------------------------------------------------------------------


def test_on_a_server_of_several_models_a_model_named_in_the_body_is_left_to_the_route(tmp_path: Any) -> None:
    async def scenario() -> None:
        runtimes = [FakeRuntime(write_fake_entry(tmp_path, name)) for name in ("fake", "other")]
        async with serving(runtimes, early=True) as served:
            fill(served.model("fake"))
            expectations = [
                # (request, status, refused before the app)
                (request("POST", "/predict", json_body(model="other")), 200, False),
                (request("POST", "/predict", json_body(model="fake")), 503, False),  # refused by the route
                (request("POST", "/predict", json_body()), 503, False),  # the default, named by no one
                (request("POST", "/predict?model=fake", json_body()), 503, True),
                (request("POST", "/predict?model=other", json_body()), 200, False),
                (upload("/predict/file"), 503, True),
                (upload("/predict/file?model=other"), 200, False),
                (request("POST", "/v2/models/fake/infer", v2_body()), 503, True),
                (request("POST", "/v2/models/other/infer", v2_body()), 200, False),
            ]
            refusals = []
            for data, expected, early in expectations:
                reached = served.inference_reached()
                answer, _ = await exchange(served.port, data)
                assert status(answer) == expected, (data[:60], answer)
                assert served.inference_reached() == reached + (0 if early else 1), data[:60]
                if expected == 503:
                    refusals.append(without_date(answer))
            project = [r for r in refusals if b'"code":"overloaded"' in r]
            assert len(set(project)) == 1 and len(project) == 4  # the route's and the protocol's alike

    run(scenario())


# --- a flood ----------------------------------------------------------------------------------------


def test_a_flood_of_retries_is_refused_and_counted_and_nothing_is_lost(tmp_path: Any) -> None:
    senders, each = 32, 25

    async def scenario() -> None:
        async with serving([FakeRuntime(write_fake_entry(tmp_path))], early=True) as served:
            fill(served.model())
            data = REFUSED["JSON, model in the query"]

            async def sender() -> list[int]:
                reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
                statuses = []
                for _ in range(each):  # keep-alive, retrying at once
                    writer.write(data)
                    statuses.append(status(await read_answer(reader)))
                writer.close()
                return statuses

            results = await asyncio.gather(*(sender() for _ in range(senders)))
            assert [s for statuses in results for s in statuses] == [503] * (senders * each)
            counted = served.counted()
            assert counted[QUEUE_FULL] == senders * each
            labels = (("endpoint", "/predict"), ("model", "fake"), ("protocol", "http"), ("status", "503"))
            assert counted[("visionserve_requests_total", labels)] == senders * each
            assert served.reached == []
            empty(served.model())
            answer, _ = await exchange(served.port, data)
            assert status(answer) == 200

    run(scenario())
