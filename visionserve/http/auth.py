"""The optional API key on the HTTP API (pure ASGI middleware): checked from the headers alone,
before routing and before a byte of the body is read."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from visionserve.errors import VisionError
from visionserve.http.limits import error_response
from visionserve.security import API_KEY_HEADER, AUTHORIZATION_HEADER, ApiKeyCheck

OPEN_PATHS = frozenset(
    {
        # health checks: load balancers, orchestrators and Compose probe them without credentials
        "/health/live",
        "/health/ready",
        "/v2/health/live",
        "/v2/health/ready",
        # the API's description: no data, and /docs needs it to offer its "Authorize" button
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
    }
)
"""Paths answered without the key; everything else (inference, models, metrics) needs it."""


class ApiKeyAuth:
    """Answer 401 (with `WWW-Authenticate: Bearer`) to requests that do not present the key."""

    def __init__(self, app: ASGIApp, *, key: str):
        self.app = app
        self.check = ApiKeyCheck(key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        authorization: str | None = None
        api_key: str | None = None
        for name, value in scope["headers"]:
            if name == AUTHORIZATION_HEADER.encode():
                authorization = value.decode("latin-1")
            elif name == API_KEY_HEADER.encode():
                api_key = value.decode("latin-1")
        try:
            self.check.check(authorization, api_key)
        except VisionError as error:
            start, body = error_response(error, scope["path"], [(b"www-authenticate", b"Bearer")])
            await send(start)
            await send(body)
            return
        await self.app(scope, receive, send)


def add_security_to_openapi(document: dict[str, Any]) -> dict[str, Any]:
    """Declare the key in an OpenAPI document: both header forms as security schemes, required
    on every operation but the open paths, and the 401 they may answer (so that /docs offers
    "Authorize" and generated clients send the key)."""
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(
        {
            "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
    )
    for path, operations in document.get("paths", {}).items():
        if path in OPEN_PATHS:
            continue
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
            operation.setdefault("responses", {}).setdefault(
                "401", {"description": "No API key, or not the right one (see WWW-Authenticate)"}
            )
    return document
