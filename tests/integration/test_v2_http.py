"""The Open Inference Protocol's HTTP routes over the fake runtimes (in-process, lifespan running):
routes, readiness, the error shape, compression limits, deadlines, metrics, and batching, where the
fake runtime makes each answer checkable (FakeRuntime scores class j as j * (1 + 0.1 * mean of the
input), so a row computed from another request's data is visibly wrong).
"""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.fixtures import FAKE_CLASSES, FakeRuntime, SlowRuntime
from tests.integration.test_grpc import CountingSlowRuntime
from tests.integration.test_http_api import FAKE, _metrics
from tests.integration.test_http_bad_input import GOOD_IMAGE
from visionserve.repository import ModelEntry
from visionserve.v2.codec import pack_bytes
from visionserve.v2.rest import HEADER_LENGTH

SHAPE = (3, 32, 32)
INFER = "/v2/models/fake/infer"
RAMP = np.arange(FAKE_CLASSES, dtype=np.float32)


def expected_logits(value: float) -> np.ndarray:
    """FakeRuntime's scores for a constant input tensor of `value`."""
    return RAMP * (1.0 + 0.1 * value)


def constant_batch(*values: float) -> np.ndarray:
    return np.stack([np.full(SHAPE, v, dtype=np.float32) for v in values])


def binary_request(
    batch: np.ndarray, *, shape: list[int] | None = None, extra: bytes = b""
) -> tuple[bytes, dict]:
    """A binary-extension request for the FP32 input; `shape` and `extra` make it lie about its data."""
    raw = batch.astype("<f4").tobytes() + extra
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": shape or list(batch.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + raw, {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}


def logits_of(response: object) -> np.ndarray:
    """The binary `logits` output of a response, shaped as it says."""
    length = int(response.headers[HEADER_LENGTH])  # type: ignore[attr-defined]
    content = response.content  # type: ignore[attr-defined]
    (output,) = json.loads(content[:length])["outputs"]
    return np.frombuffer(content[length:], "<f4").reshape(output["shape"])


def assert_v2_error(response: object, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    for fragment in fragments:
        assert fragment in body["error"], body
    assert "Traceback" not in body["error"] and "secret" not in body["error"]
    return str(body["error"])


def test_routes(fake_client: TestClient) -> None:
    assert fake_client.get("/v2").json()["name"] == "visionserve"
    assert fake_client.get("/v2/health/live").status_code == 200
    assert fake_client.get("/v2/health/ready").status_code == 200
    for prefix in ("/v2/models/fake", "/v2/models/fake/versions/1"):
        assert fake_client.get(prefix).json()["name"] == "fake"
        assert fake_client.get(f"{prefix}/ready").status_code == 200
        assert fake_client.get(f"{prefix}/config").json()["max_batch_size"] == 8
        assert fake_client.get(f"{prefix}/stats").json()["model_stats"][0]["name"] == "fake"
    assert fake_client.get("/v2/models/stats").json()["model_stats"][0]["name"] == "fake"
    assert_v2_error(fake_client.get("/v2/models/fake/versions/2"), 404, "no version '2'")
    assert_v2_error(fake_client.get("/v2/models/other/ready"), 404, "'other' is not served here")
    assert_v2_error(fake_client.get("/v2/no/such/route"), 404)
    assert_v2_error(fake_client.get(INFER), 405)
    # the project's own API keeps its own error shape
    assert fake_client.get("/no/such/route").json()["error"]["code"] == "not_found"


def test_readiness_while_loading(fake_entry: ModelEntry, app_client: Callable[..., TestClient]) -> None:
    client = app_client(SlowRuntime(fake_entry, load_s=0.5), ready=False)
    assert client.get("/v2/health/live").status_code == 200
    assert_v2_error(client.get("/v2/health/ready"), 503, "not ready")
    assert_v2_error(client.get("/v2/models/fake/ready"), 503, "not ready")
    assert_v2_error(client.post(INFER, json={"inputs": []}), 503, "not ready")
    deadline = time.monotonic() + 10
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.get("/v2/models/fake/ready").status_code == 200


def test_json_and_binary_inference(fake_client: TestClient) -> None:
    batch = constant_batch(0.5, -1.0)
    response = fake_client.post(
        INFER,
        json={
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": list(batch.shape), "data": batch.tolist()}
            ]
        },
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    logits, probabilities = response.json()["outputs"]
    np.testing.assert_allclose(
        np.reshape(logits["data"], logits["shape"]), [expected_logits(0.5), expected_logits(-1.0)], rtol=1e-6
    )
    assert np.sum(probabilities["data"]) == pytest.approx(2.0)
    body, headers = binary_request(batch)
    response = fake_client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(logits_of(response), [expected_logits(0.5), expected_logits(-1.0)], rtol=1e-6)


def test_images_binary_and_base64(fake_client: TestClient) -> None:
    raw = pack_bytes([GOOD_IMAGE, GOOD_IMAGE])
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [2, 1],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    response = fake_client.post(INFER, content=header + raw, headers={HEADER_LENGTH: str(len(header))})
    assert response.status_code == 200, response.text
    assert [o["shape"] for o in response.json()["outputs"]] == [[2, FAKE_CLASSES]] * 2
    text = base64.b64encode(GOOD_IMAGE).decode()
    response = fake_client.post(
        INFER,
        json={
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [f"data:image/png;base64,{text}"],
                }
            ]
        },
    )
    assert response.status_code == 200, response.text
    bad = fake_client.post(
        INFER, json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [text, "%%%"]}]}
    )
    assert_v2_error(bad, 400, "`image[1]` is not valid base64")


def test_gzip_body_and_the_limit_on_what_it_inflates_to(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    client = app_client(FakeRuntime(fake_entry), max_request_bytes=64 * 1024)
    batch = constant_batch(2.0)
    body, headers = binary_request(batch)
    response = client.post(
        INFER, content=gzip.compress(body), headers={**headers, "Content-Encoding": "gzip"}
    )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(logits_of(response), [expected_logits(2.0)], rtol=1e-6)
    bomb = gzip.compress(b" " * (16 * 1024 * 1024))  # 16 MiB of JSON whitespace in ~16 KB
    assert len(bomb) < 64 * 1024
    response = client.post(INFER, content=bomb, headers={"Content-Encoding": "gzip"})
    assert_v2_error(response, 413, "decompresses to more than 65,536 bytes", "VISION_MAX_REQUEST_BYTES")
    assert_v2_error(
        client.post(INFER, content=b"{}", headers={"Content-Encoding": "br"}), 415, "not supported"
    )
    # a declared Content-Length over the limit is refused before the app runs, in V2's shape too
    too_big = client.post(INFER, content=b" " * (64 * 1024 + 1))
    assert_v2_error(too_big, 413, "65,537 bytes", "VISION_MAX_REQUEST_BYTES")
    own = client.post("/predict", content=b" " * (64 * 1024 + 1))  # the own API keeps its shape
    assert own.status_code == 413 and own.json()["error"]["code"] == "payload_too_large"


def test_mis_sized_tensors_never_reach_a_batch(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    runtime = CountingSlowRuntime(fake_entry, batch_s=0.3)
    client = app_client(runtime)
    lies = [
        binary_request(constant_batch(1.0), extra=b"\x00\x00\x00\x00"),  # one float too many
        binary_request(constant_batch(1.0, 2.0), shape=[1, *SHAPE]),  # a second image undeclared
        binary_request(constant_batch(1.0), shape=[2, *SHAPE]),  # a second image missing
    ]
    for body, headers in lies:
        assert_v2_error(client.post(INFER, content=body, headers=headers), 400, "input 'input'")
    assert runtime.started == 0


def test_concurrent_v2_and_own_api_requests_share_a_batch_and_each_gets_its_own_answer(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    """Requests of both APIs queue behind a busy instance and are computed in one batch; each V2
    request gets back exactly the rows of its own data (a mis-sized one among them is refused
    before it is queued and shifts nothing: Triton server#7171)."""
    runtime = CountingSlowRuntime(fake_entry, batch_s=0.3)
    client = app_client(runtime)
    values = {"a": (1.0, 2.0), "b": (3.0,), "c": (-4.0, 5.0, 6.0)}

    def v2(values: tuple[float, ...]) -> object:
        body, headers = binary_request(constant_batch(*values))
        return client.post(INFER, content=body, headers=headers)

    def mis_sized() -> object:
        body, headers = binary_request(constant_batch(7.0), extra=b"\x00" * 4)
        return client.post(INFER, content=body, headers=headers)

    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(v2, (0.0,))  # computed at once, holding the only instance for 0.3 s
        deadline = time.monotonic() + 5
        while runtime.started == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        futures = {name: pool.submit(v2, v) for name, v in values.items()}
        bad = pool.submit(mis_sized)
        own = pool.submit(lambda: client.post("/predict/file", files={"file": ("r.png", GOOD_IMAGE)}))
        responses = {name: future.result(timeout=20) for name, future in futures.items()}
        assert first.result(timeout=20).status_code == 200
        assert_v2_error(bad.result(timeout=20), 400, "needs 12,288 bytes; 12,292 were sent")
        assert own.result(timeout=20).status_code == 200
    for name, response in responses.items():
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(logits_of(response), [expected_logits(v) for v in values[name]], rtol=1e-6)
    sizes = [shape[0] for shape in runtime.batches[1:]]  # after the warm-up
    assert sizes[0] == 1 and sum(sizes) == 1 + 6 + 1, sizes
    assert max(sizes) >= 4, sizes  # the queued rows of both APIs went in together
    samples = _metrics(client)
    ok = (
        ("endpoint", "/v2/models/{model_name}/infer"),
        ("model", "fake"),
        ("protocol", "http"),
        ("status", "200"),
    )
    bad_request = (
        ("endpoint", "/v2/models/{model_name}/infer"),
        ("model", "fake"),
        ("protocol", "http"),
        ("status", "400"),
    )
    assert samples[("visionserve_requests_total", ok)] == 4
    assert samples[("visionserve_requests_total", bad_request)] == 1
    assert samples[("visionserve_batch_size_sum", FAKE)] == 8
    assert samples[("visionserve_batch_size_count", FAKE)] < 8


def test_a_v2_request_whose_timeout_passes_while_queued_gets_504_and_is_never_computed(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    runtime = CountingSlowRuntime(fake_entry, batch_s=0.4)
    client = app_client(runtime)
    body, headers = binary_request(constant_batch(1.0))
    late = json.loads(body[: int(headers[HEADER_LENGTH])])
    late["parameters"] = {"timeout": 50_000}  # microseconds, as tritonclient sends it
    late_header = json.dumps(late).encode()
    late_body = late_header + body[int(headers[HEADER_LENGTH]) :]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: client.post(INFER, content=body, headers=headers))
        while runtime.started == 0:
            time.sleep(0.005)
        response = client.post(INFER, content=late_body, headers={HEADER_LENGTH: str(len(late_header))})
        assert first.result(timeout=10).status_code == 200
    assert_v2_error(response, 504, "deadline passed")
    assert runtime.started == 1
    assert_v2_error(
        client.post(INFER, content=body, headers={**headers, "X-Request-Timeout": "soon"}),
        400,
        "X-Request-Timeout",
    )


def test_a_request_larger_than_the_queue_is_a_400_naming_the_setting(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    client = app_client(FakeRuntime(fake_entry), max_queue_size=2)
    body, headers = binary_request(constant_batch(1.0, 2.0, 3.0))
    assert_v2_error(
        client.post(INFER, content=body, headers=headers), 400, "3 images", "VISION_MAX_QUEUE_SIZE"
    )
    body, headers = binary_request(constant_batch(1.0, 2.0))
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200
    np.testing.assert_allclose(logits_of(response), [expected_logits(1.0), expected_logits(2.0)], rtol=1e-6)


def test_the_docs_example_works_when_executed(fake_client: TestClient) -> None:
    spec = fake_client.get("/openapi.json").json()
    operation = spec["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert "X-Request-Timeout" in [p["name"] for p in operation["parameters"]]
    (example,) = operation["requestBody"]["content"]["application/json"]["examples"].values()
    response = fake_client.post(INFER, json=example["value"])
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [1, 3]


def test_tritonclient_async_requests_are_batched_and_each_gets_its_own_answer(fake_entry: ModelEntry) -> None:
    """An unmodified tritonclient.http against uvicorn: requests sent together while the instance
    is busy are computed in one batch (so says /metrics), and each gets the rows of its own data."""
    import gevent
    import tritonclient.http as httpclient
    from prometheus_client.parser import text_string_to_metric_families

    from tests.integration.v2_servers import http_serving

    runtime = CountingSlowRuntime(fake_entry, batch_s=0.3)
    with http_serving(runtime) as served:
        client = httpclient.InferenceServerClient(served.url, concurrency=8)
        try:

            def send(*values: float) -> object:
                tensor = httpclient.InferInput("input", [len(values), *SHAPE], "FP32")
                tensor.set_data_from_numpy(constant_batch(*values))
                return client.async_infer(
                    "fake", [tensor], outputs=[httpclient.InferRequestedOutput("logits")]
                )

            first = send(0.0)
            deadline = time.monotonic() + 30  # generous: a loaded 2-core machine starts slowly
            while runtime.started == 0:
                assert time.monotonic() < deadline
                # NOTE: tritonclient.http's async requests run in gevent greenlets: waiting must
                # yield to gevent's hub, or the request may not be sent until get_result().
                gevent.sleep(0.005)
            values = [(1.0,), (2.0, 3.0), (-4.0,), (5.0, 6.0, 7.0)]
            pending = [send(*v) for v in values]
            first.get_result(timeout=10)
            for request, v in zip(pending, values, strict=True):
                logits = request.get_result(timeout=10).as_numpy("logits")
                np.testing.assert_allclose(logits, [expected_logits(x) for x in v], rtol=1e-6)
        finally:
            client.close()
        status, text = served.get("/metrics")
    assert status == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }
    assert samples[("visionserve_batch_size_sum", FAKE)] == 1 + 7
    # the first alone, then the rest together (all 7 rows, unless one was slow to arrive)
    assert samples[("visionserve_batch_size_count", FAKE)] <= 3
    assert max(shape[0] for shape in runtime.batches) >= 4
    ok = (
        ("endpoint", "/v2/models/{model_name}/infer"),
        ("model", "fake"),
        ("protocol", "http"),
        ("status", "200"),
    )
    assert samples[("visionserve_requests_total", ok)] == 5


def test_the_advertised_max_batch_size_is_the_one_served(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    client = app_client(
        FakeRuntime(fake_entry), max_batch_size=2
    )  # VISION_MAX_BATCH_SIZE below the model's 8
    assert client.get("/v2/models/fake/config").json()["max_batch_size"] == 2
    body, headers = binary_request(constant_batch(1.0, 2.0, 3.0))
    assert_v2_error(
        client.post(INFER, content=body, headers=headers), 400, "a batch of 3 is over", "max_batch_size 2"
    )


def test_the_http_app_needs_neither_grpc_nor_protobuf() -> None:
    """The HTTP deployables install neither (requirements/serve.txt): the V2 routes must not pull
    them in."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = (
        "import sys, tempfile; from pathlib import Path; from tests.fixtures import FakeRuntime, "
        "write_fake_entry, app_of; from visionserve.settings "
        "import ServerSettings; app_of(ServerSettings(), FakeRuntime(write_fake_entry(Path("
        "tempfile.mkdtemp())))); print(sorted(m for m in ('grpc', 'google.protobuf') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
