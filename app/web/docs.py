"""The API documentation: /openapi.json and the Swagger UI at /docs, served without internet.

FastAPI's own /docs page loads Swagger UI from a CDN, so it is blank on a host without
internet access. Here its script, style sheet and icon come from the fastapi-offline package,
which ships them (kept up to date there, not copied into this repository), and are served
under /docs/assets. With DLR_RESTRICT_DOCS the page and the schema are behind the /api/*
access rule; the assets stay open, since they are the same public Swagger UI files for
everyone and say nothing about this service.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.params import Depends as DependsParam
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from app.config import Settings
from app.web.security import require_api_access

DOCS_URL = "/docs"
OPENAPI_URL = "/openapi.json"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs/assets"
ASSETS = Path(str(files("fastapi_offline") / "static"))


def install(app: FastAPI, settings: Settings) -> None:
    """Register /openapi.json, /docs and the Swagger UI assets on an app made with
    docs_url=None and openapi_url=None."""
    guarded: list[DependsParam] = (
        [Depends(require_api_access)] if settings.restrict_docs else [])
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    @app.get(OPENAPI_URL, include_in_schema=False, dependencies=guarded)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(DOCS_URL, include_in_schema=False, dependencies=guarded)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{OPENAPI_URL}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
