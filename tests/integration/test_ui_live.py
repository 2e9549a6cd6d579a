"""The live (camera) page in a real browser: Debian's chromium with a fake camera that plays a
clip made from a real photo (astronaut.png on a 640x480 canvas, written as Y4M by hand), against
the real HTTP API (the real exported face_expression pipeline, yolo11n and the classifier) and
the UI, each a process on a free port.

The browser is started with `--use-fake-device-for-media-stream --use-file-for-fake-video-capture`
but without `--use-fake-ui-for-media-stream`: the camera is then allowed or refused per page by
Playwright's permissions, so one browser serves both the working and the refused camera. A
browser without the fake device has no camera at all (the "absent" case).
"""

from __future__ import annotations

import io
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from tests.conftest import photo_bytes
from tests.integration.test_ui_browser import CHROMIUM, HTTP_BANNER, UI_BANNER, _require_chromium
from tests.processes import ServiceProcess

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.browser]

FRAME = (640, 480)
SHOWN = 480  # the photo's side in the camera's frames, placed at x = OFFSET
OFFSET = 80
CAMERA_FPS = 30
# Where the real models find things on astronaut.png (512x512): her face (face_expression and
# retinaface_mnet025) and her whole (yolo11n's person).
FACE = (178.0, 58.8, 273.0, 177.5)
PERSON = (13.4, 16.3, 364.6, 510.8)


def in_camera(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """A box in astronaut.png's pixels -> in the camera frame's pixels."""
    scale = SHOWN / 512
    x1, y1, x2, y2 = box
    return x1 * scale + OFFSET, y1 * scale, x2 * scale + OFFSET, y2 * scale


def y4m(frames: list[Image.Image], fps: int) -> bytes:
    """Frames (RGB, even sizes) as a YUV4MPEG2 clip, 4:2:0 (what chromium's fake camera plays)."""
    width, height = frames[0].size
    out = bytearray(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
    for frame in frames:
        luma, blue, red = frame.convert("YCbCr").split()
        out += b"FRAME\n" + luma.tobytes()
        for chroma in (blue, red):
            out += chroma.resize((width // 2, height // 2), Image.Resampling.BILINEAR).tobytes()
    return bytes(out)


@pytest.fixture(scope="module")
def camera_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second of camera at 30 frames/s: the astronaut, her brightness changing a little from
    frame to frame (so that each frame is a new picture), on a dark 640x480 canvas."""
    photo = Image.open(io.BytesIO(photo_bytes("astronaut.png"))).convert("RGB").resize((SHOWN, SHOWN))
    frames = []
    for i in range(CAMERA_FPS):
        canvas = Image.new("RGB", FRAME, (40, 40, 40))
        shade = np.clip(np.asarray(photo, dtype=np.int16) + (i % 5) - 2, 0, 255).astype(np.uint8)
        canvas.paste(Image.fromarray(shade), (OFFSET, 0))
        frames.append(canvas)
    path = tmp_path_factory.mktemp("camera") / "astronaut.y4m"
    path.write_bytes(y4m(frames, CAMERA_FPS))
    return path


@dataclass
class LiveStack:
    """The HTTP API and the UI (the live page needs no gRPC)."""

    http: ServiceProcess
    ui: ServiceProcess

    @property
    def url(self) -> str:
        return self.ui.address


@pytest.fixture(scope="module")
def stack(real_repository: Path, real_detector: object, real_faces: object) -> Iterator[LiveStack]:
    _require_chromium()
    started: list[ServiceProcess] = []
    try:
        http = ServiceProcess(
            "fastapi_onnx",
            {"VISION_MODEL_REPOSITORY": str(real_repository), "VISION_THREADS": "1", "VISION_PORT": "0"},
            HTTP_BANNER,
        )
        started.append(http)
        ui = ServiceProcess(
            "flask_ui",
            {
                "VISION_UI_PORT": "0",
                "VISION_UI_API_URL": http.address,
                "VISION_UI_GRPC_TARGET": "127.0.0.1:9",  # not used by the live page
            },
            UI_BANNER,
        )
        started.append(ui)
        deadline = time.monotonic() + 120
        while httpx2.get(f"{http.address}/health/ready", timeout=2).status_code != 200:
            assert time.monotonic() < deadline and http.process.poll() is None, http.output()
            time.sleep(0.1)
        yield LiveStack(http, ui)
    finally:
        for service in started:
            if service.process.poll() is None:
                service.stop(signal.SIGTERM)
            service.output()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def browser(stack: LiveStack, playwright: Playwright, camera_clip: Path) -> Iterator[Browser]:
    """chromium whose camera plays `camera_clip` (to pages allowed to use it)."""
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=[
            "--no-sandbox",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={camera_clip}",
        ],
    )
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui-screenshots-live")


def _page(browser: Browser, *, camera: bool) -> Page:
    context = browser.new_context(
        viewport={"width": 1100, "height": 900}, permissions=["camera"] if camera else []
    )
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # type: ignore[attr-defined]
    return page


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page allowed to use the camera."""
    page = _page(browser, camera=True)
    yield page
    errors = page.errors  # type: ignore[attr-defined]
    page.context.close()
    assert not errors, f"script errors on the page: {errors}"


def _answers(page: Page) -> int:
    return int(page.inner_text("#answer-count"))


def _drawn_box(page: Page, label: str) -> tuple[float, float, float, float]:
    """The drawn box of `label` in the camera's pixels (the overlay's viewBox is the sent frame's
    size; the frame is the camera's scaled to at most 640 px)."""
    x, y, width, height, scale = page.locator(
        f'#camera-figure .overlay .box[data-label="{label}"] .outline'
    ).evaluate(
        """e => { const video = document.getElementById("camera");
                  const scale = video.videoWidth / e.ownerSVGElement.viewBox.baseVal.width;
                  return [e.x.baseVal.value, e.y.baseVal.value, e.width.baseVal.value,
                          e.height.baseVal.value, scale]; }"""
    )
    return x * scale, y * scale, (x + width) * scale, (y + height) * scale


def _assert_on_the_video(page: Page, label: str, box: tuple[float, float, float, float]) -> None:
    """The box's outline is where `box` (camera pixels) falls on the video as it is shown."""
    shown, drawn = page.locator("#camera").evaluate(
        """(video, label) => {
            const outline = document.querySelector(
                `#camera-figure .overlay .box[data-label="${label}"] .outline`).getBoundingClientRect();
            const v = video.getBoundingClientRect();
            return [[v.x, v.y, v.width, v.height, video.videoWidth, video.videoHeight],
                    [outline.x, outline.y, outline.width, outline.height]]; }""",
        label,
    )
    vx, vy, vw, vh, width, height = shown
    sx, sy = vw / width, vh / height
    expected = (vx + box[0] * sx, vy + box[1] * sy, (box[2] - box[0]) * sx, (box[3] - box[1]) * sy)
    assert drawn == pytest.approx(expected, abs=3), (drawn, expected)


def _keeps_answering(page: Page, seconds: float = 2.0) -> None:
    before = _answers(page)
    time.sleep(seconds)
    assert _answers(page) >= before + 3, "answers keep coming"


def test_the_live_page_draws_each_face_and_its_expression_over_the_camera(
    stack: LiveStack, page: Page, shots: Path
) -> None:
    page.goto(f"{stack.url}/live?model=face_expression")
    expect(page.locator('nav a[href="/live"]')).to_have_attribute("aria-current", "page")
    page.click("#start")
    face = page.locator('#camera-figure .overlay .box[data-label="happiness"]')
    expect(face).to_have_count(1)
    expect(face.locator("text")).to_have_text(re.compile(r"^happiness \d+%$"))
    expect(face.locator("circle.point")).to_have_count(5)
    assert page.locator("#camera").evaluate("v => [v.videoWidth, v.videoHeight]") == list(FRAME)
    expected = in_camera(FACE)
    assert _drawn_box(page, "happiness") == pytest.approx(expected, abs=8)
    _assert_on_the_video(page, "happiness", _drawn_box(page, "happiness"))
    # below the video: the face's seven expressions as bars
    expect(page.locator("#live-faces li.face")).to_have_count(1)
    expect(page.locator("#live-faces li.face .expressions li")).to_have_count(7)
    expect(page.locator("#live-faces li.face")).to_have_attribute("data-top", "happiness")
    _keeps_answering(page)
    assert float(page.inner_text("#live-fps")) > 1
    assert re.fullmatch(r"\d+ ms", page.inner_text("#latency")), page.inner_text("#latency")
    assert re.fullmatch(r"\d+\.\d ms", page.inner_text("#server-ms")), page.inner_text("#server-ms")
    expect(page.locator("#error-count")).to_have_text("0")
    page.screenshot(path=shots / "ui-live.png", full_page=True)
    page.click("#stop")
    expect(page.locator("#live-state")).to_have_text("Stopped.")
    expect(page.locator("#camera-figure")).to_be_hidden()
    stopped = _answers(page)
    time.sleep(0.5)
    assert _answers(page) == stopped, "nothing is sent once stopped"
    page.click("#start")  # and again
    expect(face).to_have_count(1)
    _keeps_answering(page, 1.5)


def test_the_live_page_works_with_a_detector_and_a_classifier_switched_while_it_runs(
    stack: LiveStack, page: Page
) -> None:
    page.goto(f"{stack.url}/live?model=yolo11n")
    page.select_option("#in-flight", "2")
    page.click("#start")
    expect(page.locator('#camera-figure .overlay .box[data-label="person"]')).to_have_count(1)
    assert _drawn_box(page, "person") == pytest.approx(in_camera(PERSON), abs=12)
    _keeps_answering(page, 1.5)
    # another model while it runs: its answers replace the boxes
    page.select_option("#model", "efficientnet_lite0")
    expect(page.locator("#live-top")).to_be_visible()
    expect(page.locator("#live-top")).to_have_text(re.compile(r"^.+ \d+\.\d%$"))
    expect(page.locator("#camera-figure .overlay")).to_have_count(0)
    expect(page.locator("#live-caption")).to_contain_text("efficientnet_lite0")
    # the face detector alone: a `face` box with its landmarks
    page.select_option("#model", "retinaface_mnet025")
    expect(page.locator('#camera-figure .overlay .box[data-label="face"] circle.point')).to_have_count(5)
    assert _drawn_box(page, "face") == pytest.approx(in_camera(FACE), abs=8)


def test_a_bad_frame_shows_its_error_and_the_next_frames_are_answered(stack: LiveStack, page: Page) -> None:
    """The third frame's JPEG is broken on its way (Playwright rewrites the request)."""
    posted = {"count": 0}

    def break_the_third(route: object) -> None:
        posted["count"] += 1
        request = route.request  # type: ignore[attr-defined]
        body = request.post_data_buffer
        if posted["count"] == 3:
            body = body.replace(b"\xff\xd8\xff", b"not a JPEG", 1)
        route.continue_(post_data=body)  # type: ignore[attr-defined]

    page.route("**/live/frame", break_the_third)
    page.goto(f"{stack.url}/live?model=face_expression")
    page.click("#start")
    expect(page.locator("#frame-error")).to_contain_text("Frame 3 was not answered")
    expect(page.locator("#frame-error")).to_contain_text("That file is not an image we can read")
    expect(page.locator("#error-count")).to_have_text("1")
    page.unroute("**/live/frame")  # (the rewriting slows every frame down)
    _keeps_answering(page, 1.5)
    expect(page.locator('#camera-figure .overlay .box[data-label="happiness"]')).to_have_count(1)


def _threads(pid: int) -> int:
    return int(re.search(r"^Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))  # type: ignore[union-attr]


def test_a_page_that_vanishes_mid_stream_leaves_nothing_behind(stack: LiveStack, browser: Browser) -> None:
    """The UI keeps nothing per viewer: no stream, no session, no thread; a vanished page leaves
    only its frames in flight, which finish on their own."""
    before = _threads(stack.ui.process.pid)
    for _ in range(3):
        page = _page(browser, camera=True)
        page.goto(f"{stack.url}/live?model=yolo11n")
        page.select_option("#in-flight", "2")
        page.click("#start")
        expect(page.locator('#camera-figure .overlay .box[data-label="person"]')).to_have_count(1)
        page.context.close()  # mid-stream: frames in flight
    time.sleep(1)
    assert _threads(stack.ui.process.pid) == before
    files = {"file": ("a.jpg", photo_bytes("astronaut.png"))}
    started = time.perf_counter()
    answer = httpx2.post(f"{stack.url}/live/frame", data={"model": "yolo11n"}, files=files, timeout=10)
    assert answer.status_code == 200 and answer.json()["detections"][0]["label"] == "person"
    assert time.perf_counter() - started < 3, "no backlog left by the pages that went away"


def test_a_refused_camera_is_said_and_the_page_stays_usable(stack: LiveStack, browser: Browser) -> None:
    page = _page(browser, camera=False)
    try:
        page.goto(f"{stack.url}/live")
        page.click("#start")
        error = page.locator("#live-error")
        expect(error).to_be_visible()
        expect(error).to_have_attribute("data-problem", "camera-refused")
        expect(error.locator(".error-title")).to_have_text("The camera was refused")
        expect(error.locator(".error-message")).to_contain_text("Allow it")
        expect(page.locator("#start")).to_be_enabled()
        assert page.errors == []  # type: ignore[attr-defined]
    finally:
        page.context.close()


def test_no_camera_at_all_and_a_page_not_served_securely_are_said(
    stack: LiveStack, playwright: Playwright
) -> None:
    port = stack.url.rsplit(":", 1)[1]
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=["--no-sandbox", f"--host-resolver-rules=MAP ui.example 127.0.0.1:{port}"],
    )
    try:
        page = _page(browser, camera=True)
        page.goto(f"{stack.url}/live")
        page.click("#start")
        expect(page.locator("#live-error")).to_have_attribute("data-problem", "camera-absent")
        expect(page.locator("#live-error .error-title")).to_have_text("No camera found")
        # over plain HTTP from another host, browsers give no camera at all
        page.goto("http://ui.example/live")
        page.click("#start")
        expect(page.locator("#live-error")).to_have_attribute("data-problem", "camera-unavailable")
        expect(page.locator("#live-error .error-message")).to_contain_text("HTTPS")
        assert page.errors == []  # type: ignore[attr-defined]
    finally:
        browser.close()
