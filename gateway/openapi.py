"""The OpenAPI schema tells the truth: every status a route answers, in the shapes it answers.

Routes declare their own statuses with ``responses=`` built from :func:`errors`, :func:`redirect`
and friends here; :func:`install` adds what follows from the code around them on every operation:

- the error envelope (:class:`ErrorEnvelope`) as the body of every 4xx/5xx, the 422s included
  (``install_error_handlers`` answers them in the envelope, not FastAPI's ``{"detail": [...]}``);
- ``400``/``413`` for a header no request may carry (``gateway.bounds.header_problem``, answered
  before routing);
- the security schemes: ``Authorization: Bearer kgpu_…`` everywhere, and HTTP Basic with the token
  as the password on the drive routes (WebDAV clients), read off each route's auth dependency,
  with the ``401``/``403`` that dependency answers; public routes say they need no token;
- no body on a ``HEAD``, a ``204`` or a redirect (the server sends none, nor a Content-Type).

WebDAV (OPTIONS, PROPFIND, MKCOL, COPY, MOVE, LOCK, … on ``/v1/files/`` and everything on
``/v1/dav/``) is answered by :class:`gateway.dav_app.DavDispatcher` before FastAPI and is not
in the schema: see docs/webdav.md.
"""

from __future__ import annotations

from typing import Any, Iterable

import fastapi.routing
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from gateway import auth


class ErrorEnvelope(BaseModel):
    """Every error the API answers (SPEC decision 9): one shape, whatever the status."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {"error_code": "not_found", "message": "no file data/a.csv", "trace_id": "3f2a9c0e5b7d4e1f"}
        }
    )

    error_code: str = Field(description="what went wrong, for programs: not_found, quota_exceeded, unauthorized, …")
    message: str = Field(description="what went wrong, for people")
    trace_id: str = Field(description="this request's X-Request-ID (also in the response headers)")


ENVELOPE_REF = {"$ref": "#/components/schemas/ErrorEnvelope"}
_ENVELOPE_CONTENT = {"application/json": {"schema": ENVELOPE_REF}}

_DEFAULT_DESCRIPTIONS = {
    400: "Bad request",
    401: "Missing, malformed, unknown, revoked or expired token",
    402: "Not enough credits",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    410: "Gone",
    413: "Payload too large",
    422: "Validation error: the message names the field",
    423: "Locked (WebDAV lock): send its lock token in an If header",
    503: "Unavailable for a few seconds: retry after Retry-After",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_LOCATION = {"Location": {"description": "where to go", "schema": {"type": "string"}}}
_CHALLENGE = {
    "WWW-Authenticate": {
        "description": 'Bearer realm="kgpu" (and Basic realm="kgpu" on the drive routes)',
        "schema": {"type": "string"},
    }
}
_HEADERS_OF = {401: _CHALLENGE, 503: RETRY_AFTER}

# Statuses every operation can answer: a header no request may carry is refused before routing.
_ANY_REQUEST = {
    400: "bad_header: Content-Type or X-Content-Type over 256 bytes",
    413: "payload_too_large: Content-Length past 2^53-1",
}

# What each auth dependency answers, besides its 401.
_AUTH_403 = {
    auth.approved_principal: "account_pending: the account awaits an admin's approval; or account_suspended",
    auth.account_principal: "account_pending, or pod_token: an in-pod token cannot do this",
    auth.admin_principal: "account_pending, pod_token, or admin_only: this needs an admin token",
}
_DRIVE_PREFIXES = ("/v1/files", "/v1/shared", "/v1/dav")

# Errors that several routes answer alike, described once.
GPU_NOT_FOUND = (404, "gpu_not_found: no rental of yours with this id")
GPU_ENDED = (410, "gpu_not_running: the rental has ended")
POD_DOWN = (503, "pod_unavailable: the pod backend did not answer; retry after Retry-After")


def errors(*statuses: int | tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for error statuses, each with the envelope as its body:
    ``errors(404, (409, "name_conflict: …"))``."""
    out: dict[int | str, dict[str, Any]] = {}
    for item in statuses:
        status, description = item if isinstance(item, tuple) else (item, _DEFAULT_DESCRIPTIONS.get(item, ""))
        entry: dict[str, Any] = {"model": ErrorEnvelope, "description": description or f"error {status}"}
        if status in _HEADERS_OF:
            entry["headers"] = _HEADERS_OF[status]
        out[status] = entry
    return out


def redirect(status: int, description: str) -> dict[int, dict[str, Any]]:
    """A redirect with no body: its target is in Location."""
    return {status: {"description": description, "headers": _LOCATION}}


def no_body(status: int, description: str, headers: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    entry: dict[str, Any] = {"description": description}
    if headers:
        entry["headers"] = headers
    return {status: entry}


def content(status: int, description: str, media: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """A success answered in the given media types: ``{"text/html": {"schema": {"type": "string"}}}``."""
    return {status: {"description": description, "content": media}}


def merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        out.update(part)
    return out


JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
USER = {
    "type": "object",
    "required": ["id", "email", "name", "role", "status", "credits", "created_at"],
    "properties": {
        "id": {"type": "integer"},
        "email": {"type": "string"},
        "name": {"type": "string"},
        "role": {"type": "string", "enum": ["user", "admin"]},
        "status": {"type": "string", "enum": ["approved", "pending", "suspended"]},
        "credits": {"type": "integer"},
        "created_at": {"type": "string"},
    },
}
HTML_PAGE = {"text/html": {"schema": {"type": "string"}}}
BINARY_BODY = {
    "requestBody": {
        "required": False,
        "description": "the file's bytes (any length, chunked too); none on a POST mints a presigned PUT",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
JSON_QUERY = {
    "name": "json",
    "in": "query",
    "required": False,
    "description": "1, true or yes: answer JSON instead of a redirect or an HTML page (so does Accept: "
    "application/json); any other value is ignored",
    "schema": {"type": "string", "examples": ["1"]},
}


def _api_routes(app: FastAPI) -> Iterable[APIRoute]:
    """Every API route with its effective path and dependencies: newer FastAPI keeps an included
    router whole and resolves its routes in contexts (``iter_route_contexts``), older copies them."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    for route in contexts(app.routes) if contexts else app.routes:
        if isinstance(getattr(route, "original_route", route), APIRoute):
            yield route


def _dependency_calls(dependant) -> Iterable:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _dependency_calls(sub)


def _auth_of(route: APIRoute) -> tuple[str, Any]:
    """("public" | "optional" | "required", the strictest auth dependency)."""
    calls = list(_dependency_calls(route.dependant))
    for strictest in (auth.admin_principal, auth.account_principal, auth.approved_principal, auth.current_principal):
        if strictest in calls:
            return "required", strictest
    if auth.optional_principal in calls:
        return "optional", auth.optional_principal
    return "public", None


def _error_response(description: str, status: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"description": description, "content": _ENVELOPE_CONTENT}
    if status in _HEADERS_OF:
        entry["headers"] = _HEADERS_OF[status]
    return entry


def _set_security(operation: dict, route: APIRoute, path: str) -> None:
    kind, dependency = _auth_of(route)
    responses = operation["responses"]
    schemes = [{"bearer": []}]
    if path.startswith(_DRIVE_PREFIXES):
        schemes.append({"basic": []})
    if kind == "public":
        operation["security"] = []
        return
    if kind == "optional":
        operation["security"] = [{}, *schemes]
        responses.setdefault("401", _error_response("A token was sent and is not valid (none is needed)", 401))
        return
    operation["security"] = schemes
    responses.setdefault("401", _error_response(_DEFAULT_DESCRIPTIONS[401], 401))
    forbidden = _AUTH_403.get(dependency)
    if forbidden and "403" not in responses:
        responses["403"] = _error_response(forbidden, 403)
    elif forbidden:
        responses["403"]["description"] = f"{responses['403']['description']}; or {forbidden}"


def _tidy(operation: dict, method: str) -> None:
    responses = operation["responses"]
    if "422" in responses:
        responses["422"]["content"] = _ENVELOPE_CONTENT
        responses["422"]["description"] = _DEFAULT_DESCRIPTIONS[422]
    for status, description in _ANY_REQUEST.items():
        key = str(status)
        if key in responses:
            if description.split(":")[0] not in responses[key]["description"]:
                responses[key]["description"] += f"; or {description}"
        else:
            responses[key] = _error_response(description, status)
    for key, response in responses.items():
        if key == "503" and "headers" not in response:
            response["headers"] = RETRY_AFTER
        code = int(key) if key.isdigit() else 0
        if method == "head" or code in (204, 301, 302):
            response.pop("content", None)


def build_schema(app: FastAPI) -> dict[str, Any]:
    schema = FastAPI.openapi(app)  # FastAPI's own schema of the app (its routes, title, version, tags, servers)
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["ErrorEnvelope"] = ErrorEnvelope.model_json_schema()
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "kgpu_ and 48 hex digits",
            "description": "Authorization: Bearer kgpu_… (an account token, an in-pod token, or the admin token)",
        },
        "basic": {
            "type": "http",
            "scheme": "basic",
            "description": "HTTP Basic with the token as the password (any user name): the drive routes only, "
            "for WebDAV clients",
        },
    }
    routes = {
        (route.path_format, method.lower()): route
        for route in _api_routes(app)
        if route.include_in_schema
        for method in route.methods
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            route = routes.get((path, method))
            if route is None:
                continue
            _set_security(operation, route, path)
            _tidy(operation, method)
            operation["responses"] = dict(sorted(operation["responses"].items()))
    for unused in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(unused, None)
    return schema


def install(app: FastAPI) -> None:
    """Serve :func:`build_schema` at /openapi.json (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
