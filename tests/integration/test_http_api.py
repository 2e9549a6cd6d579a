"""The HTTP API's endpoints and lifecycle, over the fake runtimes (in-process, lifespan running)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import encode, wait_ready
from tests.fixtures import FAKE_CLASSES, FakeRuntime, SlowRuntime, app_of
from visionserve.cpu import available_cpus
from visionserve.repository import ModelEntry

RED = encode(Image.new("RGB", (48, 40), (200, 30, 30)))


def _check_prediction(body: dict[str, object], k: int) -> None:
    topk = body["topk"]
    assert isinstance(topk, list) and len(topk) == k
    assert topk[0]["label"] == body["prediction"] == f"class_{FAKE_CLASSES - 1}"
    assert body["probability"] == topk[0]["prob"]
    probs = [p["prob"] for p in topk]
    assert probs == sorted(probs, reverse=True)
    assert all(0.0 < p <= 1.0 for p in probs)
    assert [p["index"] for p in topk] == list(range(FAKE_CLASSES - 1, FAKE_CLASSES - 1 - k, -1))
    assert body["model"] == "fake"
    assert body["latency_ms"] > 0


def test_predict_json(fake_client: TestClient) -> None:
    response = fake_client.post("/predict", json={"image": base64.b64encode(RED).decode(), "topk": 3})
    assert response.status_code == 200, response.text
    _check_prediction(response.json(), 3)
    assert "preprocess;dur=" in response.headers["server-timing"]


def test_predict_json_default_topk_is_five(fake_client: TestClient) -> None:
    response = fake_client.post("/predict", json={"image": base64.b64encode(RED).decode()})
    assert response.status_code == 200, response.text
    _check_prediction(response.json(), 5)


def test_predict_b64_seed_field_names(fake_client: TestClient) -> None:
    response = fake_client.post(
        "/predict/b64", json={"image_base64": base64.b64encode(RED).decode(), "topk": 2}
    )
    assert response.status_code == 200, response.text
    _check_prediction(response.json(), 2)


def test_predict_file_multipart(fake_client: TestClient) -> None:
    response = fake_client.post("/predict/file?topk=4", files={"file": ("red.png", RED, "image/png")})
    assert response.status_code == 200, response.text
    _check_prediction(response.json(), 4)


def test_predict_all_classes(fake_client: TestClient) -> None:
    response = fake_client.post(
        "/predict/file", params={"topk": FAKE_CLASSES}, files={"file": ("r.png", RED)}
    )
    assert response.status_code == 200
    probs = [p["prob"] for p in response.json()["topk"]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_predict_names_the_served_model(fake_client: TestClient) -> None:
    response = fake_client.post("/predict", json={"image": base64.b64encode(RED).decode(), "model": "fake"})
    assert response.status_code == 200


def test_answers_depend_on_the_image(fake_client: TestClient) -> None:
    dark = encode(Image.new("RGB", (48, 40), (0, 0, 0)))
    light = encode(Image.new("RGB", (48, 40), (255, 255, 255)))
    p_dark = fake_client.post("/predict/file", files={"file": ("d.png", dark)}).json()["probability"]
    p_light = fake_client.post("/predict/file", files={"file": ("l.png", light)}).json()["probability"]
    assert p_dark != p_light


def test_runtime_runs_off_the_event_loop(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    runtime = FakeRuntime(fake_entry)
    client = app_client(runtime)
    assert client.post("/predict/file", files={"file": ("r.png", RED)}).status_code == 200
    assert runtime.threads_seen and all(name.startswith("runtime") for name in runtime.threads_seen)
    assert runtime.batches[-1] == (1, 3, 32, 32)


def test_health_and_models(fake_client: TestClient) -> None:
    assert fake_client.get("/health/live").json() == {"status": "live"}
    assert fake_client.get("/health/ready").status_code == 200
    models = fake_client.get("/models").json()["models"]
    assert models == [
        {
            "name": "fake",
            "version": 1,
            "task": "classification",
            "input_size": [32, 32],
            "labels_count": FAKE_CLASSES,
            "max_batch_size": 8,
            "max_queue_delay_us": 0,
            "max_queue_size": 128,
            "runtime": "fake",
            "compiled": None,
            "device": "cpu",
            "instances": 1,
            "threads": 1,
            "layout": "fixed: 1x1",
            "layout_reason": None,
            "sessions": [{"kind": "fixed", "count": 1, "threads": 1}],
            "preprocess_workers": available_cpus(),
            "ready": True,
            "state": "ready",
            "default": True,
            "parameters": ["topk"],
            "detection": None,
            "landmarks": None,
            "stages": None,
            "faces": None,
        }
    ]


def test_readiness_follows_loading(fake_entry: ModelEntry, app_client: Callable[..., TestClient]) -> None:
    client = app_client(SlowRuntime(fake_entry, load_s=0.5), ready=False)
    assert client.get("/health/live").status_code == 200  # live while loading
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["status"] == "loading"
    busy = client.post("/predict/file", files={"file": ("r.png", RED)})
    assert busy.status_code == 503
    assert busy.json()["error"]["code"] == "not_ready"
    assert int(busy.headers["retry-after"]) > 0
    wait_ready(client, timeout_s=10)
    assert client.post("/predict/file", files={"file": ("r.png", RED)}).status_code == 200


def test_shutdown_closes_the_runtime(fake_entry: ModelEntry) -> None:
    from visionserve.settings import ServerSettings

    runtime = FakeRuntime(fake_entry)
    with TestClient(app_of(ServerSettings(), runtime)) as client:
        wait_ready(client)
        service = client.app.state.registry.default  # type: ignore[attr-defined]
    assert runtime.closed
    assert service.state.value == "stopped"


def test_openapi_examples_work_when_executed(fake_client: TestClient) -> None:
    """The /docs 'Try it out' examples are real images that the API accepts."""
    spec = fake_client.get("/openapi.json").json()
    assert fake_client.get("/docs").status_code == 200
    for path in ("/predict", "/predict/b64"):
        examples = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"]
        for example in examples.values():
            response = fake_client.post(path, json=example["value"])
            assert response.status_code == 200, (path, response.text)


def test_concurrent_requests_all_answered(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = app_client(SlowRuntime(fake_entry, batch_s=0.01))
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda _: client.post("/predict/file", files={"file": ("r.png", RED)}).status_code, range(32)
            )
        )
    assert codes == [200] * 32
    assert time.perf_counter() - started < 30


def test_shutdown_while_loading_is_clean(fake_entry: ModelEntry) -> None:
    from visionserve.settings import ServerSettings

    runtime = SlowRuntime(fake_entry, load_s=0.5)
    with TestClient(app_of(ServerSettings(), runtime)) as client:
        assert client.get("/health/ready").json()["status"] == "loading"
        service = client.app.state.registry.default  # type: ignore[attr-defined]
    assert runtime.closed
    assert service.state.value == "stopped"


def test_concurrent_requests_are_computed_in_one_batch(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    runtime = SlowRuntime(fake_entry, batch_s=0.2)
    client = app_client(runtime)
    with ThreadPoolExecutor(4) as pool:
        codes = list(
            pool.map(
                lambda _: client.post("/predict/file", files={"file": ("r.png", RED)}).status_code, range(4)
            )
        )
    assert codes == [200] * 4
    sizes = client.app.state.registry.default.batcher.batch_sizes  # type: ignore[attr-defined]
    assert max(sizes) >= 2, sizes  # the first ran alone (idle fast path); the rest queued behind it
    assert any(shape[0] >= 2 for shape in runtime.batches)
    # and /metrics says so: fewer batches than requests, at least one batch of 2 or more
    samples = _metrics(client)
    assert samples[("visionserve_batch_size_count", FAKE)] < 4
    assert (
        samples[("visionserve_batch_size_bucket", (("le", "1.0"), ("model", "fake")))]
        < samples[("visionserve_batch_size_count", FAKE)]
    )
    assert samples[("visionserve_batch_size_sum", FAKE)] == 4


FAKE = (("model", "fake"),)


def _metrics(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_count_requests_by_endpoint_and_status(fake_client: TestClient) -> None:
    for _ in range(3):
        assert fake_client.post("/predict/file", files={"file": ("r.png", RED)}).status_code == 200
    assert fake_client.post("/predict/file", files={"file": ("x.png", b"not an image")}).status_code == 400
    assert fake_client.get("/nope").status_code == 404
    samples = _metrics(fake_client)
    ok = (("endpoint", "/predict/file"), ("model", "fake"), ("protocol", "http"), ("status", "200"))
    bad = (("endpoint", "/predict/file"), ("model", "fake"), ("protocol", "http"), ("status", "400"))
    assert samples[("visionserve_requests_total", ok)] == 3
    assert samples[("visionserve_requests_total", bad)] == 1
    unmatched = (("endpoint", "unmatched"), ("model", ""), ("protocol", "http"), ("status", "404"))
    assert samples[("visionserve_requests_total", unmatched)] == 1
    latency = (("endpoint", "/predict/file"), ("model", "fake"), ("protocol", "http"))
    assert samples[("visionserve_request_latency_seconds_count", latency)] == 4
    assert samples[("visionserve_batch_size_sum", FAKE)] == 3  # warm-up batches are not counted
    assert samples[("visionserve_compute_time_seconds_count", FAKE)] == 3
    assert samples[("visionserve_queue_depth", FAKE)] == 0


def test_a_request_whose_timeout_passes_while_queued_gets_504_and_is_never_computed(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    runtime = SlowRuntime(fake_entry, batch_s=0.5)
    client = app_client(runtime)
    warmup = len(runtime.batches)
    batcher = client.app.state.registry.default.batcher  # type: ignore[attr-defined]
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(client.post, "/predict/file", files={"file": ("r.png", RED)})
        while batcher.idle and not busy.done():  # the first holds the runtime for 0.5 s
            time.sleep(0.005)
        late = client.post(
            "/predict",
            json={"image": base64.b64encode(RED).decode()},
            headers={"X-Request-Timeout": "0.1"},
        )
        assert busy.result().status_code == 200
    assert late.status_code == 504, late.text
    assert late.json()["error"]["code"] == "deadline_exceeded"
    assert len(runtime.batches) == warmup + 1  # the late one was dropped from the queue, not computed
    samples = _metrics(client)
    assert samples[("visionserve_rejected_total", (("model", "fake"), ("reason", "deadline")))] == 1
    # with time to spare, the same request is answered
    ok = client.post(
        "/predict", json={"image": base64.b64encode(RED).decode()}, headers={"X-Request-Timeout": "5"}
    )
    assert ok.status_code == 200


def test_the_server_s_request_timeout_applies_when_the_client_sends_none(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    runtime = SlowRuntime(fake_entry, batch_s=0.5)
    client = app_client(runtime, request_timeout_s=0.1)
    warmup = len(runtime.batches)
    batcher = client.app.state.registry.default.batcher  # type: ignore[attr-defined]
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(
            client.post, "/predict/file", files={"file": ("r.png", RED)}, headers={"X-Request-Timeout": "9"}
        )
        while batcher.idle and not busy.done():
            time.sleep(0.005)
        late = client.post("/predict/file", files={"file": ("r.png", RED)})
        first = busy.result()
    assert first.status_code == 200  # found the runtime idle: computed at once
    assert late.status_code == 504, late.text  # no header: the setting's 0.1 s applied
    assert len(runtime.batches) == warmup + 1


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", ""])
def test_a_bad_timeout_header_is_a_clear_400(fake_client: TestClient, value: str) -> None:
    response = fake_client.post(
        "/predict/file", files={"file": ("r.png", RED)}, headers={"X-Request-Timeout": value}
    )
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "X-Request-Timeout" in message and "positive number of seconds" in message


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    runtime = SlowRuntime(fake_entry, batch_s=0.3)
    client = app_client(runtime, max_queue_size=1)
    body = {"image": base64.b64encode(RED).decode()}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: client.post("/predict", json=body), range(8)))
    codes = sorted(r.status_code for r in replies)
    assert set(codes) == {200, 503} and len(codes) == 8  # every request answered, one way or the other
    refused = [r for r in replies if r.status_code == 503]
    assert all(r.headers["Retry-After"] == "1" for r in refused)
    assert all(r.json()["error"]["code"] == "overloaded" for r in refused)
    assert "VISION_MAX_QUEUE_SIZE" in refused[0].json()["error"]["message"]
    samples = _metrics(client)
    assert samples[("visionserve_rejected_total", (("model", "fake"), ("reason", "queue_full")))] == len(
        refused
    )
    assert samples[("visionserve_batch_size_sum", FAKE)] == 8 - len(refused)  # accepted = computed


def test_models_reports_the_batching_in_effect(
    fake_entry: ModelEntry, app_client: Callable[..., TestClient]
) -> None:
    client = app_client(FakeRuntime(fake_entry), max_batch_size=1, max_queue_delay_us=500, max_queue_size=3)
    (model,) = client.get("/models").json()["models"]
    assert (model["max_batch_size"], model["max_queue_delay_us"], model["max_queue_size"]) == (1, 500, 3)
