"""The API's own documentation at /docs, served from this package (service/static/swagger-ui/): FastAPI's
default loads Swagger UI from a CDN, a blank page offline or behind a firewall. With API keys on, the
OpenAPI document declares both ways of sending one (`Authorization: Bearer KEY`, `X-API-Key: KEY`) on every
route that needs one, so the page's "Authorize" button works."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import RedirectResponse

from service.auth import is_open

ASSETS = "/static/swagger-ui"
SCHEMES = {"bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
           "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "X-API-Key: KEY"}}


def add_docs(app: FastAPI, keys_on: bool) -> None:
    """/docs from the package's own Swagger UI; the security schemes when keys are on."""
    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css", swagger_favicon_url="/static/favicon.svg",
                                   oauth2_redirect_url="/docs/oauth2-redirect")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def redirect():
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc():  # ReDoc came from a CDN; its old links now lead to the same reference, offline
        return RedirectResponse("/docs", status_code=308)

    if keys_on:
        def openapi() -> dict:
            if app.openapi_schema is None:
                schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                     routes=app.routes)
                schema.setdefault("components", {})["securitySchemes"] = SCHEMES
                for path, operations in schema.get("paths", {}).items():
                    if is_open(path):
                        continue
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}, {"apiKey": []}]
                        operation.setdefault("responses", {}).setdefault(
                            "401", {"description": "the key is missing or wrong"})
                app.openapi_schema = schema
            return app.openapi_schema
        app.openapi = openapi  # type: ignore[method-assign]
