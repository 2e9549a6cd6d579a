"""Per-request metrics for the HTTP API (pure ASGI middleware)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visionserve.metrics import Metrics


class RequestMetrics:
    """Counts every HTTP request by endpoint (the route's path template, so that the label set
    stays small), status and model (what the route recorded in `request.state.model`; empty for
    requests that name none), and times it."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            model = str(scope.get("state", {}).get("model", ""))
            self.metrics.requests.labels("http", endpoint, str(status), model).inc()
            self.metrics.request_latency.labels("http", endpoint, model).observe(
                time.perf_counter() - started
            )
