"""HTTP load: requests encoded once, sent by closed-loop senders over keep-alive connections.

Each request body (multipart upload, JSON with base64) is built once up front, so the client's
per-request cost is the HTTP exchange only and not the encoding of the same image again. A request
names its model in the query (`?model=NAME`), which lets a server of several models refuse it
before reading its body, and carries the task's parameters (`topk` for a classifier; a detector's
request sets none, so it gets the model's thresholds).
"""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import ssl
import struct
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx2

from bench.closed_loop import RequestFailed, SendOnce, run_closed_loop
from bench.stats import Measurement

T = TypeVar("T")

CLASSIFY: Mapping[str, object] = MappingProxyType({"topk": 5})
"""A classification request's parameters: the top 5 classes."""


@dataclass(frozen=True)
class HttpRequestSpec:
    """One request to send many times: `path` may carry a query string; `body` is sent as is."""

    name: str
    """What the request is, for reports (e.g. `POST /predict/file (multipart)`)."""
    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    model_work: bool = True
    """False for requests that run no model (the HTTP floor): nothing in-process to compare with."""


def _query(model: str, params: Mapping[str, object]) -> str:
    """`?model=NAME&topk=5` (only what is given), or nothing."""
    pairs: list[tuple[str, object]] = [("model", model)] if model else []
    for key, value in params.items():
        values = value if isinstance(value, list | tuple) else [value]
        pairs += [(key, item) for item in values]
    return f"?{urlencode(pairs)}" if pairs else ""


def file_request(
    image: bytes, filename: str, *, model: str = "", params: Mapping[str, object] = CLASSIFY
) -> HttpRequestSpec:
    """POST /predict/file: the image as a multipart upload (field `file`), the model and the
    task's parameters in the query."""
    mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    encoded = httpx2.Request("POST", "http://bench/predict/file", files={"file": (filename, image, mime)})
    return HttpRequestSpec(
        name="POST /predict/file (multipart)",
        method="POST",
        path=f"/predict/file{_query(model, params)}",
        headers={"Content-Type": encoded.headers["Content-Type"]},
        body=encoded.read(),
    )


def json_request(
    image: bytes, *, model: str = "", params: Mapping[str, object] = CLASSIFY
) -> HttpRequestSpec:
    """POST /predict: the image base64-encoded in a JSON body with the task's parameters; the
    model in the query."""
    body = json.dumps({"image": base64.b64encode(image).decode("ascii"), **params})
    return HttpRequestSpec(
        name="POST /predict (JSON base64)",
        method="POST",
        path=f"/predict{_query(model, {})}",
        headers={"Content-Type": "application/json"},
        body=body.encode("ascii"),
    )


def v2_request(image: bytes, model: str, *, topk: int = 5) -> HttpRequestSpec:
    """POST /v2/models/{model}/infer with the binary tensor extension (as tritonclient sends it):
    a JSON header naming one BYTES input `image` of shape [1], then the image as a BYTES element
    (4-byte little-endian length, the bytes); the top-k asked for as a classification."""
    element = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(element)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"classification": topk}}],
        }
    ).encode("ascii")
    return HttpRequestSpec(
        name="POST /v2/models/{model}/infer (V2, binary)",
        method="POST",
        path=f"/v2/models/{model}/infer",
        headers={
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
        body=header + element,
    )


def live_request() -> HttpRequestSpec:
    """GET /health/live: no model work, so its latency is the HTTP floor (client + server)."""
    return HttpRequestSpec(
        name="GET /health/live (HTTP floor)", method="GET", path="/health/live", model_work=False
    )


RequestBuilder = Callable[[bytes, str, str, Mapping[str, object]], HttpRequestSpec]
"""builder(image bytes, file name, model name, the task's parameters) -> the request."""

REQUESTS: dict[str, RequestBuilder] = {
    "file": lambda image, filename, model, params: file_request(image, filename, model=model, params=params),
    "json": lambda image, filename, model, params: json_request(image, model=model, params=params),
    "live": lambda image, filename, model, params: live_request(),
    "v2": lambda image, filename, model, params: v2_request(image, model),
}
"""The HTTP endpoints the CLI knows by name -> their builders."""

CLASSIFIER_ONLY = ("v2",)
"""HTTP endpoints that ask for a classification (the V2 request's `classification` output)."""


def http_client(
    base_url: str,
    *,
    concurrency: int = 1,
    timeout_s: float = 30.0,
    verify: ssl.SSLContext | bool = True,
) -> httpx2.AsyncClient:
    """An async client with one keep-alive connection per sender; proxies from the environment
    are ignored (a benchmark of localhost must not go through one). `verify`: how `https://` is
    checked (a context trusting `--tls-ca`)."""
    return httpx2.AsyncClient(
        base_url=base_url,
        timeout=timeout_s,
        verify=verify,
        limits=httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        trust_env=False,
    )


def http_sender(client: httpx2.AsyncClient, spec: HttpRequestSpec) -> SendOnce:
    """A `send` for `run_closed_loop`: one request of `spec`, the whole response read; a non-2xx
    status raises `RequestFailed("HTTP <status>")`."""
    headers = dict(spec.headers)
    content = spec.body or None

    async def send() -> None:
        response = await client.request(spec.method, spec.path, headers=headers, content=content)
        if not response.is_success:
            raise RequestFailed(f"HTTP {response.status_code}")

    return send


async def measure_http(
    base_url: str,
    spec: HttpRequestSpec,
    *,
    concurrency: int = 1,
    requests: int | None = None,
    duration_s: float | None = None,
    warmup: int = 0,
    timeout_s: float = 30.0,
) -> Measurement:
    """Send `warmup` requests (not measured; they also open the connections), then measure
    `concurrency` closed-loop senders bounded by `requests` and/or `duration_s`."""
    async with http_client(base_url, concurrency=concurrency, timeout_s=timeout_s) as client:
        send = http_sender(client, spec)
        if warmup:
            await run_closed_loop(send, concurrency=concurrency, requests=warmup)
        return await run_closed_loop(send, concurrency=concurrency, requests=requests, duration_s=duration_s)


def event_loop_runner() -> asyncio.Runner:
    """An `asyncio.Runner` on uvloop when installed (as the server's loop is), so the client's own
    overhead stays small; one runner can run many measurements on one loop and one client."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a fresh `event_loop_runner()` loop."""
    with event_loop_runner() as runner:
        return runner.run(coroutine)


def event_loop_name() -> str:
    """The event loop `run_async` uses, for reports."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return f"uvloop {metadata.version('uvloop')}"
