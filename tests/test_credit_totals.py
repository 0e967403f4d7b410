"""The credits charged in all (``kgpu_credits_charged_total`` of /metrics) come from each account's
running total (``users.credits_charged``), moved with each ledger row by gateway/billing.py:charge,
not from a sum of the ledger: after charges, concurrent ones included, they are the ledger's sum;
migration 0018 starts the totals from a ledger written before it."""

from __future__ import annotations

import secrets
import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import func, select

from gateway import billing, db, metrics
from gateway.models import CreditCharge, Rental, User
from gateway.tokens import as_utc
from tests.conftest import new_postgres_database
from tests.test_metrics import scrape, value

START = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path):
    """The URL of a database of this test's own, with no tables yet."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/kgpu.db"
        return
    with new_postgres_database() as url:
        yield url


def sessions_at_head(url: str):
    db.migrate(url)
    return db.make_sessionmaker(db.make_engine(url))


def new_user(sessions) -> int:
    with sessions.begin() as session:
        user = User(email=f"u{secrets.token_hex(5)}@lab.example", credits=1_000_000)
        session.add(user)
        session.flush()
        return user.id


def new_rental(sessions, user_id: int, minutes: int, price: int = 500, gpus: int = 1) -> str:
    """An ended rental of ``minutes`` minutes, not charged yet."""
    with sessions.begin() as session:
        rental = Rental(
            id="gpu-" + secrets.token_hex(6), user_id=user_id, name="t", image="img", node="node-a",
            gpu_model="h100", gpu_count=gpus, cpu=1.0, memory_bytes=1 << 30, ephemeral_storage_gib=1,
            duration_hours=4, backend="local", phase="Ended", price_per_hour_credits=price,
            created_at=START, started_at=START, ended_at=START + timedelta(minutes=minutes),
        )
        session.add(rental)
        return rental.id


def charge(sessions, rental_id: str) -> int:
    with sessions.begin() as session:
        rental = session.get(Rental, rental_id)
        return billing.charge(session, rental, as_utc(rental.ended_at))


def ledger_sum(sessions, user_id: int | None = None) -> int:
    query = select(func.coalesce(func.sum(CreditCharge.credits), 0))
    if user_id is not None:
        query = query.where(CreditCharge.user_id == user_id)
    with sessions() as session:
        return int(session.scalar(query))


def metric(sessions) -> float:
    """kgpu_credits_charged_total as a scrape answers it (the database's collector)."""
    families = list(metrics.DatabaseCollector(sessions).collect())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}
    assert value(samples, "kgpu_database_up") == 1
    return value(samples, "kgpu_credits_charged_total")


def charged_to(sessions, user_id: int) -> int:
    with sessions() as session:
        return session.get(User, user_id).credits_charged


def test_the_metric_is_the_ledgers_sum_after_charges(empty_database):
    sessions = sessions_at_head(empty_database)
    assert metric(sessions) == 0
    ada, alan = new_user(sessions), new_user(sessions)
    short = new_rental(sessions, ada, minutes=10)  # ceil(10 × 500 / 60) = 84
    wide = new_rental(sessions, alan, minutes=7, price=300, gpus=2)  # ceil(7 × 600 / 60) = 70
    assert charge(sessions, short) == 84 and charge(sessions, wide) == 70
    assert charge(sessions, short) == 0  # charged once: a second charge takes nothing, counts nothing
    assert ledger_sum(sessions) == 154
    with sessions() as session:
        assert billing.charged_in_all(session) == 154
    assert metric(sessions) == 154
    assert charged_to(sessions, ada) == ledger_sum(sessions, ada) == 84
    assert charged_to(sessions, alan) == ledger_sum(sessions, alan) == 70


def test_concurrent_charges_all_count(empty_database):
    """Gateways charging at once, each its own connection: two rentals of one account, one of
    another, and one rental charged by two of them (its minutes taken once, counted once)."""
    sessions = sessions_at_head(empty_database)
    ada, alan = new_user(sessions), new_user(sessions)
    rentals = [new_rental(sessions, ada, 30), new_rental(sessions, ada, 45), new_rental(sessions, alan, 20)]
    charges = [rentals[0], rentals[1], rentals[2], rentals[2]]
    start = threading.Barrier(len(charges))
    taken = [0] * len(charges)
    errors: list[BaseException] = []

    def charge_at_once(i: int) -> None:
        try:
            start.wait()
            taken[i] = charge(sessions, charges[i])
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=charge_at_once, args=(i,)) for i in range(len(charges))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # ceil(30 × 500 / 60) + ceil(45 × 500 / 60) + ceil(20 × 500 / 60), the last once
    assert sum(taken) == 250 + 375 + 167
    assert ledger_sum(sessions) == 792 and metric(sessions) == 792
    assert charged_to(sessions, ada) == 625 and charged_to(sessions, alan) == 167


def charge_at_0017(sessions, rental_id: str) -> None:
    """What billing.charge wrote before 0018: ledger rows and the balance, no running total."""
    with sessions.begin() as session:
        rental = session.get(Rental, rental_id)
        per_hour = billing.hourly_price(rental)
        for minute in range(billing.minutes_due(rental, as_utc(rental.ended_at))):
            cost = billing.minute_cost(per_hour, minute)
            session.add(CreditCharge(rental_id=rental.id, user_id=rental.user_id, minute=minute, credits=cost,
                                     charged_at=rental.ended_at))
            session.execute(sa.text("UPDATE users SET credits = credits - :cost WHERE id = :id"),
                            {"cost": cost, "id": rental.user_id})


def test_the_migration_starts_the_totals_from_the_ledger(empty_database):
    """A server before 0018 charged into the ledger alone; once upgraded it reports the same
    credits charged, and charges from then on add to them."""
    url = empty_database
    command.upgrade(db.alembic_config(url), "0017")
    sessions = db.make_sessionmaker(db.make_engine(url))
    users = sa.table("users", sa.column("id"), sa.column("email"), sa.column("credits"), sa.column("created_at"))
    with sessions.begin() as session:  # the users table as 0017 has it: no credits_charged
        for user_id in (1, 2, 3):
            session.execute(sa.insert(users).values(id=user_id, email=f"old{user_id}@lab.example", credits=10_000,
                                                    created_at=START))
    old = [new_rental(sessions, 1, 10), new_rental(sessions, 1, 61), new_rental(sessions, 2, 3)]
    for rental_id in old:
        charge_at_0017(sessions, rental_id)
    before = ledger_sum(sessions)
    assert before == 84 + 509 + 25

    db.migrate(url)
    sessions = db.make_sessionmaker(db.make_engine(url))
    assert metric(sessions) == before
    assert [charged_to(sessions, u) for u in (1, 2, 3)] == [84 + 509, 25, 0]
    later = new_rental(sessions, 3, 12)  # ceil(12 × 500 / 60) = 100
    assert charge(sessions, later) == 100
    assert metric(sessions) == ledger_sum(sessions) == before + 100
    command.downgrade(db.alembic_config(url), "0017")  # and back: started again from the ledger
    assert metric(sessions_at_head(url)) == before + 100


def test_a_scrape_answers_the_ledgers_sum(stack):
    """Over HTTP, on every stack: the scrape moves with a charge, and is the ledger's sum."""
    sessions = stack.server.app.state.sessions
    account = stack.new_user()
    rental_id = new_rental(sessions, account.id, 90)  # ceil(90 × 500 / 60) = 750
    before = value(scrape(stack.base, stack.admin), "kgpu_credits_charged_total")
    assert charge(sessions, rental_id) == 750
    after = value(scrape(stack.base, stack.admin), "kgpu_credits_charged_total")
    assert after == before + 750
    assert after == ledger_sum(sessions)
