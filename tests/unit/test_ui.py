"""The upload UI's pieces, fast: Flask's test client over a fake HTTP API (httpx2.MockTransport)
and a fake gRPC video client. The real stack in a real browser: tests/integration/test_ui_browser.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any

import av
import httpx2
import pytest
from flask.testing import FlaskClient
from PIL import Image

from flask_ui.app import create_app, megabytes
from flask_ui.client import ApiClient, Readiness, error_from_response
from flask_ui.errors import Problem, UIError
from flask_ui.frames import PREVIEW_SIDE, open_video
from flask_ui.grpc_client import MAX_IN_FLIGHT, VideoClient, _frame_template, frame_result, windowed
from flask_ui.overlay import box_shapes
from flask_ui.params import DetectionParams, FaceParams, TaskParams
from flask_ui.results import (
    EXPRESSIONS,
    FACE_EXPRESSION,
    Box,
    ClassScore,
    Detection,
    Face,
    FrameResult,
    colour_for,
)
from flask_ui.settings import UISettings
from flask_ui.video import video_events
from tests.conftest import ROOT, encode, photo_bytes
from visionserve.errors import ConfigurationError
from visionserve.settings import from_env
from visionserve.v1 import inference_pb2 as pb

Handler = Callable[[httpx2.Request], httpx2.Response]
XSS = "<img src=x onerror=alert(1)>"
NDJSON = {"Accept": "application/x-ndjson"}

CLASSIFIER = {
    "name": "efficientnet_lite0",
    "runtime": "onnx",
    "device": "cpu",
    "ready": True,
    "version": 1,
    "task": "classification",
    "default": True,
    "parameters": ["topk"],
    "detection": None,
}
DETECTOR = {
    "name": "yolo11n",
    "runtime": "onnx",
    "device": "cpu",
    "ready": True,
    "version": 1,
    "task": "detection",
    "default": False,
    "parameters": ["score_threshold", "iou_threshold", "max_detections", "classes"],
    "detection": {"score_threshold": 0.25, "iou_threshold": 0.45, "max_detections": 100},
}
FACES = {
    "name": "face_expression",
    "runtime": "pipeline",
    "device": "cpu",
    "ready": True,
    "version": 1,
    "task": "face_expression",
    "default": False,
    "parameters": ["score_threshold", "min_face_size", "max_faces"],
    "detection": None,
    "faces": {"score_threshold": 0.5, "min_face_size": 0.0, "max_faces": 32, "margin": 0.2},
}
MODELS = {"models": [CLASSIFIER, DETECTOR]}
WITH_FACES = {"models": [CLASSIFIER, DETECTOR, FACES]}
# What face_expression answers for astronaut.png (512x512), measured against the real pipeline.
ASTRONAUT_FACE = {
    "box": {"x1": 177.98, "y1": 58.77, "x2": 273.01, "y2": 177.49},
    "score": 0.9999,
    "landmarks": [[204.27, 100.75], [246.62, 102.67], [224.88, 129.37], [203.29, 139.12], [245.73, 140.52]],
    "expression": {
        "neutral": 0.001973,
        "anger": 6e-05,
        "disgust": 0.0,
        "fear": 2e-06,
        "happiness": 0.997811,
        "sadness": 4e-06,
        "surprise": 0.00015,
    },
    "top": "happiness",
}
# What yolo11n answers for motorcycle_left.png (741x500), measured against the real model.
MOTORCYCLE = {
    "label": "motorcycle",
    "index": 3,
    "score": 0.861,
    "box": {"x1": 114.52, "y1": 46.83, "x2": 683.45, "y2": 456.06},
}
BICYCLE = {
    "label": "bicycle",
    "index": 1,
    "score": 0.366,
    "box": {"x1": 0.0, "y1": 124.29, "x2": 48.93, "y2": 229.9},
}


def prediction(labels: list[str]) -> dict[str, object]:
    topk = [{"label": label, "prob": 0.5 / (i + 1), "index": i} for i, label in enumerate(labels)]
    return {
        "prediction": labels[0],
        "probability": 0.5,
        "topk": topk,
        "model": "efficientnet_lite0",
        "task": "classification",
        "latency_ms": 7.25,
    }


def detections(found: list[dict[str, object]], width: int = 741, height: int = 500) -> dict[str, object]:
    return {
        "model": "yolo11n",
        "task": "detection",
        "detections": found,
        "image": {"width": width, "height": height},
        "latency_ms": 61.5,
    }


def faces(found: list[dict[str, object]], width: int = 512, height: int = 512) -> dict[str, object]:
    return {
        "model": "face_expression",
        "task": "face_expression",
        "faces": found,
        "image": {"width": width, "height": height},
        "latency_ms": 44.5,
    }


def fake_api(
    predict: Handler | None = None,
    seen: list[httpx2.Request] | None = None,
    models: Mapping[str, object] = MODELS,
    listed: list[httpx2.Request] | None = None,
) -> Handler:
    """An API serving `models` that answers /models (each request added to `listed`),
    /health/ready and /predict/file (with `predict`; by default a classifier's classes, the
    detector's boxes when the request names yolo11n, the astronaut's face for face_expression).
    Requests to /predict/file are added to `seen`."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/models":
            if listed is not None:
                listed.append(request)
            return httpx2.Response(200, json=models)
        if request.url.path == "/health/ready":
            return httpx2.Response(200, json={"status": "ready"})
        if seen is not None:
            seen.append(request)
        if request.url.path == "/predict/file" and predict is not None:
            return predict(request)
        if request.url.params.get("model") == "yolo11n":
            return httpx2.Response(200, json=detections([MOTORCYCLE, BICYCLE]))
        if request.url.params.get("model") == "face_expression":
            return httpx2.Response(200, json=faces([ASTRONAUT_FACE]))
        return httpx2.Response(
            200, json=prediction(["tabby", "tiger cat", "Egyptian cat", "lynx", "Persian cat"])
        )

    return handle


def api_client(handler: Handler, **kwargs: float) -> ApiClient:
    settings = {"request_timeout_s": 5.0, "status_timeout_s": 1.0} | kwargs
    return ApiClient("http://api.test", transport=httpx2.MockTransport(handler), **settings)


class FakeVideo(VideoClient):
    """Answers each frame with the next of `labels` (a classifier), or a box in the frame's own
    pixels (model yolo11n); frames in `skip` come back skipped, in `errors` with that error code;
    `fail` is raised after the frames. What each stream was asked for is kept in `calls`."""

    def __init__(
        self,
        labels: Iterable[str] = ("tabby",),
        fail: UIError | None = None,
        skip: Iterable[int] = (),
        errors: dict[int, str] | None = None,
    ):
        super().__init__("fake:1", timeout_s=5, status_timeout_s=1, max_message_bytes=1 << 20)
        self.labels = list(labels)
        self.fail = fail
        self.skip = set(skip)
        self.errors = errors or {}
        self.sent: list[int] = []
        self.sent_at: list[float] = []
        self.calls: list[dict[str, object]] = []
        self.closed = False

    def stream(
        self,
        frames: Iterable[tuple[int, bytes]],
        *,
        model: str = "",
        topk: int = 0,
        params: TaskParams | None = None,
        live: bool = False,
    ) -> Generator[FrameResult]:
        self.calls.append({"model": model, "topk": topk, "params": params, "live": live})
        try:
            for n, (frame_id, image) in enumerate(frames):
                assert image[:2] == b"\xff\xd8", "frames are sent as JPEG"
                self.sent.append(frame_id)
                self.sent_at.append(time.monotonic())
                if frame_id in self.skip:
                    yield FrameResult(frame_id, task="detection" if model == "yolo11n" else "", skipped=True)
                elif frame_id in self.errors:
                    yield FrameResult(
                        frame_id, error=f"frame {frame_id} refused", error_code=self.errors[frame_id]
                    )
                elif model == "face_expression":
                    with Image.open(io.BytesIO(image)) as decoded:
                        width, height = decoded.size
                    expression = dict.fromkeys(EXPRESSIONS, 0.01) | {"surprise": 0.94}
                    face = Face(
                        Box(10, 5, 40, 45),
                        0.99,
                        ((20, 20), (30, 20), (25, 28), (21, 35), (29, 35)),
                        expression,
                        "surprise",
                    )
                    yield FrameResult(
                        frame_id, FACE_EXPRESSION, faces=[face], width=width, height=height, server_ms=4.0
                    )
                elif model == "yolo11n":
                    with Image.open(io.BytesIO(image)) as decoded:
                        width, height = decoded.size
                    found = Detection(
                        self.labels[n % len(self.labels)], 15, 0.9, Box(10, 5, width / 2, height - 5)
                    )
                    yield FrameResult(
                        frame_id, "detection", detections=[found], width=width, height=height, server_ms=3.0
                    )
                else:
                    label = self.labels[n % len(self.labels)]
                    yield FrameResult(frame_id, topk=[ClassScore(label, 0.9, 1)], server_ms=3.0)
            if self.fail:
                raise self.fail
        finally:
            self.closed = True  # the real client cancels its gRPC call here

    def health(self) -> Readiness:
        return Readiness("ready", "SERVING")


def ui(handler: Handler | None = None, video: VideoClient | None = None, **settings: object) -> FlaskClient:
    app = create_app(
        UISettings(**settings),  # type: ignore[arg-type]
        api=api_client(handler or fake_api()),
        video=video or FakeVideo(),
    )
    return app.test_client()


def gif(names: list[str], size: int = 64, duration: int = 100) -> bytes:
    frames = [Image.open(io.BytesIO(photo_bytes(n))).convert("RGB").resize((size, size)) for n in names]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=duration)
    return buffer.getvalue()


def mp4(names: list[str]) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for name in names:
            image = Image.open(io.BytesIO(photo_bytes(name))).convert("RGB").resize((128, 96))
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def data_url_image(url: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))
    image.load()
    return image


def upload(name: str = "chelsea.png", **fields: str) -> dict[str, object]:
    """Form data posting photo `name` (as a JPEG: a body over 500 KB would make the test client
    spool it to a temporary file it never closes) with `fields`."""
    photo = encode(Image.open(io.BytesIO(photo_bytes(name))).convert("RGB"), "JPEG", quality=90)
    return {"file": (io.BytesIO(photo), name), **fields}


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VISION_UI_PORT", "five thousand"),
        ("VISION_UI_API_URL", "127.0.0.1:8000"),
        ("VISION_UI_GRPC_TARGET", "http://127.0.0.1:50051"),
        ("VISION_UI_MAX_CONTENT_LENGTH", "-1"),
        ("VISION_UI_MAX_VIDEO_FRAMES", "0"),
    ],
)
def test_a_bad_setting_names_its_variable(variable: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=re.escape(variable)):
        from_env(UISettings)


def test_settings_defaults_and_the_public_api_url(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(UISettings)
    assert (settings.port, settings.api_url, settings.grpc_target) == (
        5000,
        "http://127.0.0.1:8000",
        "127.0.0.1:50051",
    )
    assert settings.docs_url == "http://127.0.0.1:8000/docs"
    monkeypatch.setenv("VISION_UI_API_URL", "http://fastapi:8000/")
    monkeypatch.setenv("VISION_UI_API_PUBLIC_URL", "http://localhost:8000")
    settings = from_env(UISettings)
    assert settings.api_url == "http://fastapi:8000"
    assert settings.docs_url == "http://localhost:8000/docs"


# --- the HTTP client's error mapping ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "problem", "shown"),
    [
        (
            400,
            {"error": {"code": "invalid_image", "message": "the data is not an image"}},
            Problem.BAD_INPUT,
            "The data is not an image",
        ),
        (
            413,
            {"error": {"code": "image_too_large", "message": "over VISION_MAX_IMAGE_PIXELS"}},
            Problem.TOO_LARGE,
            "VISION_MAX_IMAGE_PIXELS",
        ),
        (
            503,
            {"error": {"code": "not_ready", "message": "loading"}},
            Problem.NOT_READY,
            "try again in a few seconds",
        ),
        (
            503,
            {"error": {"code": "overloaded", "message": "at capacity"}},
            Problem.BUSY,
            "try again in a moment",
        ),
        (
            504,
            {"error": {"code": "deadline_exceeded", "message": "deadline passed"}},
            Problem.TIMEOUT,
            "Deadline passed",
        ),
        (
            422,
            {"error": {"code": "invalid_argument", "message": "query.score_threshold: Input should be <= 1"}},
            Problem.BAD_INPUT,
            "score_threshold: Input should be <= 1",
        ),
        (
            400,
            {"error": {"code": "invalid_argument", "message": "parameter `topk` does not apply"}},
            Problem.BAD_INPUT,
            "Parameter `topk` does not apply",
        ),
        (
            404,
            {"error": {"code": "model_not_found", "message": "model 'x' is not served here"}},
            Problem.BAD_INPUT,
            "Model 'x' is not served here",
        ),
        (500, {"error": {"code": "internal", "message": "inference failed"}}, Problem.API_ERROR, "HTTP 500"),
        (502, "<html>bad gateway</html>", Problem.API_ERROR, "HTTP 502"),
    ],
)
def test_api_errors_become_words_a_person_understands(
    status: int, body: object, problem: Problem, shown: str
) -> None:
    response = (
        httpx2.Response(status, json=body)
        if isinstance(body, dict)
        else httpx2.Response(status, text=str(body))
    )
    error = error_from_response(response)
    assert error.problem == problem
    assert shown in error.message
    assert "<html>" not in error.message


def test_unreachable_and_timeouts_name_the_address_and_the_setting() -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    def slow(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ReadTimeout("timed out", request=request)

    with pytest.raises(UIError) as refused:
        api_client(refuse).predict(b"x", "a.jpg")
    assert refused.value.problem == Problem.UNREACHABLE and refused.value.status == 503
    assert "http://api.test" in refused.value.message and "VISION_UI_API_URL" in refused.value.message
    with pytest.raises(UIError) as timed_out:
        api_client(slow, request_timeout_s=3).predict(b"x", "a.jpg")
    assert timed_out.value.problem == Problem.TIMEOUT and timed_out.value.status == 504
    assert "3 s" in timed_out.value.message and "VISION_UI_REQUEST_TIMEOUT_S" in timed_out.value.message
    assert api_client(refuse).readiness().state == "down"
    assert api_client(refuse).models() is None


def test_an_answer_that_is_not_the_api_s_is_reported_as_such() -> None:
    client = api_client(fake_api(lambda request: httpx2.Response(200, json={"hello": "world"})))
    with pytest.raises(UIError, match="does not answer like a visionserve API"):
        client.predict(b"x", "a.jpg")


def test_readiness_passes_on_the_api_s_reason() -> None:
    client = api_client(
        lambda request: httpx2.Response(503, json={"status": "loading", "detail": "model is loading"})
    )
    assert client.readiness() == Readiness("not_ready", "model is loading")


def test_predict_sends_the_file_and_reads_the_answer() -> None:
    seen: list[httpx2.Request] = []

    def predict(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json=prediction(["tabby", "lynx"]))

    result = api_client(fake_api(predict)).predict(b"image-bytes", "cat.png", topk=2)
    assert [p.label for p in result.topk] == ["tabby", "lynx"]
    assert result.server_ms == 7.25 and result.round_trip_ms >= 0
    assert seen[0].url.params["topk"] == "2"
    assert b'filename="cat.png"' in seen[0].content and b"image-bytes" in seen[0].content


# --- the image page -------------------------------------------------------------------------


def test_the_form_post_without_javascript_renders_the_whole_page() -> None:
    page = ui().post("/", data={"file": (io.BytesIO(photo_bytes("chelsea.png")), "chelsea.png")})
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert html.startswith("<!doctype html>") and 'id="upload"' in html, "the form is still there"
    assert re.findall(r'class="label">([^<]+)<', html) == [
        "tabby",
        "tiger cat",
        "Egyptian cat",
        "lynx",
        "Persian cat",
    ]
    assert 'style="width: 50.0%"' in html
    assert "7.2 ms" in html or "7.3 ms" in html
    assert 'src="data:image/jpeg;base64,' in html
    assert "onnx" in html and "efficientnet_lite0" in html
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]


def test_the_script_gets_only_the_result_fragment() -> None:
    page = ui().post(
        "/",
        data={"file": (io.BytesIO(photo_bytes("chelsea.png")), "chelsea.png")},
        headers={"X-Requested-With": "fetch"},
    )
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and "<html" not in html and 'class="topk"' in html


def test_file_names_and_labels_with_html_are_shown_as_text() -> None:
    client = ui(fake_api(lambda request: httpx2.Response(200, json=prediction([XSS, "tabby"]))))
    page = client.post("/", data={"file": (io.BytesIO(photo_bytes("chelsea.png")), f"{XSS}.png")})
    html = page.get_data(as_text=True)
    assert XSS not in html
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in html
    assert 'class="label">&lt;img src=x' in html


def test_not_an_image_keeps_the_page_usable_and_escapes_the_name() -> None:
    def invalid(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            400, json={"error": {"code": "invalid_image", "message": "the data is not an image"}}
        )

    page = ui(fake_api(invalid)).post("/", data={"file": (io.BytesIO(b"shopping list"), "<b>list</b>.jpg")})
    html = page.get_data(as_text=True)
    assert page.status_code == 400
    assert "That file is not an image we can read" in html and "The data is not an image" in html
    assert "&lt;b&gt;list&lt;/b&gt;.jpg" in html and 'id="upload"' in html


def test_no_file_chosen() -> None:
    page = ui().post("/", data={})
    assert page.status_code == 400 and "No photo chosen" in page.get_data(as_text=True)


def test_too_large_gets_the_friendly_413_page_naming_the_setting() -> None:
    client = ui(max_content_length=4096)
    upload = {"file": (io.BytesIO(b"\0" * 10_000), "big.jpg")}
    page = client.post("/", data=upload)
    html = page.get_data(as_text=True)
    assert page.status_code == 413
    assert (
        "That file is too large" in html
        and "VISION_UI_MAX_CONTENT_LENGTH" in html
        and "Traceback" not in html
    )
    assert 'href="/"' in html
    fragment = client.post(
        "/", data={"file": (io.BytesIO(b"\0" * 10_000), "big.jpg")}, headers={"X-Requested-With": "fetch"}
    )
    assert fragment.status_code == 413 and "<html" not in fragment.get_data(as_text=True)
    events = client.post(
        "/video",
        data={"file": (io.BytesIO(b"\0" * 10_000), "big.gif")},
        headers={"Accept": "application/x-ndjson"},
    )
    assert events.status_code == 413 and events.get_json()["title"] == "That file is too large"


def test_api_down_the_pages_say_so_and_stay_usable() -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    client = ui(refuse)
    home = client.get("/").get_data(as_text=True)
    assert "API unreachable" in home and 'id="upload"' in home
    page = client.post("/", data={"file": (io.BytesIO(photo_bytes("chelsea.png")), "chelsea.png")})
    assert page.status_code == 503
    assert "The inference API is not reachable" in page.get_data(as_text=True)
    status = client.get("/status").get_data(as_text=True)
    assert re.search(r'id="api-status" data-state="down"', status)


def test_unknown_pages_get_a_page_not_a_stack_trace() -> None:
    page = ui().get("/nope")
    assert page.status_code == 404 and "Page not found" in page.get_data(as_text=True)


def test_health_and_status() -> None:
    client = ui()
    assert client.get("/health/live").get_json() == {"status": "live"}
    status = client.get("/status").get_data(as_text=True)
    assert 'id="api-status" data-state="ready"' in status and 'id="grpc-status" data-state="ready"' in status
    assert 'href="http://127.0.0.1:8000/docs"' in status


# --- models, the picker and a detector's answer --------------------------------------------


def options(html: str) -> list[tuple[str, str, bool]]:
    """(value, data-task, selected) of the model picker's options."""
    found = re.findall(r'<option value="([^"]*)" data-task="([^"]*)"[^>]*?( selected)?>', html)
    return [(value, task, bool(selected)) for value, task, selected in found]


def test_the_picker_lists_every_served_model_with_its_task_the_default_chosen() -> None:
    client = ui()
    for path in ("/", "/video"):
        html = client.get(path).get_data(as_text=True)
        assert options(html) == [
            ("efficientnet_lite0", "classification", True),
            ("yolo11n", "detection", False),
        ]
        assert "efficientnet_lite0 · classification (default)" in html and "yolo11n · detection" in html
        assert 'name="score_threshold"' in html and 'placeholder="0.25"' in html, "the detector's default"
        assert 'id="detection-params" data-task="detection"' in html
    assert options(client.get("/?model=yolo11n").get_data(as_text=True))[1] == ("yolo11n", "detection", True)
    models = api_client(fake_api()).models()
    assert models is not None and [(m.name, m.task, m.default, m.is_detector) for m in models] == [
        ("efficientnet_lite0", "classification", True, False),
        ("yolo11n", "detection", False, True),
    ]
    assert models[1].detection is not None and models[1].detection.score_threshold == 0.25


def test_a_classifier_only_api_still_works_its_one_model_the_default() -> None:
    """An API from before several models were served lists one model without `task`/`default`."""
    old = {"models": [{"name": "resnet18", "runtime": "torch", "device": "cpu", "ready": True}]}

    def handle(request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/models":
            return httpx2.Response(200, json=old)
        return httpx2.Response(200, json=prediction(["tabby"]) | {"model": "resnet18"})

    html = ui(handle).get("/").get_data(as_text=True)
    assert options(html) == [("resnet18", "classification", True)]
    assert 'id="detection-params"' not in html, "no detector served: no detector settings"
    page = ui(handle).post("/", data=upload())
    assert page.status_code == 200 and 'class="label">tabby<' in page.get_data(as_text=True)


def test_a_detector_s_answer_is_the_photo_with_its_boxes_and_a_table() -> None:
    seen: list[httpx2.Request] = []
    page = ui(fake_api(seen=seen)).post(
        "/",
        data=upload(
            "motorcycle_left.png", model="yolo11n", score_threshold="0.3", classes="motorcycle, bicycle"
        ),
        headers={"X-Requested-With": "fetch"},
    )
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and 'data-task="detection"' in html
    # the overlay: an SVG whose viewBox is the photo's size as the API saw it, laid over the preview
    assert re.search(r'<svg class="overlay" viewBox="0 0 741 500" preserveAspectRatio="none"', html)
    boxes = re.findall(r'<g class="box" data-label="([^"]+)"', html)
    assert boxes == ["bicycle", "motorcycle"], "the highest score drawn last (on top)"
    outline = re.search(
        r'data-label="motorcycle".*?<rect class="outline" x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" '
        r'height="([\d.]+)" stroke="(#[0-9a-f]{6})"',
        html,
        re.S,
    )
    assert outline is not None
    assert [float(v) for v in outline.groups()[:4]] == pytest.approx([114.5, 46.8, 568.9, 409.2], abs=0.06)
    assert outline.group(5) == colour_for(3), "a colour per class"
    assert ">motorcycle 86%</text>" in html
    # the preview is the photo itself (same aspect ratio as the viewBox), as a data URL
    preview = re.search(r'<figure class="boxed">\s*<img src="([^"]+)"', html)
    assert preview is not None
    width, height = data_url_image(preview.group(1)).size
    assert width / height == pytest.approx(741 / 500, abs=0.01)
    # the table below, highest score first, box in the photo's pixels
    rows = re.findall(
        r'<tr class="detection" data-label="([^"]+)">.*?class="score">([^<]+)<.*?class="box">([^<]+)<',
        html,
        re.S,
    )
    assert rows == [("motorcycle", "86.1%", "115, 47 – 683, 456"), ("bicycle", "36.6%", "0, 124 – 49, 230")]
    assert "2 objects found" in html and "yolo11n" in html
    # the settings went to the API, and nothing of the classifier's
    params = seen[0].url.params
    assert params["model"] == "yolo11n" and params["score_threshold"] == "0.3"
    assert params.get_list("classes") == ["motorcycle", "bicycle"] and "topk" not in params


def test_colours_are_the_class_s_on_every_photo() -> None:
    shapes = box_shapes(
        [Detection("cat", 15, 0.9, Box(0, 0, 10, 10)), Detection("cat", 15, 0.5, Box(5, 5, 20, 20))], 100, 100
    )
    assert shapes[0].detection.colour == shapes[1].detection.colour == colour_for(15)
    assert len({colour_for(i) for i in range(80)}) == 80, "80 COCO classes, 80 colours"


def test_a_label_never_leaves_the_photo() -> None:
    (top_right,) = box_shapes([Detection("motorcycle", 3, 0.9, Box(90, 0, 100, 30))], 100, 100)
    x, y, width, _ = top_right.tag
    assert x >= 0 and x + width <= 100.1, "pushed left, inside the photo"
    assert y == 0, "a box at the top edge has its label inside"


def test_nothing_found_is_said() -> None:
    client = ui(fake_api(lambda request: httpx2.Response(200, json=detections([]))))
    html = client.post("/", data=upload(model="yolo11n", score_threshold="0.99")).get_data(as_text=True)
    assert "0 objects found" in html and "Nothing found with a score of at least 0.99" in html
    assert '<g class="box"' not in html


def test_a_classifier_gets_its_topk_only_and_its_bars_as_before() -> None:
    seen: list[httpx2.Request] = []
    # without JavaScript the form sends the detector's fields too: they are not the classifier's
    page = ui(fake_api(seen=seen)).post("/", data=upload(model="efficientnet_lite0", score_threshold="0.5"))
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and 'class="topk"' in html and '<svg class="overlay"' not in html
    assert dict(seen[0].url.params) == {"model": "efficientnet_lite0", "topk": "5"}


def test_the_choice_and_the_settings_are_kept_across_posts() -> None:
    html = (
        ui()
        .post("/", data=upload(model="yolo11n", score_threshold="0.4", classes="cat"))
        .get_data(as_text=True)
    )
    assert options(html)[1] == ("yolo11n", "detection", True)
    assert re.search(r'name="score_threshold"[^>]*value="0.4"', html)
    assert re.search(r'name="classes"[^>]*value="cat"', html)


def test_the_api_s_message_about_a_setting_is_shown_as_it_is() -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        message = "query.score_threshold: Input should be less than or equal to 1"
        return httpx2.Response(422, json={"error": {"code": "invalid_argument", "message": message}})

    page = ui(fake_api(refuse)).post("/", data=upload(model="yolo11n", score_threshold="1.5"))
    html = page.get_data(as_text=True)
    assert page.status_code == 400
    assert "The model cannot take these settings" in html
    assert "score_threshold: Input should be less than or equal to 1" in html
    assert options(html)[1] == ("yolo11n", "detection", True), "the form keeps the choice to fix it"


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("score_threshold", "high", "The score threshold must be a number"),
        ("score_threshold", "nan", "The score threshold must be a number"),
        ("max_detections", "2.5", "The most boxes must be a whole number"),
        ("classes", "x" * 600, "The classes field is too long"),
    ],
)
def test_settings_that_are_not_numbers_are_refused_before_the_api(field: str, value: str, shown: str) -> None:
    seen: list[httpx2.Request] = []
    page = ui(fake_api(seen=seen)).post("/", data=upload(model="yolo11n", **{field: value}))
    assert page.status_code == 400 and shown in page.get_data(as_text=True)
    assert seen == []


def test_a_crafted_form_naming_a_model_that_is_not_served_gets_a_clear_message() -> None:
    seen: list[httpx2.Request] = []
    client = ui(fake_api(seen=seen))
    page = client.post("/", data=upload(model=XSS))
    html = page.get_data(as_text=True)
    assert page.status_code == 400 and "There is no such model" in html
    assert "efficientnet_lite0 (classification), yolo11n (detection)" in html
    assert XSS not in html and "&lt;img src=x" in html
    assert seen == [], "nothing was sent to the API"
    events = client.post(
        "/video", data={"file": (io.BytesIO(gif(["chelsea.png"])), "a.gif"), "model": "nope"}, headers=NDJSON
    )
    assert events.status_code == 400 and events.get_json()["title"] == "There is no such model"
    assert client.get("/?model=nope").status_code == 400


def test_when_the_model_list_is_unknown_the_api_judges_the_name() -> None:
    def handle(request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/models":
            return httpx2.Response(503, json={"error": {"code": "not_ready", "message": "loading"}})
        message = "model 'nope' is not served here; this server serves 'efficientnet_lite0'"
        return httpx2.Response(404, json={"error": {"code": "model_not_found", "message": message}})

    page = ui(handle).post("/", data=upload(model="nope"))
    assert page.status_code == 400
    assert "There is no such model" in page.get_data(as_text=True)
    assert "Model &#39;nope&#39; is not served here" in page.get_data(as_text=True)


def test_the_preview_is_upright_as_the_api_saw_a_photo_with_exif_orientation() -> None:
    upright = Image.open(io.BytesIO(photo_bytes("motorcycle_left.png"))).convert("RGB")  # 741x500
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter left: shown turned right, upright again
    stored = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes())
    seen: list[httpx2.Request] = []
    page = ui(fake_api(seen=seen)).post(
        "/", data={"file": (io.BytesIO(stored), "phone.jpg"), "model": "yolo11n"}
    )
    html = page.get_data(as_text=True)
    preview = re.search(r'<figure class="boxed">\s*<img src="([^"]+)"', html)
    assert preview is not None
    image = data_url_image(preview.group(1))
    assert image.width > image.height, "landscape, as the API saw it (its boxes are in 741x500)"
    assert image.width / image.height == pytest.approx(741 / 500, abs=0.01)
    # the motorcycle's side of the photo is where the API found it: the bike's red tank is at
    # about (45%, 45%) of the photo; a photo left turned would have it elsewhere
    red, green, blue = image.resize((100, 100)).getpixel((45, 45))[:3]  # type: ignore[misc]
    assert red > green + 40 and red > blue + 40, (red, green, blue)


def test_the_status_page_lists_every_model() -> None:
    html = ui().get("/status").get_data(as_text=True)
    rows = re.findall(r'<tr class="model-row" data-model="([^"]+)" data-task="([^"]+)"', html)
    assert rows == [("efficientnet_lite0", "classification"), ("yolo11n", "detection")]


# --- the video page -------------------------------------------------------------------------


def events_of(response: object) -> list[dict[str, object]]:
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]  # type: ignore[attr-defined]


def test_video_events_stream_in_frame_order_with_count_and_rate() -> None:
    video = FakeVideo(["tabby", "espresso"])
    response = ui(video=video).post(
        "/video",
        data={"file": (io.BytesIO(gif(["chelsea.png", "coffee.png"] * 3)), "clip.gif"), "every": "2"},
        headers={"Accept": "application/x-ndjson"},
    )
    assert response.mimetype == "application/x-ndjson"
    events = events_of(response)
    assert events[0] == {
        "event": "start",
        "kind": "GIF",
        "frames": 6,
        "every": 2,
        "model": "efficientnet_lite0",
        "task": "classification",
        "mode": "stream",
    }
    frames = [e for e in events if e["event"] == "frame"]
    assert [e["frame_id"] for e in frames] == [0, 2, 4] == video.sent
    assert [e["count"] for e in frames] == [1, 2, 3]
    assert events[-1]["event"] == "end" and events[-1]["count"] == 3 and "note" not in events[-1]


def test_video_without_javascript_streams_the_page_itself() -> None:
    response = ui(video=FakeVideo([XSS])).post(
        "/video", data={"file": (io.BytesIO(gif(["chelsea.png", "coffee.png"])), f"{XSS}.gif")}
    )
    assert not response.is_sequence, "a streamed response"
    html = response.get_data(as_text=True)
    assert re.findall(r'data-frame="(\d+)"', html) == ["0", "1"]
    assert XSS not in html and "&lt;img src=x" in html
    assert "Done: 2 frames" in html


def test_video_frames_are_bounded_by_the_setting() -> None:
    video = FakeVideo()
    response = ui(video=video, max_video_frames=2).post(
        "/video",
        data={"file": (io.BytesIO(gif(["chelsea.png", "coffee.png"] * 2)), "clip.gif")},
        headers={"Accept": "application/x-ndjson"},
    )
    assert "VISION_UI_MAX_VIDEO_FRAMES" in str(events_of(response)[-1]["note"])
    assert video.sent == [0, 1]
    exactly = ui(max_video_frames=4).post(
        "/video",
        data={"file": (io.BytesIO(gif(["chelsea.png", "coffee.png"] * 2)), "clip.gif")},
        headers={"Accept": "application/x-ndjson"},
    )
    assert events_of(exactly)[-1] == events_of(exactly)[-1] | {"event": "end", "count": 4}
    assert "note" not in events_of(exactly)[-1], "nothing was left out"


def test_a_page_that_goes_away_closes_the_stream_at_once() -> None:
    video = FakeVideo()
    events = video_events(open_video(gif(["chelsea.png", "coffee.png"] * 3)), video, every=1, max_frames=10)
    assert [next(events)["event"], next(events)["event"]] == ["start", "frame"]
    events.close()  # what the WSGI server does when the browser disconnects
    assert video.closed and video.sent == [0]


@pytest.mark.parametrize("accept", ["application/x-ndjson", "text/html"])
def test_closing_the_response_closes_the_stream(accept: str) -> None:
    video = FakeVideo()
    response = ui(video=video).post(
        "/video",
        data={"file": (io.BytesIO(gif(["chelsea.png", "coffee.png"] * 3)), "clip.gif")},
        headers={"Accept": accept},
        buffered=False,
    )
    received = b""
    chunks = iter(response.response)
    while b'"frame"' not in received and b"data-frame" not in received:
        received += next(chunks)
    assert not video.closed
    response.close()  # what the WSGI server does when the browser went away
    assert video.closed and len(video.sent) < 6


def test_video_errors_before_and_during_the_stream() -> None:
    ndjson = {"Accept": "application/x-ndjson"}
    not_video = ui().post(
        "/video", data={"file": (io.BytesIO(b"just text\n" * 50), "clip.mp4")}, headers=ndjson
    )
    assert (
        not_video.status_code == 400
        and not_video.get_json()["title"] == "That file is not a video we can read"
    )
    page = ui().post("/video", data={"file": (io.BytesIO(b"just text"), "<i>clip</i>.mp4")})
    assert page.status_code == 400 and "not a video we can read" in page.get_data(as_text=True)
    bad_every = ui().post(
        "/video", data={"file": (io.BytesIO(gif(["chelsea.png"])), "a.gif"), "every": "0"}, headers=ndjson
    )
    assert bad_every.status_code == 400 and "Every Nth frame" in bad_every.get_json()["title"]
    down = UIError(Problem.UNREACHABLE, "The gRPC service is not reachable", "Nothing serves at fake:1.")
    broken = ui(video=FakeVideo(fail=down)).post(
        "/video", data={"file": (io.BytesIO(gif(["chelsea.png", "coffee.png"])), "a.gif")}, headers=ndjson
    )
    events = events_of(broken)
    assert [e["event"] for e in events] == ["start", "frame", "frame", "error"]
    assert events[-1]["title"] == "The gRPC service is not reachable"


def test_a_detector_s_video_events_carry_each_frame_with_its_boxes() -> None:
    video = FakeVideo(["motorcycle", "person", "cup", "cat"])
    names = ["motorcycle_left.png", "astronaut.png", "coffee.png", "chelsea.png"]
    response = ui(video=video).post(
        "/video",
        data={
            "file": (io.BytesIO(gif(names, size=200)), "clip.gif"),
            "model": "yolo11n",
            "score_threshold": "0.4",
        },
        headers=NDJSON,
    )
    events = events_of(response)
    assert events[0]["model"] == "yolo11n" and events[0]["task"] == "detection"
    assert video.calls == [
        {"model": "yolo11n", "topk": 0, "params": DetectionParams(score_threshold=0.4), "live": False}
    ]
    frames = [e for e in events if e["event"] == "frame"]
    assert [e["frame_id"] for e in frames] == [0, 1, 2, 3]
    assert [e["detections"][0]["label"] for e in frames] == ["motorcycle", "person", "cup", "cat"]  # type: ignore[index]
    first = frames[0]
    assert (first["width"], first["height"]) == (200, 200), "the size the boxes refer to"
    (box,) = first["detections"]  # type: ignore[misc]
    assert (
        box["box"] == [10, 5, 100, 195]
        and box["colour"] == colour_for(15)
        and box["text"] == "motorcycle 90%"
    )
    # the frame itself, small, to draw the boxes on: the same picture as the frame answered
    image = data_url_image(str(first["image"]))
    assert image.format == "JPEG" and image.size == (200, 200)
    assert max(len(str(e["image"])) for e in frames) < 40_000, "a few tens of KB per frame"
    assert events[-1] == events[-1] | {"event": "end", "count": 4, "computed": 4, "skipped_count": 0}


def test_a_classifier_s_video_gets_its_top_class_and_the_frames_too() -> None:
    video = FakeVideo(["tabby"])
    events = events_of(
        ui(video=video).post(
            "/video", data={"file": (io.BytesIO(gif(["chelsea.png"])), "a.gif")}, headers=NDJSON
        )
    )
    assert video.calls[0] == {"model": "efficientnet_lite0", "topk": 1, "params": None, "live": False}
    frame = events[1]
    assert frame["label"] == "tabby" and str(frame["image"]).startswith("data:image/jpeg;base64,")


def test_live_mode_answers_skipped_frames_as_skipped_and_paces_the_clip() -> None:
    video = FakeVideo(["cat"], skip={1, 2})
    response = ui(video=video).post(
        "/video",
        data={
            "file": (io.BytesIO(gif(["chelsea.png", "coffee.png"] * 2, duration=60)), "clip.gif"),
            "model": "yolo11n",
            "mode": "live",
        },
        headers=NDJSON,
    )
    events = events_of(response)
    assert events[0]["mode"] == "live" and video.calls[0]["live"] is True
    frames = [e for e in events if e["event"] == "frame"]
    assert [(e["frame_id"], bool(e.get("skipped"))) for e in frames] == [
        (0, False),
        (1, True),
        (2, True),
        (3, False),
    ]
    assert "image" not in frames[1] and "detections" not in frames[1], "nothing drawn for a skipped frame"
    assert [e["skipped_count"] for e in frames] == [0, 1, 2, 2]
    assert events[-1] == events[-1] | {"event": "end", "count": 4, "computed": 2, "skipped_count": 2}
    # sent as a camera would: each frame at its time in the clip (60 ms apart), not all at once
    gaps = [later - earlier for earlier, later in zip(video.sent_at, video.sent_at[1:], strict=False)]
    assert min(gaps) >= 0.05, gaps


def test_a_setting_the_server_refuses_stops_the_video_at_once_saying_why() -> None:
    video = FakeVideo(errors={0: "invalid_argument", 1: "invalid_argument"})
    events = events_of(
        ui(video=video).post(
            "/video",
            data={
                "file": (io.BytesIO(gif(["chelsea.png", "coffee.png", "chelsea.png"])), "a.gif"),
                "model": "yolo11n",
                "classes": "bogus",
            },
            headers=NDJSON,
        )
    )
    assert [e["event"] for e in events] == ["start", "error"]
    assert events[-1]["title"] == "The model cannot take these settings"
    assert events[-1]["message"] == "Frame 0 refused"
    assert video.closed


def test_a_frame_s_own_error_does_not_stop_the_video() -> None:
    video = FakeVideo(errors={1: "invalid_image"})
    events = events_of(
        ui(video=video).post(
            "/video",
            data={"file": (io.BytesIO(gif(["chelsea.png", "coffee.png", "chelsea.png"])), "a.gif")},
            headers=NDJSON,
        )
    )
    assert [e["event"] for e in events] == ["start", "frame", "frame", "frame", "end"]
    assert events[2]["error"] == "frame 1 refused" and "image" not in events[2]


def test_a_detector_s_video_without_javascript_is_a_table_and_no_images() -> None:
    response = ui(video=FakeVideo([XSS, "cat"], skip={2})).post(
        "/video",
        data={
            "file": (io.BytesIO(gif(["chelsea.png", "coffee.png", "chelsea.png"])), "a.gif"),
            "model": "yolo11n",
            "mode": "live",
        },
    )
    html = response.get_data(as_text=True)
    assert re.findall(r'<tr class="frame-row[^"]*" data-frame="(\d+)"', html) == ["0", "1", "2"]
    assert XSS not in html and '<span class="label">&lt;img src=x' in html
    assert '<span class="label">cat</span>' in html
    assert 'class="frame-row skipped" data-frame="2"' in html and "1 skipped" in html
    assert "data:image/jpeg" not in html, "no previews made for a page that cannot show them"
    assert (
        options(html)[1] == ("yolo11n", "detection", True) and 'value="live" id="mode-live" checked' in html
    )


def test_an_unknown_mode_is_refused() -> None:
    response = ui().post(
        "/video", data={"file": (io.BytesIO(gif(["chelsea.png"])), "a.gif"), "mode": "fast"}, headers=NDJSON
    )
    assert response.status_code == 400 and response.get_json()["title"] == "Unknown video mode"


def test_frames_in_flight_are_bounded_and_the_sender_stops_when_nobody_reads() -> None:
    """The gRPC client's request side: at most MAX_IN_FLIGHT frames unanswered (so the previews the
    page keeps for them stay few), and gRPC's sending thread ends once the answers stop."""
    window = threading.Semaphore(MAX_IN_FLIGHT)
    done = threading.Event()
    template = pb.Frame(model="yolo11n", score_threshold=0.4)
    template.classes.extend(["cat"])
    produced: list[int] = []

    def frames() -> Generator[tuple[int, bytes]]:
        for n in range(100):
            produced.append(n)
            yield n, b"jpeg"

    sent: list[pb.Frame] = []
    sender = threading.Thread(target=lambda: sent.extend(windowed(frames(), template, window, done)))
    sender.start()
    time.sleep(0.3)
    assert len(sent) == MAX_IN_FLIGHT, "the window is full: the sender waits"
    assert len(produced) == MAX_IN_FLIGHT + 1, "one decoded and waiting for a slot, no more"
    window.release()  # one answer read: one more frame may go
    time.sleep(0.3)
    assert len(sent) == MAX_IN_FLIGHT + 1 and len(produced) == MAX_IN_FLIGHT + 2
    done.set()  # the answers are no longer read (page gone, call cancelled)
    sender.join(timeout=2)
    assert not sender.is_alive()
    assert len(sent) == MAX_IN_FLIGHT + 1
    assert [f.frame_id for f in sent[:3]] == [0, 1, 2]
    assert sent[1].model == "yolo11n" and sent[1].score_threshold == pytest.approx(0.4)
    assert list(sent[1].classes) == ["cat"] and sent[1].image == b"jpeg"
    assert not pb.Frame(model="x").HasField("score_threshold"), "unset settings stay unset"


def test_gif_frames_carry_their_time_in_the_clip() -> None:
    frames = list(
        open_video(gif(["chelsea.png", "coffee.png", "chelsea.png"], duration=250)).frames(
            every=1, max_frames=9
        )
    )
    assert [f.time_s for f in frames] == pytest.approx([0.0, 0.25, 0.5])


# --- frames ---------------------------------------------------------------------------------


def test_mp4_frames_are_decoded_with_pyav_in_order() -> None:
    source = open_video(mp4(["chelsea.png", "coffee.png", "chelsea.png", "coffee.png"]))
    assert source.kind == "MP4" and source.frame_count == 4
    frames = list(source.frames(every=1, max_frames=10))
    assert [frame.index for frame in frames] == [0, 1, 2, 3]
    assert [frame.time_s for frame in frames] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert all(frame.preview is None for frame in frames), "previews only when asked for"
    with Image.open(io.BytesIO(frames[0].jpeg)) as first:
        assert (first.format, first.size) == ("JPEG", (128, 96))


def test_large_frames_are_scaled_down_before_sending() -> None:
    big = encode(Image.new("RGB", (3000, 1500), "white"), "PNG")
    (frame,) = list(open_video(big).frames(every=1, max_frames=1, previews=True))
    with Image.open(io.BytesIO(frame.jpeg)) as image:
        assert image.size == (1024, 512)
    assert frame.preview is not None
    with Image.open(io.BytesIO(frame.preview)) as preview:
        assert (preview.format, preview.size) == ("JPEG", (PREVIEW_SIDE, PREVIEW_SIDE // 2))


@pytest.mark.parametrize(
    "data", [b"", b"hello, not a video\n" * 100, b"\x00\x00\x00\x18ftypmp42" + b"\0" * 100]
)
def test_what_is_not_a_video_is_refused_plainly(data: bytes) -> None:
    with pytest.raises(UIError) as refused:
        open_video(data)
    assert refused.value.problem == Problem.BAD_INPUT


def test_megabytes() -> None:
    assert megabytes(16 * 1024 * 1024) == "16 MiB"
    assert megabytes(1_300_000) == "1.2 MiB"


def test_the_ui_imports_no_model_code() -> None:
    """Its image (target `ui` of docker/Dockerfile) installs requirements/ui.txt only: no numpy, torch, ONNX
    Runtime or FastAPI."""
    code = (
        "import sys, flask_ui.server; "
        "heavy = {'numpy', 'torch', 'onnxruntime', 'fastapi', 'starlette', 'uvicorn'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


# --- faces ------------------------------------------------------------------------------------


def with_faces(
    predict: Handler | None = None, seen: list[httpx2.Request] | None = None, video: VideoClient | None = None
) -> FlaskClient:
    return ui(fake_api(predict, seen=seen, models=WITH_FACES), video=video)


def test_a_face_model_s_answer_is_the_photo_with_each_face_its_top_expression_and_seven_bars() -> None:
    seen: list[httpx2.Request] = []
    second = ASTRONAUT_FACE | {
        "box": {"x1": 400.0, "y1": 300.0, "x2": 470.0, "y2": 390.0},
        "expression": dict.fromkeys(EXPRESSIONS, 0.05) | {"surprise": 0.7},
        "top": "surprise",
        "score": 0.8,
    }
    page = with_faces(lambda request: httpx2.Response(200, json=faces([ASTRONAUT_FACE, second])), seen).post(
        "/",
        data=upload(
            "astronaut.png",
            model="face_expression",
            face_score_threshold="0.6",
            min_face_size="20",
            max_faces="4",
            score_threshold="0.9",  # the detector's field, posted without JavaScript: not sent
        ),
        headers={"X-Requested-With": "fetch"},
    )
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and 'data-task="face_expression"' in html
    assert re.search(r'<svg class="overlay" viewBox="0 0 512 512" preserveAspectRatio="none"', html)
    # each face's box, labelled with its top expression and that one's probability, in its colour
    assert re.findall(r'<g class="box" data-label="([^"]+)"', html) == ["surprise", "happiness"]
    outline = re.search(
        r'data-label="happiness".*?<rect class="outline" x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" '
        r'height="([\d.]+)" stroke="(#[0-9a-f]{6})"',
        html,
        re.S,
    )
    assert outline is not None
    assert [float(v) for v in outline.groups()[:4]] == pytest.approx([178.0, 58.8, 95.0, 118.7], abs=0.06)
    assert outline.group(5) == colour_for(EXPRESSIONS.index("happiness"))
    assert ">happiness 100%</text>" in html and ">surprise 70%</text>" in html
    # its five landmarks as dots, in the photo's pixels
    happy = html[html.index('data-label="happiness"') :]
    dots = re.findall(r'<circle class="point" cx="([\d.]+)" cy="([\d.]+)" r="[\d.]+"', happy)
    assert [float(v) for dot in dots for v in dot] == pytest.approx(
        [204.3, 100.8, 246.6, 102.7, 224.9, 129.4, 203.3, 139.1, 245.7, 140.5], abs=0.06
    )
    # below: each face, its seven expressions as bars in seed 003's order, the top one marked
    assert "2 faces found" in html
    assert re.findall(r'<li class="face" data-top="([^"]+)"', html) == ["happiness", "surprise"]
    bars = re.findall(r'<li data-expression="([^"]+)"', html)
    assert bars == list(EXPRESSIONS) * 2
    assert re.search(
        r'<li data-expression="happiness" class="highest">\s*<span class="label">happiness', html
    )
    assert "99.8%" in html and "box 178, 59 – 273, 177" in html
    # the face model's settings went to the API under the API's names, nothing else
    assert dict(seen[0].url.params) == {
        "model": "face_expression",
        "score_threshold": "0.6",
        "min_face_size": "20.0",
        "max_faces": "4",
    }


def test_no_face_found_is_said() -> None:
    html = (
        with_faces(lambda request: httpx2.Response(200, json=faces([])))
        .post("/", data=upload("coffee.png", model="face_expression", min_face_size="40"))
        .get_data(as_text=True)
    )
    assert "0 faces found" in html and "No face found of at least 40 px" in html
    assert '<g class="box"' not in html


def test_a_face_detector_s_landmarks_are_drawn_as_dots() -> None:
    face = {"label": "face", "index": 0, "score": 0.99} | {k: ASTRONAUT_FACE[k] for k in ("box", "landmarks")}
    html = (
        ui(lambda request: httpx2.Response(200, json=detections([face, MOTORCYCLE], 512, 512)))
        .post("/", data=upload("astronaut.png", model="yolo11n"))
        .get_data(as_text=True)
    )
    assert html.count('<circle class="point"') == 5, "the face's five; the motorcycle has none"
    assert re.search(r'data-label="face".*?<circle class="point" cx="204.3" cy="100.8"', html, re.S)


def test_the_picker_shows_a_face_model_s_settings_with_its_defaults() -> None:
    html = with_faces().get("/?model=face_expression").get_data(as_text=True)
    assert options(html)[2] == ("face_expression", "face_expression", True)
    assert 'id="face-params" data-task="face_expression"' in html
    assert re.search(r'name="face_score_threshold"[^>]*placeholder="0.5"', html, re.S)
    assert re.search(r'name="max_faces"[^>]*placeholder="32"', html, re.S)
    assert 'data-face-score-threshold="0.5"' in html
    assert 'id="face-params"' not in ui().get("/").get_data(as_text=True), "no face model served"
    models = api_client(fake_api(models=WITH_FACES)).models()
    assert models is not None and models[2].is_faces and models[2].faces is not None
    assert (models[2].faces.score_threshold, models[2].faces.max_faces) == (0.5, 32)


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("face_score_threshold", "high", "The face score threshold must be a number"),
        ("min_face_size", "inf", "The smallest face size must be a number"),
        ("max_faces", "-1", "The most faces must be a whole number"),
        ("max_faces", "²", "The most faces must be a whole number"),
    ],
)
def test_a_face_model_s_settings_that_are_not_numbers_are_refused_before_the_api(
    field: str, value: str, shown: str
) -> None:
    seen: list[httpx2.Request] = []
    page = with_faces(seen=seen).post("/", data=upload(model="face_expression", **{field: value}))
    assert page.status_code == 400 and shown in page.get_data(as_text=True)
    assert seen == []


def test_a_face_model_s_video_events_carry_each_face_with_its_top_expression() -> None:
    video = FakeVideo()
    response = with_faces(video=video).post(
        "/video",
        data={
            "file": (io.BytesIO(gif(["astronaut.png", "coffee.png"], size=120)), "clip.gif"),
            "model": "face_expression",
            "face_score_threshold": "0.7",
            "max_faces": "3",
        },
        headers=NDJSON,
    )
    events = events_of(response)
    assert events[0]["task"] == "face_expression"
    assert video.calls == [
        {"model": "face_expression", "topk": 0, "params": FaceParams(0.7, None, 3), "live": False}
    ]
    frame: dict[str, Any] = events[1]
    assert (frame["width"], frame["height"]) == (120, 120)
    (box,) = frame["detections"]
    assert box["label"] == "surprise" and box["text"] == "surprise 94%" and box["box"] == [10, 5, 40, 45]
    assert box["points"] == [[20, 20], [30, 20], [25, 28], [21, 35], [29, 35]]
    (face,) = frame["faces"]
    assert face["top"] == "surprise" and [name for name, _ in face["expression"]] == list(EXPRESSIONS)
    assert frame["point_radius"] > 0 and frame["image"].startswith("data:image/jpeg;base64,")
    # without JavaScript: a row per frame with the top expression
    html = with_faces(video=FakeVideo()).post(
        "/video",
        data={"file": (io.BytesIO(gif(["astronaut.png"])), "a.gif"), "model": "face_expression"},
    )
    assert '<span class="label">surprise</span>' in html.get_data(as_text=True)


def test_the_grpc_answer_s_faces_and_landmarks_are_read_and_the_face_settings_sent() -> None:
    answer = pb.FramePrediction(frame_id=7, task="face_expression", latency_ms=12.5)
    answer.image.width, answer.image.height = 640, 480
    face = answer.faces.add(score=0.98, top="happiness")
    face.box.x1, face.box.y1, face.box.x2, face.box.y2 = 10, 20, 110, 140
    face.landmarks.add(x=40, y=60)
    face.expression.happiness, face.expression.neutral = 0.9, 0.1
    result = frame_result(answer)
    assert result.task == "face_expression" and (result.width, result.height) == (640, 480)
    (read,) = result.faces
    assert read.box == Box(10, 20, 110, 140) and read.landmarks == ((40, 60),) and read.top == "happiness"
    assert list(read.expression) == list(EXPRESSIONS) and read.expression["happiness"] == pytest.approx(0.9)
    detector = pb.FramePrediction(frame_id=1, task="detection")
    found = detector.detections.add(label="face", index=0, score=0.9)
    found.landmarks.add(x=1.5, y=2.5)
    assert frame_result(detector).detections[0].landmarks == ((1.5, 2.5),)
    template = _frame_template("face_expression", 0, FaceParams(0.6, 24.0, 5))
    assert template.score_threshold == pytest.approx(0.6)
    assert (template.min_face_size, template.max_faces) == (24.0, 5)
    assert not template.HasField("iou_threshold") and not template.classes
    assert not _frame_template("face_expression", 0, FaceParams()).HasField("score_threshold")


# --- the live page ----------------------------------------------------------------------------


def frame(name: str = "astronaut.png", **fields: str) -> dict[str, object]:
    jpeg = encode(Image.open(io.BytesIO(photo_bytes(name))).convert("RGB"), "JPEG")
    return {"file": (io.BytesIO(jpeg), "frame-1.jpg"), **fields}


JSON = {"Accept": "application/json"}


def test_the_live_page_is_in_the_nav_with_the_picker_and_its_scripts() -> None:
    html = with_faces().get("/live?model=yolo11n").get_data(as_text=True)
    assert '<a href="/live" aria-current="page">Live</a>' in html
    assert options(html)[1] == ("yolo11n", "detection", True)
    assert 'id="detection-params"' in html and 'id="face-params"' in html
    for script in ("picker.js", "overlay.js", "live.js"):
        assert f"/static/{script}" in html
    assert 'action="/live/frame"' in html and 'id="camera"' in html
    assert '<a href="/live"' in ui().get("/").get_data(as_text=True), "linked from every page"


def test_a_camera_frame_gets_a_face_model_s_boxes_expressions_and_times() -> None:
    seen: list[httpx2.Request] = []
    response = with_faces(seen=seen).post(
        "/live/frame", data=frame(model="face_expression", max_faces="2"), headers=JSON
    )
    assert response.status_code == 200 and response.mimetype == "application/json"
    answer = response.get_json()
    assert answer["task"] == "face_expression" and answer["model"] == "face_expression"
    assert (answer["width"], answer["height"]) == (512, 512)
    assert answer["server_ms"] == 44.5 and answer["api_ms"] >= 0
    (box,) = answer["detections"]
    assert box["text"] == "happiness 100%" and box["box"] == [178.0, 58.8, 273.0, 177.5]
    assert len(box["points"]) == 5
    assert answer["faces"][0]["top"] == "happiness" and len(answer["faces"][0]["expression"]) == 7
    assert dict(seen[0].url.params) == {"model": "face_expression", "max_faces": "2"}
    assert response.headers["Cache-Control"] == "no-store"


def test_a_camera_frame_gets_a_detector_s_boxes_or_a_classifier_s_top_classes() -> None:
    seen: list[httpx2.Request] = []
    client = ui(fake_api(seen=seen))
    boxes = client.post("/live/frame", data=frame(model="yolo11n", classes="motorcycle"), headers=JSON)
    assert [d["label"] for d in boxes.get_json()["detections"]] == ["motorcycle", "bicycle"]
    assert seen[0].url.params.get_list("classes") == ["motorcycle"] and "topk" not in seen[0].url.params
    top = client.post("/live/frame", data=frame(), headers=JSON).get_json()
    assert top["task"] == "classification" and top["label"] == "tabby" and top["topk"][0] == ["tabby", 0.5]
    assert seen[1].url.params["topk"] == "3" and seen[1].url.params["model"] == "efficientnet_lite0"


def test_the_model_list_is_looked_up_once_for_many_frames() -> None:
    listed: list[httpx2.Request] = []
    client = ui(fake_api(listed=listed))
    before = len(listed)
    for _ in range(5):
        assert client.post("/live/frame", data=frame(model="yolo11n"), headers=JSON).status_code == 200
    assert len(listed) - before == 1


@pytest.mark.parametrize(
    ("answer", "fields", "status", "title"),
    [
        (
            httpx2.Response(
                400, json={"error": {"code": "invalid_image", "message": "cannot identify image"}}
            ),
            {},
            400,
            "That file is not an image we can read",
        ),
        (
            httpx2.Response(
                422, json={"error": {"code": "invalid_argument", "message": "query.max_faces: too many"}}
            ),
            {"model": "face_expression", "max_faces": "5000"},
            400,
            "The model cannot take these settings",
        ),
        (httpx2.Response(200), {"model": "no_such_model"}, 400, "There is no such model"),
        (
            httpx2.Response(200),
            {"model": "yolo11n", "score_threshold": "x"},
            400,
            "The score threshold must be a number",
        ),
        (
            httpx2.Response(503, json={"error": {"code": "overloaded", "message": "full"}}),
            {},
            503,
            "The model is busy",
        ),
    ],
)
def test_a_bad_camera_frame_gets_its_own_error_as_json(
    answer: httpx2.Response, fields: dict[str, str], status: int, title: str
) -> None:
    client = with_faces(lambda request: answer)
    response = client.post("/live/frame", data=frame(**fields), headers=JSON)
    assert response.status_code == status and response.mimetype == "application/json"
    body = response.get_json()
    assert body["event"] == "error" and body["title"] == title and body["message"]
    # the next frame is answered as usual (the stream goes on)
    assert with_faces().post("/live/frame", data=frame(model="yolo11n"), headers=JSON).status_code == 200


def test_a_camera_frame_without_a_file_or_the_api_down_says_so_as_json() -> None:
    missing = ui().post("/live/frame", data={"model": "yolo11n"}, headers=JSON)
    assert missing.status_code == 400 and missing.get_json()["title"] == "No frame chosen"

    def down(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("refused", request=request)

    response = ui(down).post("/live/frame", data=frame(), headers=JSON)
    assert (
        response.status_code == 503 and response.get_json()["title"] == "The inference API is not reachable"
    )


def test_a_camera_frame_over_the_upload_limit_gets_json_too() -> None:
    response = ui(max_content_length=2048).post("/live/frame", data=frame(), headers=JSON)
    assert response.status_code == 413 and response.get_json()["title"] == "That file is too large"
