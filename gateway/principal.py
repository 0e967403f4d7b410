"""Who is calling: the account a request acts for (or the environment admin token), as the
domain sees it. Free of HTTP: gateway/auth.py finds the principal of a request; rentals, orgs
and the drive take it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from drive.keys import user_prefix
from gateway.domain_errors import Forbidden


@dataclass(frozen=True)
class Principal:
    user_id: int | None  # None: the environment admin token, which has no user row
    email: str
    role: str
    status: str
    rental_id: str | None = None  # set for in-pod tokens: scoped to one rental

    @property
    def is_admin(self) -> bool:
        """Admin powers never travel into a pod: an in-pod token of an admin is not an admin."""
        return self.role == "admin" and self.rental_id is None

    @cached_property  # a cached principal serves many requests (gateway/auth.py)
    def drive_prefix(self) -> str:
        if self.user_id is None:
            raise Forbidden("no_drive", "the environment admin token has no drive; use a user's token")
        return user_prefix(self.user_id)


ENV_ADMIN = Principal(user_id=None, email="", role="admin", status="approved")
