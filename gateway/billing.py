"""Per-minute billing as ledger rows: each minute of each rental is charged exactly once.

A rental's minute ``m`` (0-based, from its start, rounded up) costs
``ceil((m+1)·u·p/60) − ceil(m·u·p/60)`` credits for ``u`` billed units (its GPU
count, at least one: a CPU-only pod bills at its class rate) at ``p`` credits
per hour, so any number of minutes costs exactly the rounded-up total. The
``(rental_id, minute)`` pair is unique in the ledger and the balance moves in
the same transaction as the insert, so gateway restarts and several gateway
processes on one database never charge a minute twice.

Each account keeps the running total of its credits charged (``users.credits_charged``), moved by
the same UPDATE as its balance, so the credits charged in all (``/metrics``) are read without
scanning the ledger. A total on the account's row rather than one row for everyone: the charge
locks that row anyway, while a shared row, locked by the reaper's first charge until its
transaction ends (it charges every live rental in one), would deadlock it on PostgreSQL against a
rental's start or return holding a row the reaper wants next.
"""

from __future__ import annotations

import math
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from gateway.models import CreditCharge, Rental, User
from gateway.tokens import as_utc


def billed_units(rental: Rental) -> int:
    return max(rental.gpu_count, 1)


def hourly_price(rental: Rental) -> int:
    return billed_units(rental) * rental.price_per_hour_credits


def minute_cost(per_hour: int, minute: int) -> int:
    return math.ceil((minute + 1) * per_hour / 60) - math.ceil(minute * per_hour / 60)


def minutes_due(rental: Rental, now: datetime) -> int:
    started = as_utc(rental.started_at)
    if started is None:
        return 0
    until = min(now, as_utc(rental.ended_at)) if rental.ended_at else now
    return max(1, math.ceil((until - started).total_seconds() / 60))


def _insert_ignoring_duplicates(session: Session, values: dict) -> bool:
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    statement = (
        module.insert(CreditCharge)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["rental_id", "minute"])
        .returning(CreditCharge.id)
    )
    return session.execute(statement).first() is not None


def charge(session: Session, rental: Rental, now: datetime) -> int:
    """Charge every minute of the rental that is due and not yet charged; returns credits taken."""
    due = minutes_due(rental, now)
    charged = session.scalar(select(func.count()).where(CreditCharge.rental_id == rental.id)) or 0
    taken = 0
    per_hour = hourly_price(rental)
    for minute in range(charged, due):
        cost = minute_cost(per_hour, minute)
        values = {"rental_id": rental.id, "user_id": rental.user_id, "minute": minute, "credits": cost, "charged_at": now}
        if _insert_ignoring_duplicates(session, values):
            session.execute(
                update(User)
                .where(User.id == rental.user_id)
                .values(credits=User.credits - cost, credits_charged=User.credits_charged + cost)
            )
            taken += cost
    return taken


def charged_in_all(session: Session) -> int:
    """Credits charged for every rental of every account: the ledger's sum, read from the
    accounts' running totals (one row per account, however long the ledger)."""
    return int(session.scalar(select(func.coalesce(func.sum(User.credits_charged), 0))))  # PostgreSQL's SUM: a numeric


def charged_total(session: Session, rental_id: str) -> int:
    return session.scalar(select(func.coalesce(func.sum(CreditCharge.credits), 0)).where(CreditCharge.rental_id == rental_id))


def recent_charges(session: Session, user_id: int, rental_id: str | None = None, limit: int = 50) -> list[dict]:
    """What the user's latest rentals were charged, newest first (only ``rental_id``'s when given):
    ``[{rental_id, name, gpu_model, minutes, credits}]``, ``minutes`` being the minutes charged."""
    query = (
        select(CreditCharge.rental_id, Rental.name, Rental.gpu_model, func.count(CreditCharge.id),
               func.sum(CreditCharge.credits))
        .join(Rental, Rental.id == CreditCharge.rental_id)
        .where(CreditCharge.user_id == user_id)
        .group_by(CreditCharge.rental_id, Rental.name, Rental.gpu_model)
        .order_by(func.max(CreditCharge.charged_at).desc(), CreditCharge.rental_id)
        .limit(limit)
    )
    if rental_id is not None:
        query = query.where(CreditCharge.rental_id == rental_id)
    return [
        {"rental_id": r, "name": n, "gpu_model": m, "minutes": k, "credits": c}
        for r, n, m, k, c in session.execute(query)
    ]
