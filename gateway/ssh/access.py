"""Who may enter which pod over SSH: the database's word, asked at login, at every channel, and
by the bastion's watcher for the connections it holds (a returned rental or a rotated key ends
them). Blocking (SQLAlchemy): the bastion calls it from its worker threads."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from gateway.models import Rental
from gateway.rentals import Rentals
from gateway.rentals.phases import Phase

# A pod one can enter: started, not ending.
LIVE = (Phase.RUNNING,)
LOGIN_NAME = "kgpu"


@dataclass(frozen=True)
class Target:
    """The rental a login enters."""

    rental_id: str
    user_id: int
    pod_ref: str
    fingerprint: str


@dataclass(frozen=True)
class Ambiguous:
    """A key pinned to several live rentals, logged in as ``kgpu``: the login name must pick one."""

    user_id: int
    rental_ids: tuple[str, ...]

    @property
    def message(self) -> str:
        choices = ", ".join(self.rental_ids)
        return (f"kgpu: this key is pinned to {len(self.rental_ids)} live rentals ({choices}); "
                f"log in as one of them, e.g. ssh -p PORT {self.rental_ids[0]}@HOST")


class Access:
    def __init__(self, rentals: Rentals):
        self.rentals = rentals
        self.sessions = rentals.sessions

    def choose(self, login: str, fingerprint: str) -> Target | Ambiguous | None:
        """Where ``login`` with the key ``fingerprint`` lands: ``kgpu`` in the one live rental
        pinning the key, ``gpu-…`` in that rental if it pins the key; None: nowhere."""
        with self.sessions() as session:
            query = select(Rental).where(Rental.ssh_fingerprint == fingerprint, Rental.phase.in_(LIVE))
            if login != LOGIN_NAME:
                query = query.where(Rental.id == login)
            found = list(session.scalars(query.order_by(Rental.created_at)))
        found = [r for r in found if r.pod_ref]
        if not found or (login != LOGIN_NAME and len(found) != 1):
            return None
        if len(found) > 1:
            return Ambiguous(found[0].user_id, tuple(r.id for r in found))
        return Target(found[0].id, found[0].user_id, found[0].pod_ref, fingerprint)

    def still_open(self, target: Target) -> str | None:
        """None while ``target`` may be entered (live, the same key, its pod this gateway's);
        else why not."""
        with self.sessions() as session:
            rental = session.get(Rental, target.rental_id)
            closed = _closed(rental, target)
            if closed is None and not self.rentals.mine(rental):
                return f"kgpu: rental {target.rental_id}'s pod runs behind another gateway"
        return closed

    def closed_of(self, targets: list[Target]) -> set[str]:
        """The rental ids among ``targets`` that may no longer be entered (the watcher's one query)."""
        if not targets:
            return set()
        with self.sessions() as session:
            rows = {
                r.id: r for r in session.scalars(select(Rental).where(Rental.id.in_({t.rental_id for t in targets})))
            }
        return {t.rental_id for t in targets if _closed(rows.get(t.rental_id), t) is not None}

    def active(self, rental_ids: set[str]) -> None:
        """Rentals with an SSH session open or a forward that carried bytes: not idle."""
        if not rental_ids:
            return
        with self.sessions.begin() as session:
            for rental in session.scalars(select(Rental).where(Rental.id.in_(rental_ids), Rental.phase.in_(LIVE))):
                rental.last_activity_at = self.rentals.now()
                rental.last_activity_kind = "ssh"
                rental.idle_warning = False


def _closed(rental: Rental | None, target: Target) -> str | None:
    """Why ``target``'s login may no longer enter ``rental`` (ended, or its key changed); None: it may."""
    if rental is None or rental.phase not in LIVE:
        return f"kgpu: rental {target.rental_id} has ended"
    if rental.ssh_fingerprint != target.fingerprint:
        return f"kgpu: the key of rental {target.rental_id} was changed"
    return None
