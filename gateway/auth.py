"""Bearer authentication: who is calling, and may they?

Lookups are cached for ``KGPU_AUTH_CACHE_SECONDS`` (default 2 s) because a
download is one redirect and the token check would otherwise be most of its
cost. Changes made through this server's own API (revocation, status, role)
clear the cache at once; changes made by ``kgpu admin`` in another process
reach a running server within that many seconds. A token in use is looked up
again in the background once its entry is half that old, so a busy client never
finds it expired (and its requests never queue on the database together), while
no entry is ever used past that age.

A request is authenticated once (:func:`authenticate`): the outcome, a principal or the
refusal, stays in ``scope["state"]``, so the layer that authenticated first (the WebDAV
dispatcher, which checks locks before a PUT reaches its route; the download fast path)
and the route's dependency below it never look the token up twice.
"""

from __future__ import annotations

import base64
import hmac
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Callable

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from gateway.errors import ApiError
from gateway.models import ApiToken, User, utcnow
from gateway.principal import ENV_ADMIN, Principal
from gateway.shared_generation import SharedGeneration
from gateway.tokens import as_utc, hash_token, is_well_formed

_BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="kgpu"'}


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, _BEARER_CHALLENGE)


class Authenticator:
    def __init__(
        self, sessions: sessionmaker, admin_token: str, cache_seconds: float = 2.0, clock: Callable[[], float] = time.time,
        shared: SharedGeneration | None = None,
    ):
        """``shared``: the generation the server's processes share (its data directory's): an
        invalidation in one drops every process's cached lookups."""
        self._sessions = sessions
        self._clock = clock
        self._admin_token = admin_token
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Principal, float | None, bytes]] = {}
        self._lock = threading.Lock()
        self._generation = 0  # bumped by invalidate(): a lookup begun before it caches nothing
        self._shared = shared
        self._refreshing: set[str] = set()
        self._refresher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kgpu-auth-refresh")

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._cache.clear()
        if self._shared is not None:
            self._shared.bump()

    def _shared_generation(self) -> bytes:
        return self._shared.read() if self._shared is not None else b""

    def close(self) -> None:
        self._refresher.shutdown(wait=False, cancel_futures=True)

    def bearer(self, authorization: str | None, allow_basic: bool = False) -> str:
        """The token from ``Bearer <token>``; with ``allow_basic`` also from HTTP Basic, where the
        token is the password and the user name is ignored (what WebDAV clients can send)."""
        if not authorization:
            raise unauthorized("missing Authorization: Bearer token")
        scheme, _, token = authorization.partition(" ")
        if allow_basic and scheme.lower() == "basic":
            try:
                _, _, token = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                raise unauthorized("malformed Basic credentials") from None
            if not token:
                raise unauthorized("Basic credentials need the token as the password")
            return token
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("Authorization must be 'Bearer <token>'")
        return token.strip()

    def cached(self, token: str) -> Principal | None:
        hit = self._cache.get(token)
        if hit is None:
            return None
        fetched, principal, expires, shared = hit
        now = self._clock()
        age = now - fetched
        if age > self._cache_seconds or (expires is not None and now >= expires):
            return None
        if shared != self._shared_generation():  # another process invalidated since
            return None
        if age > self._cache_seconds / 2 and token not in self._refreshing:
            self._refresh_soon(token)
        return principal

    def _refresh_soon(self, token: str) -> None:
        with self._lock:
            if token in self._refreshing:
                return
            self._refreshing.add(token)
        self._refresher.submit(self._refresh, token)

    def _refresh(self, token: str) -> None:
        """Look a cached token up again; one that no longer passes leaves the cache."""
        try:
            self._look_up(token)
        except Exception:  # noqa: BLE001 - revoked, expired, or the database down: the next request looks it up
            with self._lock:
                self._cache.pop(token, None)
        finally:
            with self._lock:
                self._refreshing.discard(token)

    def lookup(self, token: str) -> Principal:
        """Resolve a token against the database (blocking), for a request."""
        return self._look_up(token)

    def _look_up(self, token: str) -> Principal:
        # Bytes, not str: compare_digest refuses non-ASCII str (a 500 for a token like "kgpu_é").
        if self._admin_token and hmac.compare_digest(token.encode(), self._admin_token.encode()):
            return ENV_ADMIN
        generation, shared = self._generation, self._shared_generation()
        if not is_well_formed(token):
            raise unauthorized("malformed token: expected kgpu_ and 48 hex digits")
        with self._sessions() as session:
            row = session.execute(
                select(ApiToken, User)
                .join(User, User.id == ApiToken.user_id)
                .where(ApiToken.token_hash == hash_token(token))
            ).first()
        if row is None:
            raise unauthorized("unknown token")
        api_token, user = row
        if api_token.revoked_at is not None:
            raise unauthorized("token revoked")
        expires = as_utc(api_token.expires_at)
        if expires is not None and expires <= utcnow():
            raise unauthorized("token expired")
        principal = Principal(
            user_id=user.id, email=user.email, role=user.role, status=user.status, rental_id=api_token.rental_id
        )
        if self._cache_seconds > 0:
            with self._lock:
                if generation != self._generation:
                    return principal  # invalidated while it was read: it may predate the change
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[token] = (self._clock(), principal, expires.timestamp() if expires else None, shared)
        return principal


_OUTCOME = "kgpu.authentication"  # in scope["state"]: (allow_basic, Principal or ApiError)


def remember(scope: Scope, principal: Principal, *, allow_basic: bool) -> None:
    """Record that this request's credentials name ``principal`` (found by a layer that read the
    cache itself), so :func:`authenticate` does not look them up again."""
    scope.setdefault("state", {})[_OUTCOME] = (allow_basic, principal)


async def authenticate(scope: Scope, authorization: str | None, *, allow_basic: bool) -> Principal:
    """The caller of this request (ApiError 401 if the credentials are not valid), looked up once
    per request: a second call, from a layer further in, gets the first one's outcome."""
    state = scope.setdefault("state", {})
    known = state.get(_OUTCOME)
    if known is not None and known[0] == allow_basic:
        outcome = known[1]
    else:
        authenticator: Authenticator = scope["app"].state.authenticator
        try:
            token = authenticator.bearer(authorization, allow_basic=allow_basic)
            outcome = authenticator.cached(token) or await run_in_threadpool(authenticator.lookup, token)
        except ApiError as exc:
            outcome = exc
        state[_OUTCOME] = (allow_basic, outcome)
    if isinstance(outcome, ApiError):
        raise outcome
    return outcome


async def current_principal(request: Request) -> Principal:
    """Any valid token, pending users included (they may only read /v1/me)."""
    # HTTP Basic (token as password) is accepted on the drive routes, for WebDAV clients.
    drive_route = request.url.path.startswith(("/v1/files", "/v1/shared", "/v1/dav"))
    return await authenticate(request.scope, request.headers.get("authorization"), allow_basic=drive_route)


async def approved_principal(request: Request) -> Principal:
    # Not a sub-dependency of current_principal: every level of FastAPI's dependency
    # resolution costs time on the download redirect, the hottest path of the service.
    principal = await current_principal(request)
    refusal = status_refusal(principal.status)
    if refusal is not None:
        raise refusal
    return principal


def status_refusal(status: str) -> ApiError | None:
    """Why an account of this status may not act (None: it may): the one home of that rule."""
    if status == "approved":
        return None
    if status == "suspended":
        return ApiError(403, "account_suspended", "your account is suspended; ask an admin")
    return ApiError(403, "account_pending", "your account is waiting for an admin's approval")


async def account_principal(principal: Annotated[Principal, Depends(approved_principal)]) -> Principal:
    """An account token: in-pod tokens may use the drive and their own rental, nothing else."""
    if principal.rental_id is not None:
        raise ApiError(403, "pod_token", "an in-pod token cannot do this; use your account token")
    return principal


async def admin_principal(principal: Annotated[Principal, Depends(account_principal)]) -> Principal:
    if not principal.is_admin:
        raise ApiError(403, "admin_only", "this needs an admin token")
    return principal


AnyUser = Annotated[Principal, Depends(current_principal)]
ApprovedUser = Annotated[Principal, Depends(approved_principal)]
AccountUser = Annotated[Principal, Depends(account_principal)]
AdminUser = Annotated[Principal, Depends(admin_principal)]


async def optional_principal(request: Request) -> Principal | None:
    """The caller if a token was sent (it must then be valid), else None: for public routes."""
    if not request.headers.get("authorization"):
        return None
    return await current_principal(request)


MaybeUser = Annotated[Principal | None, Depends(optional_principal)]
