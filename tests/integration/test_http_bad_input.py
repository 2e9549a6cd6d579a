"""HTTP bad input: each bad request gets a 4xx JSON error `{"error": {"code", "message"}}` that says
what was wrong, and the service keeps serving (every test sends a good request afterwards).

The issue's list, and where it is covered:
- invalid base64                                   test_invalid_base64
- bytes that are not an image                      test_not_an_image, test_unsupported_format
- a truncated JPEG                                 test_truncated_jpeg
- pixel count over a configurable limit (bomb),
  checked before full decode                       test_pixels_over_the_setting, test_crafted_bomb
- body over a configurable size limit -> 413
  naming the setting                               test_body_over_limit_*
- topk < 1 or > number of classes                  test_topk_out_of_range
- grayscale, palette, RGBA, CMYK converted         test_image_modes_are_converted
- EXIF orientation honoured                        test_exif_orientation_is_honoured
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

from tests.conftest import encode, wait_ready
from tests.fixtures import FAKE_CLASSES, FailingRuntime, FakeRuntime, crafted_png
from visionserve.errors import GENERIC_INTERNAL_MESSAGE
from visionserve.repository import ModelEntry

if TYPE_CHECKING:
    from httpx2 import Response  # what TestClient returns

ENDPOINTS = ("/predict", "/predict/b64", "/predict/file")
B64_ENDPOINTS = ("/predict", "/predict/b64")
FIELD = {"/predict": "image", "/predict/b64": "image_base64"}
GOOD_IMAGE = encode(Image.new("RGB", (40, 30), (200, 100, 50)))
WHITE = (255, 255, 255)
RED = (255, 0, 0)
ClientFactory = Callable[..., TestClient]


# --- helpers ------------------------------------------------------------------------------------


def post_text(
    client: TestClient, endpoint: str, text: str, *, topk: object = None, model: str | None = None
) -> Response:
    """POST a base64 text to a JSON endpoint."""
    body: dict[str, object] = {FIELD[endpoint]: text}
    if topk is not None:
        body["topk"] = topk
    if model is not None:
        body["model"] = model
    return client.post(endpoint, json=body)


def post_image(
    client: TestClient, endpoint: str, data: bytes, *, topk: object = None, model: str | None = None
) -> Response:
    """POST image bytes the way `endpoint` takes them (base64 in JSON, or a multipart file)."""
    if endpoint == "/predict/file":
        params = {key: str(value) for key, value in (("topk", topk), ("model", model)) if value is not None}
        return client.post(
            endpoint, files={"file": ("upload", data, "application/octet-stream")}, params=params
        )
    return post_text(client, endpoint, base64.b64encode(data).decode("ascii"), topk=topk, model=model)


def assert_serving(client: TestClient, endpoint: str = "/predict") -> None:
    """A good request still gets a good answer."""
    response = post_image(client, endpoint if endpoint in ENDPOINTS else "/predict", GOOD_IMAGE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prediction"] == f"class_{FAKE_CLASSES - 1}"
    assert len(body["topk"]) == 5


def assert_error(response: Response, status: int, code: str, *fragments: str) -> str:
    """The response is exactly `{"error": {"code", "message"}}` with this status and code; returns the
    message, which must be non-empty, leak nothing internal, and contain every fragment."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict)
    assert list(body) == ["error"], body
    assert isinstance(body["error"], dict)
    assert sorted(body["error"]) == ["code", "message"], body
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str)
    assert message.strip(), "empty message"
    assert "Traceback" not in message
    assert 'File "' not in message
    assert "0xdeadbeef" not in message
    assert "secret" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_rejected(client: TestClient, response: Response, status: int, code: str, *fragments: str) -> str:
    """`assert_error`, then a good request on the same endpoint must still succeed."""
    message = assert_error(response, status, code, *fragments)
    assert_serving(client, response.request.url.path)
    return message


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(11)
    data = encode(Image.fromarray(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2]


class RecordingRuntime(FakeRuntime):
    """FakeRuntime that keeps the last batch it ran, to check what reached the model."""

    backend = "recording"

    def __init__(self, model: ModelEntry):
        super().__init__(model)
        self.last: np.ndarray | None = None

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        self.last = batch.copy()
        return super().predict_batch(batch)

    def last_pixels(self) -> np.ndarray:
        """The last image as (H, W, 3) pixel values 0..255 (normalization undone)."""
        assert self.last is not None
        spec = self.model.config.input
        pixels: np.ndarray = (
            self.last[0].transpose(1, 2, 0) * np.asarray(spec.std) + np.asarray(spec.mean)
        ) * 255.0
        return pixels


class GatedRuntime(FakeRuntime):
    """FakeRuntime whose `load` waits until the test opens the gate (bounded, so a failing test
    cannot hang the shutdown)."""

    def __init__(self, model: ModelEntry):
        super().__init__(model)
        self.gate = threading.Event()

    def load(self) -> None:
        self.gate.wait(timeout=30)
        super().load()


class WrongShapeRuntime(FakeRuntime):
    """Returns one score too few per image."""

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        return super().predict_batch(batch)[:, :-1]


def ready_failing_client(app_client: ClientFactory, entry: ModelEntry, failures: int | None) -> TestClient:
    """A ready app whose runtime then fails `failures` batches (None: every batch).

    FailingRuntime's warm-up succeeds, so it gets ready and fails on real batches.
    """
    return app_client(FailingRuntime(entry, failures=failures))


# --- smoke --------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_good_request(fake_client: TestClient, endpoint: str) -> None:
    response = post_image(fake_client, endpoint, GOOD_IMAGE, topk=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prediction"] == "class_9"
    assert [p["index"] for p in body["topk"]] == [9, 8, 7]
    assert body["model"] == "fake"


# --- invalid base64 -----------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", B64_ENDPOINTS)
@pytest.mark.parametrize(
    "text",
    ["not base64!", "aGVsbG8", "aGVs$bG8=", "aGVsbG8=é", "data:image/png;base64,@@@@", "iVBORw0K-_8="],
    ids=["words", "no-padding", "bad-char", "non-ascii", "data-url", "url-safe"],
)
def test_invalid_base64(fake_client: TestClient, endpoint: str, text: str) -> None:
    response = post_text(fake_client, endpoint, text)
    assert_rejected(fake_client, response, 400, "invalid_base64", f"`{FIELD[endpoint]}`", "base64")


@pytest.mark.parametrize("endpoint", B64_ENDPOINTS)
def test_data_url_and_wrapped_base64_are_accepted(fake_client: TestClient, endpoint: str) -> None:
    wrapped = base64.encodebytes(GOOD_IMAGE).decode("ascii")
    assert "\n" in wrapped
    for text in (f"data:image/png;base64,{wrapped}", wrapped):
        response = post_text(fake_client, endpoint, text)
        assert response.status_code == 200, response.text


# --- not an image, truncated, unsupported -------------------------------------------------------


NOT_IMAGES = {
    "random": np.random.default_rng(2).bytes(2048),
    "text": b"hello, I am plain text, not a picture\n",
    "png-magic-only": b"\x89PNG\r\n\x1a\n",
    "svg": b"<svg xmlns='http://www.w3.org/2000/svg' width='1' height='1'/>",
}
"""Bytes that are not an image in an accepted format (shared with the gRPC tests)."""


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("data", list(NOT_IMAGES.values()), ids=list(NOT_IMAGES))
def test_not_an_image(fake_client: TestClient, endpoint: str, data: bytes) -> None:
    response = post_image(fake_client, endpoint, data)
    assert_rejected(fake_client, response, 400, "invalid_image", "not an image", "JPEG", "PNG")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_empty_image(fake_client: TestClient, endpoint: str) -> None:
    response = post_image(fake_client, endpoint, b"")
    assert_rejected(fake_client, response, 400, "invalid_image", "empty")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("fmt", ["ICO", "PPM", "PDF"])
def test_unsupported_format(fake_client: TestClient, endpoint: str, fmt: str) -> None:
    response = post_image(fake_client, endpoint, encode(Image.new("RGB", (32, 32), RED), fmt))
    assert_rejected(fake_client, response, 400, "invalid_image", "supported format")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_truncated_jpeg(fake_client: TestClient, endpoint: str) -> None:
    response = post_image(fake_client, endpoint, truncated_jpeg())
    assert_rejected(fake_client, response, 400, "invalid_image", "JPEG", "truncated")


# --- decompression bombs ------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_pixels_over_the_setting(fake_entry: ModelEntry, app_client: ClientFactory, endpoint: str) -> None:
    client = app_client(FakeRuntime(fake_entry), max_image_pixels=10_000)
    response = post_image(client, endpoint, encode(Image.new("RGB", (200, 100), RED), "JPEG"))
    assert_rejected(client, response, 413, "image_too_large", "200x100", "10,000", "VISION_MAX_IMAGE_PIXELS")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("size", [(8000, 8000), (20000, 20000)])  # over the default 40 Mpx
def test_crafted_bomb(
    fake_client: TestClient, monkeypatch: pytest.MonkeyPatch, endpoint: str, size: tuple[int, int]
) -> None:
    decoded: list[str] = []

    def load(self: ImageFile.ImageFile) -> object:
        decoded.append(f"{self.format} {self.size}")
        raise AssertionError("the pixels of a bomb were decoded")

    data = crafted_png(*size)
    assert len(data) < 100
    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", load)
        response = post_image(fake_client, endpoint, data)
    assert decoded == [], "refused only after decoding"
    assert_rejected(fake_client, response, 413, "image_too_large", "VISION_MAX_IMAGE_PIXELS", "40,000,000")


# --- request body size --------------------------------------------------------------------------


def _multipart_body(data: bytes, boundary: str) -> bytes:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode()


def _chunks(body: bytes, size: int = 512) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def _post_body(client: TestClient, endpoint: str, body: bytes | Iterator[bytes], boundary: str) -> Response:
    content_type = "application/json" if endpoint in FIELD else f"multipart/form-data; boundary={boundary}"
    return client.post(endpoint, content=body, headers={"content-type": content_type})


def _body(endpoint: str, payload: bytes, boundary: str) -> bytes:
    if endpoint in FIELD:
        return json.dumps({FIELD[endpoint]: base64.b64encode(payload).decode("ascii")}).encode()
    return _multipart_body(payload, boundary)


LIMIT = 4096
BOUNDARY = "visionserve-test-boundary"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_body_over_limit_with_content_length(
    fake_entry: ModelEntry, app_client: ClientFactory, endpoint: str
) -> None:
    client = app_client(FakeRuntime(fake_entry), max_request_bytes=LIMIT)
    body = _body(endpoint, np.random.default_rng(4).bytes(8000), BOUNDARY)
    response = _post_body(client, endpoint, body, BOUNDARY)
    assert response.request.headers["content-length"] == str(len(body))
    assert_rejected(
        client, response, 413, "payload_too_large", "VISION_MAX_REQUEST_BYTES", "4,096", f"{len(body):,}"
    )


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_body_over_limit_chunked(fake_entry: ModelEntry, app_client: ClientFactory, endpoint: str) -> None:
    client = app_client(FakeRuntime(fake_entry), max_request_bytes=LIMIT)
    body = _body(endpoint, np.random.default_rng(4).bytes(8000), BOUNDARY)
    response = _post_body(client, endpoint, _chunks(body), BOUNDARY)
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert_rejected(client, response, 413, "payload_too_large", "VISION_MAX_REQUEST_BYTES", "4,096")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_body_under_limit_chunked_is_served(
    fake_entry: ModelEntry, app_client: ClientFactory, endpoint: str
) -> None:
    client = app_client(FakeRuntime(fake_entry), max_request_bytes=LIMIT)
    body = _body(endpoint, GOOD_IMAGE, BOUNDARY)
    assert len(body) < LIMIT
    response = _post_body(client, endpoint, _chunks(body, 64), BOUNDARY)
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 200, response.text


def test_content_length_that_is_not_a_number(fake_client: TestClient) -> None:
    response = fake_client.post("/predict", content=b"{}", headers={"content-length": "lots"})
    assert_rejected(fake_client, response, 400, "invalid_argument", "Content-Length")


# --- topk ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("topk", [0, -1, FAKE_CLASSES + 1, 1000])
def test_topk_out_of_range(fake_client: TestClient, endpoint: str, topk: int) -> None:
    response = post_image(fake_client, endpoint, GOOD_IMAGE, topk=topk)
    assert response.status_code in (400, 422), response.text
    message = assert_rejected(fake_client, response, response.status_code, "invalid_argument", "topk")
    assert re.search(r"\b1\b", message), f"the lower bound is not in {message!r}"
    if topk > FAKE_CLASSES:
        assert re.search(rf"\b{FAKE_CLASSES}\b", message), f"the upper bound is not in {message!r}"
        assert str(topk) in message


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("topk", ["five", 2.5])
def test_topk_not_an_integer(fake_client: TestClient, endpoint: str, topk: object) -> None:
    response = post_image(fake_client, endpoint, GOOD_IMAGE, topk=topk)
    assert_rejected(fake_client, response, 422, "invalid_argument", "topk")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("topk", [1, FAKE_CLASSES])
def test_topk_bounds_are_inclusive(fake_client: TestClient, endpoint: str, topk: int) -> None:
    response = post_image(fake_client, endpoint, GOOD_IMAGE, topk=topk)
    assert response.status_code == 200, response.text
    assert len(response.json()["topk"]) == topk


# --- schema -------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", B64_ENDPOINTS)
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{}", "{field}"),  # missing field
        (b'{"image_base64_typo": "aGVsbG8="}', "{field}"),
        (b"{not json", "JSON"),
        (b"", "body"),
        (b"[1, 2]", "body"),
        (b'{"{field}": 123}', "{field}"),
        (b'{"{field}": "aGVsbG8=", "colour": "red"}', "colour"),  # extra field
        (b'{"{field}": "aGVsbG8=", "model": 5}', "model"),
    ],
    ids=["missing", "misspelt", "bad-json", "empty", "list", "wrong-type", "extra", "model-type"],
)
def test_json_schema_errors(fake_client: TestClient, endpoint: str, body: bytes, fragment: str) -> None:
    field = FIELD[endpoint]
    content = body.replace(b"{field}", field.encode())
    response = fake_client.post(endpoint, content=content, headers={"content-type": "application/json"})
    assert_rejected(fake_client, response, 422, "invalid_argument", fragment.replace("{field}", field))


def test_the_other_endpoints_field_is_an_error(fake_client: TestClient) -> None:
    text = base64.b64encode(GOOD_IMAGE).decode("ascii")
    response = fake_client.post("/predict", json={"image_base64": text})
    assert_rejected(fake_client, response, 422, "invalid_argument", "image", "image_base64")
    response = fake_client.post("/predict/b64", json={"image": text})
    assert_rejected(fake_client, response, 422, "invalid_argument", "image_base64")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"files": {"image": ("x.png", GOOD_IMAGE, "image/png")}},
        {"data": {"file": "not a file"}},
        {"json": {"file": "aGVsbG8="}},
    ],
    ids=["nothing", "wrong-field", "text-field", "json"],
)
def test_file_schema_errors(fake_client: TestClient, kwargs: dict[str, object]) -> None:
    response = fake_client.post("/predict/file", **kwargs)  # type: ignore[arg-type]
    assert_rejected(fake_client, response, 422, "invalid_argument", "file")


def test_a_large_upload_without_a_writable_temp_dir_is_a_clear_500(
    fake_client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Starlette keeps a file part over 1 MB in a temporary file: without a writable temporary
    directory every large upload fails. The answer says why and what to fix; the rest works."""
    noise = Image.frombytes("RGB", (800, 700), os.urandom(800 * 700 * 3))
    large = encode(noise)
    assert len(large) > 1_100_000
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    response = post_image(fake_client, "/predict/file", large)
    message = assert_error(response, 500, "internal", "buffer this upload on disk", "TMPDIR")
    assert "No such file or directory" in message
    # what needs no temporary file still works meanwhile: a small upload, the JSON endpoint
    assert_serving(fake_client, "/predict/file")
    assert post_image(fake_client, "/predict", large).status_code == 200
    monkeypatch.undo()
    assert post_image(fake_client, "/predict/file", large).status_code == 200


# --- model, path, method ------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_unknown_model(fake_client: TestClient, endpoint: str) -> None:
    response = post_image(fake_client, endpoint, GOOD_IMAGE, model="resnet9000")
    assert_rejected(fake_client, response, 404, "model_not_found", "'resnet9000'", "'fake'")
    assert post_image(fake_client, endpoint, GOOD_IMAGE, model="fake").status_code == 200


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/nope"), ("POST", "/predict/nope"), ("POST", "/v1/models/fake:predict")]
)
def test_unknown_path(fake_client: TestClient, method: str, path: str) -> None:
    response = fake_client.request(method, path)
    assert_rejected(fake_client, response, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/predict"), ("PUT", "/predict/b64"), ("DELETE", "/predict/file"), ("POST", "/health/ready")],
)
def test_wrong_method(fake_client: TestClient, method: str, path: str) -> None:
    response = fake_client.request(method, path)
    assert_rejected(fake_client, response, 405, "method_not_allowed")
    assert response.headers.get("allow"), "405 without an Allow header"


# --- colour modes and orientation: converted, not rejected ---------------------------------------


def _palette(transparent: bool) -> bytes:
    image = Image.new("P", (40, 30), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * (3 * 254))
    return encode(image, "PNG", transparency=1) if transparent else encode(image, "PNG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), colour) for colour in (RED, (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40)
    return buffer.getvalue()


MODES: dict[str, tuple[Callable[[], bytes], tuple[int, int, int]]] = {
    "grayscale": (lambda: encode(Image.new("L", (40, 30), 90)), (90, 90, 90)),
    "grayscale JPEG": (lambda: encode(Image.new("L", (40, 30), 90), "JPEG"), (90, 90, 90)),
    "palette": (lambda: _palette(False), RED),
    "palette transparent": (lambda: _palette(True), WHITE),
    "RGBA transparent": (lambda: encode(Image.new("RGBA", (40, 30), (0, 0, 0, 0))), WHITE),
    "RGBA opaque": (lambda: encode(Image.new("RGBA", (40, 30), (0, 0, 255, 255))), (0, 0, 255)),
    "LA": (lambda: encode(Image.new("LA", (40, 30), (0, 0))), WHITE),
    "CMYK JPEG": (lambda: encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), RED),
    "16-bit PNG": (
        lambda: encode(Image.fromarray(np.full((30, 40), 160 * 257, dtype=np.uint16))),
        (160, 160, 160),
    ),
    "1-bit": (lambda: encode(Image.new("1", (40, 30), 1)), WHITE),
    "animated GIF": (_animated_gif, RED),
    "WebP": (lambda: encode(Image.new("RGB", (40, 30), RED), "WEBP", lossless=True), RED),
}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("mode", list(MODES))
def test_image_modes_are_converted(
    fake_entry: ModelEntry, app_client: ClientFactory, endpoint: str, mode: str
) -> None:
    runtime = RecordingRuntime(fake_entry)
    client = app_client(runtime)
    make, colour = MODES[mode]
    response = post_image(client, endpoint, make())
    assert response.status_code == 200, response.text
    pixels = runtime.last_pixels()
    np.testing.assert_allclose(pixels, np.broadcast_to(colour, pixels.shape), atol=4)
    assert_serving(client, endpoint)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(("orientation", "corner"), [(1, (2, 2)), (3, (29, 29)), (6, (2, 29)), (8, (29, 2))])
def test_exif_orientation_is_honoured(
    fake_entry: ModelEntry,
    app_client: ClientFactory,
    endpoint: str,
    orientation: int,
    corner: tuple[int, int],
) -> None:
    runtime = RecordingRuntime(fake_entry)
    client = app_client(runtime)
    image = Image.new("RGB", (48, 48), WHITE)
    image.paste(RED, (0, 0, 12, 12))  # stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    response = post_image(client, endpoint, encode(image, "JPEG", exif=exif, quality=95))
    assert response.status_code == 200, response.text
    pixels = runtime.last_pixels()
    red = [
        (row, col)
        for row in (2, 29)
        for col in (2, 29)
        if pixels[row, col, 0] > 200 and pixels[row, col, 1] < 60 and pixels[row, col, 2] < 60
    ]
    assert red == [corner], f"orientation {orientation}: marker at {red}, expected {corner} (row, col)"
    assert_serving(client, endpoint)


# --- failures inside the service ----------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_runtime_failure_is_a_generic_500(
    fake_entry: ModelEntry, app_client: ClientFactory, endpoint: str
) -> None:
    client = ready_failing_client(app_client, fake_entry, failures=None)
    for _ in range(2):
        message = assert_error(post_image(client, endpoint, GOOD_IMAGE), 500, "internal")
        assert "kernel" not in message
        assert "RuntimeError" not in message
    client.app.state.registry.default.runtime.failures_left = 0  # type: ignore[attr-defined]
    assert_serving(client, endpoint)


def test_runtime_that_fails_once(fake_entry: ModelEntry, app_client: ClientFactory) -> None:
    client = ready_failing_client(app_client, fake_entry, failures=1)
    assert_error(post_image(client, "/predict", GOOD_IMAGE), 500, "internal")
    assert_serving(client, "/predict")
    assert_serving(client, "/predict/file")


def test_malformed_runtime_output_is_a_500(fake_entry: ModelEntry, app_client: ClientFactory) -> None:
    client = app_client(WrongShapeRuntime(fake_entry))
    assert_error(post_image(client, "/predict/file", GOOD_IMAGE), 500, "internal", "malformed")


def test_unexpected_exception_is_a_generic_500(
    fake_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = fake_client.app.state.registry.default  # type: ignore[attr-defined]

    def broken(data: bytes) -> np.ndarray:
        raise ValueError("secret internal detail at 0xdeadbeef")

    with monkeypatch.context() as patch:
        patch.setattr(service.task, "preprocessor", broken)
        response = post_image(fake_client, "/predict/file", GOOD_IMAGE)
    message = assert_error(response, 500, "internal")
    assert message == GENERIC_INTERNAL_MESSAGE
    assert_serving(fake_client, "/predict/file")


# --- not ready ----------------------------------------------------------------------------------


def test_not_ready_then_ready(fake_entry: ModelEntry, app_client: ClientFactory) -> None:
    runtime = GatedRuntime(fake_entry)
    client = app_client(runtime, ready=False)
    try:
        assert client.get("/health/live").status_code == 200
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] in ("created", "loading")
        for endpoint in ENDPOINTS:
            response = post_image(client, endpoint, GOOD_IMAGE)
            assert_error(response, 503, "not_ready", "not ready", "'fake'")
            assert response.headers["retry-after"] == "5"
        # readiness is checked before the image is decoded: no work is spent on requests that
        # cannot be served yet, even when their image is bad
        assert_error(post_text(client, "/predict", "@@@"), 503, "not_ready")
    finally:
        runtime.gate.set()
    wait_ready(client, timeout_s=30)
    for endpoint in ENDPOINTS:
        assert_serving(client, endpoint)


def _wait_for_state(client: TestClient, state: str, timeout_s: float = 30.0) -> Response:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/health/ready")
        if response.json().get("status") == state or time.monotonic() > deadline:
            return response
        time.sleep(0.01)


def test_failed_load_stays_not_ready(fake_entry: ModelEntry, app_client: ClientFactory) -> None:
    client = app_client(FailingRuntime(fake_entry, fail_on_load=True), ready=False)
    ready = _wait_for_state(client, "failed")
    assert ready.status_code == 503
    assert ready.json()["status"] == "failed"
    for endpoint in ENDPOINTS:
        response = post_image(client, endpoint, GOOD_IMAGE)
        assert_error(response, 503, "not_ready", "failed to load")
        assert "retry-after" not in response.headers  # retrying will not help
    assert client.get("/health/ready").status_code == 503
    assert client.get("/health/live").status_code == 200


def test_failed_load_does_not_leak_the_exception(fake_entry: ModelEntry, app_client: ClientFactory) -> None:
    client = app_client(FailingRuntime(fake_entry, fail_on_load=True), ready=False)
    ready = _wait_for_state(client, "failed")
    assert ready.json()["status"] == "failed"
    assert "0xdeadbeef" not in ready.text
    assert "secret" not in ready.text
