"""Organisations and their members: who may read, write and manage each shared drive.

Roles inside an org: ``admin`` (manage members, read, write), ``uploader``
(read, write), ``member`` (read). A global admin acts as an org admin in
every org. An org the caller may not read behaves as if it did not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.bounds import PlainText, RowId, dns_label, is_dns_label
from gateway.db import add_new
from gateway.domain_errors import Conflict, NotFound
from gateway.models import Org, OrgMember, User
from gateway.principal import Principal
from gateway.tokens import as_utc

OrgRole = Literal["admin", "uploader", "member"]
SLUG_LENGTH = 63
Slug = dns_label(SLUG_LENGTH, "slug must be DNS-friendly: lowercase letters, digits and inner '-', at most 63")
_WRITERS = {"admin", "uploader"}


class NewOrg(BaseModel):
    slug: Slug
    name: PlainText = Field(default="", max_length=200)
    owner_user_id: RowId | None = None


class Membership(BaseModel):
    user_id: RowId
    role: OrgRole = "member"


@dataclass(frozen=True)
class Access:
    org: Org
    role: OrgRole  # the caller's effective role

    @property
    def can_write(self) -> bool:
        return self.role in _WRITERS

    @property
    def can_manage(self) -> bool:
        return self.role == "admin"


def describe(org: Org) -> dict:
    return {
        "slug": org.slug,
        "name": org.name,
        "owner_user_id": org.owner_user_id,
        "created_at": as_utc(org.created_at).isoformat(),
    }


def describe_member(member: OrgMember, user: User) -> dict:
    return {"user_id": user.id, "email": user.email, "name": user.name, "role": member.role}


def access(session: Session, principal: Principal, slug: str) -> Access:
    """The caller's access to an org; 404 when the org does not exist *or* the caller is not in it."""
    org = session.scalar(select(Org).where(Org.slug == slug)) if is_dns_label(slug, SLUG_LENGTH) else None
    if org is not None and principal.is_admin:
        return Access(org, "admin")
    if org is not None and principal.user_id is not None:
        role = session.scalar(
            select(OrgMember.role).where(OrgMember.org_id == org.id, OrgMember.user_id == principal.user_id)
        )
        if role:
            return Access(org, role)
    raise NotFound("org_not_found", f"no organisation {slug!r} that you belong to")


def visible_orgs(session: Session, principal: Principal) -> list[tuple[Org, str]]:
    """(org, role) for every org the caller may read, by slug."""
    if principal.is_admin:
        return [(org, "admin") for org in session.scalars(select(Org).order_by(Org.slug))]
    if principal.user_id is None:
        return []
    rows = session.execute(
        select(Org, OrgMember.role)
        .join(OrgMember, OrgMember.org_id == Org.id)
        .where(OrgMember.user_id == principal.user_id)
        .order_by(Org.slug)
    )
    return [(org, role) for org, role in rows]


def create(session: Session, new: NewOrg) -> Org:
    if new.owner_user_id is not None and session.get(User, new.owner_user_id) is None:
        raise NotFound("user_not_found", f"no user with id {new.owner_user_id}")
    org = Org(slug=new.slug, name=new.name, owner_user_id=new.owner_user_id)
    add_new(session, org, Conflict("org_exists", f"an organisation {new.slug!r} already exists"))
    if new.owner_user_id is not None:
        session.add(OrgMember(org_id=org.id, user_id=new.owner_user_id, role="admin"))
        session.flush()
    return org


def set_member(session: Session, org: Org, membership: Membership) -> tuple[OrgMember, User]:
    user = session.get(User, membership.user_id)
    if user is None:
        raise NotFound("user_not_found", f"no user with id {membership.user_id}")
    member = session.get(OrgMember, (org.id, user.id))
    if member is None:
        member = OrgMember(org_id=org.id, user_id=user.id, role=membership.role)
        session.add(member)
    else:
        member.role = membership.role
    session.flush()
    return member, user


def remove_member(session: Session, org: Org, user_id: int) -> None:
    member = session.get(OrgMember, (org.id, user_id))
    if member is None:
        raise NotFound("member_not_found", f"user {user_id} is not a member of {org.slug}")
    session.delete(member)


def members(session: Session, org: Org) -> list[dict]:
    rows = session.execute(
        select(OrgMember, User).join(User, User.id == OrgMember.user_id).where(OrgMember.org_id == org.id).order_by(User.id)
    )
    return [describe_member(m, u) for m, u in rows]
