"""`ApiClient`: the UI's only way to the HTTP inference API (predict, readiness, the served models).

Every failure comes out as a `UIError` whose words suit the page: the API's own error messages
already say what to fix and are shown as they are; connection failures and timeouts are named
with the address and the setting involved.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx2

from flask_ui.answers import model_info, prediction
from flask_ui.errors import Problem, UIError
from flask_ui.params import TaskParams
from flask_ui.results import ModelInfo, Prediction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    """Whether a service can serve: `state` is "ready", "not_ready" or "down"; `detail` says why."""

    state: str
    detail: str

    @property
    def ok(self) -> bool:
        """True when the service can serve now."""
        return self.state == "ready"


def _error_detail(response: httpx2.Response) -> tuple[str, str]:
    """The API's `{"error": {"code", "message"}}`, or ("", "") when the body is something else
    (e.g. a proxy's HTML page)."""
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "", ""


def error_from_response(response: httpx2.Response) -> UIError:  # noqa: PLR0911 (one per kind)
    """Map an API error answer to what the page says (the API's message, when it has one, is
    shown as it is: it says what to fix)."""
    code, message = _error_detail(response)
    # NOTE: FastAPI's validation names a query parameter "query.score_threshold"; the parameter's
    # own name is what the form shows, and a name is not capitalised.
    message = message.removeprefix("query.")
    if "_" not in message.split(maxsplit=1)[0] if message else True:
        message = message[:1].upper() + message[1:]
    status = response.status_code
    if code == "invalid_argument" or (status == 422 and not code):
        return UIError(
            Problem.BAD_INPUT,
            "The model cannot take these settings",
            message or "Check the settings in the form.",
        )
    if status == 404 and code == "model_not_found":
        return UIError(Problem.BAD_INPUT, "There is no such model", message)
    if status in (400, 415, 422) or code in ("invalid_image", "invalid_base64"):
        return UIError(
            Problem.BAD_INPUT,
            "That file is not an image we can read",
            message or "Choose a JPEG, PNG, WebP, GIF, BMP or TIFF photo.",
        )
    if status == 401:
        return UIError(
            Problem.API_ERROR,
            "The inference API refused this page's key",
            "It needs an API key and the UI's is missing or wrong: set VISION_UI_API_KEY to the "
            "API's VISION_API_KEY.",
        )
    if status == 413:
        return UIError(Problem.TOO_LARGE, "The image is too large", message or "Try a smaller image.")
    if status == 503 and code == "overloaded":
        return UIError(Problem.BUSY, "The model is busy", "Too many images at once; try again in a moment.")
    if status == 503:
        return UIError(
            Problem.NOT_READY,
            "The model is not ready yet",
            "The inference API is still loading its model; try again in a few seconds.",
        )
    if status == 504:
        return UIError(Problem.TIMEOUT, "The model took too long", message or "Try again in a moment.")
    logger.warning("the API answered %s %s: %s", status, code or "(no error code)", message)
    return UIError(
        Problem.API_ERROR,
        "The inference API failed",
        f"It answered HTTP {status}; its log says why. Try again, or another image.",
    )


class ApiClient:
    """Calls the HTTP inference API at `base_url`. Thread-safe (one pooled httpx2 client).

    `api_key` is sent as `Authorization: Bearer` on every call; `ca_file` is trusted for an
    https:// API (default: the system's authorities). `transport` replaces the network (tests
    pass an `httpx2.MockTransport`)."""

    def __init__(
        self,
        base_url: str,
        *,
        request_timeout_s: float,
        status_timeout_s: float,
        api_key: str | None = None,
        ca_file: Path | None = None,
        transport: httpx2.BaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.status_timeout_s = status_timeout_s
        # NOTE: connect time is bounded by the short status timeout even for predictions: an API
        # that does not accept a connection within it is down, and the page should say so at once.
        self._http = httpx2.Client(
            base_url=self.base_url,
            timeout=httpx2.Timeout(request_timeout_s, connect=min(status_timeout_s, request_timeout_s)),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            verify=ssl.create_default_context(cafile=str(ca_file)) if ca_file else True,
            transport=transport,
        )

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def _unreachable(self, exc: Exception) -> UIError:
        logger.info("the API at %s is not reachable: %s", self.base_url, exc)
        return UIError(
            Problem.UNREACHABLE,
            "The inference API is not reachable",
            f"Nothing answers at {self.base_url}. Start it (`make run` starts everything) or point "
            "VISION_UI_API_URL at it.",
        )

    def predict(
        self,
        image: bytes,
        filename: str,
        *,
        model: str | None = None,
        topk: int | None = None,
        params: TaskParams | None = None,
    ) -> Prediction:
        """POST the image to /predict/file for `model` (None: the API's default) with a
        classifier's `topk` or a detector's or face model's settings (only those given are sent);
        the answer as the model's task has it."""
        query: dict[str, str | list[str]] = {}
        if model:
            query["model"] = model
        if topk is not None:
            query["topk"] = str(topk)
        if params is not None:
            query |= params.query()
        started = time.perf_counter()
        try:
            response = self._http.post(
                "/predict/file",
                params=query,
                files={"file": (filename or "upload", image, "application/octet-stream")},
            )
        except httpx2.TimeoutException as exc:
            if isinstance(exc, httpx2.ConnectTimeout):
                raise self._unreachable(exc) from None
            raise UIError(
                Problem.TIMEOUT,
                "The model took too long",
                f"No answer from the inference API within {self.request_timeout_s:g} s "
                "(VISION_UI_REQUEST_TIMEOUT_S). Try again in a moment.",
            ) from None
        except httpx2.TransportError as exc:
            raise self._unreachable(exc) from None
        round_trip_ms = (time.perf_counter() - started) * 1e3
        if response.status_code != 200:
            raise error_from_response(response)
        try:
            return prediction(response.json(), round_trip_ms)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("unexpected answer from %s/predict/file: %s", self.base_url, exc)
            raise UIError(
                Problem.API_ERROR,
                "Unexpected answer from the API",
                f"{self.base_url} does not answer like a visionserve API; check VISION_UI_API_URL.",
            ) from None

    def readiness(self) -> Readiness:
        """GET /health/ready: ready, not ready (with the API's reason) or down."""
        try:
            response = self._http.get("/health/ready", timeout=self.status_timeout_s)
        except httpx2.TransportError as exc:
            return Readiness("down", self._unreachable(exc).message)
        if response.status_code == 200:
            return Readiness("ready", "its models are loaded and warmed up")
        try:
            detail = str(response.json().get("detail") or f"HTTP {response.status_code}")
        except (ValueError, AttributeError):
            detail = f"HTTP {response.status_code}"
        return Readiness("not_ready", detail)

    def models(self) -> list[ModelInfo] | None:
        """GET /models: every served model (the default one flagged), or None when the API
        cannot say (down, odd answer)."""
        try:
            response = self._http.get("/models", timeout=self.status_timeout_s)
            response.raise_for_status()
            models = [model_info(entry) for entry in response.json()["models"]]
        except (httpx2.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            logger.debug("no model list from %s: %s", self.base_url, exc)
            return None
        if models and not any(m.default for m in models):
            # NOTE: an API from before several models were served lists only its one model.
            models[0] = replace(models[0], default=True)
        return models
