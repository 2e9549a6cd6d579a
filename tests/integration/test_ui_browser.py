"""The upload UI in a real browser (Debian's chromium, driven by Playwright) against the real
stack: the HTTP API, the gRPC API and the UI, each started as users start it, on free ports, with
the real exported models (the EfficientNet-Lite0 classifier, the default, the YOLO11n detector,
and the face models: the face_expression pipeline over retinaface_mnet025 and mini_xception).
The live camera page has its own module: test_ui_live.py.

Screenshots of every page go to the pytest tmp dir (`ui-screenshots*`), to look at; those in
docs/ (ui-image.png, ui-video.png, ui-detection.png, ui-video-detection.png, ui-faces.png) are
copied from there.
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
from PIL import Image, ImageOps
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import photo_bytes
from tests.processes import ServiceProcess
from visionserve.repository import ModelEntry

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
def stack(real_repository: Path, real_detector: ModelEntry, real_faces: object) -> Iterator[Stack]:
    """HTTP API, gRPC API and UI as processes on free ports, each API serving every model of the
    repository: the classifier, yolo11n and the face models (the gRPC one may be stopped by a
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


# What yolo11n finds on motorcycle_left.png (741x500): the bike spans about x 115..683, y 47..456.
MOTORCYCLE = (114.5, 46.8, 683.5, 456.1)
PHOTO = (741, 500)


def _on_screen(page: Page, selector: str) -> dict[str, float]:
    return page.locator(selector).evaluate(
        "e => { const r = e.getBoundingClientRect();"
        " return {x: r.x, y: r.y, width: r.width, height: r.height}; }"
    )


def _outline_box(page: Page, selector: str) -> tuple[float, float, float, float]:
    """The SVG rect's corners in its viewBox's units: the photo's pixels."""
    x, y, width, height = page.locator(selector).first.evaluate(
        "e => [e.x.baseVal.value, e.y.baseVal.value, e.width.baseVal.value, e.height.baseVal.value]"
    )
    return x, y, x + width, y + height


def _assert_box_over(
    page: Page, image: str, outline: str, box: tuple[float, float, float, float], size: tuple[int, int]
) -> None:
    """The outline's on-screen corners are where `box` (in the photo's pixels) falls on the image
    as it is shown, within 2 screen pixels (the outline's stroke)."""
    shown, drawn = _on_screen(page, image), _on_screen(page, outline)
    scale_x, scale_y = shown["width"] / size[0], shown["height"] / size[1]
    expected = {
        "x": shown["x"] + box[0] * scale_x,
        "y": shown["y"] + box[1] * scale_y,
        "width": (box[2] - box[0]) * scale_x,
        "height": (box[3] - box[1]) * scale_y,
    }
    for key, value in expected.items():
        assert abs(drawn[key] - value) <= 2.5, (key, drawn, expected, shown)


def test_a_detector_draws_its_boxes_over_the_photo_at_any_size(stack: Stack, page: Page, shots: Path) -> None:
    page.goto(stack.url)
    served = page.locator("#model option").evaluate_all("options => options.map(o => o.value)")
    assert {"efficientnet_lite0", "yolo11n"} <= set(served), served
    expect(page.locator("#model")).to_have_value("efficientnet_lite0")  # the default
    expect(page.locator("#detection-params")).to_be_hidden()  # a classifier has no such settings
    page.select_option("#model", "yolo11n")
    expect(page.locator("#detection-params")).to_be_visible()
    expect(page.locator("#score_threshold")).to_have_attribute("placeholder", "0.25")
    page.set_input_files("#file", files=[_file("motorcycle_left.png", photo_bytes("motorcycle_left.png"))])
    bike = page.locator('#result .overlay .box[data-label="motorcycle"]')
    expect(bike).to_have_count(1)
    expect(bike.locator("text")).to_have_text(re.compile(r"^motorcycle \d+%$"))
    image, outline = "#result .boxed img", '#result .overlay .box[data-label="motorcycle"] .outline'
    assert _outline_box(page, outline) == pytest.approx(MOTORCYCLE, abs=1.5)
    _assert_box_over(page, image, outline, MOTORCYCLE, PHOTO)
    shown = _on_screen(page, image)
    assert shown["width"] > 600, "shown larger than the photo's preview size would be at 480"
    # the table below: label, score, box in the photo's pixels
    row = page.locator('#result tr.detection[data-label="motorcycle"]')
    expect(row.locator(".box")).to_have_text(re.compile(r"^11[0-9], (4[0-9]|5[0-9]) – 68[0-9], 45[0-9]$"))
    page.screenshot(path=shots / "ui-detection.png", full_page=True)
    # the same boxes on a narrow window: they scale with the photo
    page.set_viewport_size({"width": 520, "height": 820})
    _assert_box_over(page, image, outline, MOTORCYCLE, PHOTO)
    assert _on_screen(page, image)["width"] < shown["width"] * 0.8
    # a higher threshold and a class filter go to the API: only the bike, its colour unchanged
    colour = page.locator(outline).get_attribute("stroke")
    page.fill("#score_threshold", "0.5")
    page.fill("#classes", "motorcycle")
    page.click("#submit")
    expect(page.locator("#result .overlay .box")).to_have_count(1)
    assert page.locator(outline).get_attribute("stroke") == colour
    # the API's word on a setting out of range, then the classifier again on the chosen photo
    page.fill("#score_threshold", "1.5")
    page.locator("#score_threshold").dispatch_event("change")
    expect(page.locator("#result .error-title")).to_have_text("The model cannot take these settings")
    expect(page.locator("#result .error-message")).to_contain_text("score_threshold")
    page.select_option("#model", "efficientnet_lite0")
    expect(page.locator("#result .topk li")).to_have_count(5)
    expect(page.locator("#result .overlay")).to_have_count(0)


def test_a_photo_with_exif_orientation_gets_its_boxes_where_the_bike_is(stack: Stack, page: Page) -> None:
    upright = Image.open(io.BytesIO(photo_bytes("motorcycle_left.png"))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter left, as phones store photos: shown upright
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=92, exif=exif.tobytes())
    page.goto(f"{stack.url}/?model=yolo11n")
    page.set_input_files("#file", files=[_file("phone.jpg", buffer.getvalue(), "image/jpeg")])
    expect(page.locator('#result .overlay .box[data-label="motorcycle"]')).to_have_count(1)
    shown = _on_screen(page, "#result .boxed img")
    assert shown["width"] > shown["height"], "the preview is upright, as the API saw the photo"
    assert page.locator("#result .overlay").get_attribute("viewBox") == "0 0 741 500"
    outline = '#result .overlay .box[data-label="motorcycle"] .outline'
    box = _outline_box(page, outline)
    # about where the upright photo has it: the bike's top edge (its mirror) moves with JPEG noise,
    # by 25 px between quality 75 and 92 with or without a rotation
    assert box == pytest.approx(MOTORCYCLE, abs=30), box
    _assert_box_over(page, "#result .boxed img", outline, box, PHOTO)


def test_without_javascript_a_detector_s_answer_is_a_plain_page(stack: Stack, browser: Browser) -> None:
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(stack.url)
        page.select_option("#model", "yolo11n")
        page.fill("#score_threshold", "0.5")
        page.set_input_files(
            "#file", files=[_file("motorcycle_left.png", photo_bytes("motorcycle_left.png"))]
        )
        with page.expect_navigation():
            page.click("#submit")
        expect(page.locator('#result tr.detection[data-label="motorcycle"]')).to_have_count(1)
        expect(page.locator("#model")).to_have_value("yolo11n")  # the choice is kept
        expect(page.locator("#score_threshold")).to_have_value("0.5")
    finally:
        context.close()


def _clip(names: list[str], size: tuple[int, int] = (400, 300), duration: int = 100) -> bytes:
    frames = [Image.open(io.BytesIO(photo_bytes(name))).convert("RGB").resize(size) for name in names]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0)
    return buffer.getvalue()


CLIP = ["motorcycle_left.png", "astronaut.png", "coffee.png", "chelsea.png"]
EXPECTED = ["motorcycle", "person", "cup", "cat"]  # one object each frame shows, in order

# Records what the stage shows each time it changes: the frame and the labels drawn on it.
WATCH_STAGE = """() => {
    window.shown = [];
    new MutationObserver((changes) => {
        for (const figure of changes.flatMap((change) => [...change.addedNodes])) {
            const labels = [...figure.querySelectorAll(".overlay .box")].map((g) => g.dataset.label);
            window.shown.push({frame: Number(figure.dataset.frame), labels});
        }
    }).observe(document.getElementById("stage"), {childList: true});
}"""


def test_video_page_draws_a_detector_s_boxes_on_each_frame_in_order(
    stack: Stack, page: Page, shots: Path
) -> None:
    page.goto(f"{stack.url}/video")
    page.evaluate(WATCH_STAGE)
    page.select_option("#model", "yolo11n")
    page.set_input_files("#file", files=[_file("clip.gif", _clip(CLIP), "image/gif")])
    page.click("#submit")
    expect(page.locator("#video-state")).to_contain_text("Done: 4 frames")
    # the stage showed each frame with its own boxes, in frame order
    shown = page.evaluate("window.shown")
    assert [s["frame"] for s in shown] == [0, 1, 2, 3], shown
    for step, label in zip(shown, EXPECTED, strict=True):
        assert label in step["labels"], shown
    # the strip keeps them, each frame with the boxes found on it, scaled onto the frame shown
    tiles = page.locator("#strip li")
    expect(tiles).to_have_count(4)
    for i, label in enumerate(EXPECTED):
        tile = tiles.nth(i)
        assert tile.get_attribute("data-frame") == str(i)
        assert tile.locator("figure").get_attribute("data-frame") == str(i)
        assert tile.locator(".overlay").get_attribute("viewBox") == "0 0 400 300"
        expect(tile.locator(f'.overlay .box[data-label="{label}"]')).not_to_have_count(0)
    stage_image = "#stage figure img"
    cat = '#stage .overlay .box[data-label="cat"] .outline'
    bounds = _outline_box(page, cat)
    _assert_box_over(page, stage_image, cat, bounds, (400, 300))
    assert bounds[2] - bounds[0] > 200, "the cat fills most of its frame"
    assert float(page.inner_text("#fps")) > 0
    expect(page.locator("#skipped-count")).to_have_text("0")
    labels = [page.locator("#frames tr.frame-row").nth(i).inner_text() for i in range(4)]
    assert all(label in row for label, row in zip(EXPECTED, labels, strict=True)), labels
    page.screenshot(path=shots / "ui-video-detection.png", full_page=True)


def test_video_page_live_mode_skips_what_the_model_cannot_keep_up_with(stack: Stack, page: Page) -> None:
    """12 frames 20 ms apart (50 frames/s) into PredictLive: the detector on these cores cannot
    keep up, so frames are answered as skipped, counted, listed and never drawn."""
    page.goto(f"{stack.url}/video")
    page.select_option("#model", "yolo11n")
    page.check("#mode-live")
    clip = _clip(CLIP * 3, size=(200, 150), duration=20)
    page.set_input_files("#file", files=[_file("clip.gif", clip, "image/gif")])
    page.click("#submit")
    expect(page.locator("#video-state")).to_contain_text("Done: 12 frames")
    skipped_rows = page.locator("#frames tr.frame-row.skipped")
    skipped = int(page.inner_text("#skipped-count"))
    assert skipped > 0 and skipped_rows.count() == skipped
    expect(page.locator("#frames tr.frame-row")).to_have_count(12)
    computed = {
        int(row.get_attribute("data-frame") or -1)
        for row in page.locator("#frames tr.frame-row:not(.skipped)").all()
    }
    drawn = {int(tile.get_attribute("data-frame") or -1) for tile in page.locator("#strip li").all()}
    assert drawn and drawn <= computed, "only computed frames are drawn"
    assert 11 in computed, "the newest frame is always computed"
    expect(page.locator("#video-kind")).to_contain_text("live")


# Where face_expression finds the astronaut's face on astronaut.png (512x512) and on its mirror
# image beside it (the two side by side: 1024x512).
FACE = (178.0, 58.8, 273.0, 177.5)
MIRRORED_FACE = (1024 - FACE[2], FACE[1], 1024 - FACE[0], FACE[3])


def _two_faces() -> bytes:
    astronaut = Image.open(io.BytesIO(photo_bytes("astronaut.png"))).convert("RGB")
    canvas = Image.new("RGB", (1024, 512))
    canvas.paste(astronaut, (0, 0))
    canvas.paste(ImageOps.mirror(astronaut), (512, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_face_model_draws_each_face_with_its_top_expression_and_seven_bars(
    stack: Stack, page: Page, shots: Path
) -> None:
    page.goto(f"{stack.url}/?model=face_expression")
    expect(page.locator("#face-params")).to_be_visible()
    expect(page.locator("#detection-params")).to_be_hidden()
    expect(page.locator("#face_score_threshold")).to_have_attribute("placeholder", "0.5")
    page.set_input_files("#file", files=[_file("two.png", _two_faces())])
    faces = page.locator('#result .overlay .box[data-label="happiness"]')
    expect(faces).to_have_count(2)
    for i in range(2):
        expect(faces.nth(i).locator("text")).to_have_text(re.compile(r"^happiness \d+%$"))
        expect(faces.nth(i).locator("circle.point")).to_have_count(5)
    image = "#result .boxed img"
    outlines = sorted(
        (_outline_box(page, f"#result .overlay .box:nth-of-type({i + 1}) .outline"), i) for i in range(2)
    )
    for (box, i), expected in zip(outlines, (FACE, MIRRORED_FACE), strict=True):
        assert box == pytest.approx(expected, abs=8), (box, expected)  # the detector is not symmetric
        _assert_box_over(
            page, image, f"#result .overlay .box:nth-of-type({i + 1}) .outline", box, (1024, 512)
        )
    # below the photo: each face with its seven expressions as bars, the top one's bar drawn
    expect(page.locator("#result li.face")).to_have_count(2)
    expect(page.locator("#result li.face .expressions li")).to_have_count(14)
    width = page.locator('#result li.face:first-child li[data-expression="happiness"] .fill').evaluate(
        "e => e.getBoundingClientRect().width / e.parentElement.getBoundingClientRect().width"
    )
    assert width > 0.9, "happiness is almost all of the first face's expression"
    page.screenshot(path=shots / "ui-faces.png", full_page=True)
    # the face model's settings reach the API: one face at most
    page.fill("#max_faces", "1")
    page.click("#submit")
    expect(page.locator("#result li.face")).to_have_count(1)
    expect(page.locator("#result .overlay .box")).to_have_count(1)


def test_video_page_runs_the_face_model_over_a_clip(stack: Stack, page: Page) -> None:
    page.goto(f"{stack.url}/video")
    page.evaluate(WATCH_STAGE)
    page.select_option("#model", "face_expression")
    names = ["astronaut.png", "coffee.png", "astronaut.png"]
    page.set_input_files("#file", files=[_file("clip.gif", _clip(names), "image/gif")])
    page.click("#submit")
    expect(page.locator("#video-state")).to_contain_text("Done: 3 frames")
    shown = page.evaluate("window.shown")
    assert [s["labels"] for s in shown] == [["happiness"], [], ["happiness"]], shown
    rows = page.locator("#frames tr.frame-row")
    assert [rows.nth(i).locator("td").nth(1).inner_text() for i in range(3)] == [
        "happiness",
        "no face found",
        "happiness",
    ]
    tile = page.locator('#strip li[data-frame="2"]')
    expect(tile.locator('.overlay .box[data-label="happiness"] circle.point')).to_have_count(5)


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
