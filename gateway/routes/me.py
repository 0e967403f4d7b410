"""/v1/me: who am I (answered to pending users too)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway import users
from gateway.auth import AnyUser

router = APIRouter(prefix="/v1", tags=["me"])


@router.get("/me")
def me(principal: AnyUser, request: Request) -> dict:
    if principal.user_id is None:
        return {"user": None, "role": "admin", "status": "approved", "kind": "environment_admin"}
    with request.app.state.sessions() as session:
        user = users.get(session, principal.user_id)
        return {"user": users.describe(user), "role": user.role, "status": user.status, "kind": "user"}
