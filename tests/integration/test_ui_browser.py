"""The upload UI in a real browser (Debian's chromium, driven by Playwright) against the real
stack: the HTTP API, the gRPC API and the UI, each started as users start it, on free ports, with
the real exported model.

Screenshots of every page go to the pytest tmp dir (`ui-screenshots*`), to look at.
`make test` installs chromium when it is missing; without it these tests fail where apt-get could
install it, and skip (saying why) only where it cannot.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import grpc
import httpx2
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import photo_bytes
from tests.processes import ServiceProcess

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
UPLOAD_LIMIT = 1024 * 1024  # the UI's VISION_UI_MAX_CONTENT_LENGTH here
HTTP_BANNER = re.compile(r"HTTP API .* on (http://127\.0\.0\.1:\d+)")
GRPC_BANNER = re.compile(r"gRPC API .* on (127\.0\.0\.1:\d+)\s*$")
UI_BANNER = re.compile(r"visionserve UI on (http://127\.0\.0\.1:\d+)")


def _require_chromium() -> None:
    if CHROMIUM.is_file():
        return
    if shutil.which("apt-get"):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install -y chromium)")
    pytest.skip(f"{CHROMIUM} is missing and there is no apt-get to install it (Debian/Ubuntu only)")


@dataclass
class Stack:
    """The three services and the UI's address."""

    http: ServiceProcess
    grpc: ServiceProcess
    ui: ServiceProcess

    @property
    def url(self) -> str:
        return self.ui.address


def _wait_ready(stack: Stack, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(stack.grpc.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            for service in (stack.http, stack.grpc, stack.ui):
                assert service.process.poll() is None, service.output()
            try:
                http_ok = httpx2.get(f"{stack.http.address}/health/ready", timeout=2).status_code == 200
                serving = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except (httpx2.HTTPError, grpc.RpcError):
                http_ok, serving = False, None
            if http_ok and serving == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
    raise AssertionError(f"the stack was not ready in {timeout_s} s")


@pytest.fixture(scope="module")
def stack(real_repository: Path) -> Iterator[Stack]:
    """HTTP API, gRPC API and UI as processes on free ports (the gRPC one may be stopped by a
    test: the status test comes last in this module)."""
    _require_chromium()
    model = {"VISION_MODEL_REPOSITORY": str(real_repository), "VISION_THREADS": "1"}
    started: list[ServiceProcess] = []
    try:
        http = ServiceProcess("fastapi_onnx", {**model, "VISION_PORT": "0"}, HTTP_BANNER)
        started.append(http)
        grpc_process = ServiceProcess(
            "grpc_server",
            {**model, "VISION_GRPC_PORT": "0", "VISION_GRPC_METRICS_PORT": "0"},
            GRPC_BANNER,
        )
        started.append(grpc_process)
        ui = ServiceProcess(
            "flask_ui",
            {
                "VISION_UI_PORT": "0",
                "VISION_UI_API_URL": http.address,
                "VISION_UI_GRPC_TARGET": grpc_process.address,
                "VISION_UI_MAX_CONTENT_LENGTH": str(UPLOAD_LIMIT),
            },
            UI_BANNER,
        )
        started.append(ui)
        stack = Stack(http, grpc_process, ui)
        _wait_ready(stack)
        yield stack
    finally:
        for service in started:
            if service.process.poll() is None:
                service.stop(signal.SIGTERM)
            service.output()


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui-screenshots")


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 820})
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def _file(name: str, data: bytes, mime: str = "image/png") -> dict[str, object]:
    return {"name": name, "mimeType": mime, "buffer": data}


def _top_labels(page: Page) -> list[str]:
    return page.locator("#result .topk .label").all_inner_texts()


def test_upload_a_photo_shows_top5_with_bars_model_runtime_and_latency(
    stack: Stack, page: Page, shots: Path
) -> None:
    page.goto(stack.url)
    expect(page.locator("#model-line")).to_contain_text("efficientnet_lite0")
    page.screenshot(path=shots / "image-empty.png", full_page=True)
    page.set_input_files("#file", files=[_file("chelsea.png", photo_bytes("chelsea.png"))])
    expect(page.locator("#result .topk li")).to_have_count(5)
    labels = _top_labels(page)
    assert labels[0] in CATS, labels
    width = page.locator("#result .topk li:first-child .bar .fill").evaluate(
        "e => e.getBoundingClientRect().width"
    )
    assert width > 20, "the top class's probability bar is drawn"
    expect(page.locator("#result .model-name")).to_have_text("efficientnet_lite0")
    expect(page.locator("#result .model-runtime")).to_contain_text("onnx")
    for selector in ("#result .server-ms", "#result .round-trip-ms"):
        assert re.fullmatch(r"\d+\.\d ms", page.inner_text(selector)), page.inner_text(selector)
    assert page.locator("#result .photo img").get_attribute("src").startswith("data:image/jpeg;base64,")
    assert page.url.rstrip("/") == stack.url, "updated in place, no navigation"
    page.screenshot(path=shots / "image-result.png", full_page=True)


def test_a_text_file_named_jpg_gives_a_readable_error_and_the_next_upload_works_dropped_on_the_page(
    stack: Stack, page: Page, shots: Path
) -> None:
    page.goto(stack.url)
    page.set_input_files("#file", files=[_file("<b>notes</b>.jpg", b"shopping list\n- milk\n", "image/jpeg")])
    expect(page.locator("#result .error-title")).to_have_text("That file is not an image we can read")
    expect(page.locator("#result .error-message")).to_contain_text("not an image")
    expect(page.locator("#result .filename")).to_have_text("<b>notes</b>.jpg")  # shown as text
    page.screenshot(path=shots / "image-not-an-image.png", full_page=True)
    # the next one dropped on the page, as a person drags a file from their desktop
    page.locator("#drop").evaluate(
        """(drop, b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const files = new DataTransfer();
            files.items.add(new File([bytes], "coffee.png", {type: "image/png"}));
            drop.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
        }""",
        base64.b64encode(photo_bytes("coffee.png")).decode("ascii"),
    )
    expect(page.locator("#result .topk li")).to_have_count(5)
    assert _top_labels(page)[0] in {"espresso", "cup", "coffee mug"}, _top_labels(page)
    expect(page.locator("#result .photo .filename")).to_have_text("coffee.png")
    expect(page.locator("#result .error")).to_have_count(0)


def test_an_oversized_file_gets_the_friendly_413_page(stack: Stack, browser: Browser, shots: Path) -> None:
    big = _file("huge.jpg", b"\xff" * (UPLOAD_LIMIT + 200_000), "image/jpeg")
    # Without JavaScript: the form posts, the answer is the 413 page itself.
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(stack.url)
        page.set_input_files("#file", files=[big])
        with page.expect_navigation() as navigation:
            page.click("#submit")
        assert navigation.value is not None and navigation.value.status == 413
        expect(page.locator("h1.error-title")).to_have_text("That file is too large")
        expect(page.locator(".error-message")).to_contain_text("VISION_UI_MAX_CONTENT_LENGTH")
        expect(page.locator(".error-message")).to_contain_text("up to 1 MiB")
        expect(page.locator("a.button")).to_have_attribute("href", "/")
        page.screenshot(path=shots / "too-large-413.png", full_page=True)
    finally:
        context.close()
    # With JavaScript: the same words, in place.
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(stack.url)
        page.set_input_files("#file", files=[big])
        expect(page.locator("#result .error-title")).to_have_text("That file is too large")
    finally:
        context.close()


def test_without_javascript_photo_and_video_are_plain_form_posts(stack: Stack, browser: Browser) -> None:
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(stack.url)
        page.set_input_files("#file", files=[_file("chelsea.png", photo_bytes("chelsea.png"))])
        with page.expect_navigation():
            page.click("#submit")
        expect(page.locator("#result .topk li")).to_have_count(5)
        assert _top_labels(page)[0] in CATS
        # the video page's answer is the page itself, streamed a row per frame
        page.goto(f"{stack.url}/video")
        clip = _animated_gif(["chelsea.png", "coffee.png", "chelsea.png"])
        page.set_input_files("#file", files=[_file("clip.gif", clip, "image/gif")])
        with page.expect_navigation():
            page.click("#submit")
        expect(page.locator("#frames tr.done")).to_contain_text("Done: 3 frames")
        rows = page.locator("#frames tr.frame-row")
        assert [rows.nth(i).get_attribute("data-frame") for i in range(3)] == ["0", "1", "2"]
    finally:
        context.close()


def _animated_gif(names: list[str]) -> bytes:
    frames = [Image.open(io.BytesIO(photo_bytes(name))).convert("RGB").resize((256, 256)) for name in names]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=120, loop=0)
    return buffer.getvalue()


def test_video_page_streams_a_gif_frame_by_frame_in_order(stack: Stack, page: Page, shots: Path) -> None:
    names = ["chelsea.png", "coffee.png", "chelsea.png", "coffee.png", "chelsea.png", "coffee.png"]
    page.goto(f"{stack.url}/video")
    page.set_input_files("#file", files=[_file("clip.gif", _animated_gif(names), "image/gif")])
    page.fill("#every", "1")
    page.click("#submit")
    expect(page.locator("#video-state")).to_contain_text("Done: 6 frames")
    rows = page.locator("#frames tr.frame-row")
    expect(rows).to_have_count(6)
    assert [rows.nth(i).get_attribute("data-frame") for i in range(6)] == [str(i) for i in range(6)]
    labels = rows.locator(".label").all_inner_texts()
    assert all(label in CATS for label in labels[0::2]), labels
    assert all(label not in CATS for label in labels[1::2]), labels
    expect(page.locator("#frame-count")).to_have_text("6")
    assert float(page.inner_text("#fps")) > 0
    page.screenshot(path=shots / "video.png", full_page=True)
    # every 2nd frame: frames 0, 2, 4 (all the cat)
    page.fill("#every", "2")
    page.click("#submit")
    expect(page.locator("#video-state")).to_contain_text("Done: 3 frames")
    assert [rows.nth(i).get_attribute("data-frame") for i in range(3)] == ["0", "2", "4"]


def _mp4(names: list[str], size: tuple[int, int] = (320, 240)) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.bit_rate = 4_000_000
        for name in names:
            image = Image.open(io.BytesIO(photo_bytes(name))).convert("RGB").resize(size)
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def test_video_page_decodes_an_mp4_with_pyav(stack: Stack, page: Page) -> None:
    page.goto(f"{stack.url}/video")
    clip = _mp4(["chelsea.png", "coffee.png"] * 3)
    page.set_input_files("#file", files=[_file("clip.mp4", clip, "video/mp4")])
    page.fill("#every", "2")
    page.click("#submit")
    expect(page.locator("#video-state")).to_contain_text("Done: 3 frames")
    rows = page.locator("#frames tr.frame-row")
    assert [rows.nth(i).get_attribute("data-frame") for i in range(3)] == ["0", "2", "4"]
    labels = rows.locator(".label").all_inner_texts()
    assert all(label in CATS for label in labels), labels
    expect(page.locator("#video-kind")).to_contain_text("MP4, 6 frames, every 2nd frame")


def test_status_page_says_when_the_grpc_service_is_down(stack: Stack, page: Page, shots: Path) -> None:
    """Last in the module: it stops the stack's gRPC service."""

    page.goto(f"{stack.url}/status")
    expect(page.locator("#api-status")).to_have_attribute("data-state", "ready")
    expect(page.locator("#grpc-status")).to_have_attribute("data-state", "ready")
    expect(page.locator("#grpc-status .badge")).to_have_text("SERVING")
    expect(page.locator("#model-status")).to_contain_text("efficientnet_lite0")
    expect(page.locator("#model-status")).to_contain_text("onnx")
    expect(page.locator("#docs-link")).to_have_attribute("href", f"{stack.http.address}/docs")
    page.screenshot(path=shots / "status-up.png", full_page=True)

    assert stack.grpc.stop(signal.SIGTERM) == 0
    page.reload()
    expect(page.locator("#grpc-status")).to_have_attribute("data-state", "down")
    expect(page.locator("#grpc-status .badge")).to_have_text("down")
    expect(page.locator("#grpc-status .detail")).to_contain_text(f"nothing answers at {stack.grpc.address}")
    expect(page.locator("#api-status")).to_have_attribute("data-state", "ready")
    page.screenshot(path=shots / "status-grpc-down.png", full_page=True)
    # the image page still works without the gRPC service
    page.goto(stack.url)
    page.set_input_files("#file", files=[_file("chelsea.png", photo_bytes("chelsea.png"))])
    expect(page.locator("#result .topk li")).to_have_count(5)
