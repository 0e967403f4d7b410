"""API tokens: ``kgpu_<48 hex>``, shown once, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime, timezone

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gateway.models import ApiToken, utcnow

TOKEN_PATTERN = re.compile(r"^kgpu_[0-9a-f]{48}$")


def new_token() -> str:
    return "kgpu_" + secrets.token_hex(24)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_well_formed(token: str) -> bool:
    return bool(TOKEN_PATTERN.match(token))


def issue(
    session: Session,
    user_id: int,
    *,
    label: str = "",
    expires_at: datetime | None = None,
    rental_id: str | None = None,
) -> tuple[ApiToken, str]:
    """Create a token for the user; returns the row and the plaintext (shown once, never stored).
    With ``rental_id`` it is an in-pod token, scoped to that rental."""
    plaintext = new_token()
    row = ApiToken(
        user_id=user_id,
        token_hash=hash_token(plaintext),
        hint=plaintext[:11],
        label=label,
        expires_at=expires_at,
        rental_id=rental_id,
    )
    session.add(row)
    session.flush()
    return row, plaintext


def revoke_all(session: Session, user_id: int) -> int:
    result = session.execute(
        update(ApiToken)
        .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return result.rowcount or 0


def revoke(session: Session, token_id: int) -> bool:
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


def is_live(row: ApiToken, now: datetime | None = None) -> bool:
    now = now or utcnow()
    expires = as_utc(row.expires_at)
    return row.revoked_at is None and (expires is None or expires > now)


def describe(row: ApiToken) -> dict:
    return {
        "id": row.id,
        "user_id": row.user_id,
        "hint": row.hint + "…",
        "label": row.label,
        "created_at": as_utc(row.created_at).isoformat(),
        "expires_at": as_utc(row.expires_at).isoformat() if row.expires_at else None,
        "revoked_at": as_utc(row.revoked_at).isoformat() if row.revoked_at else None,
        "live": is_live(row),
        "rental_id": row.rental_id,
    }


def find_by_plaintext(session: Session, plaintext: str) -> ApiToken | None:
    return session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(plaintext)))
