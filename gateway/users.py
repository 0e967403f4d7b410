"""User accounts: creation, approval, roles, credits. Shared by the admin API and the CLI."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gateway.bounds import MAX_CREDITS, MAX_ROW_ID, PlainText
from gateway.db import add_new
from gateway.domain_errors import Conflict, Invalid, NotFound
from gateway.models import User
from gateway.tokens import as_utc

Role = Literal["user", "admin"]
Status = Literal["approved", "pending", "suspended"]


class NewUser(BaseModel):
    email: PlainText = Field(min_length=3, max_length=320)
    name: PlainText = Field(default="", max_length=200)
    role: Role = "user"
    status: Status = "approved"
    credits: int | None = Field(default=None, ge=0, le=MAX_CREDITS)

    @field_validator("email")
    @classmethod
    def _email_shape(cls, value: str) -> str:
        value = value.strip().lower()
        local, at, domain = value.partition("@")
        if not at or not local or "." not in domain or any(c.isspace() for c in value):
            raise ValueError("not an email address")
        return value


class UserPatch(BaseModel):
    status: Status | None = None
    role: Role | None = None
    name: PlainText | None = Field(default=None, max_length=200)


def describe(user: User) -> dict:
    return {
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "role": user.role,
        "status": user.status,
        "credits": user.credits,
        "created_at": as_utc(user.created_at).isoformat(),
    }


def create(session: Session, new: NewUser, starting_credits: int) -> User:
    user = User(
        email=new.email,
        name=new.name,
        role=new.role,
        status=new.status,
        credits=starting_credits if new.credits is None else new.credits,
    )
    add_new(session, user, Conflict("user_exists", f"a user with email {new.email} already exists"))
    return user


def get(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("user_not_found", f"no user with id {user_id}")
    return user


def get_locked(session: Session, user_id: int) -> User:
    """The user, its row locked until the transaction ends: what is read next is current and
    stays so, whatever other gateways on the same database do meanwhile. A no-op UPDATE rather
    than SELECT … FOR UPDATE: it locks the row on PostgreSQL and, as the transaction's first
    write, takes SQLite's database lock before anything is read (a deferred SQLite transaction
    that reads first fails on its first write when another committed in between)."""
    session.execute(update(User).where(User.id == user_id).values(id=User.id))
    user = session.get(User, user_id, populate_existing=True)
    if user is None:
        raise NotFound("user_not_found", f"no user with id {user_id}")
    return user


def find(session: Session, id_or_email: str) -> User:
    if id_or_email.isascii() and id_or_email.isdigit():
        if int(id_or_email) > MAX_ROW_ID:
            raise NotFound("user_not_found", f"no user with id {id_or_email}")
        return get(session, int(id_or_email))
    user = session.scalar(select(User).where(User.email == id_or_email.strip().lower()))
    if user is None:
        raise NotFound("user_not_found", f"no user with email {id_or_email}")
    return user


def apply_patch(user: User, patch: UserPatch) -> None:
    for field, value in patch.model_dump(exclude_none=True).items():
        setattr(user, field, value)


def grant_credits(user: User, credits: int) -> None:
    """Add (or take back) credits on a row locked with ``get_locked``; the balance stays in 0..MAX_CREDITS."""
    if user.credits + credits < 0:
        raise Invalid(f"the balance is {user.credits}; it cannot go below zero")
    if user.credits + credits > MAX_CREDITS:
        raise Invalid(f"the balance is {user.credits}; it cannot go above {MAX_CREDITS}")
    user.credits = user.credits + credits
