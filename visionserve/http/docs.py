"""`/docs` (Swagger UI) and `/redoc` served from the project itself, not from a CDN.

FastAPI's own pages load their script, styles and icon from public CDNs, so on a network without
internet they stay blank. These are FastAPI's documented self-hosting (its HTML helpers pointed at
local files); the files come from the pinned PyPI package `fastapi-offline` (requirements/
serve.txt), which bundles a current Swagger UI and ReDoc and depends on nothing but FastAPI.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.responses import FileResponse, HTMLResponse
from starlette.types import ASGIApp, Receive, Scope, Send

DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
ASSETS_PATH = "/docs/assets"
"""Where the pages' files are served (answered before the API key is checked, as /docs is)."""
REDOC_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' blob:; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)
"""/redoc's Content-Security-Policy: this server only (ReDoc's search runs in a blob: worker)."""
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def assets_dir() -> Path:
    """The folder of Swagger UI's and ReDoc's files inside the installed fastapi-offline."""
    return Path(str(importlib.resources.files("fastapi_offline") / "static"))


class DocsAssets:
    """Serve the docs pages' files (GET/HEAD, with ETag and Last-Modified) ahead of the app.

    NOTE: pure ASGI and installed outside the API-key middleware: the pages are open (they hold
    no data), so their script must be too, or /docs would be blank whenever a key is set.
    """

    def __init__(self, app: ASGIApp, *, directory: Path | None = None):
        self.app = app
        folder = directory or assets_dir()
        self.files = {f"{ASSETS_PATH}/{name}": folder / name for name in ASSET_FILES}
        missing = [str(path) for path in self.files.values() if not path.is_file()]
        if missing:
            raise RuntimeError(
                f"the /docs files are missing ({', '.join(missing)}): reinstall fastapi-offline"
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = self.files.get(scope["path"]) if scope["type"] == "http" else None
        if path is None or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        response = FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})
        await response(scope, receive, send)


def install_docs(app: FastAPI) -> None:
    """Add /docs, its OAuth2 redirect and /redoc to `app` (built with docs_url=redoc_url=None)
    and serve their files from this process."""
    app.add_middleware(DocsAssets)

    def asset(request: Request, name: str) -> str:
        return f"{request.scope.get('root_path', '')}{ASSETS_PATH}/{name}"

    def openapi_url(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{app.openapi_url}"

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url(request),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=asset(request, "swagger-ui-bundle.js"),
            swagger_css_url=asset(request, "swagger-ui.css"),
            swagger_favicon_url=asset(request, "favicon.png"),
            oauth2_redirect_url=OAUTH2_REDIRECT_PATH,
            # NOTE: null: never send the document to swagger.io's online validator
            swagger_ui_parameters={"validatorUrl": None} | (app.swagger_ui_parameters or {}),
        )

    @app.get(OAUTH2_REDIRECT_PATH, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=openapi_url(request),
            title=f"{app.title} - ReDoc",
            redoc_js_url=asset(request, "redoc.standalone.js"),
            redoc_favicon_url=asset(request, "favicon.png"),
            with_google_fonts=False,
        )
        # NOTE: ReDoc's menu always shows Redocly's logo from cdn.redoc.ly (hidden when it fails
        # to load); the policy keeps the browser from asking for it, or anything else outside.
        page.headers["Content-Security-Policy"] = REDOC_POLICY
        return page
