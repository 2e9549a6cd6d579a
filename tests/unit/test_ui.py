"""The upload UI's pieces, fast: Flask's test client over a fake HTTP API (httpx2.MockTransport)
and a fake gRPC video client. The real stack in a real browser: tests/integration/test_ui_browser.py.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Callable, Generator, Iterable

import av
import httpx2
import pytest
from flask.testing import FlaskClient
from PIL import Image

from flask_ui.app import create_app, megabytes, video_events
from flask_ui.client import ApiClient, ClassScore, Readiness, error_from_response
from flask_ui.errors import Problem, UIError
from flask_ui.frames import open_video
from flask_ui.grpc_client import FrameResult, VideoClient
from flask_ui.settings import UISettings
from tests.conftest import ROOT, encode, photo_bytes
from visionserve.errors import ConfigurationError
from visionserve.settings import from_env

Handler = Callable[[httpx2.Request], httpx2.Response]
XSS = "<img src=x onerror=alert(1)>"

MODELS = {
    "models": [
        {
            "name": "efficientnet_lite0",
            "runtime": "onnx",
            "device": "cpu",
            "ready": True,
            "version": 1,
            "task": "classification",
        }
    ]
}


def prediction(labels: list[str]) -> dict[str, object]:
    topk = [{"label": label, "prob": 0.5 / (i + 1), "index": i} for i, label in enumerate(labels)]
    return {
        "prediction": labels[0],
        "probability": 0.5,
        "topk": topk,
        "model": "efficientnet_lite0",
        "latency_ms": 7.25,
    }


def fake_api(predict: Handler | None = None) -> Handler:
    """An API answering /models, /health/ready and /predict/file (with `predict`)."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/models":
            return httpx2.Response(200, json=MODELS)
        if request.url.path == "/health/ready":
            return httpx2.Response(200, json={"status": "ready"})
        if request.url.path == "/predict/file" and predict is not None:
            return predict(request)
        return httpx2.Response(
            200, json=prediction(["tabby", "tiger cat", "Egyptian cat", "lynx", "Persian cat"])
        )

    return handle


def api_client(handler: Handler, **kwargs: float) -> ApiClient:
    settings = {"request_timeout_s": 5.0, "status_timeout_s": 1.0} | kwargs
    return ApiClient("http://api.test", transport=httpx2.MockTransport(handler), **settings)


class FakeVideo(VideoClient):
    """Answers each frame with the next of `labels`; `fail` raises it after the frames."""

    def __init__(self, labels: Iterable[str] = ("tabby",), fail: UIError | None = None):
        super().__init__("fake:1", timeout_s=5, status_timeout_s=1, max_message_bytes=1 << 20)
        self.labels = list(labels)
        self.fail = fail
        self.sent: list[int] = []
        self.closed = False

    def stream(self, frames: Iterable[tuple[int, bytes]], *, topk: int = 3) -> Generator[FrameResult]:
        try:
            for n, (frame_id, image) in enumerate(frames):
                assert image[:2] == b"\xff\xd8", "frames are sent as JPEG"
                self.sent.append(frame_id)
                yield FrameResult(frame_id, [ClassScore(self.labels[n % len(self.labels)], 0.9, 1)], 3.0)
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


def gif(names: list[str], size: int = 64) -> bytes:
    frames = [Image.open(io.BytesIO(photo_bytes(n))).convert("RGB").resize((size, size)) for n in names]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
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
    assert api_client(refuse).model_details() is None


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
    assert events[0] == {"event": "start", "kind": "GIF", "frames": 6, "every": 2}
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


# --- frames ---------------------------------------------------------------------------------


def test_mp4_frames_are_decoded_with_pyav_in_order() -> None:
    source = open_video(mp4(["chelsea.png", "coffee.png", "chelsea.png", "coffee.png"]))
    assert source.kind == "MP4" and source.frame_count == 4
    frames = list(source.frames(every=1, max_frames=10))
    assert [index for index, _ in frames] == [0, 1, 2, 3]
    with Image.open(io.BytesIO(frames[0][1])) as first:
        assert (first.format, first.size) == ("JPEG", (128, 96))


def test_large_frames_are_scaled_down_before_sending() -> None:
    big = encode(Image.new("RGB", (3000, 1500), "white"), "PNG")
    ((_, frame),) = list(open_video(big).frames(every=1, max_frames=1))
    with Image.open(io.BytesIO(frame)) as image:
        assert image.size == (1024, 512)


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
