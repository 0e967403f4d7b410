"""Drive usage and the quota, kept in the database so a check never lists the drive.

The quota is a **reservation** taken before any byte moves: one conditional
``UPDATE drive_usage SET reserved = reserved + n WHERE used + reserved + n <= quota``
(atomic on SQLite and PostgreSQL alike), so uploads running at once can never
promise more than the quota between them. Afterwards the reservation is settled
with the real size, or released if nothing was stored:

* a body streamed through the gateway (HTTP or WebDAV, :class:`Upload`) reserves its
  declared length up front, or, of unknown length, reserves as its bytes arrive
  (a part at a time); a reservation that fails is a 413 and nothing is stored;
* a presigned PUT (a 307 or a two-step mint, :meth:`UsageBook.hold`) reserves its
  declared size in a :class:`~gateway.models.QuotaHold`, held until the object appears in
  the store (it then becomes usage) or the URL expires (it is released):
  :meth:`UsageBook.settle_holds`, run when the drive's usage is read and whenever a
  reservation would fail.

An overwrite counts as new minus old everywhere (:func:`needed`, the one formula).
Whenever a row is older than ``quota_reconcile_seconds`` a background thread
re-counts the prefix from the store, so drift never lasts.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import AsyncIterator

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from drive.store import ObjectInfo, ObjectStore, iter_objects
from drive.uploads import UploadTooLarge
from gateway.models import DriveUsage, QuotaHold, utcnow
from gateway.tokens import as_utc

log = logging.getLogger("kgpu.quota")

HOLD_CHECK_THREADS = 8  # HEADs at once when settling a drive's presigned PUTs
HOLD_SETTLE_INTERVAL = 5.0  # seconds between background settles of a drive's presigned PUTs
# A streamed upload's reservation is a lease, renewed while its bytes flow: if the gateway holding
# it dies (a replica, a crash), the lease runs out and the reservation is given back.
STREAM_LEASE_SECONDS = 600
BACKGROUND_SETTLE_MAX_HOLDS = 64  # more outstanding holds: settled only when a reservation needs room
STREAM_RENEW_SECONDS = 60


class _LeaseLost(Exception):
    """A streamed upload's lease was given back while it still ran (rolls its transaction back)."""


class QuotaExceeded(UploadTooLarge):
    """A reservation that would take the drive past its quota (a 413 ``quota_exceeded``)."""


def needed(new_size: int, previous_size: int) -> int:
    """What a write of ``new_size`` bytes over a file of ``previous_size`` (0: none) adds to
    the drive: new minus old. The one formula for HTTP, WebDAV, redirects and mints."""
    return new_size - previous_size


class UsageBook:
    def __init__(self, sessions: sessionmaker, store: ObjectStore, reconcile_seconds: int):
        self._sessions = sessions
        self._store = store
        self._max_age = timedelta(seconds=reconcile_seconds)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kgpu-reconcile")
        self._pending: set[tuple[str, str]] = set()
        self._last_hold_settle: dict[str, float] = {}
        self._lock = threading.Lock()

    def used_bytes(self, prefix: str) -> int:
        """Current usage; counts from the store the first time a prefix is seen. Presigned
        PUTs whose objects have appeared (or whose URLs expired) are settled first."""
        self.settle_holds(prefix)
        with self._sessions() as session:
            row = session.get(DriveUsage, prefix)
            if row is None:
                return self.reconcile(prefix)
            reconciled = as_utc(row.reconciled_at)
            used = row.used_bytes
        if reconciled is None or utcnow() - reconciled > self._max_age:
            self.reconcile_soon(prefix)
        return max(used, 0)

    def _change(
        self, prefix: str, *, used: int = 0, reserved: int = 0, inflight: int = 0, where=None, also=None
    ) -> bool:
        """One UPDATE of a drive's row (every change bumps ``changes``, which a recount checks);
        ``also(session)`` runs in the same transaction when the row changed."""
        conditions = [DriveUsage.prefix == prefix] + ([where] if where is not None else [])
        with self._sessions.begin() as session:
            changed = bool(
                session.execute(
                    update(DriveUsage)
                    .where(*conditions)
                    .values(
                        used_bytes=DriveUsage.used_bytes + used,
                        reserved_bytes=DriveUsage.reserved_bytes + reserved,
                        inflight=DriveUsage.inflight + inflight,
                        changes=DriveUsage.changes + 1,
                    )
                ).rowcount
            )
            if changed and also is not None:
                also(session, max(reserved, 0))
            return changed

    def add(self, prefix: str, delta: int) -> None:
        if delta == 0:
            return
        if not self._change(prefix, used=delta):
            self.reconcile(prefix)

    # ------------------------------------------------------------ reservations

    def _ensure_row(self, prefix: str) -> None:
        with self._sessions() as session:
            exists = session.get(DriveUsage, prefix) is not None
        if not exists:
            self.reconcile(prefix)

    def _fits(self, n: int, quota: int):
        return DriveUsage.used_bytes + DriveUsage.reserved_bytes + n <= quota

    def room(self, prefix: str, quota: int) -> int:
        """What is neither used nor promised (a hint: a reservation checks again)."""
        with self._sessions() as session:
            row = session.get(DriveUsage, prefix)
            return quota - row.used_bytes - row.reserved_bytes if row is not None else 0

    def _refusal(self, prefix: str, n: int, quota: int) -> QuotaExceeded:
        with self._sessions() as session:
            row = session.get(DriveUsage, prefix)
            used, reserved = (row.used_bytes, row.reserved_bytes) if row is not None else (0, 0)
        return QuotaExceeded(
            f"this upload ({n} bytes) would take the drive to {max(used + reserved, 0) + n} of {quota} bytes"
            + (f" ({reserved} of them promised to uploads in progress)" if reserved > 0 else "")
        )

    def _reserve(self, prefix: str, n: int, quota: int, *, opening: bool, also=None) -> int:
        """``n`` more bytes (0 or less: none) for an upload, atomically: ``used + reserved + n``
        must stay within ``quota``; ``opening`` counts a new upload in flight. Presigned PUTs
        that are done are settled once before giving up."""
        n = max(n, 0)
        settled = counted = False
        while True:
            if self._change(
                prefix, reserved=n, inflight=int(opening), where=self._fits(n, quota) if n else None, also=also
            ):
                return n
            if not counted:
                counted = True
                with self._sessions() as session:
                    if session.get(DriveUsage, prefix) is None:  # the drive's first upload: count it
                        self.reconcile(prefix)
                        continue
            if settled or not self.settle_holds(prefix):
                raise self._refusal(prefix, n, quota)
            settled = True

    def open(self, prefix: str, n: int, quota: int) -> int:
        """Reserve ``n`` bytes for a write that starts now (a WebDAV COPY): QuotaExceeded if they
        do not fit; close it with :meth:`settle`."""
        return self._reserve(prefix, n, quota, opening=True)

    def reserve(self, prefix: str, n: int, quota: int) -> int:
        """Reserve ``n`` more bytes for an upload already open (QuotaExceeded if they do not fit)."""
        return self._reserve(prefix, n, quota, opening=False) if n > 0 else 0

    def settle(self, prefix: str, reserved: int, delta: int, *, closing: bool = True) -> None:
        """Close an upload: its ``reserved`` bytes are given back and ``delta`` (what the drive
        really grew by, :func:`needed`; 0 if nothing was stored) is added, in one UPDATE."""
        if not self._change(prefix, used=delta, reserved=-reserved, inflight=-int(closing)):
            self.reconcile(prefix)

    def hold(
        self,
        prefix: str,
        key: str,
        size: int | None,
        quota: int | None,
        previous: ObjectInfo | None,
        expires_in: int,
    ) -> None:
        """Reserve room for a presigned PUT of ``key`` (a 307 or a mint), held until the object
        appears or the URL expires. ``size`` None (a mint that did not say): all the room left."""
        if quota is None:
            return
        previous_size = previous.size if previous else 0

        def record(session, n: int) -> None:  # in the reservation's own transaction
            session.execute(
                insert(QuotaHold).values(
                    prefix=prefix,
                    key=key,
                    bytes=n,
                    previous_etag=previous.etag if previous else None,
                    previous_size=previous_size,
                    expires_at=utcnow() + timedelta(seconds=expires_in),
                )
            )

        if size is None:
            self._ensure_row(prefix)
            for _attempt in range(4):
                with self._sessions() as session:  # read apart: the conditional UPDATE re-checks it
                    row = session.get(DriveUsage, prefix)
                    n = quota - row.used_bytes - row.reserved_bytes
                try:
                    self._reserve(prefix, max(n, 1), quota, opening=True, also=record)
                    break
                except QuotaExceeded:
                    if n <= 0:
                        raise
            else:
                raise self._refusal(prefix, 1, quota)
        else:
            self._reserve(prefix, needed(size, previous_size), quota, opening=True, also=record)
        now = time.monotonic()
        with self._lock:
            due = now - self._last_hold_settle.get(prefix, 0.0) >= HOLD_SETTLE_INTERVAL
            if due:
                self._last_hold_settle[prefix] = now
        if due:  # redirected PUTs in a row: settle the done ones in the background now and then
            self._soon(self._settle_few_holds, prefix)

    # A streamed upload's reservation: a QuotaHold of kind "stream", its lease renewed while
    # bytes flow, given back by settle_holds if the lease runs out (the gateway died).

    def _open_stream(self, prefix: str, n: int, quota: int) -> tuple[int, int]:
        """Reserve ``n`` bytes (may be 0) for a new streamed upload: (reserved, lease id)."""
        lease: list[int] = []

        def record(session, reserved: int) -> None:
            lease.append(
                session.execute(
                    insert(QuotaHold).values(
                        prefix=prefix, key="", kind="stream", bytes=reserved, previous_size=0,
                        expires_at=utcnow() + timedelta(seconds=STREAM_LEASE_SECONDS),
                    )
                ).inserted_primary_key[0]
            )

        reserved = self._reserve(prefix, n, quota, opening=True, also=record)
        return reserved, lease[0]

    def _extend_stream(self, prefix: str, lease: int, n: int, quota: int) -> int:
        """``n`` more bytes for the streamed upload holding ``lease`` (QuotaExceeded if they do
        not fit, or if its lease ran out meanwhile)."""

        def grow(session, reserved: int) -> None:
            changed = session.execute(
                update(QuotaHold)
                .where(QuotaHold.id == lease)
                .values(bytes=QuotaHold.bytes + reserved, expires_at=utcnow() + timedelta(seconds=STREAM_LEASE_SECONDS))
            ).rowcount
            if not changed:
                raise _LeaseLost()

        try:
            return self._reserve(prefix, n, quota, opening=False, also=grow)
        except _LeaseLost:
            raise QuotaExceeded("this upload's reservation ran out (it stalled too long)") from None

    def _renew_stream(self, lease: int) -> None:
        with self._sessions.begin() as session:
            session.execute(
                update(QuotaHold)
                .where(QuotaHold.id == lease)
                .values(expires_at=utcnow() + timedelta(seconds=STREAM_LEASE_SECONDS))
            )

    def _close_stream(self, prefix: str, lease: int, reserved: int, delta: int) -> None:
        """Settle a streamed upload: its lease and reservation go, ``delta`` is added. A lease
        already given back (it ran out) leaves only the delta to add."""
        with self._sessions.begin() as session:
            claimed = session.execute(delete(QuotaHold).where(QuotaHold.id == lease)).rowcount
            values = {"used_bytes": DriveUsage.used_bytes + delta, "changes": DriveUsage.changes + 1}
            if claimed:
                values |= {"reserved_bytes": DriveUsage.reserved_bytes - reserved, "inflight": DriveUsage.inflight - 1}
            changed = session.execute(update(DriveUsage).where(DriveUsage.prefix == prefix).values(**values)).rowcount
        if not changed:
            self.reconcile(prefix)

    def open_upload(
        self, prefix: str, quota: int | None, previous_size: int, declared: int | None, step: int
    ) -> "Upload":
        """An :class:`Upload` for a body streamed through the gateway, begun (QuotaExceeded if
        its declared length does not fit). WebDAV's PUT (drive/dav/resources.py) takes it from here."""
        upload = Upload(self, prefix, quota, previous_size, declared, step)
        upload.begin()
        return upload

    def _settle_few_holds(self, prefix: str) -> None:
        """The background settle: skipped when a drive has many URLs out (each would cost a HEAD
        every few seconds); a reservation that does not fit settles them all anyway."""
        with self._sessions() as session:
            outstanding = session.scalar(select(func.count()).where(QuotaHold.prefix == prefix))
        if outstanding <= BACKGROUND_SETTLE_MAX_HOLDS:
            self.settle_holds(prefix)

    def settle_holds(self, prefix: str) -> int:
        """Settle the presigned PUTs of ``prefix`` that are done: an object that appeared
        (another ETag or size than the one it replaces) becomes usage, an expired URL's hold is
        released. Returns how many holds were settled."""
        with self._sessions() as session:
            holds = session.scalars(select(QuotaHold).where(QuotaHold.prefix == prefix)).all()
        if not holds:
            return 0
        settled = 0
        now = utcnow()
        # A streamed upload's lease only runs out; a presigned PUT's object may have appeared.
        holds = [hold for hold in holds if hold.kind != "stream" or as_utc(hold.expires_at) <= now]
        puts = [hold for hold in holds if hold.kind != "stream"]
        if len(puts) > 1:
            with ThreadPoolExecutor(max_workers=min(len(puts), HOLD_CHECK_THREADS)) as pool:
                heads = dict(zip((hold.id for hold in puts), pool.map(lambda hold: self._store.head(hold.key), puts)))
        else:
            heads = {hold.id: self._store.head(hold.key) for hold in puts}
        for hold in holds:
            info = heads.get(hold.id)
            appeared = info is not None and (
                hold.previous_etag is None or info.etag != hold.previous_etag or info.size != hold.previous_size
            )
            if not appeared and as_utc(hold.expires_at) > now:
                continue
            delta = needed(info.size, hold.previous_size) if appeared else 0
            with self._sessions.begin() as session:
                claimed = session.execute(delete(QuotaHold).where(QuotaHold.id == hold.id)).rowcount
                if claimed:  # another request may have settled it first
                    session.execute(
                        update(DriveUsage)
                        .where(DriveUsage.prefix == prefix)
                        .values(
                            used_bytes=DriveUsage.used_bytes + delta,
                            reserved_bytes=DriveUsage.reserved_bytes - hold.bytes,
                            inflight=DriveUsage.inflight - 1,
                            changes=DriveUsage.changes + 1,
                        )
                    )
            settled += claimed
        return settled

    # ------------------------------------------------------------ recounts

    def reconcile(self, prefix: str) -> int:
        """Count the prefix in the store and record it, unless an upload was in flight or the
        row changed while counting (the count could then miss, or count twice, what that
        upload settles): the incremental count stays, and the next recount tries again."""
        with self._sessions() as session:
            row = session.get(DriveUsage, prefix)
            before = row.changes if row is not None else None
        used = sum(obj.size for obj in iter_objects(self._store, prefix))
        if before is None:
            try:  # the first count of a drive: no upload can have reserved before the row exists
                with self._sessions.begin() as session:
                    session.add(DriveUsage(prefix=prefix, used_bytes=used, reconciled_at=utcnow()))
                return used
            except IntegrityError:  # another request counted it first: its row stands
                with self._sessions() as session:
                    return session.get(DriveUsage, prefix).used_bytes
        with self._sessions.begin() as session:
            recorded = session.execute(
                update(DriveUsage)
                .where(DriveUsage.prefix == prefix, DriveUsage.changes == before, DriveUsage.inflight == 0)
                .values(used_bytes=used, reconciled_at=utcnow(), changes=DriveUsage.changes + 1)
            ).rowcount
            if not recorded:
                session.execute(update(DriveUsage).where(DriveUsage.prefix == prefix).values(reconciled_at=utcnow()))
        return used

    def reconcile_soon(self, prefix: str) -> None:
        self._soon(self.reconcile, prefix)

    def _soon(self, job, prefix: str) -> None:
        """Run ``job(prefix)`` in the background thread, once at a time per job and prefix."""
        with self._lock:
            if (job.__name__, prefix) in self._pending:
                return
            self._pending.add((job.__name__, prefix))
        self._pool.submit(self._background, job, prefix)

    def _background(self, job, prefix: str) -> None:
        try:
            job(prefix)
        except Exception:
            log.warning("could not %s %s", job.__name__, prefix, exc_info=True)
        finally:
            with self._lock:
                self._pending.discard((job.__name__, prefix))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Upload:
    """The quota side of one upload streamed through the gateway (HTTP or WebDAV).

    ``begin`` reserves a declared length (new minus old) before any byte moves; ``guard`` wraps
    the body and, for one of unknown length, reserves ``step`` bytes more whenever what arrived
    passes what is reserved (exactly what is missing if a whole step does not fit), raising
    :class:`~drive.uploads.UploadTooLarge` when even that does not fit, so the upload stores
    nothing. Then ``commit`` (the real size) or ``abort``."""

    def __init__(
        self,
        book: UsageBook,
        prefix: str,
        quota: int | None,
        previous_size: int,
        declared: int | None,
        step: int,
    ):
        self.book = book
        self.prefix = prefix
        self.quota = quota
        self.previous_size = previous_size
        self.declared = declared
        self.step = max(step, 1)
        self.reserved = 0
        self.lease: int | None = None  # its QuotaHold of kind "stream"
        self._open = False  # counted in flight (a quota applies)
        self._done = False

    def begin(self) -> None:
        """Open the upload, reserving its declared length (QuotaExceeded if it does not fit)."""
        if self.quota is None:
            return
        n = needed(self.declared, self.previous_size) if self.declared is not None else 0
        self.reserved, self.lease = self.book._open_stream(self.prefix, n, self.quota)
        self._open = True

    async def guard(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        if not self._open:
            async for chunk in chunks:
                yield chunk
            return
        received = 0
        renewed = time.monotonic()
        async for chunk in chunks:
            received += len(chunk)
            missing = received - self.previous_size - self.reserved
            if missing > 0 and self.declared is None:
                await run_in_threadpool(self._reserve_more, missing)
                renewed = time.monotonic()
            elif time.monotonic() - renewed > STREAM_RENEW_SECONDS:
                await run_in_threadpool(self.book._renew_stream, self.lease)
                renewed = time.monotonic()
            yield chunk

    def _reserve_more(self, missing: int) -> None:
        """A step more; near the quota, all the room left (so of uploads racing for the last
        room one gets it and finishes, rather than all starving on small reservations); else
        exactly what is missing; else this upload is over the quota."""
        tries = [max(missing, self.step)]
        room = self.book.room(self.prefix, self.quota)
        if missing <= room < tries[0]:
            tries.append(room)
        tries.append(missing)
        for n in dict.fromkeys(tries):
            try:
                self.reserved += self.book._extend_stream(self.prefix, self.lease, n, self.quota)
                return
            except QuotaExceeded:
                continue
        raise UploadTooLarge("upload exceeds the drive quota")

    def commit(self, size: int) -> None:
        """The object is stored: the drive grew by new minus old."""
        if not self._done:
            self._done = True
            if self._open:
                self.book._close_stream(self.prefix, self.lease, self.reserved, needed(size, self.previous_size))
            else:
                self.book.add(self.prefix, needed(size, self.previous_size))

    def abort(self) -> None:
        """Nothing was stored: give the reservation back."""
        if not self._done:
            self._done = True
            if self._open:
                self.book._close_stream(self.prefix, self.lease, self.reserved, 0)
