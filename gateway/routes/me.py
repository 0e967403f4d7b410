"""/v1/me: who am I (answered to pending users too)."""

from __future__ import annotations

from fastapi import APIRouter

from gateway import users
from gateway.auth import AnyUser
from gateway.deps import SessionsDep
from gateway.openapi import USER, content

WHO = {
    "type": "object",
    "required": ["user", "role", "status", "kind"],
    "properties": {
        "user": {"anyOf": [USER, {"type": "null"}]},
        "role": {"type": "string", "enum": ["user", "admin"]},
        "status": {"type": "string", "enum": ["approved", "pending", "suspended"]},
        "kind": {"type": "string", "enum": ["user", "environment_admin"]},
    },
}

router = APIRouter(prefix="/v1", tags=["me"])


@router.get(
    "/me",
    summary="Who am I (pending accounts too)",
    responses=content(
        200, "user (null for the environment admin token), role, status, kind", {"application/json": {"schema": WHO}}
    ),
)
def me(principal: AnyUser, sessions: SessionsDep) -> dict:
    if principal.user_id is None:
        return {"user": None, "role": "admin", "status": "approved", "kind": "environment_admin"}
    with sessions() as session:
        user = users.get(session, principal.user_id)
        return {"user": users.describe(user), "role": user.role, "status": user.status, "kind": "user"}
