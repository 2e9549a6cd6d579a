"""Refusals decided from a request's line and headers, before the framework sees the request.

Under a flood of instant retries an overloaded server spends its event loop refusing: through
FastAPI a refusal costs ~0.45 ms (a task, middleware, routing, dependencies, exception handlers, a
JSON body rendered each time), and 64 senders' refusals queue behind each other (issue 15).
`EarlyRefusal` answers the same refusal from the HTTP protocol, as soon as the headers are in
(`SlowClientProtocol`, `visionserve.http.timeouts`): no task, no ASGI, no routing.

It refuses only what the route itself would refuse before reading the body, with the same answer:
an inference request (`POST /predict`, `/predict/b64`, `/predict/file`, `/v2/models/{name}/infer`
and its versioned form) whose model is known from the path, the query (`?model=`), or is the only
one served (the JSON routes; a JSON body may name the model on a server of several), whose model's
`check_admission` fails (no room in the queue: 503 `overloaded`; not ready: 503 `not_ready`). The
answer is the route's, byte for byte: the status, `Retry-After`, the error JSON in the route's
protocol's shape (rendered by `vision_error_json`, as the app's handler does), `Connection: close`
while the server drains (`CloseWhileDraining`); it is counted as the route counts it
(`visionserve_rejected_total` by `check_admission` itself, `visionserve_requests_total` and the
latency histogram under the route's template, as `RequestMetrics` does).

Everything the app would answer otherwise is left to the app, which decides it as before: a
request without the API key (401 comes first: an unauthenticated client learns nothing of the
load), a `Content-Length` over VISION_MAX_REQUEST_BYTES or not a number (413/400), a bad
`X-Request-Timeout` (400), an unknown model or version (404), query parameters FastAPI would
refuse (422: checked conservatively, anything unusual falls through), any other method or path,
and every request the check admits.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from prometheus_client import Counter, Histogram

from visionserve.deadlines import positive_seconds
from visionserve.errors import VisionError
from visionserve.http.errors import vision_error_json
from visionserve.http.requests import TIMEOUT_HEADER
from visionserve.security import API_KEY_HEADER, AUTHORIZATION_HEADER, ApiKeyCheck
from visionserve.serving.lifecycle import ServiceState
from visionserve.serving.registry import AnyModel, ModelRegistry
from visionserve.settings import ServerSettings
from visionserve.v2.models import V2Models

JSON_ROUTES = frozenset({"/predict", "/predict/b64"})
"""The project's JSON inference routes: the model in the query, else in the body."""
FILE_ROUTE = "/predict/file"
"""The multipart route: the model in the query only."""
V2_INFER = "/v2/models/{model_name}/infer"
V2_INFER_VERSION = "/v2/models/{model_name}/versions/{model_version}/infer"
_V2_INFER = re.compile(r"^/v2/models/(?P<name>[^/]+)/infer$")
_V2_INFER_VERSION = re.compile(r"^/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/infer$")
"""Starlette's patterns for those templates (a path parameter is `[^/]+` of the decoded path)."""

_POSITIVE_INT = re.compile(r"^[1-9][0-9]{0,17}$")
_DECIMAL = re.compile(r"^[0-9]{1,18}(\.[0-9]{1,18})?$")
_FILE_INTS = frozenset({"topk", "max_detections", "max_faces"})
"""/predict/file's query parameters declared `int >= 1`."""
_FILE_FLOATS = {"score_threshold": 1.0, "iou_threshold": 1.0, "min_face_size": None}
"""/predict/file's query parameters declared `float >= 0`, with their upper bounds."""

_AUTHORIZATION = AUTHORIZATION_HEADER.encode()
_API_KEY = API_KEY_HEADER.encode()
_TIMEOUT = TIMEOUT_HEADER.lower().encode()
_CACHED_ANSWERS = 256


@dataclass(frozen=True)
class Refusal:
    """An answer decided before the app: what the app would have sent after the server's own
    default headers (`Date`, `Server`), and whether the connection closes after it."""

    status: int
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes
    close: bool


class EarlyRefusal:
    """Decides, from an HTTP scope with its headers complete, whether the app would refuse the
    request before reading its body; if so returns the app's answer (and counts it), else None.
    Event loop only."""

    def __init__(self, registry: ModelRegistry, settings: ServerSettings, *, api_key: str | None = None):
        self.registry = registry
        self.models = V2Models(registry)
        self.max_request_bytes = settings.max_request_bytes
        self.key = ApiKeyCheck(api_key) if api_key is not None else None
        self.metrics = registry.metrics
        self._answers: dict[tuple[bool, str, str, int | None], tuple[list[tuple[bytes, bytes]], bytes]] = {}
        self._counters: dict[tuple[str, int, str], tuple[Counter, Histogram]] = {}

    def __call__(self, scope: Any) -> Refusal | None:
        if scope["method"] != "POST":
            return None
        started = time.perf_counter()
        path: str = scope["path"]
        if path in JSON_ROUTES or path == FILE_ROUTE:
            v2 = False
        elif path.startswith("/v2/models/"):
            v2 = True
        else:
            return None
        if not self._headers_pass(scope["headers"]):
            return None
        query = scope["query_string"]
        params = parse_qsl(query.decode("latin-1"), keep_blank_values=True) if query else []
        resolved = self._v2_model(path, params) if v2 else self._project_model(path, params)
        if resolved is None:
            return None
        model, endpoint = resolved
        try:
            model.check_admission()  # NOTE: counts a queue_full refusal, as on the route
        except VisionError as error:
            return self._refuse(error, v2, endpoint, model.name, started)
        return None  # admitted: the route checks again and serves it

    # --- what the app checks before the route ---------------------------------------------------

    def _headers_pass(self, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """True unless the app would answer from the headers before the route's admission check:
        the API key (401), Content-Length (BodySizeLimit: 413, 400), X-Request-Timeout (400)."""
        authorization: bytes | None = None
        api_key: bytes | None = None
        timeout: bytes | None = None
        length_seen = False
        for name, value in headers:
            if name == b"content-length":
                if not length_seen:  # BodySizeLimit reads the first
                    length_seen = True
                    try:
                        declared = int(value)
                    except ValueError:
                        return False
                    if declared > self.max_request_bytes:
                        return False
            elif name == _AUTHORIZATION:  # ApiKeyAuth reads the last of each
                authorization = value
            elif name == _API_KEY:
                api_key = value
            elif name == _TIMEOUT and timeout is None:  # Starlette's Headers.get: the first
                timeout = value
        if self.key is not None:
            try:
                self.key.check(
                    None if authorization is None else authorization.decode("latin-1"),
                    None if api_key is None else api_key.decode("latin-1"),
                )
            except VisionError:
                return False
        if timeout is not None:
            try:
                positive_seconds(timeout.decode("latin-1"), what=f"header {TIMEOUT_HEADER}")
            except VisionError:
                return False
        return True

    def _project_model(self, path: str, params: list[tuple[str, str]]) -> tuple[AnyModel, str] | None:
        query_model: str | None = None
        for key, value in params:
            if key == "model":
                query_model = value  # FastAPI takes the last
            elif path == FILE_ROUTE and not _file_parameter_valid(key, value):
                return None  # FastAPI answers 422 first (or may: left to it)
        if path != FILE_ROUTE and not query_model and len(self.registry) != 1:
            return None  # the JSON body may name the model (`early_admission`)
        try:
            return self.registry.get(query_model), path
        except VisionError:
            return None  # 404

    def _v2_model(self, path: str, params: list[tuple[str, str]]) -> tuple[AnyModel, str] | None:
        if match := _V2_INFER.match(path):
            endpoint = V2_INFER
            # NOTE: the unversioned route declares `model_version` too: FastAPI reads it from the
            # query (the last value)
            version = next((value for key, value in reversed(params) if key == "model_version"), None)
        elif match := _V2_INFER_VERSION.match(path):
            endpoint = V2_INFER_VERSION
            version = match["version"]
        else:
            return None
        try:
            model, _ = self.models.get(match["name"], version)
        except VisionError:
            return None  # 404
        return model, endpoint

    # --- the answer -------------------------------------------------------------------------------

    def _refuse(self, error: VisionError, v2: bool, endpoint: str, model: str, started: float) -> Refusal:
        key = (v2, error.code.value, error.message, error.retry_after_s)
        answer = self._answers.get(key)
        if answer is None:
            response = vision_error_json(error, v2=v2)  # the app's handler renders the same
            answer = (list(response.raw_headers), bytes(response.body))
            if len(self._answers) >= _CACHED_ANSWERS:
                self._answers.clear()
            self._answers[key] = answer
        status = error.status.http
        counted = self._counters.get((endpoint, status, model))
        if counted is None:
            counted = (
                self.metrics.requests.labels("http", endpoint, str(status), model),
                self.metrics.request_latency.labels("http", endpoint, model),
            )
            self._counters[(endpoint, status, model)] = counted
        requests, latency = counted
        requests.inc()
        latency.observe(time.perf_counter() - started)
        # NOTE: as CloseWhileDraining, which adds `Connection: close` while the server drains
        close = self.registry.state is ServiceState.STOPPING
        return Refusal(status, answer[0], answer[1], close)


def _file_parameter_valid(key: str, value: str) -> bool:
    """Whether FastAPI surely accepts this value of a /predict/file query parameter (a plain
    positive integer or decimal in range); False for anything it might refuse, and then the app
    decides."""
    if key in _FILE_INTS:
        return _POSITIVE_INT.match(value) is not None
    if key in _FILE_FLOATS:
        if _DECIMAL.match(value) is None:
            return False
        upper = _FILE_FLOATS[key]
        return upper is None or float(value) <= upper
    return True  # `model`, `classes` (any text) and what the route does not declare
