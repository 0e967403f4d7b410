"""/view: sign-in with OIDC, sign-out, the token, the dashboard; and / itself.

Pages are rendered on the server (gateway/web_pages.py); what moves on the dashboard (the drive,
rentals, runs and their output) is fetched by gateway/static/view.js from the same /v1 API a
shell uses, with the person's own token.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from gateway import billing, orgs, signin, users
from gateway import cli_login as login_codes
from gateway.auth import status_refusal
from gateway.deps import services
from gateway.errors import ApiError
from gateway.models import User
from gateway.web_pages import (
    PageError, clear_cookies, current, is_secure, page, principal_of, public_base, refusal, see_other,
    set_session, signed_in_form, wants_html,
)
from gateway.web_session import SIGNIN_MAX_AGE_S, WebSession, new_session

router = APIRouter(include_in_schema=False)
# `kgpu login --browser` waits on this computer's loopback for a one-time code: the page it opens,
# with the loopback's port, its state and the S256 challenge of the verifier only it holds.
CLI_HANDOFF = re.compile(
    r"^/view/cli\?port=(?P<port>[0-9]{4,5})&state=(?P<state>[A-Za-z0-9_-]{16,128})"
    r"&code_challenge=(?P<challenge>[A-Za-z0-9_-]{43})&code_challenge_method=S256$"
)
MAX_EXCHANGE_BYTES = 4096


def _oidc(request: Request) -> signin.OidcClient:
    client = services(request).oidc
    if client is None:
        raise PageError(404, "signin_not_configured", "sign-in is not configured on this server (KGPU_OIDC_ISSUER)")
    return client


def _callback_url(request: Request) -> str:
    return f"{public_base(request)}/view/callback"


# --- / and sign-in ------------------------------------------------------------------------------


@router.get("/")
def root(request: Request) -> Response:
    """A browser goes to the dashboard; an API client learns where the API and its docs are."""
    if wants_html(request):
        return see_other("/view")
    return JSONResponse(
        {"service": "kgpu", "api": "/v1", "docs": "/docs", "openapi": "/openapi.json", "dashboard": "/view"}
    )


def _after_sign_in(target: str | None) -> str:
    """Where a sign-in ends: /view, or the command-line hand-off page it was started from."""
    if target and CLI_HANDOFF.match(target):
        return target
    return "/view"


@router.get("/view/signin")
async def start_sign_in(request: Request) -> Response:
    try:
        client = _oidc(request)
        pending = await run_in_threadpool(client.begin, _callback_url(request))
    except PageError as error:
        return refusal(request, error)
    except signin.SignInError as error:
        return refusal(request, PageError(503, "signin_unavailable", str(error)))
    response = see_other(pending.url)
    signer = services(request).cookie_signer
    secure = is_secure(request)
    kept = {"state": pending.state, "nonce": pending.nonce, "code_verifier": pending.code_verifier,
            "next": _after_sign_in(request.query_params.get("next"))}
    response.set_cookie(signer.signin_cookie(secure), signer.dump_signin(kept), max_age=SIGNIN_MAX_AGE_S,
                        **signer.cookie_options(secure))
    return response


@router.get("/view/callback")
async def finish_sign_in(request: Request) -> Response:
    signer = services(request).cookie_signer
    secure = is_secure(request)
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
        return refusal(request, error)
    except signin.SignInError as error:
        return refusal(request, PageError(400, "signin_failed", str(error)))
    web = await run_in_threadpool(_admit, request, identity)
    if web is None:
        return refusal(request, PageError(403, "account_suspended", "your account is suspended; ask an admin"))
    response = see_other(_after_sign_in(kept.get("next")))
    response.delete_cookie(signer.signin_cookie(secure), **signer.cookie_options(secure))
    set_session(request, response, web)
    return response


def _admit(request: Request, identity: signin.Identity) -> WebSession | None:
    try:
        return _admit_once(request, identity)
    except IntegrityError:  # a first sign-in of the same email at the same moment made the row
        return _admit_once(request, identity)


def _admit_once(request: Request, identity: signin.Identity) -> WebSession | None:
    state = services(request)
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
        web, user, _ = await signed_in_form(request)
    except PageError as error:
        return refusal(request, error)

    def revoke() -> None:
        with services(request).sessions.begin() as session:
            signin.revoke_personal_tokens(session, user.id)

    await run_in_threadpool(revoke)
    services(request).authenticator.invalidate()  # the token is dead at once, not after the cache
    response = see_other("/view")
    clear_cookies(request, response)
    return response


@router.post("/view/token")
async def reissue(request: Request) -> Response:
    try:
        web, user, _ = await signed_in_form(request)
        forbidden = status_refusal(user.status)
        if forbidden is not None:
            raise PageError(forbidden.status, forbidden.error_code, forbidden.message)
        if web.token_id is None:  # a session that began pending: tokens come only right after a sign-in
            raise PageError(403, "sign_in_again", "you were approved after this sign-in; sign in again to get a token")
    except PageError as error:
        return refusal(request, error)

    def issue() -> tuple[int, str]:
        with services(request).sessions.begin() as session:
            users.get_locked(session, user.id)
            row, plaintext = signin.reissue_personal_token(session, user.id)
            return row.id, plaintext

    token_id, plaintext = await run_in_threadpool(issue)
    services(request).authenticator.invalidate()
    response = see_other("/view")
    set_session(request, response, web.with_token(token_id, plaintext))
    return response


# --- the dashboard ------------------------------------------------------------------------------


def _dashboard_context(request: Request, user: User) -> dict:
    principal = principal_of(user)
    with services(request).sessions() as session:
        shared = [{"slug": org.slug, "name": org.name, "role": role} for org, role in orgs.visible_orgs(session, principal)]
        charges = billing.recent_charges(session, user.id)
        balance = session.get(User, user.id).credits
    return {
        "shared": shared,
        "charges": charges,
        "balance": balance,
        "quota_bytes": services(request).settings.user_quota_bytes,
        "default_image": services(request).settings.default_image,
        "ssh": services(request).ssh_published,  # the bastion: None where KGPU_SSH_PORT=0
    }


@router.get("/view")
async def dashboard(request: Request) -> Response:
    found = await run_in_threadpool(current, request)
    signin_ready = services(request).oidc is not None
    if found is None:
        response = page(request, "signin.html", signin_ready=signin_ready)
        signer = services(request).cookie_signer
        if request.cookies.get(signer.session_cookie(is_secure(request))):
            clear_cookies(request, response)  # a dead session's cookie goes
        return response
    web, user = found
    if user.status != "approved":
        return page(request, "pending.html", user=user, web=web)
    if web.token_id is None:
        # Approved after this session began: a token is handed out only right after a sign-in.
        return page(request, "pending.html", user=user, web=web, approved_since=True)
    context = await run_in_threadpool(_dashboard_context, request, user)
    return page(request, "dashboard.html", user=user, web=web, api_base=public_base(request), **context)


# --- kgpu login --browser -----------------------------------------------------------------------
# RFC 8252 with PKCE (gateway/cli_login.py): the page hands the command's loopback listener a
# one-time code, never the token; only the command, with its verifier, exchanges it for the token.


def _cli_handoff(request: Request) -> tuple[int, str, str]:
    """The loopback port, state and code challenge in the query of the hand-off page (and of its
    forms); PageError 400 when they are not sane."""
    found = CLI_HANDOFF.match(f"/view/cli?{request.url.query}")
    if found is None or not 1024 <= int(found["port"]) <= 65535:
        raise PageError(
            400, "bad_request",
            "this page is opened by `kgpu login --browser`, with its port, state and code challenge "
            "(an older kgpu without the challenge: update it)",
        )
    return int(found["port"]), found["state"], found["challenge"]


def _handoff_query(port: int, state: str, challenge: str) -> str:
    return urlencode({"port": port, "state": state, "code_challenge": challenge, "code_challenge_method": "S256"})


@router.get("/view/cli")
async def cli_login(request: Request) -> Response:
    """Ask the person to confirm that the `kgpu login --browser` on this computer is theirs; the
    form they submit gets a one-time code for it (POST /view/cli/code)."""
    try:
        port, state, challenge = _cli_handoff(request)
    except PageError as error:
        return refusal(request, error)
    query = _handoff_query(port, state, challenge)
    here = f"/view/cli?{query}"
    found = await run_in_threadpool(current, request)
    if found is None:
        return see_other(f"/view/signin?{urlencode({'next': here})}")
    web, user = found
    if user.status != "approved":
        return page(request, "pending.html", user=user, web=web)
    response = page(request, "cli_login.html", user=user, web=web, port=port, query=query)
    # The form goes to /view/cli/code, which answers with a redirect to the command's listener on
    # the loopback (with the code): browsers hold that redirect to form-action too.
    response.headers["Content-Security-Policy"] = response.headers["Content-Security-Policy"].replace(
        "form-action 'self'", f"form-action 'self' http://127.0.0.1:{port}/callback"
    )
    return response


@router.post("/view/cli/code")
async def cli_login_code(request: Request) -> Response:
    """The person confirmed: a one-time code for their token, bound to the command's challenge,
    handed to the command's loopback listener with its state (a 303: a code in a URL is worth
    nothing without the verifier, and works once, for a minute)."""
    try:
        port, state, challenge = _cli_handoff(request)
        web, user, _ = await signed_in_form(request)
        forbidden = status_refusal(user.status)
        if forbidden is not None:
            raise PageError(forbidden.status, forbidden.error_code, forbidden.message)
        if web.token_id is None or web.token is None:
            raise PageError(
                409, "token_not_shown",
                "this browser cannot hand your token on (it was issued before this browser signed in): "
                "go back to the kgpu login page to issue a new one",
            )
    except PageError as error:
        return refusal(request, error)

    def mint() -> str:
        with services(request).sessions.begin() as session:
            return login_codes.mint(session, user.id, web.token_id, web.token, challenge)

    try:
        code = await run_in_threadpool(mint)
    except login_codes.TooManyCodes as error:
        return refusal(request, PageError(429, "too_many_requests", str(error)))
    return see_other(f"http://127.0.0.1:{port}/callback?{urlencode({'code': code, 'state': state})}")


@router.post("/view/cli/token")
async def cli_login_token(request: Request) -> Response:
    """A session that cannot show the token (issued before it began) reissues it for the command."""
    try:
        port, state, challenge = _cli_handoff(request)
    except PageError as error:
        return refusal(request, error)
    response = await reissue(request)
    if response.status_code == 303:
        response.headers["location"] = f"/view/cli?{_handoff_query(port, state, challenge)}"
    return response


@router.post("/view/cli/exchange")
async def cli_login_exchange(request: Request) -> Response:
    """The command trades a one-time code and its PKCE verifier for the token (JSON in, JSON out;
    no cookie is read). 400 ``invalid_grant`` for a code that is unknown, used, expired, made for
    another challenge, or whose token is no longer live."""
    declared = request.headers.get("content-length", "")
    if not declared.isdigit() or int(declared) > MAX_EXCHANGE_BYTES:
        raise ApiError(400, "bad_request", f"send a JSON body of at most {MAX_EXCHANGE_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_EXCHANGE_BYTES:
            raise ApiError(400, "bad_request", f"send a JSON body of at most {MAX_EXCHANGE_BYTES} bytes")
    try:
        sent = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        sent = None
    if not isinstance(sent, dict) or not isinstance(sent.get("code"), str) or not isinstance(sent.get("code_verifier"), str):
        raise ApiError(400, "bad_request", 'send {"code": "…", "code_verifier": "…"}')
    try:
        token = await run_in_threadpool(login_codes.redeem, services(request).sessions, sent["code"], sent["code_verifier"])
    except login_codes.CodeRefused as refused:
        raise ApiError(400, "invalid_grant", str(refused)) from None
    return JSONResponse({"token": token, "token_type": "bearer"}, headers={"Cache-Control": "no-store"})
