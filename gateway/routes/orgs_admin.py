"""/v1/admin/orgs: organisations and their members.

Global admins manage every org and create orgs; an org's own ``admin``
members manage that org's members.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from gateway import orgs
from gateway.auth import AccountUser, AdminUser
from gateway.deps import RowIdPath, SessionsDep
from gateway.errors import ApiError
from gateway.openapi import errors

router = APIRouter(prefix="/v1/admin/orgs", tags=["admin: organizations"])
MANAGED = errors(
    (403, "org_admin_only: managing an org's members needs its admin role"),
    (404, "org_not_found: no organisation of that name that you belong to"),
)


def _managed(session, principal, slug: str) -> orgs.Access:
    found = orgs.access(session, principal, slug)
    if not found.can_manage:
        raise ApiError(403, "org_admin_only", f"managing {slug}'s members needs its admin role")
    return found


@router.get(
    "", responses=errors((403, "admin_only: needs an admin token or an org's admin role"))
)
def list_orgs(principal: AccountUser, sessions: SessionsDep) -> dict:
    """Every org for global admins; the orgs a caller administers otherwise."""
    with sessions() as session:
        found = [
            {**orgs.describe(org), "role": role}
            for org, role in orgs.visible_orgs(session, principal)
            if role == "admin"
        ]
    if not found and not principal.is_admin:
        raise ApiError(403, "admin_only", "this needs an admin token or an org's admin role")
    return {"orgs": found}


@router.post(
    "",
    status_code=201,
    responses=errors(
        (404, "user_not_found: no user owner_user_id"), (409, "org_exists: an organisation with this slug exists")
    ),
)
def create_org(body: orgs.NewOrg, _: AdminUser, sessions: SessionsDep) -> dict:
    with sessions.begin() as session:
        return {"org": orgs.describe(orgs.create(session, body))}


@router.get("/{slug}/members", responses=MANAGED)
def list_members(slug: str, principal: AccountUser, sessions: SessionsDep) -> dict:
    with sessions() as session:
        found = _managed(session, principal, slug)
        return {"org": orgs.describe(found.org), "members": orgs.members(session, found.org)}


@router.post(
    "/{slug}/members",
    responses={**MANAGED, **errors((404, "org_not_found, or user_not_found: no user user_id"))},
)
def set_member(slug: str, body: orgs.Membership, principal: AccountUser, sessions: SessionsDep) -> dict:
    with sessions.begin() as session:
        found = _managed(session, principal, slug)
        member, user = orgs.set_member(session, found.org, body)
        described = orgs.describe_member(member, user)
        if not principal.is_admin:
            # An org admin names people by id; echoing their email would let one list every account.
            described = {"user_id": user.id, "role": member.role}
        return {"org": slug, "member": described}


@router.delete(
    "/{slug}/members/{user_id}",
    status_code=204,
    responses={
        204: {"description": "Removed"},
        **MANAGED,
        **errors((404, "org_not_found, or member_not_found: the user is not a member")),
    },
)
def remove_member(slug: str, user_id: RowIdPath, principal: AccountUser, sessions: SessionsDep) -> Response:
    with sessions.begin() as session:
        found = _managed(session, principal, slug)
        orgs.remove_member(session, found.org, user_id)
    return Response(status_code=204)
