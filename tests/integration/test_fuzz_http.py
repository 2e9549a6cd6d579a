"""Fuzzing the HTTP surface: schemathesis generates requests from the service's own OpenAPI document
(every operation, the Open Inference Protocol's `/v2` routes included) and sends them to the app
in-process, its lifespan running and its model (a fake runtime) ready.

Every answer must be: not a 5xx; back within a time limit; for a 4xx, the error shape of its
protocol with a non-empty message (`{"error": {"code", "message"}}`, or `{"error": "<message>"}`
under `/v2`); and as the document describes it (status code, content type, headers, schema).

Bounded and reproducible: a fixed seed, derandomized generation, a fixed number of examples per
operation and phase, no example database and no schemathesis cache written into the repository.
Run with `-s` to see how many cases each operation got.
"""

from __future__ import annotations

import base64
import collections
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import requests
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis.checks import not_a_server_error, positive_data_acceptance
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi

from tests.conftest import DEFAULT_MODEL, encode
from tests.fixtures import FakeRuntime, app_of, crafted_png, write_fake_entry
from visionserve.http.limits import is_v2_path
from visionserve.repository import ModelEntry
from visionserve.runtimes.onnx import OnnxRuntime
from visionserve.settings import ServerSettings

MAX_EXAMPLES = 20
"""Hypothesis examples per operation in the fuzzing phase (the coverage and examples phases add
their own, a fixed set each)."""

SEED = 20261121
CALL_TIMEOUT_S = 10.0
"""A request not answered in this time fails the test as a hang (schemathesis raises ReadTimeout)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _fuzz_images() -> list[str]:
    """Base64 images for the image fields: valid ones, so that requests get past the decoder, and
    hostile ones (truncated, pixel bombs, zero bytes), so that they reach its error paths."""
    png = encode(Image.new("RGB", (40, 30), (200, 100, 50)))
    jpeg = encode(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG")
    gray16 = encode(Image.new("I;16", (8, 8), 4000))
    return [
        _b64(png),
        _b64(jpeg),
        _b64(gray16),
        _b64(jpeg[: len(jpeg) // 2]),
        _b64(png[:40]),
        _b64(crafted_png(100_000, 100_000)),
        _b64(crafted_png(0, 10)),
        _b64(b"GIF89a" + b"\xff" * 8),
        "",
    ]


EXTREME_NUMBERS: list[int | float] = [10**400, -(10**400), 2**64, 2**63, -(2**63), 1e308, 3.5e38, 5e-324, 0]
"""Numbers at and past the limits of the types a server converts JSON numbers to (JSON has none):
Python parses any integer, and float() of one past 1.8e308 raises OverflowError."""


def fuzz_config(model: str, max_examples: int) -> SchemathesisConfig:
    """The run's configuration, for a server serving `model`."""
    bindings = {
        "path.model_name": {"dictionary": "model", "probability": 0.9},
        "path.model_version": {"dictionary": "version", "probability": 0.7},
        "body.image": {"dictionary": "images", "probability": 0.6},
        "body.image_base64": {"dictionary": "images", "probability": 0.6},
        "body.inputs[*].name": {"dictionary": "v2-input", "probability": 0.8},
        "body.inputs[*].datatype": {"dictionary": "v2-datatype", "probability": 0.8},
        "body.inputs[*].data[*]": {"dictionary": "images", "probability": 0.6},
        "body.parameters.timeout": {"dictionary": "numbers", "probability": 0.3},
        "body.topk": {"dictionary": "integers", "probability": 0.2},
        "query.topk": {"dictionary": "integers", "probability": 0.2},
    }
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "cache": {"enabled": False},
            "request-timeout": CALL_TIMEOUT_S,
            "generation": {
                "mode": "all",  # valid requests and requests that break the schema
                "max-examples": max_examples,
                "deterministic": True,
                "database": "none",
                # NOTE: an HTTP server ignores query parameters and headers it does not know (proxies
                # and clients add their own), so "an unknown header was accepted" is no failure.
                "allow-extra-parameters": False,
            },
            "phases": {"stateful": {"enabled": False}},
            # NOTE: values that get a request past the first check: every V2 route names its model
            # in the path, and random names would stop every request at the 404, never reaching the
            # body parsing; random bytes are almost never an image. Each is used only part of the
            # time, the rest stays random.
            "dictionaries": {
                "model": {"values": [model]},
                "version": {"values": ["1"]},
                "images": {"values": _fuzz_images()},
                "v2-input": {"values": ["image", "input"]},
                "v2-datatype": {"values": ["BYTES", "FP32"]},
                "numbers": {"values": EXTREME_NUMBERS},
                # NOTE: no floats for topk: JSON Schema counts 1e308 as an integer, the parsers
                # (pydantic, FastAPI's query) do not, and answer 422 with a clear message.
                "integers": {"values": [n for n in EXTREME_NUMBERS if isinstance(n, int)]},
            },
            "parameters": bindings,
            # NOTE: the infer routes always name the served model (version 1): their coverage
            # phase otherwise spends nearly every case on the model-not-found 404.
            "operations": [
                {
                    "include-path-regex": "/infer$",
                    "parameters": bindings | {"path.model_name": model, "path.model_version": "1"},
                }
            ],
            "checks": {
                # NOTE: a schema-valid body is not always a valid request here: no JSON schema can say
                # "base64 of an image Pillow decodes" or "V2 tensors of the model's shape", so a
                # schema-valid request may be answered 400 (not an image), 404 (unknown model or
                # version) or 413 (image over the pixel limit). Any other status stays a failure.
                "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404", "413"]},
            },
        }
    )


CASES: collections.Counter[tuple[str, str, int]] = collections.Counter()
"""Cases sent: (run, operation label, status answered) -> count; printed at the end (`-s`)."""


@pytest.fixture(scope="module", autouse=True)
def _report_cases() -> Iterator[None]:
    yield
    for run in sorted({run for run, _, _ in CASES}):
        cases = {key: n for key, n in CASES.items() if key[0] == run}
        labels = sorted({label for _, label, _ in cases})
        print(f"\nschemathesis, {run}: {sum(cases.values())} cases over {len(labels)} operations")
        for label in labels:
            statuses = {status: n for (_, name, status), n in cases.items() if name == label}
            answers = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
            print(f"  {sum(statuses.values()):5d}  {label}  ({answers})")


SETTINGS = {"max_request_bytes": 256 * 1024}
"""A lower body limit than the default, so that generated bodies can reach it."""


def _build_app(root: Path) -> FastAPI:
    return app_of(ServerSettings(**SETTINGS), FakeRuntime(write_fake_entry(root / "repo")))


def _openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document, as `/openapi.json` serves it (built once, at collection)."""
    with tempfile.TemporaryDirectory() as root:
        return _build_app(Path(root)).openapi()


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    """A fresh app for each operation, its lifespan started and the fake model ready.

    NOTE: schemathesis runs the app's lifespan on its own event loop thread, and sends requests
    through that loop; its pytest plugin ends the lifespan when the test ends.
    """
    application = _build_app(tmp_path)
    with asgi.get_client(application) as client:
        deadline = time.monotonic() + 60
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the fake model did not become ready"
            time.sleep(0.02)
    return application


def check_error_shape(path: str, status: int, body: Any) -> None:
    """An error answer has its protocol's error shape and a message a person can read."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    if is_v2_path(path):
        message = body["error"]
    else:
        error = body["error"]
        assert isinstance(error, dict) and set(error) == {"code", "message"}, body
        assert isinstance(error["code"], str) and error["code"], body
        message = error["message"]
    assert isinstance(message, str) and message.strip(), f"{status} with an empty message: {body}"


def asked_for_a_deadline(request: requests.PreparedRequest) -> bool:
    """Whether the request set its own deadline: the X-Request-Timeout header, or (V2) the request
    parameter `timeout`."""
    if "x-request-timeout" in {name.lower() for name in request.headers}:
        return True
    try:
        document = json.loads(request.body or b"")
    except (ValueError, TypeError):
        return False
    return (
        isinstance(document, dict)
        and isinstance(document.get("parameters"), dict)
        and ("timeout" in document["parameters"])
    )


schema = schemathesis.openapi.from_dict(_openapi_document(), config=fuzz_config("fake", MAX_EXAMPLES))


@schema.parametrize()
# NOTE: the app fixture is shared by every case of one operation on purpose: a service that keeps
# serving after hostile requests is part of what is tested.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], database=None, derandomize=True)
def test_http_surface(case: schemathesis.Case, app: FastAPI) -> None:
    """No 5xx, no hang, errors in the error shape, answers as documented."""
    call_and_check(case, app, run="fake runtime")


def call_and_check(case: schemathesis.Case, app: FastAPI, *, run: str) -> None:
    """Send `case` to `app` and check its answer."""
    response = case.call(app=app, timeout=CALL_TIMEOUT_S)
    CASES[run, case.operation.label, response.status_code] += 1
    path = unquote(urlsplit(response.request.url or "").path)
    status = response.status_code
    # NOTE: the one 5xx allowed: 504 to a request that set itself a deadline (a generated
    # X-Request-Timeout of 5e-324 s is valid) which passed while it was queued. That is the
    # documented answer to the client's own choice, not a server error; the other checks still run.
    own_deadline = status == 504 and asked_for_a_deadline(response.request)
    assert status < 500 or own_deadline, f"{case.method} {path}: {status} {response.text}"
    if status >= 400:
        content_type = {k.lower(): v for k, v in response.headers.items()}.get("content-type", [""])
        assert content_type[0].startswith("application/json"), response.headers
        check_error_shape(path, status, response.json())
    excluded = [not_a_server_error, positive_data_acceptance] if own_deadline else []
    case.validate_response(
        response, excluded_checks=excluded, transport_kwargs={"app": app, "timeout": CALL_TIMEOUT_S}
    )


# --- a small second run against the real model ----------------------------------------------------

REAL_MAX_EXAMPLES = 5


def _model_operations(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with only the operations that reach the model: predict and infer."""
    paths = {
        path: ops
        for path, ops in document["paths"].items()
        if path.startswith("/predict") or path.endswith("/infer")
    }
    return document | {"paths": paths}


real_schema = schemathesis.openapi.from_dict(
    _model_operations(_openapi_document()), config=fuzz_config(DEFAULT_MODEL, REAL_MAX_EXAMPLES)
)
"""The predict and infer operations only: the rest never reach the model."""


@pytest.fixture
def real_app(real_entry: ModelEntry) -> Iterator[FastAPI]:
    """An app over the real exported model (ONNX Runtime, one thread), ready."""
    application = app_of(ServerSettings(**SETTINGS), OnnxRuntime(real_entry, threads=1))
    with asgi.get_client(application) as client:
        deadline = time.monotonic() + 120
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the real model did not become ready"
            time.sleep(0.05)
    yield application


@pytest.mark.real_model
@real_schema.parametrize()
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], database=None, derandomize=True)
def test_http_surface_real_model(case: schemathesis.Case, real_app: FastAPI) -> None:
    """The same checks, with the real model computing what the generated requests get through."""
    call_and_check(case, real_app, run="real model")


# --- the document fixes the fuzzing called for, as plain regression tests -------------------------


def test_every_error_answer_is_documented_in_its_shape() -> None:
    """Each operation documents its error answers with the body they are sent with: V2 routes
    `{"error": "<message>"}` (V2ErrorResponse), the others ErrorResponse; none documents FastAPI's
    `{"detail": [...]}`, which the app never sends. The V2 model routes document their 404."""
    document = _openapi_document()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if not status.startswith(("4", "5")):
                    continue
                refs = [c.get("schema", {}).get("$ref", "") for c in response.get("content", {}).values()]
                expected = {
                    "V2ErrorResponse" if is_v2_path(path) else "ErrorResponse",
                    "HealthStatus",  # the readiness probe's 503 carries its status
                }
                names = {ref.rsplit("/", 1)[-1] for ref in refs}
                assert names and names <= expected, f"{method.upper()} {path} {status}: {refs}"
            if path.startswith("/v2/models/{model_name}"):
                assert "404" in operation["responses"], f"{method.upper()} {path} does not document 404"
    infer = document["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert {"400", "404", "413", "415", "503", "504"} <= set(infer["responses"])
    assert infer["requestBody"]["content"]["application/json"]["schema"]["required"] == ["inputs"]


# --- failures found by probing the limits the fuzzing exercises, as regression tests ------------

IMAGE_INPUT = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [_fuzz_images()[0]]}


def tensor_input(value: object) -> dict[str, object]:
    """The fake model's FP32 input, every element `value`."""
    return {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [value] * 3 * 32 * 32}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        # was 500: `timeout / 1e6` raised OverflowError
        ({"inputs": [IMAGE_INPUT], "parameters": {"timeout": 10**400}}, "parameter timeout"),
        ({"inputs": [IMAGE_INPUT], "parameters": {"timeout": 2**64}}, "parameter timeout"),
        # was 500: numpy raised OverflowError converting the integer to float32
        ({"inputs": [tensor_input(10**400)]}, "too large for FP32"),
        # past FP32's range: infinity, refused (numpy's overflow warning was an error under pytest)
        ({"inputs": [tensor_input(1e39)]}, "NaN or infinity"),
    ],
    ids=["timeout-10e400", "timeout-2e64", "fp32-10e400", "fp32-1e39"],
)
def test_numbers_past_any_float_are_refused(
    fake_client: TestClient, body: dict[str, Any], fragment: str
) -> None:
    """JSON numbers have no limit, and Python parses any integer: numbers past what the server
    converts them to are a 400 naming the field, never a 500."""
    response = fake_client.post(
        "/v2/models/fake/infer", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]
    good = {"inputs": [IMAGE_INPUT]}
    assert fake_client.post("/v2/models/fake/infer", json=good).status_code == 200


def test_the_largest_timeout_is_accepted(fake_client: TestClient) -> None:
    """The protocol's largest timeout (uint64) still works."""
    body = {"inputs": [IMAGE_INPUT], "parameters": {"timeout": 2**64 - 1}}
    assert fake_client.post("/v2/models/fake/infer", json=body).status_code == 200


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_refused(fake_client: TestClient, depth: int) -> None:
    """JSON nested `depth` levels deep (2 KB at 1,000): a 400 (V2) or 422 (the project's API) in the
    error shape, never a 500 (the V2 parser's RecursionError was one)."""
    nested = "[" * depth + "]" * depth
    headers = {"content-type": "application/json"}
    response = fake_client.post(
        "/v2/models/fake/infer", content='{"inputs": ' + nested + "}", headers=headers
    )
    assert response.status_code == 400, response.text
    assert "nested too deeply" in response.json()["error"]
    response = fake_client.post("/predict", content='{"image": ' + nested + "}", headers=headers)
    assert response.status_code == 422, response.text
    check_error_shape("/predict", 422, response.json())
