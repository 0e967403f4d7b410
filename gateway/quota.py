"""Drive usage, kept in the database so a quota check is one row read.

Uploads that pass through the gateway adjust the count exactly; uploads
redirected to a presigned PUT add their Content-Length (an overwrite is
counted twice until the next reconcile, which errs on the safe side).
Whenever a row is older than ``quota_reconcile_seconds`` a background thread
re-counts the prefix from the store, so drift never lasts.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from drive.store import ObjectStore, iter_objects
from gateway.models import DriveUsage, utcnow
from gateway.tokens import as_utc

log = logging.getLogger("kgpu.quota")


class UsageBook:
    def __init__(self, sessions: sessionmaker, store: ObjectStore, reconcile_seconds: int):
        self._sessions = sessions
        self._store = store
        self._max_age = timedelta(seconds=reconcile_seconds)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kgpu-reconcile")
        self._pending: set[str] = set()
        self._lock = threading.Lock()

    def used_bytes(self, prefix: str) -> int:
        """Current usage; counts from the store the first time a prefix is seen."""
        with self._sessions() as session:
            row = session.get(DriveUsage, prefix)
            if row is None:
                return self.reconcile(prefix)
            reconciled = as_utc(row.reconciled_at)
            used = row.used_bytes
        if reconciled is None or utcnow() - reconciled > self._max_age:
            self.reconcile_soon(prefix)
        return max(used, 0)

    def add(self, prefix: str, delta: int) -> None:
        if delta == 0:
            return
        with self._sessions.begin() as session:
            changed = session.execute(
                update(DriveUsage)
                .where(DriveUsage.prefix == prefix)
                .values(used_bytes=DriveUsage.used_bytes + delta)
            ).rowcount
        if not changed:
            self.reconcile(prefix)

    def set_counted(self, prefix: str, used: int) -> None:
        """Record a total just counted from the store."""
        try:
            with self._sessions.begin() as session:
                row = session.get(DriveUsage, prefix)
                if row is None:
                    session.add(DriveUsage(prefix=prefix, used_bytes=used, reconciled_at=utcnow()))
                else:
                    row.used_bytes = used
                    row.reconciled_at = utcnow()
        except IntegrityError:  # another request inserted the row first: update it
            with self._sessions.begin() as session:
                session.execute(
                    update(DriveUsage)
                    .where(DriveUsage.prefix == prefix)
                    .values(used_bytes=used, reconciled_at=utcnow())
                )

    def reconcile(self, prefix: str) -> int:
        used = sum(obj.size for obj in iter_objects(self._store, prefix))
        self.set_counted(prefix, used)
        return used

    def reconcile_soon(self, prefix: str) -> None:
        with self._lock:
            if prefix in self._pending:
                return
            self._pending.add(prefix)
        self._pool.submit(self._background_reconcile, prefix)

    def _background_reconcile(self, prefix: str) -> None:
        try:
            self.reconcile(prefix)
        except Exception:
            log.warning("could not reconcile usage of %s", prefix, exc_info=True)
        finally:
            with self._lock:
                self._pending.discard(prefix)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
