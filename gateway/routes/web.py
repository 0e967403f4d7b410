"""/view: the people's side — sign-in with OIDC, the dashboard, the admin pages; and / itself.

Pages are rendered here (Jinja2, gateway/templates); what moves (the drive, rentals, runs and their
output) is fetched by gateway/static/view.js from the same /v1 API a shell uses, with the
person's own token. Every state change made with the session cookie is a POST that carries the
session's CSRF token (a form field or the X-CSRF-Token header), checked here before anything.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from gateway import orgs, signin, users
from gateway.auth import Principal, status_refusal
from gateway.errors import ApiError
from gateway.models import CreditCharge, Rental, User
from gateway.web_session import CSRF_FIELD, CSRF_HEADER, CookieSigner, WebSession, new_session

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent.parent / "templates"))
MAX_FORM_BYTES = 16 * 1024


class PageError(Exception):
    """A refusal shown to a person as a page (to an API client as the error envelope)."""

    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message


# --- plumbing -----------------------------------------------------------------------------------


def _signer(request: Request) -> CookieSigner:
    return request.app.state.cookie_signer


def _secure(request: Request) -> bool:
    """Secure cookies when the public URL is https (or the request came over https)."""
    configured = request.app.state.settings.public_base_url
    return configured.startswith("https://") if configured else request.url.scheme == "https"


def public_base(request: Request) -> str:
    """KGPU_API_BASE as a person's shell should use it."""
    return (request.app.state.settings.public_base_url or str(request.base_url)).rstrip("/")


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, {"request": request, **context}, status_code=status)
    response.headers["Cache-Control"] = "no-store"  # a page may hold a token: never cached
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'"
    )
    return response


def _refusal(request: Request, error: PageError) -> Response:
    if _wants_html(request):
        return _page(request, "error.html", status=error.status, error=error)
    raise ApiError(error.status, error.error_code, error.message)


def _set_session(request: Request, response: Response, session: WebSession) -> None:
    signer = _signer(request)
    secure = _secure(request)
    response.set_cookie(
        signer.session_cookie(secure), signer.dump_session(session), max_age=signer.max_age_s,
        **signer.cookie_options(secure),
    )


def _clear_cookies(request: Request, response: Response) -> None:
    signer = _signer(request)
    secure = _secure(request)
    for name in (signer.session_cookie(secure), signer.signin_cookie(secure)):
        response.delete_cookie(name, **signer.cookie_options(secure))


def _see(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _current(request: Request) -> tuple[WebSession, User] | None:
    """The signed-in person, if the cookie is good and still honoured (blocking)."""
    signer = _signer(request)
    web = signer.load_session(request.cookies.get(signer.session_cookie(_secure(request))))
    if web is None:
        return None
    with request.app.state.sessions() as session:
        user = session.get(User, web.user_id)
        if user is None or user.status == "suspended":
            return None
        if web.token_id is not None:
            live = signin.live_personal_token(session, user.id)
            if live is None or live.id != web.token_id:
                return None  # signed out (here or elsewhere), or the token was reissued elsewhere
        session.expunge(user)
    return web, user


def _principal(user: User) -> Principal:
    return Principal(user_id=user.id, email=user.email, role=user.role, status=user.status)


async def _form(request: Request, web: WebSession) -> dict[str, str]:
    """The POSTed form, after its CSRF token was checked against the session's."""
    body = await request.body()
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


async def _signed_in_form(request: Request, admin: bool = False) -> tuple[WebSession, User, dict[str, str]]:
    found = await run_in_threadpool(_current, request)
    if found is None:
        raise PageError(401, "unauthorized", "you are not signed in (or your session ended); sign in again")
    web, user = found
    fields = await _form(request, web)
    if admin and user.role != "admin":
        raise PageError(403, "admin_only", "this needs an admin")
    return web, user, fields


def _oidc(request: Request) -> signin.OidcClient:
    client = getattr(request.app.state, "oidc", None)
    if client is None:
        raise PageError(404, "signin_not_configured", "sign-in is not configured on this server (KGPU_OIDC_ISSUER)")
    return client


def _callback_url(request: Request) -> str:
    return f"{public_base(request)}/view/callback"


# --- / and sign-in ------------------------------------------------------------------------------


@router.get("/")
def root(request: Request) -> Response:
    """A browser goes to the dashboard; an API client learns where the API and its docs are."""
    if _wants_html(request):
        return _see("/view")
    return JSONResponse(
        {"service": "kgpu", "api": "/v1", "docs": "/docs", "openapi": "/openapi.json", "dashboard": "/view"}
    )


@router.get("/view/signin")
async def start_sign_in(request: Request) -> Response:
    try:
        client = _oidc(request)
        pending = await run_in_threadpool(client.begin, _callback_url(request))
    except PageError as error:
        return _refusal(request, error)
    except signin.SignInError as error:
        return _refusal(request, PageError(503, "signin_unavailable", str(error)))
    response = _see(pending.url)
    signer = _signer(request)
    secure = _secure(request)
    kept = {"state": pending.state, "nonce": pending.nonce, "code_verifier": pending.code_verifier}
    response.set_cookie(signer.signin_cookie(secure), signer.dump_signin(kept), max_age=600,
                        **signer.cookie_options(secure))
    return response


@router.get("/view/callback")
async def finish_sign_in(request: Request) -> Response:
    signer = _signer(request)
    secure = _secure(request)
    params = request.query_params
    try:
        client = _oidc(request)
        if params.get("error"):
            raise PageError(400, "signin_refused", f"the sign-in provider said: {params.get('error')[:200]}")
        kept = signer.load_signin(request.cookies.get(signer.signin_cookie(secure)))
        if kept is None:
            raise PageError(400, "signin_expired", "this sign-in was not started in this browser, or took too long")
        pending = signin.PendingSignIn("", kept.get("state", ""), kept.get("nonce", ""), kept.get("code_verifier", ""))
        identity = await run_in_threadpool(
            client.finish, pending, _callback_url(request), state=params.get("state", ""), code=params.get("code", "")
        )
    except PageError as error:
        return _refusal(request, error)
    except signin.SignInError as error:
        return _refusal(request, PageError(400, "signin_failed", str(error)))
    web = await run_in_threadpool(_admit, request, identity)
    if web is None:
        return _refusal(request, PageError(403, "account_suspended", "your account is suspended; ask an admin"))
    response = _see("/view")
    response.delete_cookie(signer.signin_cookie(secure), **signer.cookie_options(secure))
    _set_session(request, response, web)
    return response


def _admit(request: Request, identity: signin.Identity) -> WebSession | None:
    state = request.app.state
    with state.sessions.begin() as session:
        user = signin.sign_in(session, identity, state.admission, state.settings.starting_credits)
        if user.status == "suspended":
            return None
        if user.status != "approved":
            return new_session(user.id)
        users.get_locked(session, user.id)  # two sign-ins at once: one token
        live = signin.live_personal_token(session, user.id)
        if live is not None:  # issued before (the CLI, another browser): kept; shown only when reissued
            return new_session(user.id, live.id)
        row, plaintext = signin.reissue_personal_token(session, user.id)
        return new_session(user.id, row.id, plaintext)


@router.post("/view/signout")
async def sign_out(request: Request) -> Response:
    try:
        web, user, _ = await _signed_in_form(request)
    except PageError as error:
        return _refusal(request, error)

    def revoke() -> None:
        with request.app.state.sessions.begin() as session:
            signin.revoke_personal_tokens(session, user.id)

    await run_in_threadpool(revoke)
    request.app.state.authenticator.invalidate()  # the token is dead at once, not after the cache
    response = _see("/view")
    _clear_cookies(request, response)
    return response


@router.post("/view/token")
async def reissue(request: Request) -> Response:
    try:
        web, user, _ = await _signed_in_form(request)
        refusal = status_refusal(user.status)
        if refusal is not None:
            raise PageError(refusal.status, refusal.error_code, refusal.message)
    except PageError as error:
        return _refusal(request, error)

    def issue() -> tuple[int, str]:
        with request.app.state.sessions.begin() as session:
            users.get_locked(session, user.id)
            row, plaintext = signin.reissue_personal_token(session, user.id)
            return row.id, plaintext

    token_id, plaintext = await run_in_threadpool(issue)
    request.app.state.authenticator.invalidate()
    response = _see("/view")
    _set_session(request, response, web.with_token(token_id, plaintext))
    return response


# --- the dashboard ------------------------------------------------------------------------------


def _dashboard_context(request: Request, user: User) -> dict:
    principal = _principal(user)
    with request.app.state.sessions() as session:
        shared = [{"slug": org.slug, "name": org.name, "role": role} for org, role in orgs.visible_orgs(session, principal)]
        charges = session.execute(
            select(CreditCharge.rental_id, Rental.name, Rental.gpu_model, func.sum(CreditCharge.credits),
                   func.count(CreditCharge.id))
            .join(Rental, Rental.id == CreditCharge.rental_id)
            .where(CreditCharge.user_id == user.id)
            .group_by(CreditCharge.rental_id, Rental.name, Rental.gpu_model)
            .order_by(func.max(CreditCharge.charged_at).desc())
            .limit(50)
        ).all()
        balance = session.get(User, user.id).credits
    return {
        "shared": shared,
        "charges": [{"rental_id": r, "name": n, "gpu_model": m, "credits": c, "minutes": k} for r, n, m, c, k in charges],
        "balance": balance,
        "quota_bytes": request.app.state.settings.user_quota_bytes,
    }


@router.get("/view")
async def dashboard(request: Request) -> Response:
    found = await run_in_threadpool(_current, request)
    signin_ready = getattr(request.app.state, "oidc", None) is not None
    if found is None:
        response = _page(request, "signin.html", signin_ready=signin_ready)
        signer = _signer(request)
        if request.cookies.get(signer.session_cookie(_secure(request))):
            _clear_cookies(request, response)  # a dead session's cookie goes
        return response
    web, user = found
    if user.status != "approved":
        return _page(request, "pending.html", user=user, web=web)
    if web.token_id is None:
        # Approved after this session began: a token is handed out only right after a sign-in.
        return _page(request, "pending.html", user=user, web=web, approved_since=True)
    context = await run_in_threadpool(_dashboard_context, request, user)
    return _page(request, "dashboard.html", user=user, web=web, api_base=public_base(request), **context)


# --- admin pages --------------------------------------------------------------------------------


def _admin_context(request: Request, user: User) -> dict:
    principal = _principal(user)
    with request.app.state.sessions() as session:
        everyone = [users.describe(u) for u in session.scalars(select(User).order_by(User.status.desc(), User.id))]
        found = []
        for org, role in orgs.visible_orgs(session, principal):
            if role == "admin":
                found.append({**orgs.describe(org), "members": orgs.members(session, org)})
    return {"users": everyone, "orgs": found}


@router.get("/view/admin")
async def admin_page(request: Request) -> Response:
    found = await run_in_threadpool(_current, request)
    if found is None:
        return _see("/view")
    web, user = found
    if user.role != "admin" or user.status != "approved":
        return _refusal(request, PageError(403, "admin_only", "the admin pages are for admins"))
    context = await run_in_threadpool(_admin_context, request, user)
    return _page(request, "admin.html", user=user, web=web, **context)


def _row_id(raw: str, what: str) -> int:
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) < 2**31:
        raise PageError(400, "bad_request", f"{what} must be a positive whole number")
    return int(raw)


async def _admin_change(request: Request, change) -> Response:
    """Run ``change(session, fields, principal)`` for a signed-in admin, then back to the admin page."""
    try:
        _, user, fields = await _signed_in_form(request, admin=True)

        def apply() -> None:
            with request.app.state.sessions.begin() as session:
                change(session, fields, _principal(user))

        await run_in_threadpool(apply)
    except PageError as error:
        return _refusal(request, error)
    except ApiError as error:
        return _refusal(request, PageError(error.status, error.error_code, error.message))
    except ValidationError as error:
        problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return _refusal(request, PageError(422, "validation_error", problem))
    request.app.state.authenticator.invalidate()
    return _see("/view/admin")


@router.post("/view/admin/users/{user_id}/status")
async def set_status(user_id: str, request: Request) -> Response:
    def change(session, fields, _):
        target = users.get_locked(session, _row_id(user_id, "user id"))
        users.apply_patch(target, users.UserPatch(status=fields.get("status", "")))

    return await _admin_change(request, change)


@router.post("/view/admin/users/{user_id}/role")
async def set_role(user_id: str, request: Request) -> Response:
    def change(session, fields, _):
        target = users.get_locked(session, _row_id(user_id, "user id"))
        users.apply_patch(target, users.UserPatch(role=fields.get("role", "")))

    return await _admin_change(request, change)


@router.post("/view/admin/users/{user_id}/credits")
async def grant_credits(user_id: str, request: Request) -> Response:
    def change(session, fields, _):
        raw = fields.get("credits", "").strip()
        if not raw.lstrip("-").isascii() or not raw.lstrip("-").isdigit() or len(raw) > 17:
            raise PageError(400, "bad_request", "credits must be a whole number")
        users.grant_credits(users.get_locked(session, _row_id(user_id, "user id")), int(raw))

    return await _admin_change(request, change)


@router.post("/view/admin/orgs")
async def create_org(request: Request) -> Response:
    def change(session, fields, _):
        orgs.create(session, orgs.NewOrg(slug=fields.get("slug", ""), name=fields.get("name", "")))

    return await _admin_change(request, change)


@router.post("/view/admin/orgs/{slug}/members")
async def set_member(slug: str, request: Request) -> Response:
    def change(session, fields, principal):
        found = orgs.access(session, principal, slug)
        member = users.find(session, fields.get("user", "").strip())
        orgs.set_member(session, found.org, orgs.Membership(user_id=member.id, role=fields.get("role", "member")))

    return await _admin_change(request, change)


@router.post("/view/admin/orgs/{slug}/members/{user_id}/remove")
async def remove_member(slug: str, user_id: str, request: Request) -> Response:
    def change(session, fields, principal):
        found = orgs.access(session, principal, slug)
        orgs.remove_member(session, found.org, _row_id(user_id, "user id"))

    return await _admin_change(request, change)
