"""Errors as RFC 9457 problem details (``application/problem+json``).

Every error a client can get has a stable ``type`` URI (``urn:vpmon:problem:<slug>``), a ``title`` per
type, a ``detail`` that says what went wrong and what to do, and the HTTP ``status``. Enrolment
quality-gate refusals add ``reason``, ``recording``, ``measured`` and ``limit``; validation errors add
``errors``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import redis
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect, WebSocketState

from streamer import metrics
from streamer.redis_clients import REDIS_UNAVAILABLE
from verifier.errors import (
    AudioError,
    AudioLimitError,
    ConflictError,
    InvalidValueError,
    ModelMismatchError,
    NotFoundError,
    StoreError,
    UnsupportedAudioError,
    VpmonError,
)

log = logging.getLogger("vpmon.api")

PROBLEM_JSON = "application/problem+json"
CLOSE_INTERNAL_ERROR = 1011  # RFC 6455: the server met a condition that kept it from going on

# Most specific class first: the first match decides.
_ERRORS: list[tuple[type[Exception], int, str, str]] = [
    (UnsupportedAudioError, 415, "unsupported-audio", "Audio format not supported"),
    (AudioLimitError, 422, "audio-limit", "Audio outside the accepted limits"),
    (AudioError, 422, "unusable-audio", "Audio not usable"),
    (InvalidValueError, 422, "invalid-value", "Invalid value"),
    (ModelMismatchError, 409, "model-mismatch", "Voiceprint made by another model"),
    (ConflictError, 409, "conflict", "Conflict with the stored state"),
    (NotFoundError, 404, "not-found", "Not found"),
    (StoreError, 503, "store-unavailable", "Voiceprint store unavailable"),
    (VpmonError, 500, "server-error", "Server error"),
]

_HTTP_TITLES = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Missing or invalid API key"),
    403: ("forbidden", "Not allowed for this key"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("too-large", "Request too large"),
    429: ("too-many-requests", "Too many requests"),
}


class Problem(BaseModel):
    """What every error response carries (``application/problem+json``); some types add members."""

    model_config = ConfigDict(extra="allow", title="Problem")

    type: str = Field(description="urn:vpmon:problem:<slug>, stable for each kind of error.")
    title: str
    status: int
    detail: str = Field(description="What went wrong, and what to do.")
    errors: list[dict[str, Any]] | None = Field(None, description="invalid-request: each invalid field.")


# The OpenAPI responses every route may give besides its own: any 4xx is a problem, and so is a 503 when
# Redis cannot be reached or is loading (``Retry-After``). The schema itself is added to the components
# by ``openapi_components``.
PROBLEM_SCHEMA_REF = {"$ref": "#/components/schemas/Problem"}
RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "description": "Refused: a problem (RFC 9457) whose `type` says why.",
        "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA_REF}},
    },
    503: {
        "description": "The voiceprint store (Redis) is unavailable or loading: retry after Retry-After.",
        "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA_REF}},
    },
}


def openapi_components(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (the app's OpenAPI document) with the ``Problem`` schema that ``RESPONSES`` names."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}"))
    return schema


def problem(
    status: int, slug: str, title: str, detail: str, headers: dict[str, str] | None = None, **extra: object
) -> JSONResponse:
    body = {"type": f"urn:vpmon:problem:{slug}", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _vpmon_error(request: Request, exc: Exception) -> JSONResponse:
    for cls, status, slug, title in _ERRORS:
        if isinstance(exc, cls):
            extra = {}
            for name in ("reason", "recording", "measured", "limit"):
                if getattr(exc, name, None) is not None:
                    extra[name] = getattr(exc, name)
            if status >= 500:
                log.error("%s %s failed: %s", request.method, request.url.path, exc)
            return problem(status, slug, title, str(exc), **extra)
    raise AssertionError("VpmonError is the last entry")


async def _redis_error(conn: Request | WebSocket, exc: Exception) -> JSONResponse | None:
    method = conn.method if isinstance(conn, Request) else "WEBSOCKET"
    metrics.REDIS_ERRORS.inc()
    log.warning("%s %s: Redis unavailable: %s", method, conn.url.path, exc)
    loading = isinstance(exc, redis.BusyLoadingError)
    detail = (
        "Redis is loading its data after a restart; retry in a few seconds"
        if loading
        else "the voiceprint store (Redis) cannot be reached; retry later, and check VPMON_REDIS_URL "
        "or `vpmon redis status`"
    )
    if isinstance(conn, WebSocket) and conn.application_state is WebSocketState.CONNECTED:
        # The upgrade was answered already: no HTTP problem can follow, so close the call with why.
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await conn.close(CLOSE_INTERNAL_ERROR, "Redis unavailable; retry later")
        return None
    return problem(503, "store-unavailable", "Voiceprint store unavailable", detail, {"Retry-After": "5"})


def http_problem(status: int, detail: str | None, headers: dict[str, str] | None = None) -> JSONResponse:
    """A problem for a plain HTTP status (401, 403, 404, …) with the type and title every route uses."""
    slug, title = _HTTP_TITLES.get(status, ("http-error", "HTTP error"))
    return problem(status, slug, title, detail or title, headers)


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else None
    return http_problem(exc.status_code, detail, dict(exc.headers or {}))


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", ""))}
        for error in exc.errors()
    ]
    where = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5])
    detail = f"the request is not valid: {where}"
    return problem(422, "invalid-request", "Invalid request", detail, errors=errors)


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s crashed", request.method, request.url.path)
    return problem(500, "server-error", "Server error", "an unexpected error; the server log has the details")


def install(app: FastAPI) -> None:
    app.add_exception_handler(VpmonError, _vpmon_error)
    for unavailable in REDIS_UNAVAILABLE:  # a cluster's CLUSTERDOWN and redis-py's own cluster errors too
        app.add_exception_handler(unavailable, _redis_error)
    app.add_exception_handler(redis.BusyLoadingError, _redis_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
