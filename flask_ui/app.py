"""`create_app(settings)`: the upload UI (image page, video page, status page).

Every page works as a plain form post; the scripts in `static/` only make the same requests with
`fetch` and update the page in place (`X-Requested-With: fetch` asks for the result fragment,
`Accept: application/x-ndjson` for the video's events). All text from users and from the APIs
reaches the browser through Jinja's autoescaping, or through `textContent` in the scripts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator, Iterator
from typing import Any

from flask import Flask, Response, render_template, request, stream_template, stream_with_context
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from flask_ui.client import ApiClient
from flask_ui.errors import Problem, UIError
from flask_ui.frames import VideoSource, open_video
from flask_ui.grpc_client import VideoClient
from flask_ui.preview import preview_data_url
from flask_ui.settings import UISettings

logger = logging.getLogger(__name__)

TOPK = 5
MAX_EVERY = 1000
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
    return NDJSON in request.headers.get("Accept", "")


def _upload(kind: str) -> tuple[bytes, str]:
    """The uploaded file's bytes and name; UIError when none was chosen."""
    upload = request.files.get("file")
    data = upload.read() if upload is not None else b""
    if upload is None or (not data and not upload.filename):
        raise UIError(Problem.BAD_INPUT, f"No {kind} chosen", f"Choose a {kind} file first.")
    if not data:
        raise UIError(Problem.BAD_INPUT, "The file is empty", f"{upload.filename} has no content.")
    return data, upload.filename or ""


def _every() -> int:
    raw = request.form.get("every", "1").strip() or "1"
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_EVERY:
        raise UIError(
            Problem.BAD_INPUT,
            "'Every Nth frame' must be a whole number",
            f"Use 1 (every frame) up to {MAX_EVERY}; got {raw[:20]!r}.",
        )
    return int(raw)


def video_events(
    source: VideoSource, client: VideoClient, *, every: int, max_frames: int
) -> Generator[dict[str, Any]]:
    """What the video page shows, as events: `start`, one `frame` per answer (with the running
    count and frames per second), then `end`, or `error` when the stream fails."""
    yield {"event": "start", "kind": source.kind, "frames": source.frame_count, "every": every}
    count = 0
    started = time.perf_counter()
    results = client.stream(source.frames(every=every, max_frames=max_frames))
    try:
        for result in results:
            count += 1
            elapsed = time.perf_counter() - started
            event: dict[str, Any] = {
                "event": "frame",
                "frame_id": result.frame_id,
                "count": count,
                "fps": round(count / elapsed, 1) if elapsed > 0 else 0.0,
                "server_ms": round(result.server_ms, 1),
            }
            if result.error:
                event["error"] = result.error
            else:
                top = result.topk[0]
                event |= {"label": top.label, "prob": round(top.prob, 4)}
            yield event
    except UIError as exc:
        yield {"event": "error", "title": exc.title, "message": exc.message, "count": count}
        return
    except Exception:
        logger.exception("video stream failed")
        yield {
            "event": "error",
            "title": "The video failed",
            "message": "The UI's log says why.",
            "count": count,
        }
        return
    finally:
        # NOTE: when the browser goes away, the server closes this generator at a `yield`; closing
        # the stream here cancels the gRPC call at once, so the model stops working for nobody.
        results.close()
    elapsed = time.perf_counter() - started
    end: dict[str, Any] = {
        "event": "end",
        "count": count,
        "elapsed_s": round(elapsed, 2),
        "fps": round(count / elapsed, 1) if elapsed > 0 else 0.0,
    }
    if source.truncated:
        end["note"] = f"Stopped at {max_frames} frames (VISION_UI_MAX_VIDEO_FRAMES)."
    yield end


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

    @app.context_processor
    def common() -> dict[str, Any]:
        return {"settings": settings, "max_upload": megabytes(settings.max_content_length)}

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    @app.get("/")
    def image_page() -> str:
        return render_template("index.html", model=api.model_details(), page="image")

    @app.post("/")
    def classify() -> tuple[str, int]:
        context: dict[str, Any] = {"page": "image", "filename": None, "result": None, "error": None}
        try:
            data, context["filename"] = _upload("photo")
            context["result"] = api.predict(data, context["filename"], topk=TOPK)
            context["preview"] = preview_data_url(data)
        except UIError as exc:
            context["error"] = exc
        context["model"] = api.model_details()
        status = context["error"].status if context["error"] else 200
        return render_template("_result.html" if _wants_fragment() else "index.html", **context), status

    @app.get("/video")
    def video_page() -> str:
        return render_template("video.html", page="video", events=None, max_frames=settings.max_video_frames)

    @app.post("/video")
    def classify_video() -> Response | tuple[str, int]:
        try:
            data, filename = _upload("video")
            every = _every()
            source = open_video(data)
        except UIError as exc:
            if _wants_events():
                body = json.dumps({"event": "error", "title": exc.title, "message": exc.message})
                return Response(body, status=exc.status, mimetype="application/json")
            return render_template(
                "video.html", page="video", events=None, error=exc, max_frames=settings.max_video_frames
            ), exc.status
        events = video_events(source, video, every=every, max_frames=settings.max_video_frames)
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # proxies: do not buffer
        if _wants_events():
            lines = (json.dumps(event) + "\n" for event in events)
            return Response(stream_with_context(_closing(lines, events)), mimetype=NDJSON, headers=headers)
        # No JavaScript: the page itself streams, a table row per frame as its answer arrives.
        page = stream_template(
            "video.html",
            page="video",
            events=events,
            filename=filename,
            every=every,
            max_frames=settings.max_video_frames,
        )
        return Response(_closing(page, events), mimetype="text/html", headers=headers)

    @app.get("/status")
    def status_page() -> str:
        return render_template(
            "status.html",
            page="status",
            api_state=api.readiness(),
            grpc_state=video.health(),
            model=api.model_details(),
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
