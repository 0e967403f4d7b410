"""Reading rentals: the caller's own (:func:`get`, :func:`active_of`) and what the API says of
one (:func:`describe`)."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway import billing
from gateway.domain_errors import NotFound
from gateway.models import Rental
from gateway.principal import Principal
from gateway.rentals.phases import ACTIVE, Phase
from gateway.rentals.placement import Placement
from gateway.tokens import as_utc

_RENTAL_ID = re.compile(r"^gpu-[0-9a-f]{1,40}$")


def get(session: Session, principal: Principal, rental_id: str) -> Rental:
    """The caller's rental ``rental_id`` (an in-pod token sees only its own); NotFound otherwise."""
    rental = session.get(Rental, rental_id) if _RENTAL_ID.match(rental_id) else None
    if rental is None or rental.user_id != principal.user_id or (
        principal.rental_id is not None and principal.rental_id != rental_id
    ):
        raise NotFound("gpu_not_found", f"no rental {rental_id} of yours")
    return rental


def active_of(session: Session, principal: Principal) -> list[Rental]:
    """The caller's live rentals, oldest first (an in-pod token: its own, if live)."""
    query = select(Rental).where(Rental.user_id == principal.user_id, Rental.phase.in_(ACTIVE))
    if principal.rental_id is not None:
        query = query.where(Rental.id == principal.rental_id)
    return list(session.scalars(query.order_by(Rental.created_at)))


def describe(session: Session, rental: Rental, now: datetime, ssh_door: dict | None) -> dict:
    """A rental as the API answers it (``gpu_id`` on the wire)."""
    last = as_utc(rental.last_activity_at)
    started = as_utc(rental.started_at)
    return {
        "gpu_id": rental.id,
        "rent_id": rental.id,
        "name": rental.name,
        "image": rental.image,
        "node": rental.node,
        "gpu_model": rental.gpu_model,
        "gpu_count": rental.gpu_count,
        "phase": rental.phase,
        "ready": rental.ready,
        "pending_reason": rental.pending_reason,
        "queue_position": (
            Placement.queued_ahead(session, rental.gpu_model, rental.created_at) + 1
            if rental.phase == Phase.QUEUED else None
        ),
        "end_reason": rental.end_reason,
        "mounts": json.loads(rental.mounts_json) if rental.mounts_json else None,
        "flush_error": rental.flush_error,
        "created_at": as_utc(rental.created_at).isoformat(),
        "started_at": started.isoformat() if started else None,
        "expires_at": (started + timedelta(hours=rental.duration_hours)).isoformat() if started else None,
        "ended_at": as_utc(rental.ended_at).isoformat() if rental.ended_at else None,
        "last_activity_at": last.isoformat() if last else None,
        "idle_seconds": int((now - last).total_seconds()) if last and rental.phase in ACTIVE else None,
        "idle_warning": rental.idle_warning,
        "activity": rental.last_activity_kind,
        "price_per_hour_credits": billing.hourly_price(rental),
        "credits_charged": billing.charged_total(session, rental.id),
        "ssh_access": ssh_access(session, rental, ssh_door),
    }


def ssh_access(session: Session, rental: Rental, ssh_door: dict | None) -> dict | None:
    """How to SSH into a live rental (None: no SSH here, no key, or it has ended). The login
    name is ``kgpu`` unless the key is pinned to another live rental too."""
    if ssh_door is None or not rental.ssh_fingerprint or rental.phase not in ACTIVE:
        return None
    shared = session.scalar(select(func.count()).select_from(Rental).where(
        Rental.ssh_fingerprint == rental.ssh_fingerprint, Rental.phase.in_(ACTIVE), Rental.id != rental.id,
    ))
    return {**ssh_door, "fingerprint": rental.ssh_fingerprint, "ssh_user": rental.id if shared else "kgpu"}
