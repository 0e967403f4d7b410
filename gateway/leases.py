"""Duties one process at a time must do, elected through the database.

A duty (the reaper of one pod backend) has a row in ``duty_leases``: its holder and when its lease
ends. The holder renews it every quarter of the lease; any other process takes it once it has
lapsed, so a holder that dies (a SIGKILLed worker, a lost replica) is replaced within one lease.
The worker processes of ``kgpu serve --workers N`` and replicas on one database elect alike: one
statement decides, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import Callable

from sqlalchemy import update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from gateway.models import DutyLease

log = logging.getLogger("kgpu")

RENEWALS_PER_LEASE = 4  # a holder renews this often within one lease: a late renewal or two loses nothing


def holder_id() -> str:
    """This process, told apart from every other on any host (a pid is reused; the token is not)."""
    return f"{socket.gethostname()[:120]}:{os.getpid()}:{secrets.token_hex(4)}"


class Lease:
    """One duty's lease as this process sees it. ``name`` is asked at each renewal (a pod
    backend that cannot say who it is yet raises, and the lease is not taken that round)."""

    def __init__(self, sessions: sessionmaker, name: Callable[[], str], seconds: float, holder: str | None = None):
        self._sessions = sessions
        self._name = name
        self.seconds = seconds
        self.holder = holder or holder_id()
        self._held_until = 0.0  # monotonic: held until then, unless renewed

    @property
    def held(self) -> bool:
        return time.monotonic() < self._held_until

    def renew(self) -> bool:
        """Take the lease if it is free or has lapsed, or extend it if it is ours; whether it is ours
        now. Blocking (the database)."""
        asked = time.monotonic()
        name = self._name()
        now = time.time()
        with self._sessions.begin() as session:
            module = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
            inserted = module.insert(DutyLease).values(name=name, holder=self.holder, expires_at=now + self.seconds)
            statement = inserted.on_conflict_do_update(
                index_elements=["name"],
                set_={"holder": inserted.excluded.holder, "expires_at": inserted.excluded.expires_at},
                where=(DutyLease.holder == self.holder) | (DutyLease.expires_at < now),
            ).returning(DutyLease.holder)
            ours = session.execute(statement).first() is not None
        was_held = self.held
        # Counted from before the question: the row's clock ran from no later than that.
        self._held_until = asked + self.seconds if ours else 0.0
        if ours and not was_held:
            log.info("this process (%s) now holds %s", self.holder, name)
        elif was_held and not ours:
            log.warning("this process (%s) no longer holds %s", self.holder, name)
        return ours

    def release(self) -> None:
        """Let the next process take the duty at once (a clean stop), if it is still ours."""
        if not self.held:
            return
        self._held_until = 0.0
        try:
            name = self._name()
            with self._sessions.begin() as session:
                session.execute(
                    update(DutyLease).where(DutyLease.name == name, DutyLease.holder == self.holder).values(expires_at=0.0)
                )
        except Exception:  # noqa: BLE001 - it lapses by itself within a lease
            log.warning("could not release a lease; it lapses within %.0f s", self.seconds, exc_info=True)

    async def keep(self) -> None:
        """Renew (or wait to take) the lease until cancelled; a failed renewal is retried next round."""
        while True:
            try:
                await run_in_threadpool(self.renew)
            except Exception:  # noqa: BLE001 - a database hiccup: held runs out by itself
                log.warning("could not renew a lease", exc_info=True)
            await asyncio.sleep(self.seconds / RENEWALS_PER_LEASE)
