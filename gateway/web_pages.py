"""What every /view page shares: rendering (Jinja2, gateway/templates), refusals as pages, the
session cookie (gateway/web_session.py) read and written, and the CSRF check of every POST.

Every state change made with the session cookie is a POST that carries the session's CSRF token
(a form field or the X-CSRF-Token header), checked by ``checked_form`` before anything else.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from gateway import signin
from gateway.deps import services
from gateway.errors import ApiError
from gateway.models import User
from gateway.principal import Principal
from gateway.web_session import CSRF_FIELD, CSRF_HEADER, WebSession

templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))
MAX_FORM_BYTES = 16 * 1024


class PageError(Exception):
    """A refusal shown to a person as a page (to an API client as the error envelope)."""

    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message


def is_secure(request: Request) -> bool:
    """Secure cookies when the public URL is https (or the request came over https)."""
    configured = services(request).settings.public_base_url
    return configured.startswith("https://") if configured else request.url.scheme == "https"


def public_base(request: Request) -> str:
    """KGPU_API_BASE as a person's shell should use it."""
    return (services(request).settings.public_base_url or str(request.base_url)).rstrip("/")


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, {"request": request, **context}, status_code=status)
    response.headers["Cache-Control"] = "no-store"  # a page may hold a token: never cached
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'"
    )
    return response


def refusal(request: Request, error: PageError) -> Response:
    if wants_html(request):
        return page(request, "error.html", status=error.status, error=error)
    raise ApiError(error.status, error.error_code, error.message)


def set_session(request: Request, response: Response, session: WebSession) -> None:
    signer = services(request).cookie_signer
    secure = is_secure(request)
    response.set_cookie(
        signer.session_cookie(secure), signer.dump_session(session), max_age=signer.max_age_s,
        **signer.cookie_options(secure),
    )


def clear_cookies(request: Request, response: Response) -> None:
    signer = services(request).cookie_signer
    secure = is_secure(request)
    for name in (signer.session_cookie(secure), signer.signin_cookie(secure)):
        response.delete_cookie(name, **signer.cookie_options(secure))


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def current(request: Request) -> tuple[WebSession, User] | None:
    """The signed-in person, if the cookie is good and still honoured (blocking)."""
    signer = services(request).cookie_signer
    web = signer.load_session(request.cookies.get(signer.session_cookie(is_secure(request))))
    if web is None:
        return None
    with services(request).sessions() as session:
        user = session.get(User, web.user_id)
        if user is None or user.status == "suspended":
            return None
        if web.token_id is not None:
            live = signin.live_personal_token(session, user.id)
            if live is None or live.id != web.token_id:
                return None  # signed out (here or elsewhere), or the token was reissued elsewhere
        session.expunge(user)
    return web, user


def principal_of(user: User) -> Principal:
    return Principal(user_id=user.id, email=user.email, role=user.role, status=user.status)


async def checked_form(request: Request, web: WebSession) -> dict[str, str]:
    """The POSTed form, after its CSRF token was checked against the session's."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_FORM_BYTES:
        raise PageError(413, "payload_too_large", "the form is too large")
    body = b""
    async for chunk in request.stream():  # a body longer than it declared is cut off here too
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise PageError(413, "payload_too_large", "the form is too large")
    try:
        fields = {k: v[0] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
    except UnicodeDecodeError:
        raise PageError(400, "bad_request", "the form is not UTF-8") from None
    sent = request.headers.get(CSRF_HEADER) or fields.get(CSRF_FIELD)
    if not web.csrf_matches(sent):
        raise PageError(403, "csrf_failed", "this form is stale or did not come from kgpu's own page; reload and retry")
    return fields


async def signed_in_form(request: Request, admin: bool = False) -> tuple[WebSession, User, dict[str, str]]:
    found = await run_in_threadpool(current, request)
    if found is None:
        raise PageError(401, "unauthorized", "you are not signed in (or your session ended); sign in again")
    web, user = found
    fields = await checked_form(request, web)
    if admin and (user.role != "admin" or user.status != "approved"):
        raise PageError(403, "admin_only", "this needs an admin")
    return web, user, fields
