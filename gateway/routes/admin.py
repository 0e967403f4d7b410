"""/v1/admin/users: accounts, approval, tokens and credits (admins only)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import select

from gateway import tokens, users
from gateway.auth import AdminUser
from gateway.bounds import MAX_CREDITS
from gateway.deps import AuthenticatorDep, RowIdPath, SessionsDep, SettingsDep
from gateway.models import User
from gateway.openapi import errors

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class CreditGrant(BaseModel):
    credits: int = Field(
        ge=-MAX_CREDITS, le=MAX_CREDITS, description="credits to add (negative to take back)"
    )


@router.post(
    "/users", status_code=201, responses=errors((409, "user_exists: a user with this email exists"))
)
def create_user(body: users.NewUser, _: AdminUser, sessions: SessionsDep, settings: SettingsDep) -> dict:
    with sessions.begin() as session:
        user = users.create(session, body, settings.starting_credits)
        _, plaintext = tokens.issue(session, user.id, label="created by admin")
        return {"user": users.describe(user), "token": plaintext}


@router.get("/users")
def list_users(_: AdminUser, sessions: SessionsDep, status: users.Status | None = None) -> dict:
    with sessions() as session:
        query = select(User).order_by(User.id)
        if status:
            query = query.where(User.status == status)
        return {"users": [users.describe(u) for u in session.scalars(query)]}


@router.patch("/users/{user_id}", responses=errors((404, "user_not_found")))
def patch_user(
    user_id: RowIdPath, body: users.UserPatch, _: AdminUser, sessions: SessionsDep, authenticator: AuthenticatorDep
) -> dict:
    with sessions.begin() as session:
        user = users.get(session, user_id)
        users.apply_patch(user, body)
        described = users.describe(user)
    authenticator.invalidate()
    return {"user": described}


@router.post("/users/{user_id}/token", status_code=201, responses=errors((404, "user_not_found")))
def reissue_token(user_id: RowIdPath, _: AdminUser, sessions: SessionsDep, authenticator: AuthenticatorDep) -> dict:
    """Revoke every token of the user and issue a new one (shown once)."""
    with sessions.begin() as session:
        users.get_locked(session, user_id)  # concurrent reissues, on any gateway, one after another
        revoked = tokens.revoke_all(session, user_id)
        row, plaintext = tokens.issue(session, user_id, label="reissued by admin")
        described = tokens.describe(row)
    authenticator.invalidate()
    return {"token": plaintext, "token_info": described, "revoked": revoked}


@router.post(
    "/users/{user_id}/credits",
    responses=errors(
        (404, "user_not_found"), (422, "validation_error: the field named, or a balance below 0 or past 10^15")
    ),
)
def grant_credits(user_id: RowIdPath, body: CreditGrant, _: AdminUser, sessions: SessionsDep) -> dict:
    with sessions.begin() as session:
        user = users.get_locked(session, user_id)  # the balance read is the one written to
        users.grant_credits(user, body.credits)
        session.flush()
        session.refresh(user)
        return {"user": users.describe(user)}
