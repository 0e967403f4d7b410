"""/view/admin: approve and suspend people, roles, credits, organisations and their members.

Each change is a POST with the session's CSRF token, made through the same domain functions as
the admin API (gateway/users.py, gateway/orgs.py), then back to the admin page.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from gateway import orgs, users
from gateway.deps import services
from gateway.domain_errors import DomainError
from gateway.errors import status_of
from gateway.models import User
from gateway.web_pages import PageError, current, page, principal_of, refusal, see_other, signed_in_form

router = APIRouter(include_in_schema=False)


def _admin_context(request: Request, user: User) -> dict:
    principal = principal_of(user)
    with services(request).sessions() as session:
        everyone = [users.describe(u) for u in session.scalars(select(User).order_by(User.status.desc(), User.id))]
        found = []
        for org, role in orgs.visible_orgs(session, principal):
            if role == "admin":
                found.append({**orgs.describe(org), "members": orgs.members(session, org)})
    return {"users": everyone, "orgs": found}


@router.get("/view/admin")
async def admin_page(request: Request) -> Response:
    found = await run_in_threadpool(current, request)
    if found is None:
        return see_other("/view")
    web, user = found
    if user.role != "admin" or user.status != "approved":
        return refusal(request, PageError(403, "admin_only", "the admin pages are for admins"))
    context = await run_in_threadpool(_admin_context, request, user)
    return page(request, "admin.html", user=user, web=web, **context)


def _row_id(raw: str, what: str) -> int:
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) < 2**31:
        raise PageError(400, "bad_request", f"{what} must be a positive whole number")
    return int(raw)


async def _admin_change(request: Request, change) -> Response:
    """Run ``change(session, fields, principal)`` for a signed-in admin, then back to the admin page."""
    try:
        _, user, fields = await signed_in_form(request, admin=True)

        def apply() -> None:
            with services(request).sessions.begin() as session:
                change(session, fields, principal_of(user))

        await run_in_threadpool(apply)
    except PageError as error:
        return refusal(request, error)
    except DomainError as error:
        return refusal(request, PageError(status_of(error), error.error_code, error.message))
    except ValidationError as error:
        problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return refusal(request, PageError(422, "validation_error", problem))
    services(request).authenticator.invalidate()
    return see_other("/view/admin")


def _patch_user(user_id: str, field: str):
    """The change that sets one field of a user from the form's field of that name."""
    def change(session, fields, _):
        target = users.get_locked(session, _row_id(user_id, "user id"))
        users.apply_patch(target, users.UserPatch(**{field: fields.get(field, "")}))

    return change


@router.post("/view/admin/users/{user_id}/status")
async def set_status(user_id: str, request: Request) -> Response:
    return await _admin_change(request, _patch_user(user_id, "status"))


@router.post("/view/admin/users/{user_id}/role")
async def set_role(user_id: str, request: Request) -> Response:
    return await _admin_change(request, _patch_user(user_id, "role"))


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
