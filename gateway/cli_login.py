"""``kgpu login --browser`` on the server: one-time codes bound to a PKCE challenge (RFC 8252, 7636).

The command (client/browser_login.py) makes a random verifier in its own memory, never on a
command line, and opens ``/view/cli?port=P&state=S&code_challenge=C&code_challenge_method=S256``
with ``C = BASE64URL(SHA-256(verifier))``. Whoever reads that address (every user of the machine
can read a browser's command line) learns the port, the state and the challenge, none of which
is worth a token:

* the page (the person signed in, confirming with the session's CSRF token) gets a **code**, not
  the token, and hands it to ``http://127.0.0.1:P/callback`` with the state (a 303);
* the code is redeemed at ``POST /view/cli/exchange`` with the **verifier**, which only the
  command holds: once (the first try burns it, right or wrong), within :data:`CODE_TTL_S`, and
  only for the challenge it was minted for; then the token is handed over;
* so a token, or a code minted for another challenge, posted to the listener by another local
  user is refused by the server, and the command keeps waiting; the command also refuses what
  another uid sends it at all (client/browser_login.py).

State lives in the database (``cli_login_codes``, migration 0010), so any replica mints and any
redeems. The token is stored sealed (AES-GCM) under a key derived from the code, which is kept
only as its SHA-256: the table alone gives no token. Rows go an hour after they expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from gateway import tokens
from gateway.models import ApiToken, CliLoginCode

CODE_TTL_S = 60.0  # the page hands the code on at once, and the command redeems it at once
KEPT_AFTER_EXPIRY_S = 3600.0
MAX_LIVE_CODES_PER_USER = 10  # codes not yet expired, used or not: a person signs in one command at a time
CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # BASE64URL(SHA-256) without padding
VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")  # RFC 7636 4.1
CODE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_NONCE = bytes(12)  # each key seals one token, once


class TooManyCodes(Exception):
    """More than :data:`MAX_LIVE_CODES_PER_USER` codes of one person within a minute (a 429)."""


class CodeRefused(Exception):
    """A code the server does not redeem (unknown, used, expired, another challenge's, or its token
    is no longer live): the message says which, in words."""


def s256(verifier: str) -> str:
    """The S256 challenge of a PKCE verifier (RFC 7636 4.2)."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode("ascii")).hexdigest()


def _key(code: str) -> bytes:
    return hashlib.sha256(b"kgpu cli-login seal\0" + code.encode("ascii")).digest()


def mint(session: Session, user_id: int, token_id: int, token: str, challenge: str, now: float | None = None) -> str:
    """A one-time code for ``token`` (the user's live personal token, ``token_id``), bound to
    ``challenge``; expired rows are swept on the way. :class:`TooManyCodes` past
    :data:`MAX_LIVE_CODES_PER_USER` live codes of the user."""
    if not CHALLENGE.match(challenge):
        raise ValueError("not an S256 code challenge")
    now = time.time() if now is None else now
    session.execute(delete(CliLoginCode).where(CliLoginCode.expires_at < now - KEPT_AFTER_EXPIRY_S))
    live = session.scalar(
        select(func.count()).select_from(CliLoginCode)
        .where(CliLoginCode.user_id == user_id, CliLoginCode.expires_at > now)
    )
    if live >= MAX_LIVE_CODES_PER_USER:
        raise TooManyCodes(f"over {MAX_LIVE_CODES_PER_USER} sign-ins of the kgpu command in a minute; wait a minute")
    code = secrets.token_urlsafe(32)
    sealed = AESGCM(_key(code)).encrypt(_NONCE, token.encode(), challenge.encode())
    session.add(CliLoginCode(
        code_hash=_hash(code), code_challenge=challenge, user_id=user_id, token_id=token_id,
        sealed_token=sealed, created_at=now, expires_at=now + CODE_TTL_S,
    ))
    session.flush()
    return code


def redeem(sessions, code: str, verifier: str, now: float | None = None) -> str:
    """The token a code was minted for, if ``verifier`` is the one its challenge was made from;
    the code is burnt by this call whatever its outcome (committed before the verifier is
    checked). :class:`CodeRefused` otherwise."""
    if not CODE.match(code or ""):
        raise CodeRefused("this is not a code of kgpu's sign-in page")
    if not VERIFIER.match(verifier or ""):
        raise CodeRefused("code_verifier must be 43 to 128 characters of A-Z a-z 0-9 - . _ ~ (RFC 7636)")
    now = time.time() if now is None else now
    key = _hash(code)
    with sessions.begin() as session:
        burnt = session.execute(
            update(CliLoginCode)
            .where(CliLoginCode.code_hash == key, CliLoginCode.used_at.is_(None), CliLoginCode.expires_at > now)
            .values(used_at=now)
        ).rowcount
        row = session.get(CliLoginCode, key) if burnt == 1 else None
        if row is not None:
            session.expunge(row)
    if row is None:
        raise CodeRefused("this code is unknown, already used or expired: sign in again with kgpu login --browser")
    if not hmac.compare_digest(s256(verifier).encode(), row.code_challenge.encode()):
        raise CodeRefused("this code was not made for this kgpu login (its code_verifier does not match)")
    with sessions() as session:
        token_row = session.get(ApiToken, row.token_id)
        if token_row is None or not tokens.is_live(token_row):
            raise CodeRefused("the token this code stood for was revoked since (signed out or reissued)")
    try:
        plaintext = AESGCM(_key(code)).decrypt(_NONCE, row.sealed_token, row.code_challenge.encode()).decode()
    except InvalidTag:
        raise CodeRefused("this code does not open its token") from None
    if tokens.hash_token(plaintext) != token_row.token_hash:
        raise CodeRefused("this code does not open its token")
    return plaintext
