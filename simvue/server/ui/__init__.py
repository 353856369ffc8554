"""The dashboard's pages, served beside the API by ``simvue server`` and ``simvue ui``.

One page (``static/index.html``) answers ``/`` and every ``/dashboard/...`` path; its script reads
the API (``/api/...``) with the token it was given, and draws with uPlot (``static/vendor``, MIT,
shipped in the package: nothing is fetched from elsewhere).  ``/docs`` is a self-contained
list of the API's routes read from the OpenAPI schema, for the same reason.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
_NO_CACHE = {"Cache-Control": "no-cache"}  # the page is tiny; its assets are revalidated by ETag


def _page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_NO_CACHE)


def mount(app: FastAPI) -> None:
    """Serve the dashboard at ``/`` and ``/dashboard/...``, its assets at ``/static``."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def root(request: Request) -> RedirectResponse:
        query = request.url.query
        return RedirectResponse("/dashboard/runs" + (f"?{query}" if query else ""))

    @app.get("/dashboard", include_in_schema=False)
    @app.get("/dashboard/{path:path}", include_in_schema=False)
    def dashboard(path: str = "") -> FileResponse:
        return _page()

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse((STATIC / "docs.html").read_text(encoding="utf-8"), headers=_NO_CACHE)

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> RedirectResponse:
        return RedirectResponse("/docs")
