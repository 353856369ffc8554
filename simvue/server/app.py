"""The FastAPI application: routes, token check, error answers and the request guard."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from . import DEFAULT_MAX_BODY_MB, ui
from .auth import TokenRejected, check_authorization, load_or_create_secret
from .blobs import BlobStore
from .db import ServerData
from .faults import FaultRule, FaultSet
from .guard import RequestGuard, RequestStats
from .routes import (
    SafeJSONResponse,
    admin,
    alerts,
    artifacts,
    dashboard,
    events,
    folders,
    grids,
    metrics,
    runs,
    service,
    storage,
    tags,
)

ARTIFACTS_DIR = "artifacts"
API_PREFIX = "/api"
_API_MODULES = (service, folders, runs, metrics, events, artifacts, alerts, tags, grids, dashboard, admin, storage)


@dataclasses.dataclass
class ServerSettings:
    directory: Path
    faults: list[FaultRule] = dataclasses.field(default_factory=list)
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    # Tokens are signed with this instead of the data directory's secret (``simvue ui``: a
    # token valid while that one process serves, and nothing written beside the store).
    secret: bytes | None = None


async def _require_token(request: Request) -> None:
    try:
        check_authorization(request.app.state.secret, request.headers.get("authorization"))
    except TokenRejected as exc:
        raise HTTPException(status_code=401, detail=exc.args[0], headers={"WWW-Authenticate": "Bearer"}) from None


async def _invalid_request(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
    """400 for a body that is not JSON at all; 422 with FastAPI's ``detail`` list otherwise.

    The list keeps ``loc``, ``msg`` and ``type`` (what the upstream client prints) and drops
    the offending input, which may be a whole batch.
    """
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = error.get("ctx", {}).get("error", error.get("msg"))
            return SafeJSONResponse({"detail": f"request body is not valid JSON: {reason}"}, status_code=400)
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
    return SafeJSONResponse({"detail": detail}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
    """FastAPI's answer to an ``HTTPException``, written so that it cannot fail (a detail may
    quote what the client sent)."""
    return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _route_templates(routers: list[tuple[str, APIRouter]]) -> list[tuple[re.Pattern, str]]:
    """Each route's full path and the pattern it matches, for counting requests by route."""
    # Starlette types ``routes`` as ``BaseRoute``, which has no ``path``; every route here is an ``APIRoute``.
    paths = [prefix + route.path for prefix, router in routers for route in router.routes]  # type: ignore[attr-defined]
    return [(compile_path(path)[0], path) for path in paths]


def create_app(settings: ServerSettings) -> FastAPI:
    """The server for one data directory.  Call ``app.state.data.close()`` after serving."""
    # /docs is the packaged page of simvue.server.ui: FastAPI's own loads its scripts from a CDN.
    app = FastAPI(title="simvue server", version=service.API_VERSION, default_response_class=SafeJSONResponse,
                  docs_url=None, redoc_url=None)
    app.state.data = ServerData(settings.directory)
    app.state.secret = settings.secret or load_or_create_secret(settings.directory)[0]
    app.state.blobs = BlobStore(settings.directory / ARTIFACTS_DIR)
    app.state.blobs.remove_scratch()  # uploads cut off by a previous stop
    app.state.stats = RequestStats()
    with app.state.data.checkout() as handle:
        folders.adopt_store_folders(handle)

    api = APIRouter(prefix=API_PREFIX, dependencies=[Depends(_require_token)])
    for module in _API_MODULES:
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(artifacts.content_router)
    ui.mount(app)
    routers = [(API_PREFIX, module.router) for module in _API_MODULES] + [("", artifacts.content_router)]
    # Starlette types a handler as taking any ``Exception``, though it is only called with the class given.
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_middleware(
        RequestGuard,
        routes=_route_templates(routers),
        stats=app.state.stats,
        faults=FaultSet(settings.faults),
        max_body_bytes=int(settings.max_body_mb * (1 << 20)),
    )
    return app
