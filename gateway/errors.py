"""The error envelope and request ids (SPEC decision 9).

Every response carries ``X-Request-ID`` (the client's own, when it sent a sane
one). Every error is ``{"error_code", "message", "trace_id"}`` with the right
status; nothing else, and never a traceback, reaches a client.
"""

from __future__ import annotations

import logging
import random
import re
from contextvars import ContextVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from drive.keys import InvalidPath
from drive.store import ObjectNotFound, StoreUnavailable
from gateway.bounds import header_problem
from gateway.domain_errors import (
    BadInput, Busy, Conflict, DomainError, Forbidden, Gone, InsufficientCredits, Invalid, NoSpace, NotFound,
    RangeNotSatisfiable, TooLarge, Unavailable,
)
from gateway.pods import PodError

log = logging.getLogger("kgpu")
request_id_var: ContextVar[str] = ContextVar("request_id", default="")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    402: "insufficient_credits",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    411: "length_required",
    413: "payload_too_large",
    416: "range_not_satisfiable",
    412: "precondition_failed",
    415: "unsupported_media_type",
    422: "validation_error",
    423: "locked",
    424: "failed_dependency",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    507: "insufficient_storage",
}


def default_code(status: int) -> str:
    """The error_code of a status when nothing more specific is known."""
    return _DEFAULT_CODES.get(status, "error")


class ApiError(Exception):
    def __init__(self, status: int, error_code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.headers = headers or {}


# The one place a domain error becomes an HTTP status (the nearest class in its MRO wins).
_DOMAIN_STATUS: dict[type[DomainError], int] = {
    NotFound: 404,
    Conflict: 409,
    Gone: 410,
    Forbidden: 403,
    Invalid: 422,
    TooLarge: 413,
    InsufficientCredits: 402,
    Unavailable: 503,
    BadInput: 400,
    RangeNotSatisfiable: 416,
    NoSpace: 507,
    Busy: 429,
}


def status_of(error: DomainError) -> int:
    """The HTTP status a domain error answers with."""
    for kind in type(error).__mro__:
        if kind in _DOMAIN_STATUS:
            return _DOMAIN_STATUS[kind]
    return 500


def _headers_of(error: DomainError) -> dict[str, str] | None:
    """What a domain error's answer says besides its envelope: where a resume starts, when to retry."""
    if isinstance(error, RangeNotSatisfiable):
        return {"Content-Range": f"bytes */{error.size}"}
    if isinstance(error, Busy):
        return {"Retry-After": "5"}
    return None


def envelope(status: int, error_code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error_code": error_code, "message": message, "trace_id": request_id_var.get()}
    return JSONResponse(body, status_code=status, headers=headers)


def new_request_id() -> str:
    # 128 random bits as uuid4().hex prints them, without its system call (random reseeds on fork).
    return f"{random.getrandbits(128):032x}"


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The request's id: the client's own ``X-Request-ID`` when it is sane, else a fresh one."""
    for name, value in headers:
        if name == b"x-request-id":
            incoming = value.decode("latin-1")
            return incoming if _SANE_ID.match(incoming) else new_request_id()
    return new_request_id()


class RequestIdMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so streamed bodies and 100-continue stay untouched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope["headers"])
        token = request_id_var.set(request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            problem = header_problem(scope["headers"])
            if problem is not None:
                status, code, message = problem
                await envelope(status, code, message, {"Connection": "close"})(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if not started:
                response = envelope(500, "internal_error", "internal server error")
                await response(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route answers on this path (Starlette's own 405 names only the first
    route's)."""
    methods = {
        method
        for method in HTTP_METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.router.routes)
    }
    return [method for method in HTTP_METHODS if method in methods]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return envelope(exc.status, exc.error_code, exc.message, exc.headers)

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError):
        return envelope(status_of(exc), exc.error_code, exc.message, _headers_of(exc))

    @app.exception_handler(InvalidPath)
    async def _invalid_path(_: Request, exc: InvalidPath):
        return envelope(400, "invalid_path", str(exc))

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(_: Request, exc: StoreUnavailable):
        return envelope(503, "store_unavailable", str(exc), {"Retry-After": "5"})

    @app.exception_handler(PodError)
    async def _pod_error(_: Request, exc: PodError):
        return envelope(503, "pod_unavailable", str(exc), {"Retry-After": "5"})

    @app.exception_handler(ObjectNotFound)
    async def _not_found(_: Request, exc: ObjectNotFound):
        return envelope(404, "not_found", "no such file")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = default_code(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            allowed = allowed_methods(app, request.scope)
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            message = f"{request.method} is not allowed here; allowed: {', '.join(allowed)}"
        return envelope(exc.status_code, code, message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}" for err in exc.errors()
        )
        return envelope(422, "validation_error", problems or "invalid request")
