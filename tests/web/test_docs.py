"""/docs works on a host without internet: Swagger UI's files come from this server, and the
page and schema follow DLR_RESTRICT_DOCS."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI

from app.main import create_app
from app.store.db import make_engine
from app.store.migrate import upgrade
from app.web import docs

from ..helpers import CHROMIUM, AppFactory, client_for, make_settings, serving_in_thread


def referenced(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", page) + re.findall(
        r"""url: *["']([^"']+)["']""", page)


async def test_docs_load_nothing_from_elsewhere(app_with: AppFactory) -> None:
    app = await app_with()
    async with client_for(app) as client:
        r = await client.get("/docs")
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        urls = referenced(r.text)
        assert "/openapi.json" in urls
        # Every script, style sheet and icon is this server's own, and it serves them.
        assert all(u.startswith("/") and not u.startswith("//") for u in urls), urls
        assert "//" not in r.text.replace("http://www.w3.org", "")
        kinds = {}
        for url in urls:
            asset = await client.get(url)
            assert asset.status_code == 200, url
            kinds[url.rsplit(".", 1)[-1]] = asset
        assert "SwaggerUIBundle" in kinds["js"].text
        assert "javascript" in kinds["js"].headers["content-type"]
        assert kinds["css"].headers["content-type"].startswith("text/css")
        assert (await client.get("/openapi.json")).json()["info"]["title"] == app.title


@pytest.mark.parametrize("restrict", [False, True])
async def test_restrict_docs_puts_page_and_schema_behind_the_api_rule(
        app_with: AppFactory, restrict: bool) -> None:
    app = await app_with(api_keys="docs-key", restrict_docs=restrict)
    async with client_for(app, peer="203.0.113.9") as client:
        for path in ("/docs", "/openapi.json"):
            anonymous = await client.get(path)
            assert anonymous.status_code == (401 if restrict else 200), path
            keyed = await client.get(path, headers={"Authorization": "Bearer docs-key"})
            assert keyed.status_code == 200, path
        # The Swagger UI files are the same public files for everyone.
        asset = await client.get(f"{docs.ASSETS_URL}/swagger-ui.css")
        assert asset.status_code == 200


async def test_install_on_a_bare_app() -> None:
    """The module needs nothing from create_app: any app made without FastAPI's docs."""
    app = FastAPI(title="bare", docs_url=None, openapi_url=None)

    @app.get("/api/v1/ping")
    def ping() -> dict[str, str]:
        return {"ok": "yes"}

    docs.install(app, make_settings())
    async with client_for(app) as client:
        assert "/api/v1/ping" in (await client.get("/openapi.json")).json()["paths"]
        assert (await client.get("/docs/oauth2-redirect")).status_code == 200
        assert "/docs/assets/swagger-ui-bundle.js" in (await client.get("/docs")).text


@pytest.mark.slow
def test_swagger_ui_renders_with_the_network_cut_off(sqlite_url: str) -> None:
    """In a real browser that may reach nothing but this server, /docs lists the API."""
    from playwright.sync_api import Route, expect, sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium is needed: apt-get install chromium (make test does)"
    settings = make_settings(database_url=sqlite_url)
    engine = make_engine(settings)
    upgrade(engine)
    engine.dispose()
    app = create_app(settings)
    with serving_in_thread(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--headless=new", "--no-sandbox", "--disable-gpu"])
        elsewhere: list[str] = []

        def only_this_server(route: Route) -> None:
            if route.request.url.startswith(url + "/"):
                route.continue_()
            else:
                elsewhere.append(route.request.url)
                route.abort("internetdisconnected")

        try:
            page = browser.new_page()
            page.route("**/*", only_this_server)
            page.goto(f"{url}/docs")
            expect(page.locator(".opblock-summary-path").first).to_be_visible(timeout=15_000)
            expect(page.locator(".opblock-summary-path",
                                has_text="/api/v1/timeline")).to_have_count(1)
            assert elsewhere == []
        finally:
            browser.close()
