"""`/docs` and `/redoc` on a network without internet: chromium, allowed to reach 127.0.0.1 only,
renders Swagger UI from the server's own files and an "Execute" on `POST /predict` answers a
prediction; ReDoc renders too. And the pages' files stay open when an API key is set."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, BrowserContext, Route, expect, sync_playwright

from tests.fixtures import FakeRuntime, app_of, write_fake_entry
from tests.integration.v2_servers import HttpServing, http_serving
from visionserve.http.docs import ASSET_FILES, ASSETS_PATH
from visionserve.settings import ServerSettings

pytestmark = [pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
KEY = "docs-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        # NOTE: the resolver maps every name but 127.0.0.1 to nothing: no request can leave
        # the machine even if one escaped the page's routing (service workers, prefetch).
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
        )
        yield browser
        browser.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HttpServing]:
    with http_serving(FakeRuntime(write_fake_entry(tmp_path))) as serving:
        yield serving


@pytest.fixture
def offline(browser: Browser) -> Iterator[tuple[BrowserContext, list[str]]]:
    """A browser context that aborts (and records) every request not to 127.0.0.1."""
    context = browser.new_context()
    context.set_default_timeout(30_000)
    outside: list[str] = []

    def only_local(route: Route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort("internetdisconnected")

    context.route("**/*", only_local)
    yield context, outside
    context.close()


def test_swagger_ui_renders_and_executes_predict_offline(
    server: HttpServing, offline: tuple[BrowserContext, list[str]]
) -> None:
    context, outside = offline
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    loaded: list[str] = []
    page.on("requestfinished", lambda request: loaded.append(request.url))
    page.goto(f"http://{server.url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("visionserve")

    operation = page.locator(".opblock-post").filter(
        has=page.locator('.opblock-summary-path[data-path="/predict"]')
    )
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()  # the documented example: a cat photo
    status = operation.locator(".live-responses-table .response .response-col_status")
    expect(status).to_have_text("200")
    body = operation.locator(".live-responses-table .response-col_description pre").first
    expect(body).to_contain_text('"topk"')
    expect(body).to_contain_text('"label"')

    assert not outside, f"requests to outside: {outside}"
    assert not errors, errors
    assert any(url.endswith(f"{ASSETS_PATH}/swagger-ui-bundle.js") for url in loaded), loaded


def test_redoc_renders_offline(server: HttpServing, offline: tuple[BrowserContext, list[str]]) -> None:
    """ReDoc's own logo (cdn.redoc.ly) is refused by the page's Content-Security-Policy before
    any request is made; everything else comes from the server."""
    context, outside = offline
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    refused: list[str] = []
    page.on("console", lambda message: refused.append(message.text) if message.type == "error" else None)
    page.goto(f"http://{server.url}/redoc")
    expect(page.locator("h1").first).to_contain_text("visionserve")
    expect(page.get_by_text("/predict/file").first).to_be_attached()
    page.get_by_placeholder("Search...").fill("predict")  # search runs in a blob: worker
    expect(page.locator('[role="search"] li').first).to_be_attached()
    assert not outside, f"requests to outside: {outside}"
    assert not errors, errors
    assert all("cdn.redoc.ly" in text for text in refused), refused


def test_the_docs_pages_and_their_files_need_no_key(tmp_path: Path) -> None:
    app = app_of(ServerSettings(), FakeRuntime(write_fake_entry(tmp_path)), api_key=KEY)
    with TestClient(app) as client:
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect", "/openapi.json"):
            page = client.get(path)
            assert page.status_code == 200, path
            # every script, style and icon the pages name is served from here
            assert not re.search(r"(?:src|href)=\"https?://", page.text), path
        for name in ASSET_FILES:
            asset = client.get(f"{ASSETS_PATH}/{name}")
            assert asset.status_code == 200 and asset.content, name
            assert "max-age" in asset.headers["cache-control"] and asset.headers["etag"]
        assert client.get(f"{ASSETS_PATH}/other.js").status_code == 401  # only those files are open
        assert client.get("/models").status_code == 401
