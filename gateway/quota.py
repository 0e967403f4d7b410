"""Drive usage and the quota, kept in the database so a check never lists the drive.

The quota is a **reservation** taken before any byte moves: one conditional
``UPDATE drive_usage SET reserved = reserved + n WHERE used + reserved + n <= quota``
(atomic on SQLite and PostgreSQL alike), so uploads running at once can never
promise more than the quota between them. Afterwards the reservation is settled
with the real size, or released if nothing was stored:

* a body streamed through the gateway (HTTP or WebDAV, :class:`drive.usage.Upload`) reserves its
  declared length up front, or, of unknown length, reserves as its bytes arrive
  (a part at a time); a reservation that fails is a 413 and nothing is stored;
* a presigned PUT (a 307 or a two-step mint, :meth:`DbUsageBook.hold`) reserves its
  declared size in a :class:`~gateway.models.QuotaHold`, held until the object appears in
  the store (it then becomes usage) or the URL expires (it is released):
  :meth:`DbUsageBook.settle_holds`, run when the drive's usage is read and whenever a
  reservation would fail;
* a transit object (gateway/transit.py, the prefix ``transit/{user}/``) reserves its declared
  size at its mint, in one transaction with its row (:meth:`DbUsageBook.open` with ``also``), and
  keeps it until the row goes (:meth:`DbUsageBook.give_back`): its size is signed into its URL.

An overwrite counts as new minus old everywhere (:func:`drive.usage.needed`, the one formula), and "old"
is what the write really replaced: every write to a key holds that key while it reads what
stands there, writes and counts (:meth:`DbUsageBook.writing`, a :class:`WriteLease` in the table
``drive_writes``, on every replica), so two writes of one key, or a write and a MOVE, a COPY or
a DELETE of it, never both count the same old object (issue 19, item 11: an overwrite racing a
MOVE kept both copies; two DELETEs at once freed one file twice). A folder's lease holds
everything under it. A write that finds its key held waits a little, then is refused
(:class:`WriteBusy`, a 423 ``busy``).
WebDAV dead properties (PROPPATCH) count too, as ``property_bytes`` (name and XML value of
each): :meth:`DbUsageBook.change_properties` changes them in one transaction with the drive's
count, refusing growth past the quota (issue 19, item 12: they were storage outside it).
Whenever a row is older than ``quota_reconcile_seconds`` a background thread
re-counts the prefix from the store (and its properties from the database), so drift never lasts.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Iterable
from urllib.parse import quote

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from drive.store import ObjectInfo, ObjectStore, at_once, iter_objects, list_together
from drive.uploads import WriteBusy
from drive.usage import Keys, PutHold, QuotaExceeded, needed, room_left
from gateway.models import DavProperty, DriveUsage, DriveWrite, QuotaHold, utcnow
from gateway.tokens import as_utc

log = logging.getLogger("kgpu.quota")

HOLD_CHECK_THREADS = 8  # HEADs at once when settling a drive's presigned PUTs
HOLD_SETTLE_INTERVAL = 5.0  # seconds between background settles of a drive's presigned PUTs
# A streamed upload's reservation is a lease, renewed while its bytes flow: if the gateway holding
# it dies (a replica, a crash), the lease runs out and the reservation is given back.
STREAM_LEASE_SECONDS = 600
BACKGROUND_SETTLE_MAX_HOLDS = 64  # more outstanding holds: settled only when a reservation needs room
# A write holds its keys (drive_writes) for as long as it runs: the lease is renewed every
# WRITE_RENEW_SECONDS while held and runs out WRITE_LEASE_SECONDS after a gateway that died.
WRITE_LEASE_SECONDS = 120
WRITE_RENEW_SECONDS = 30
PATHS_A_QUERY = 100  # a lease's keys looked up in one query (SQLite's expressions are at most 1000 deep)
WRITE_WAIT_SECONDS = 5.0  # how long a write waits for another write of the same key, then 423
_WRITES_LOCK = 0x6B677077 << 32  # PostgreSQL advisory locks "kgpw" + a drive's CRC: one taker at a time


def _update_usage(session, prefix: str, *, used: int = 0, reserved: int = 0, inflight: int = 0, where=None) -> bool:
    """One UPDATE of a drive's usage row in ``session``'s transaction (every change bumps
    ``changes``, which a recount checks); whether the row changed."""
    conditions = [DriveUsage.prefix == prefix] + ([where] if where is not None else [])
    return bool(
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


class _NoRoom(Exception):
    """Bytes that do not fit (rolls their transaction back)."""


class _Rebased(Exception):
    """A hold changed since it was looked at: not settled (rolls the claim back)."""


def _appeared(info: ObjectInfo | None, previous_etag: str | None, previous_size: int) -> bool:
    """Whether a presigned PUT's object is in the store: one there, other than the one it replaces."""
    return info is not None and (previous_etag is None or info.etag != previous_etag or info.size != previous_size)


def _objects_at(store: ObjectStore, keys: set[str]) -> dict[str, ObjectInfo | None]:
    """What the store holds at each of ``keys``: their folders listed where they hold many
    (drive/store list_together), the others asked :data:`HOLD_CHECK_THREADS` HEADs at a time."""
    listed = list_together(store, sorted(keys))
    found = dict(listed.objects)
    found.update(zip(listed.unlisted, at_once(store.head, listed.unlisted, HOLD_CHECK_THREADS)))
    return found


class _LeaseLost(Exception):
    """A streamed upload's lease was given back while it still ran (rolls its transaction back)."""


# What a dead property weighs in the quota: its name and its XML value (characters and bytes), as
# drive/dav/storage.py measures it in Python (len(name) + len(value)).
PROPERTY_BYTES = func.length(DavProperty.name) + func.length(DavProperty.value)


def _holds(held: str, path: str) -> bool:
    """Whether a lease on ``held`` (a key, or a folder's key ending in "/") holds ``path``."""
    return held == path or (held.endswith("/") and path.startswith(held))


def _meeting(path: str, exclusive: bool):
    """The rows of drive_writes a lease on ``path`` must wait for: the same key, a folder above
    it, anything under it (a folder); only exclusive ones, for a shared lease."""
    parts = path.rstrip("/").split("/")
    above = ["/".join(parts[:n]) + "/" for n in range(1, len(parts))]
    where = or_(DriveWrite.path == path, DriveWrite.path.in_(above))
    if path.endswith("/"):  # "0" follows "/": the keys under the folder, compared byte by byte
        where = or_(where, (DriveWrite.path > path) & (DriveWrite.path < path[:-1] + "0"))
    return where if exclusive else where & DriveWrite.exclusive


class WriteLease:
    """The keys one request writes (or, shared, reads whole: a COPY's source), held until
    :meth:`release` (or the end of a ``with``)."""

    def __init__(self, book: "DbUsageBook | None", prefix: str, paths: dict[str, bool], ids: list[int]):
        self._book = book
        self.prefix = prefix
        self.paths = paths  # path -> exclusive
        self._ids = ids

    def holds(self, path: str, exclusive: bool) -> bool:
        return any(_holds(held, path) and (mine or not exclusive) for held, mine in self.paths.items())

    def release(self) -> None:
        ids, self._ids = self._ids, []
        if ids and self._book is not None:
            self._book._release_writes(ids)

    def __enter__(self) -> "WriteLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class DbUsageBook:
    """The usage book (:class:`drive.usage.UsageBook`) in the database, shared by every replica."""

    def __init__(self, sessions: sessionmaker, store: ObjectStore, reconcile_seconds: int):
        self._sessions = sessions
        self._store = store
        self._max_age = timedelta(seconds=reconcile_seconds)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kgpu-reconcile")
        self._pending: set[tuple[str, str]] = set()
        self._last_hold_settle: dict[str, float] = {}
        self._lock = threading.Lock()
        self._held_writes: set[int] = set()  # ids of drive_writes rows this gateway holds
        self._renewer: threading.Thread | None = None
        self._closed = threading.Event()

    def used_bytes(self, prefix: str) -> int:
        """Current usage; counts from the store the first time a prefix is seen. Presigned
        PUTs whose objects have appeared (or whose URLs expired) are settled first."""
        self.settle_holds(prefix)
        with self._sessions() as session:
            row = session.get(DriveUsage, prefix)
            if row is None:
                return self.reconcile(prefix)
            reconciled = as_utc(row.reconciled_at)
            used = row.used_bytes + row.property_bytes
        if reconciled is None or utcnow() - reconciled > self._max_age:
            self.reconcile_soon(prefix)
        return max(used, 0)

    def _change(
        self, prefix: str, *, used: int = 0, reserved: int = 0, inflight: int = 0, where=None, also=None
    ) -> bool:
        """One UPDATE of a drive's row (every change bumps ``changes``, which a recount checks);
        ``also(session)`` runs in the same transaction when the row changed."""
        with self._sessions.begin() as session:
            changed = _update_usage(session, prefix, used=used, reserved=reserved, inflight=inflight, where=where)
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
        """The one test of the quota, in SQL: ``n`` more fit in :func:`~drive.usage.room_left`."""
        return room_left(quota, DriveUsage.used_bytes, DriveUsage.reserved_bytes, DriveUsage.property_bytes) >= n

    def room(self, prefix: str, quota: int) -> int:
        """What is neither used nor promised (a hint: a reservation checks again)."""
        with self._sessions() as session:
            row = session.get(DriveUsage, prefix)
            return room_left(quota, row.used_bytes, row.reserved_bytes, row.property_bytes) if row is not None else 0

    def _refusal(self, prefix: str, n: int, quota: int, what: str = "this upload") -> QuotaExceeded:
        with self._sessions() as session:
            row = session.get(DriveUsage, prefix)
            used, reserved, properties = (
                (row.used_bytes, row.reserved_bytes, row.property_bytes) if row is not None else (0, 0, 0)
            )
        notes = [f"{reserved} of them promised to uploads in progress"] if reserved > 0 else []
        notes += [f"{properties} of them dead properties"] if properties > 0 else []
        return QuotaExceeded(
            f"{what} ({n} bytes) would take the drive to {max(used + reserved + properties, 0) + n} of {quota} bytes"
            + (f" ({', '.join(notes)})" if notes else "")
        )

    def _reserve(self, prefix: str, n: int, quota: int, *, opening: int, also=None, settle: bool = True) -> int:
        """``n`` more bytes (0 or less: none) for an upload, atomically: ``used + reserved + n``
        must stay within ``quota``; ``opening`` counts that many new uploads in flight (True: one).
        Presigned PUTs that are done are settled once before giving up (``settle`` False: not,
        for a batch whose settle was tried already)."""
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
                # Once more, now that the row exists (another request may have just counted it).
                continue
            if settled or not settle or not self.settle_holds(prefix):
                raise self._refusal(prefix, n, quota)
            settled = True

    def open(self, prefix: str, n: int, quota: int, also=None) -> int:
        """Reserve ``n`` bytes for a write that starts now (a WebDAV COPY): QuotaExceeded if they
        do not fit; close it with :meth:`settle`. ``also(session, n)`` runs in the reservation's
        own transaction (a transit object's row: it carries the reservation, :meth:`give_back`)."""
        return self._reserve(prefix, n, quota, opening=True, also=also)

    def reserve(self, prefix: str, n: int, quota: int) -> int:
        """Reserve ``n`` more bytes for an upload already open (QuotaExceeded if they do not fit)."""
        return self._reserve(prefix, n, quota, opening=False) if n > 0 else 0

    def settle(self, prefix: str, reserved: int, delta: int, *, closing: bool = True) -> None:
        """Close an upload: its ``reserved`` bytes are given back and ``delta`` (what the drive
        really grew by, :func:`needed`; 0 if nothing was stored) is added, in one UPDATE."""
        if not self._change(prefix, used=delta, reserved=-reserved, inflight=-int(closing)):
            self.reconcile(prefix)

    def give_back(self, prefix: str, claim) -> int | None:
        """Close a reservation that a row of its own carries (:meth:`open` with ``also``), once
        whoever asks: ``claim(session)`` removes that row and returns its bytes, or None when
        another request or replica removed it first (then nothing changes). Nothing was stored
        against the drive's count: the bytes stop being promised, in the claim's transaction."""
        with self._sessions.begin() as session:
            n = claim(session)
            if n is None:
                return None
            _update_usage(session, prefix, reserved=-n, inflight=-1)
            return n

    def hold(self, put: PutHold, quota: int | None) -> None:
        """Reserve room for a presigned PUT (a 307 or a mint), held until the object appears or
        the URL expires. ``put.size`` None (a mint that did not say): all the room left. With
        ``put.upload_id``: a multipart upload the client sends straight to the store (kind
        "parts", drive/direct.py), recorded even without a quota, since its row is the upload's."""
        if quota is None and put.upload_id is None:
            return
        prefix, previous, size, upload_id = put.prefix, put.previous, put.size, put.upload_id
        parts = {"kind": "parts", "upload_id": upload_id, "size": size, "part_bytes": put.part_bytes} if upload_id else {}

        def row(n: int) -> dict:
            return self._hold_row(put, n, **parts)

        if quota is None:
            self._hold([row(0)], prefix, None)
        elif size is None:
            self._ensure_row(prefix)
            for _attempt in range(4):
                n = self.room(prefix, quota)  # read apart: the conditional UPDATE re-checks it
                try:
                    self._hold([row(max(n, 1))], prefix, quota)
                    break
                except QuotaExceeded:
                    if n <= 0:
                        raise
            else:
                raise self._refusal(prefix, 1, quota)
        else:
            self._hold([row(needed(size, previous.size if previous else 0))], prefix, quota)
        self._settle_now_and_then(prefix)

    def hold_many(self, puts: list[PutHold], quota: int | None) -> list[QuotaExceeded | None]:
        """:meth:`hold` for many presigned PUTs of one drive at once (a batch mint): all in one
        transaction when they fit together; else each alone, in order, so each that does not fit
        is refused on its own and nothing is ever reserved past the quota. For each: None (held)
        or its QuotaExceeded."""
        if len(puts) <= 1 or quota is None or any(put.size is None for put in puts):
            outcomes: list[QuotaExceeded | None] = []
            for put in puts:
                try:
                    self.hold(put, quota)
                    outcomes.append(None)
                except QuotaExceeded as exc:
                    outcomes.append(exc)
            return outcomes
        prefix = puts[0].prefix
        rows = [self._hold_row(put, needed(put.size, put.previous.size if put.previous else 0)) for put in puts]
        try:
            self._hold(rows, prefix, quota)
            outcomes = [None] * len(rows)
        except QuotaExceeded:
            outcomes = []
            for row in rows:  # the done URLs were settled just now: not again for each
                try:
                    self._hold([row], prefix, quota, settle=False)
                    outcomes.append(None)
                except QuotaExceeded as exc:
                    outcomes.append(exc)
        self._settle_now_and_then(prefix)
        return outcomes

    @staticmethod
    def _hold_row(put: PutHold, n: int, **parts) -> dict:
        """A QuotaHold's values: ``n`` bytes (0 or less: none) for the presigned PUT ``put``."""
        return {
            "prefix": put.prefix,
            "key": put.key,
            "bytes": max(n, 0),
            "previous_etag": put.previous.etag if put.previous else None,
            "previous_size": put.previous.size if put.previous else 0,
            "expires_at": utcnow() + timedelta(seconds=put.expires_in),
            **parts,
        }

    def _hold(self, rows: list[dict], prefix: str, quota: int | None, *, settle: bool = True) -> None:
        """Reserve the bytes of the holds ``rows`` (:meth:`_hold_row`) together, in one
        transaction with the rows (QuotaExceeded, and none of them, when they do not fit)."""

        def record(session, _n: int) -> None:
            session.execute(insert(QuotaHold), rows)

        if quota is None:
            self._reserve(prefix, 0, 0, opening=len(rows), also=record)
        else:
            self._reserve(prefix, sum(row["bytes"] for row in rows), quota, opening=len(rows), also=record,
                          settle=settle)

    def _settle_now_and_then(self, prefix: str) -> None:
        """Redirected PUTs in a row: settle the done ones in the background now and then."""
        now = time.monotonic()
        with self._lock:
            due = now - self._last_hold_settle.get(prefix, 0.0) >= HOLD_SETTLE_INTERVAL
            if due:
                self._last_hold_settle[prefix] = now
        if due:
            self._soon(self._settle_few_holds, prefix)

    # A multipart upload sent straight to the store (drive/direct.py): a QuotaHold of kind "parts".

    def open_parts_uploads(self, prefix: str) -> int:
        with self._sessions() as session:
            return session.scalar(
                select(func.count()).where(
                    QuotaHold.prefix == prefix, QuotaHold.kind == "parts", QuotaHold.expires_at > utcnow()
                )
            )

    def parts_upload(self, prefix: str, key: str, upload_id: str) -> QuotaHold | None:
        """The open multipart upload ``upload_id`` of ``key`` (its size and part size), or None:
        finished, aborted, expired or never this key's."""
        with self._sessions() as session:
            hold = session.scalars(
                select(QuotaHold).where(
                    QuotaHold.prefix == prefix, QuotaHold.key == key, QuotaHold.kind == "parts",
                    QuotaHold.upload_id == upload_id, QuotaHold.expires_at > utcnow(),
                )
            ).first()
            if hold is not None:
                session.expunge(hold)
            return hold

    def keep_parts_upload(self, hold: QuotaHold, seconds: int) -> bool:
        """Keep an open multipart upload's hold (as :meth:`parts_upload` read it) at least
        ``seconds`` more, while the gateway completes it, so no settle expires it meanwhile;
        False when it is gone."""
        now = utcnow()
        until = max(as_utc(hold.expires_at), now + timedelta(seconds=seconds))
        with self._sessions.begin() as session:
            return bool(
                session.execute(
                    update(QuotaHold).where(QuotaHold.id == hold.id, QuotaHold.expires_at > now).values(expires_at=until)
                ).rowcount
            )

    def close_parts_upload(self, prefix: str, hold_id: int, stored: ObjectInfo | None) -> None:
        """A multipart upload ends: completed (``stored``: the object it made counts, new minus
        what it replaced) or aborted (None); its hold goes either way. Once, whoever asks."""
        with self._sessions.begin() as session:
            row = session.execute(
                delete(QuotaHold).where(QuotaHold.id == hold_id).returning(QuotaHold.bytes, QuotaHold.previous_size)
            ).first()
            if row is None:
                return  # settled already (settle_holds saw its object appear)
            reserved, previous_size = row
            grown = needed(stored.size, previous_size) if stored else 0
            _update_usage(session, prefix, used=grown, reserved=-reserved, inflight=-1)

    # A streamed upload's reservation: a QuotaHold of kind "stream", its lease renewed while
    # bytes flow, given back by settle_holds if the lease runs out (the gateway died).

    def open_stream(self, prefix: str, n: int, quota: int) -> tuple[int, int]:
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

    def extend_stream(self, prefix: str, lease: int, n: int, quota: int) -> int:
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

    def renew_stream(self, lease: int) -> None:
        with self._sessions.begin() as session:
            session.execute(
                update(QuotaHold)
                .where(QuotaHold.id == lease)
                .values(expires_at=utcnow() + timedelta(seconds=STREAM_LEASE_SECONDS))
            )

    def close_stream(self, prefix: str, lease: int, reserved: int, delta: int) -> None:
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
        found = _objects_at(self._store, {hold.key for hold in puts})
        for hold in holds:
            info = found.get(hold.key)
            expired = as_utc(hold.expires_at) <= now
            if not expired and not _appeared(info, hold.previous_etag, hold.previous_size):
                continue
            try:
                with self._sessions.begin() as session:
                    # The row as it is now: another request may have settled it first, a streamed
                    # upload grown it, or a write rebased it (_count_urls_whole).
                    row = session.execute(
                        delete(QuotaHold)
                        .where(QuotaHold.id == hold.id)
                        .returning(QuotaHold.bytes, QuotaHold.previous_etag, QuotaHold.previous_size)
                    ).first()
                    if row is None:
                        continue
                    reserved, previous_etag, previous_size = row
                    appeared = _appeared(info, previous_etag, previous_size)
                    if not appeared and not expired:
                        raise _Rebased()  # rolls the claim back: that URL may still land
                    if hold.kind == "parts" and not appeared:
                        self._abort_quietly(hold.key, hold.upload_id)
                    grown = needed(info.size, previous_size) if appeared else 0
                    _update_usage(session, prefix, used=grown, reserved=-reserved, inflight=-1)
            except _Rebased:
                continue
            settled += 1
        return settled

    def _abort_quietly(self, key: str, upload_id: str) -> None:
        """An expired multipart upload's parts go (else the start-up sweep takes them)."""
        try:
            self._store.abort_multipart(key, upload_id)
        except Exception:  # noqa: BLE001 - finished or aborted already, or the store is down
            log.info("could not abort the expired multipart upload of %s", key, exc_info=True)

    def _count_urls_whole(self, prefix: str, paths: list[str], quota: int | None, frees: bool) -> None:
        """A write is about to change ``paths`` (keys, or folders' keys ending in "/"): upload URLs
        handed out for them (a 307, a mint) may still land, on whatever the write leaves there.
        Those that landed are settled first; each other one is then counted whole when it lands
        (it replaces nothing now: its previous object's size is reserved as well), so a MOVE or a
        DELETE of its file cannot leave that size counted nowhere (issue 19, item 11, through a
        presigned PUT). The room must fit the quota (QuotaExceeded), unless the write ``frees`` at
        least that much (a DELETE). Overwrites are counted twice until a recount, never less."""
        where = or_(*(QuotaHold.key.startswith(path, autoescape=True) if path.endswith("/") else QuotaHold.key == path
                      for path in paths))
        out = (QuotaHold.prefix == prefix, QuotaHold.kind.in_(("put", "parts")), where)
        with self._sessions() as session:
            if not session.scalar(select(func.count()).where(*out)):
                return  # no URL out: the usual case, one query
        self.settle_holds(prefix)
        with self._sessions.begin() as session:
            # The holds first, then the drive's row (the order settle_holds takes them in). This
            # statement leaves previous_size as it was, so it returns what each hold grows by.
            rows = session.execute(
                update(QuotaHold)
                .where(*out, or_(QuotaHold.previous_etag.is_not(None), QuotaHold.previous_size != 0))
                .values(bytes=QuotaHold.bytes + QuotaHold.previous_size)
                .returning(QuotaHold.id, QuotaHold.previous_size)
            ).all()
            if not rows:
                return
            session.execute(
                update(QuotaHold)
                .where(QuotaHold.id.in_([row[0] for row in rows]))
                .values(previous_size=0, previous_etag=None)
            )
            more = sum(row[1] for row in rows)
            grown = session.execute(
                update(DriveUsage)
                .where(DriveUsage.prefix == prefix, *([] if frees or quota is None else [self._fits(more, quota)]))
                .values(reserved_bytes=DriveUsage.reserved_bytes + more, changes=DriveUsage.changes + 1)
            )
            if not grown.rowcount:
                raise _NoRoom(more)

    # ------------------------------------------------------------ recounts

    def reconcile(self, prefix: str) -> int:
        """Count the prefix in the store (and its dead properties) and record it, unless an upload
        was in flight or the row changed while counting (the count could then miss, or count
        twice, what that upload settles): the incremental count stays, and the next recount tries
        again. Returns what the drive holds, its properties included."""
        with self._sessions() as session:
            row = session.get(DriveUsage, prefix)
            before = row.changes if row is not None else None
        used = sum(obj.size for obj in iter_objects(self._store, prefix))
        properties = self._count_properties(prefix)
        if before is None:
            try:  # the first count of a drive: no upload can have reserved before the row exists
                with self._sessions.begin() as session:
                    session.add(
                        DriveUsage(prefix=prefix, used_bytes=used, property_bytes=properties, reconciled_at=utcnow())
                    )
                return used + properties
            except IntegrityError:  # another request counted it first: its row stands
                with self._sessions() as session:
                    row = session.get(DriveUsage, prefix)
                    return row.used_bytes + row.property_bytes
        with self._sessions.begin() as session:
            recorded = session.execute(
                update(DriveUsage)
                .where(DriveUsage.prefix == prefix, DriveUsage.changes == before, DriveUsage.inflight == 0)
                .values(used_bytes=used, property_bytes=properties, reconciled_at=utcnow(), changes=DriveUsage.changes + 1)
            ).rowcount
            if not recorded:
                session.execute(update(DriveUsage).where(DriveUsage.prefix == prefix).values(reconciled_at=utcnow()))
        return used + properties

    def _count_properties(self, prefix: str) -> int:
        """The bytes of the dead properties of a drive's files and folders (their ref URLs are
        the quoted keys, "/users/7/a%20b": all from "/users/7/" to "/users/70")."""
        low = "/" + quote(prefix)
        with self._sessions() as session:
            return session.scalar(
                select(func.coalesce(func.sum(PROPERTY_BYTES), 0)).where(
                    DavProperty.url >= low, DavProperty.url < low[:-1] + "0"
                )
            ) or 0

    # ------------------------------------------------------------ dead properties

    def change_properties(self, prefix: str, quota: int | None, change) -> int:
        """Change a drive's dead properties (drive/dav/storage.py) in one transaction with its
        count: ``change(session)`` makes the change and returns by how many bytes they grew
        (negative: shrank; :data:`PROPERTY_BYTES` measures a row). Growth past ``quota`` (None:
        not checked, e.g. bytes reserved already) is QuotaExceeded and changes nothing. The
        drive's row is locked first, so changes of one drive's properties go one at a time and
        ``change`` reads them current. Presigned PUTs that are done are settled once before a refusal."""
        self._ensure_row(prefix)
        settled = False
        while True:
            try:
                with self._sessions.begin() as session:
                    session.execute(
                        update(DriveUsage).where(DriveUsage.prefix == prefix).values(changes=DriveUsage.changes + 1)
                    )
                    delta = change(session)
                    if delta:
                        where = [DriveUsage.prefix == prefix]
                        if delta > 0 and quota is not None:
                            where.append(self._fits(delta, quota))
                        grown = session.execute(
                            update(DriveUsage).where(*where).values(property_bytes=DriveUsage.property_bytes + delta)
                        ).rowcount
                        if not grown:
                            raise _NoRoom(delta)  # rolls the change back
                return delta
            except _NoRoom as exc:
                if settled or not self.settle_holds(prefix):
                    raise self._refusal(prefix, exc.args[0], quota, "these dead properties") from None
                settled = True

    def check_property_room(self, prefix: str, n: int, quota: int | None) -> None:
        """QuotaExceeded unless ``n`` more bytes of dead properties fit now (PROPPATCH's dry run;
        :meth:`change_properties` checks again, atomically)."""
        if quota is None or n <= 0:
            return
        self._ensure_row(prefix)
        if self.room(prefix, quota) >= n or (self.settle_holds(prefix) and self.room(prefix, quota) >= n):
            return
        raise self._refusal(prefix, n, quota, "these dead properties")

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

    # ------------------------------------------------------------ one write of a key at a time

    def writing(
        self, keys: Keys, *, within: Iterable[WriteLease] = (), wait: float | None = None, quota: int | None = None,
        frees: bool = False, urls: bool = True,
    ) -> WriteLease:
        """Hold ``keys`` (drive/usage.py: a folder's key, ending in "/", holds all under it) for
        one write: ``exclusive`` ones are written, ``shared`` ones only read whole. Taken all at
        once or not at all, on every replica (one drive's takers go one at a time: a PostgreSQL
        advisory lock, or SQLite's write lock);
        waits up to ``wait`` (WRITE_WAIT_SECONDS) for the writes in the way, then WriteBusy.
        What ``within`` (the request's own leases) already holds is not taken again.
        Read what a write replaces only once its key is held.

        Upload URLs still out for the ``exclusive`` keys are then counted whole
        (:meth:`_count_urls_whole`): QuotaExceeded, and nothing held, when their room does not
        fit ``quota``, unless the write ``frees`` it (a DELETE). ``urls`` False: left as they are
        (a write that hands out another URL for the key: either may land, each counted apart)."""
        prefix = keys.prefix
        wanted = {path: True for path in keys.exclusive}
        for path in keys.shared:
            wanted.setdefault(path, False)
        wanted = {
            path: mine for path, mine in wanted.items()
            if not any(lease.prefix == prefix and lease.holds(path, mine) for lease in within)
        }
        if not wanted:
            return WriteLease(None, prefix, {}, [])
        deadline = time.monotonic() + (WRITE_WAIT_SECONDS if wait is None else wait)
        pause = 0.01
        while True:
            ids = self._take_writes(prefix, wanted)
            if ids is not None:
                with self._lock:
                    self._held_writes.update(ids)
                    if self._renewer is None:
                        self._renewer = threading.Thread(target=self._renew_writes, name="kgpu-write-leases", daemon=True)
                        self._renewer.start()
                lease = WriteLease(self, prefix, wanted, ids)
                written = [path for path, mine in wanted.items() if mine]
                if urls and written:
                    try:
                        self._count_urls_whole(prefix, written, quota, frees)
                    except _NoRoom as exc:
                        lease.release()
                        raise self._refusal(prefix, exc.args[0], quota, "the upload URLs still out for it") from None
                    except BaseException:
                        lease.release()
                        raise
                return lease
            if time.monotonic() + pause > deadline:
                names = ", ".join(path[len(prefix):] or "/" for path in wanted)
                raise WriteBusy(f"another request is writing {names} (or a folder that holds it); retry in a moment")
            time.sleep(pause)
            pause = min(pause * 2, 0.2)

    def _take_writes(self, prefix: str, wanted: dict[str, bool]) -> list[int] | None:
        """One try: the new rows' ids, or None if a lease in the way is held."""
        now = utcnow()
        with self._sessions.begin() as session:
            if session.get_bind().dialect.name == "postgresql":
                crc = zlib.crc32(prefix.encode())
                session.execute(select(func.pg_advisory_xact_lock(_WRITES_LOCK | crc)))
            # On SQLite this first write takes the database's write lock: the check below and the
            # insert are one step for every process on the file, as the advisory lock makes them.
            session.execute(delete(DriveWrite).where(DriveWrite.prefix == prefix, DriveWrite.expires_at <= now))
            asked = list(wanted.items())
            for start in range(0, len(asked), PATHS_A_QUERY):  # a batch mint's many keys: SQL of bounded depth
                meeting = or_(*(_meeting(path, exclusive) for path, exclusive in asked[start : start + PATHS_A_QUERY]))
                if session.execute(select(DriveWrite.id).where(DriveWrite.prefix == prefix, meeting).limit(1)).first():
                    return None
            expires = now + timedelta(seconds=WRITE_LEASE_SECONDS)
            rows = [DriveWrite(prefix=prefix, path=path, exclusive=mine, expires_at=expires) for path, mine in wanted.items()]
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]

    def _release_writes(self, ids: list[int]) -> None:
        with self._lock:
            self._held_writes.difference_update(ids)
        with self._sessions.begin() as session:
            session.execute(delete(DriveWrite).where(DriveWrite.id.in_(ids)))

    def _renew_writes(self) -> None:
        """While this gateway runs, the leases it holds do not run out."""
        while not self._closed.wait(WRITE_RENEW_SECONDS):
            with self._lock:
                held = list(self._held_writes)
            if not held:
                continue
            try:
                with self._sessions.begin() as session:
                    session.execute(
                        update(DriveWrite)
                        .where(DriveWrite.id.in_(held))
                        .values(expires_at=utcnow() + timedelta(seconds=WRITE_LEASE_SECONDS))
                    )
            except Exception:
                log.warning("could not renew %d write leases", len(held), exc_info=True)

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
