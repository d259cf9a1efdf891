"""The API's documentation pages, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served with
their JavaScript and CSS from the head itself (``dashboard/vendor/``), so that they work with no
internet access, as the dashboard does. ``/openapi.json`` is FastAPI's own."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

#: where ``create_app`` mounts the dashboard's folder
VENDOR = "/static/vendor"
SWAGGER_JS = f"{VENDOR}/swagger-ui-bundle.js"
SWAGGER_CSS = f"{VENDOR}/swagger-ui.css"
REDOC_JS = f"{VENDOR}/redoc.standalone.js"
FAVICON = f"{VENDOR}/swagger-ui-favicon-32x32.png"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"

#: no token needed: the pages hold no data (their "Try it out" sends the token the user gives)
router = APIRouter(include_in_schema=False)


def _title(request: Request) -> str:
    return str(request.app.title)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=str(request.app.openapi_url), title=f"{_title(request)} - Swagger UI",
                               swagger_js_url=SWAGGER_JS, swagger_css_url=SWAGGER_CSS, swagger_favicon_url=FAVICON,
                               oauth2_redirect_url=OAUTH2_REDIRECT)


@router.get(OAUTH2_REDIRECT)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=str(request.app.openapi_url), title=f"{_title(request)} - ReDoc",
                          redoc_js_url=REDOC_JS, redoc_favicon_url=FAVICON, with_google_fonts=False)
