"""`create_app(settings)`: the upload UI (image page, video page, live camera page, status page).

Every page but the live one works as a plain form post; the scripts in `static/` only make the
same requests with `fetch` and update the page in place (`X-Requested-With: fetch` asks for the
result fragment, `Accept: application/x-ndjson` for the video's events). The live page needs
JavaScript (the camera is the browser's): it posts one camera frame at a time to `/live/frame`.
All text from users and from the APIs reaches the browser through Jinja's autoescaping, or
through `textContent` in the scripts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator, Iterator
from typing import Any

from flask import Flask, Response, jsonify, render_template, request, stream_template, stream_with_context
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from flask_ui.client import ApiClient
from flask_ui.errors import Problem, UIError
from flask_ui.frames import open_video
from flask_ui.grpc_client import VideoClient
from flask_ui.live import LIVE_TOPK, ModelCache, live_answer
from flask_ui.overlay import box_shapes, face_shapes, font_size, point_radius
from flask_ui.params import choose_model, every, form_values, live_mode, task_params
from flask_ui.preview import DETECTION_PREVIEW_SIDE, PREVIEW_SIDE, preview_data_url
from flask_ui.results import DetectionPrediction, FacesPrediction, ModelInfo
from flask_ui.settings import UISettings
from flask_ui.video import video_events

logger = logging.getLogger(__name__)

TOPK = 5
NDJSON = "application/x-ndjson"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def megabytes(size: int | None) -> str:
    """`size` bytes in words ("16 MiB", "3.2 MiB")."""
    mib = (size or 0) / (1024 * 1024)
    return f"{mib:.0f} MiB" if mib == int(mib) else f"{mib:.1f} MiB"


def _wants_fragment() -> bool:
    return request.headers.get("X-Requested-With") == "fetch"


def _wants_events() -> bool:
    """Errors as JSON: the video page's event stream and the live page's frames."""
    accept = request.headers.get("Accept", "")
    return NDJSON in accept or "application/json" in accept


def _upload(kind: str) -> tuple[bytes, str]:
    """The uploaded file's bytes and name; UIError when none was chosen."""
    upload = request.files.get("file")
    data = upload.read() if upload is not None else b""
    if upload is None or (not data and not upload.filename):
        raise UIError(Problem.BAD_INPUT, f"No {kind} chosen", f"Choose a {kind} file first.")
    if not data:
        raise UIError(Problem.BAD_INPUT, "The file is empty", f"{upload.filename} has no content.")
    return data, upload.filename or ""


def _closing(chunks: Iterator[str], events: Generator[dict[str, Any]]) -> Iterator[str]:
    """`chunks` (rendered from `events`), closing `events` when the server closes the response:
    a page that went away stops its gRPC stream at once, not when the generators are collected."""
    try:
        yield from chunks
    finally:
        events.close()


def create_app(
    settings: UISettings, *, api: ApiClient | None = None, video: VideoClient | None = None
) -> Flask:
    """Build the UI for `settings`; `api` and `video` replace the real clients (tests)."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    api = api or ApiClient(
        settings.api_url,
        request_timeout_s=settings.request_timeout_s,
        status_timeout_s=settings.status_timeout_s,
        api_key=settings.api_key_value,
        ca_file=settings.tls_ca_file,
    )
    video = video or VideoClient(
        settings.grpc_target,
        timeout_s=settings.video_timeout_s,
        status_timeout_s=settings.status_timeout_s,
        max_message_bytes=settings.grpc_max_message_bytes,
        api_key=settings.api_key_value,
        tls=settings.grpc_tls,
        ca_file=settings.tls_ca_file,
    )
    app.extensions["visionserve_ui"] = {"settings": settings, "api": api, "video": video}
    live_models = ModelCache(api)

    @app.context_processor
    def common() -> dict[str, Any]:
        return {"settings": settings, "max_upload": megabytes(settings.max_content_length)}

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    def _choice(models: list[ModelInfo] | None, values: dict[str, str]) -> dict[str, Any]:
        """The picker's context: the served models, the chosen one, the form's values; `error`
        when the form names a model that is not served (the default one is then chosen)."""
        context: dict[str, Any] = {"models": models, "form": values, "error": None}
        try:
            context["chosen"] = choose_model(models, values["model"])
        except UIError as exc:
            context["error"], context["chosen"] = exc, choose_model(models, "")
        return context

    def _form_page(template: str, page: str, **extra: Any) -> tuple[str, int]:
        context = _choice(api.models(), form_values(request.args)) | {"page": page, **extra}
        return render_template(template, **context), context["error"].status if context["error"] else 200

    @app.get("/")
    def image_page() -> tuple[str, int]:
        return _form_page("index.html", "image")

    @app.post("/")
    def predict_photo() -> tuple[str, int]:
        context = _choice(api.models(), form_values(request.form))
        context |= {"page": "image", "filename": None, "result": None}
        try:
            if context["error"]:
                raise context["error"]
            chosen: ModelInfo | None = context["chosen"]
            data, context["filename"] = _upload("photo")
            topk, params = task_params(request.form, chosen, topk=TOPK)
            name = chosen.name if chosen else context["form"]["model"].strip() or None
            result = api.predict(data, context["filename"], model=name, topk=topk, params=params)
            context["result"] = result
            if isinstance(result, DetectionPrediction | FacesPrediction):
                context["preview"] = preview_data_url(data, DETECTION_PREVIEW_SIDE)
                context["shapes"] = (
                    box_shapes(result.detections, result.width, result.height)
                    if isinstance(result, DetectionPrediction)
                    else face_shapes(result.faces, result.width, result.height)
                )
                context["font_size"] = font_size(result.width, result.height)
                context["point_radius"] = point_radius(result.width, result.height)
            else:
                context["preview"] = preview_data_url(data, PREVIEW_SIDE)
        except UIError as exc:
            context["error"] = exc
        status = context["error"].status if context["error"] else 200
        return render_template("_result.html" if _wants_fragment() else "index.html", **context), status

    @app.get("/video")
    def video_page() -> tuple[str, int]:
        return _form_page("video.html", "video", events=None, max_frames=settings.max_video_frames)

    @app.post("/video")
    def predict_video() -> Response | tuple[str, int]:
        context = _choice(api.models(), form_values(request.form))
        context |= {"page": "video", "max_frames": settings.max_video_frames}
        try:
            if context["error"]:
                raise context["error"]
            data, filename = _upload("video")
            sampling, live = every(request.form), live_mode(request.form)
            _, params = task_params(request.form, context["chosen"], topk=1)
            source = open_video(data)
        except UIError as exc:
            if _wants_events():
                body = json.dumps({"event": "error", "title": exc.title, "message": exc.message})
                return Response(body, status=exc.status, mimetype="application/json")
            return render_template("video.html", events=None, **context | {"error": exc}), exc.status
        events = video_events(
            source,
            video,
            every=sampling,
            max_frames=settings.max_video_frames,
            model=context["chosen"],
            requested_model=context["form"]["model"].strip(),
            params=params,
            live=live,
            previews=_wants_events(),  # NOTE: the page without JavaScript shows a table only
        )
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # proxies: do not buffer
        if _wants_events():
            lines = (json.dumps(event) + "\n" for event in events)
            return Response(stream_with_context(_closing(lines, events)), mimetype=NDJSON, headers=headers)
        # No JavaScript: the page itself streams, a table row per frame as its answer arrives.
        page = stream_template("video.html", events=events, filename=filename, **context)
        return Response(_closing(page, events), mimetype="text/html", headers=headers)

    @app.get("/live")
    def live_page() -> tuple[str, int]:
        return _form_page("live.html", "live")

    @app.post("/live/frame")
    def live_frame() -> Response | tuple[Response, int]:
        """One camera frame (`file`, a JPEG) and the form's model and settings -> its answer as
        JSON, or `{"event": "error", "title", "message"}` with the error's status: a bad frame
        fails alone, the page shows why and sends the next one."""
        try:
            models = live_models.get()
            requested = form_values(request.form)["model"]
            chosen = choose_model(models, requested)
            data, _ = _upload("frame")
            topk, params = task_params(request.form, chosen, topk=LIVE_TOPK)
            name = chosen.name if chosen else requested.strip() or None
            result = api.predict(data, "frame.jpg", model=name, topk=topk, params=params)
        except UIError as exc:
            return jsonify(event="error", title=exc.title, message=exc.message), exc.status
        response = jsonify(live_answer(result))
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/status")
    def status_page() -> str:
        return render_template(
            "status.html",
            page="status",
            api_state=api.readiness(),
            grpc_state=video.health(),
            models=api.models(),
            checked_at=time.strftime("%H:%M:%S"),
        )

    @app.get("/health/live")
    def live() -> dict[str, str]:
        return {"status": "live"}

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_: RequestEntityTooLarge) -> Response | tuple[str, int]:
        error = UIError(
            Problem.TOO_LARGE,
            "That file is too large",
            f"The upload is {megabytes(request.content_length)}; this page accepts files up to "
            f"{megabytes(settings.max_content_length)} (setting VISION_UI_MAX_CONTENT_LENGTH).",
        )
        return _error_answer(error, 413)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response | tuple[str, int]:
        title = {404: "Page not found", 405: "Not allowed"}.get(exc.code or 0, exc.name)
        return _error_answer(UIError(Problem.BAD_INPUT, title, exc.description or ""), exc.code or 400)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response | tuple[str, int]:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return _error_answer(
            UIError(Problem.API_ERROR, "Something went wrong", "The UI's log says why."), 500
        )

    def _error_answer(error: UIError, status: int) -> Response | tuple[str, int]:
        if _wants_events():
            body = json.dumps({"event": "error", "title": error.title, "message": error.message})
            return Response(body, status=status, mimetype="application/json")
        if _wants_fragment():
            return render_template("_result.html", error=error, result=None, filename=None), status
        back = request.path if request.method == "POST" else "/"
        return render_template("error.html", error=error, status=status, back=back), status

    return app
