"""Browser sessions of /view: a signed cookie, bound to the user's personal token.

Why a signed cookie and no session table: everything a session needs is small (user id, the id
of the token it is bound to, the token itself while it may still be shown, a CSRF secret), any
gateway replica reads it with the shared secret, and it costs no table, no migration and no
sweep. What a signed cookie cannot do alone — end at once everywhere — comes from the binding:
a session of an approved user holds its token's id, and is honoured only while that token is
live in the database; signing out revokes the token, so every copy of the cookie dies with it.
A session of a pending user holds no token and can see nothing private; to get a token once
approved, the person signs in again (a stolen pending cookie never turns into a token).

The cookie is HttpOnly, SameSite=Lax, Secure (and ``__Host-``) when the public URL is https,
signed with itsdangerous (HMAC-SHA1 over the JSON, a timestamp checked against the session's
maximum age). Its content is readable by whoever holds the cookie: the person's own token, which
that person may see anyway; no other secret goes in it.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer

SESSION_COOKIE = "kgpu_session"
SIGNIN_COOKIE = "kgpu_signin"
SIGNIN_MAX_AGE_S = 600  # the trip to the provider and back
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"


@dataclass(frozen=True)
class WebSession:
    user_id: int
    csrf: str
    token_id: int | None = None  # the personal token this session is bound to (approved users)
    token: str | None = None  # its plaintext, while this browser may still show it

    def with_token(self, token_id: int | None, token: str | None) -> "WebSession":
        return WebSession(self.user_id, self.csrf, token_id, token)

    def csrf_matches(self, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(sent.encode(), self.csrf.encode())


def new_session(user_id: int, token_id: int | None = None, token: str | None = None) -> WebSession:
    return WebSession(user_id, secrets.token_urlsafe(32), token_id, token)


def load_or_create_secret(configured: str, data_dir: Path) -> str:
    """KGPU_SESSION_SECRET, else one kept in the data directory (replicas must share one: set it)."""
    if configured:
        return configured
    path = data_dir / "session-secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    # Written whole before it appears under its name: the worker processes of `kgpu serve` start at
    # once, and one reading a secret another has created but not yet written would sign with "".
    staged = path.with_name(f".session-secret.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(48))
    try:
        os.link(staged, path)
    except FileExistsError:  # another process of this data directory made it first: theirs holds
        pass
    finally:
        staged.unlink()
    return path.read_text().strip()


class CookieSigner:
    def __init__(self, secret: str, max_age_s: int):
        self._sessions = URLSafeTimedSerializer(secret, salt="kgpu.view.session")
        self._signins = URLSafeTimedSerializer(secret, salt="kgpu.view.signin")
        self.max_age_s = max_age_s

    @staticmethod
    def session_cookie(secure: bool) -> str:
        # __Host-: the browser keeps it only if Secure, for this host and path / (no subdomain sets it).
        return f"__Host-{SESSION_COOKIE}" if secure else SESSION_COOKIE

    @staticmethod
    def signin_cookie(secure: bool) -> str:
        return f"__Host-{SIGNIN_COOKIE}" if secure else SIGNIN_COOKIE

    @staticmethod
    def cookie_options(secure: bool) -> dict:
        return {"httponly": True, "samesite": "lax", "secure": secure, "path": "/"}

    def dump_session(self, session: WebSession) -> str:
        return self._sessions.dumps(asdict(session))

    def load_session(self, raw: str | None) -> WebSession | None:
        if not raw:
            return None
        try:
            data = self._sessions.loads(raw, max_age=self.max_age_s)
            return WebSession(int(data["user_id"]), str(data["csrf"]), data.get("token_id"), data.get("token"))
        except (BadSignature, KeyError, TypeError, ValueError):
            return None

    def dump_signin(self, pending: dict) -> str:
        return self._signins.dumps(pending)

    def load_signin(self, raw: str | None) -> dict | None:
        if not raw:
            return None
        try:
            data = self._signins.loads(raw, max_age=SIGNIN_MAX_AGE_S)
        except BadSignature:
            return None
        return data if isinstance(data, dict) else None
