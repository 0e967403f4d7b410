"""Transit objects (seed 001's ``/objects``): scratch objects for moving data to pods without the drive.

A user mints an object with its size declared; the answer is a presigned PUT with that size
signed in (a store that checks signatures, R2 or the embedded rclone, refuses any other size),
then any number of pods fetch it with presigned GETs. Objects live under ``transit/{user}/``
in the store, apart from the drives (``users/``, ``orgs/``): no drive path reaches them.

The quota is the drive's usage book (drive/usage.py's UsageBook, which gateway/quota.py keeps in
the database) on the prefix ``transit/{user}/``, with its operations and formulas (``open`` with
``also``, ``give_back``, :func:`drive.usage.free_bytes`): the
mint reserves the declared size, in one transaction with the object's row, atomically against
``KGPU_TRANSIT_QUOTA_BYTES``; the reservation lasts as long as the row and is given back when
the row goes (:meth:`TransitObjects._purge`, once, whichever replica gets there). A row goes
24 h after its mint, or after a DELETE once its upload URL has expired (until then the upload
may still land: its room stays reserved, and what lands is deleted then). The sweep runs on the
reaper's tick (gateway/app.py), on every gateway: each purge is claimed by deleting the row, so
replicas and restarts never purge twice nor miss one.

Times come from an injected clock (``now``) so tests move time instead of sleeping.
"""

from __future__ import annotations

import logging
import re
import secrets
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import sessionmaker

from drive.store import ObjectNotFound, ObjectStore
from drive.usage import QuotaExceeded, UsageBook, free_bytes
from gateway.domain_errors import Conflict, Forbidden, NotFound, TooLarge
from gateway.models import TransitObject, utcnow
from gateway.principal import Principal
from gateway.settings import Settings
from gateway.tokens import as_utc

log = logging.getLogger("kgpu.transit")

LIFETIME = timedelta(hours=24)
MAX_OBJECT_BYTES = 50 << 30
MAX_OBJECTS = 1000  # rows one user holds (live, and deleted ones not swept yet): sizes of 0 take no quota
SWEEP_BATCH = 500  # objects purged per tick at most; the next tick takes the rest
_OBJECT_ID = re.compile(r"^obj-[0-9a-f]{24}$")


def transit_prefix(user_id: int) -> str:
    return f"transit/{user_id}/"


def _owner(principal: Principal) -> int:
    if principal.user_id is None:
        raise Forbidden("no_account", "the environment admin token has no transit objects; use a user's token")
    return principal.user_id


def _iso(moment: datetime) -> str:
    return as_utc(moment).isoformat().replace("+00:00", "Z")


def describe(row: TransitObject) -> dict:
    return {
        "object_id": row.id,
        "label": row.label,
        "size_bytes": row.size_bytes,
        "created_at": _iso(row.created_at),
        "expires_at": _iso(row.expires_at),
    }


class TransitObjects:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker,
        store: ObjectStore,
        usage: UsageBook,
        now: Callable[[], datetime] = utcnow,
    ):
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.usage = usage
        self.now = now

    def _url_seconds(self, until: datetime) -> int:
        """A presigned URL's lifetime: the configured one, never past ``until`` (at least 1 s)."""
        left = (as_utc(until) - self.now()).total_seconds()
        return max(1, min(self.settings.presign_expires_seconds, int(left)))

    def mint(self, principal: Principal, label: str, size: int) -> dict:
        """A new object of ``size`` bytes and its presigned PUT; 413 past the cap or the quota."""
        user_id = _owner(principal)
        if size > MAX_OBJECT_BYTES:
            raise TooLarge("object_too_large", f"size_bytes is {size}; one transit object is at most {MAX_OBJECT_BYTES}")
        now = self.now()
        expires_at = now + LIFETIME
        upload_seconds = self._url_seconds(expires_at)
        row = TransitObject(
            id="obj-" + secrets.token_hex(12),
            user_id=user_id,
            label=label,
            size_bytes=size,
            created_at=now,
            expires_at=expires_at,
            upload_expires_at=now + timedelta(seconds=upload_seconds),
        )
        prefix = transit_prefix(user_id)
        quota = self.settings.transit_quota_bytes
        # Signed before anything is reserved (a store that is down refuses here); handed out only
        # once the reservation holds, so no URL exists for bytes that were not reserved.
        put_url = self.store.presign_put(prefix + row.id, upload_seconds, content_length=size)

        def record(session, _reserved: int) -> None:
            # In the reservation's transaction, which holds the user's usage row: mints of one
            # user count their objects one at a time, on every replica.
            held = session.scalar(select(func.count()).where(TransitObject.user_id == user_id))
            if held >= MAX_OBJECTS:
                raise Conflict(
                    "too_many_objects", f"you hold {held} transit objects; at most {MAX_OBJECTS}: delete some"
                )
            session.add(row)

        try:
            self.usage.open(prefix, size, quota, also=record)
        except QuotaExceeded:
            raise TooLarge(
                "quota_exceeded",
                f"this object ({size} bytes) does not fit: {free_bytes(self.usage, prefix, quota)} of your {quota} bytes of transit objects are free "
                "(deleted objects hold their room until their upload URL expires)",
            ) from None
        return {
            **describe(row),
            "put_url": put_url,
            "method": "PUT",
            "put_expires_at": _iso(row.upload_expires_at),
            "headers": {"Content-Length": str(size)},
        }

    def _live(self, user_id: int):
        return select(TransitObject).where(
            TransitObject.user_id == user_id,
            TransitObject.deleted_at.is_(None),
            TransitObject.expires_at > self.now(),
        )

    def list(self, principal: Principal) -> list[dict]:
        """The caller's live objects, newest first."""
        with self.sessions() as session:
            rows = session.scalars(
                self._live(_owner(principal)).order_by(TransitObject.created_at.desc(), TransitObject.id)
            ).all()
            return [describe(row) for row in rows]

    def quota(self, principal: Principal) -> dict:
        """The transit quota and what is free of it (deleted objects hold their room until
        their upload URL expires)."""
        prefix, limit = transit_prefix(_owner(principal)), self.settings.transit_quota_bytes
        return {"limit_bytes": limit, "free_bytes": free_bytes(self.usage, prefix, limit)}

    def _find(self, session, principal: Principal, object_id: str) -> TransitObject:
        """One of the caller's live objects; anything else (another user's, gone, malformed) is 404."""
        row = None
        if _OBJECT_ID.match(object_id):
            row = session.scalars(self._live(_owner(principal)).where(TransitObject.id == object_id)).first()
        if row is None:
            raise NotFound("object_not_found", f"no live transit object {object_id[:100]} of yours")
        return row

    def fetch(self, principal: Principal, object_id: str) -> dict:
        """A fresh presigned GET (any number of pods may use it until it expires); 409 if the
        object has not been uploaded yet."""
        with self.sessions() as session:
            row = self._find(session, principal, object_id)
            described = describe(row)
            key, expires_at = transit_prefix(row.user_id) + row.id, row.expires_at
        if self.store.head(key) is None:
            raise Conflict("not_uploaded", f"{object_id} has not been uploaded yet: PUT its bytes to its put_url")
        seconds = self._url_seconds(expires_at)
        return {
            **described,
            "get_url": self.store.presign_get(key, seconds),
            "get_expires_at": _iso(self.now() + timedelta(seconds=seconds)),
        }

    def delete(self, principal: Principal, object_id: str) -> None:
        """Idempotent: the object's bytes go now; its row (and reserved room) once its upload
        URL has expired, as nothing can land after that."""
        user_id = _owner(principal)
        if not _OBJECT_ID.match(object_id):
            return
        now = self.now()
        with self.sessions.begin() as session:
            upload_expires_at = session.execute(
                update(TransitObject)
                .where(TransitObject.id == object_id, TransitObject.user_id == user_id, TransitObject.deleted_at.is_(None))
                .values(deleted_at=now)
                .returning(TransitObject.upload_expires_at)
            ).scalar()
        if upload_expires_at is None:
            return
        if as_utc(upload_expires_at) <= now:
            self._purge(object_id, user_id)
        else:
            self._delete_bytes(transit_prefix(user_id) + object_id)

    def _delete_bytes(self, key: str) -> None:
        try:
            self.store.delete(key)
        except ObjectNotFound:
            pass

    def sweep(self) -> int:
        """Purge the objects that are due: expired ones, and deleted ones whose upload URL has
        expired. Run on every reaper tick, on every gateway; returns how many this call purged."""
        now = self.now()
        with self.sessions() as session:
            due = session.execute(
                select(TransitObject.id, TransitObject.user_id)
                .where(
                    or_(
                        TransitObject.expires_at <= now,
                        and_(TransitObject.deleted_at.is_not(None), TransitObject.upload_expires_at <= now),
                    )
                )
                .limit(SWEEP_BATCH)
            ).all()
        purged = 0
        for object_id, user_id in due:
            try:
                purged += self._purge(object_id, user_id)
            except Exception:  # noqa: BLE001 - one object's trouble never stops the others; the next tick retries
                log.warning("could not purge transit object %s", object_id, exc_info=True)
        return purged

    def _purge(self, object_id: str, user_id: int) -> bool:
        """The object's bytes, then its row and reserved room (claimed: once, whoever gets there)."""
        prefix = transit_prefix(user_id)
        self._delete_bytes(prefix + object_id)

        def claim(session) -> int | None:
            return session.execute(
                delete(TransitObject).where(TransitObject.id == object_id).returning(TransitObject.size_bytes)
            ).scalar()

        return self.usage.give_back(prefix, claim) is not None
