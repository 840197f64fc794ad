"""`GET /`: a small page to try the served model, and its assets under `/static`.

The page and its assets hold no data, so they are open without an API key (see
`middleware.PUBLIC_PATHS`); the page sends the key the user types to the JSON endpoints.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# The page builds its DOM with textContent only; this keeps any injected markup inert too.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)
_static = StaticFiles(directory=STATIC_DIR)


@router.api_route("/", methods=["GET", "HEAD"])
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers=PAGE_HEADERS)


# A route rather than `router.mount`: older FastAPI versions drop the mounts of included
# routers. StaticFiles still does the lookup (no escaping the folder), ETags and 304s.
@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static(name: str, request: Request) -> Response:
    response = await _static.get_response(name, request.scope)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
