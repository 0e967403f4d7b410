"""The usage book: what a drive holds and may still take (the quota), as every write asks it.

The drive's rules speak to the book through :class:`UsageBook`, a Protocol; the database
implements it (gateway/quota.py: the counts, reservations, presigned-PUT holds and write
leases, shared by every replica). The rules that are the drive's own live here:

* :func:`needed`: what a write adds, new minus old (the one formula for every kind of write);
* :func:`room_left`: what is neither stored, promised nor taken by dead properties (the one
  formula of the quota, in Python and, on the columns, in SQL);
* :class:`Upload`: the quota side of one body streamed through the gateway, reserved before
  its bytes move.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterable, Protocol

from starlette.concurrency import run_in_threadpool

from drive.store import ObjectInfo
from drive.uploads import UploadTooLarge

STREAM_RENEW_SECONDS = 60  # a streamed upload's lease is renewed this often while its bytes flow


class QuotaExceeded(UploadTooLarge):
    """A reservation that would take the drive past its quota (a 413 ``quota_exceeded``)."""


def needed(new_size: int, previous_size: int) -> int:
    """What a write of ``new_size`` bytes over a file of ``previous_size`` (0: none) adds to
    the drive: new minus old. The one formula for HTTP, WebDAV, redirects and mints."""
    return new_size - previous_size


def room_left(quota, used, reserved, properties):
    """What a drive may still take: its quota less what it stores, what is promised to uploads
    and what its dead properties weigh. Works on numbers and on columns (the SQL of a reservation)."""
    return quota - used - reserved - properties


def free_bytes(book: "UsageBook", prefix: str, quota: int) -> int:
    """What a drive may still take, as its owner is told (WebDAV's quota-available-bytes, the
    transit quota's ``free_bytes``): :func:`room_left`, never below 0, once the book has settled
    the presigned PUTs that are done (and counted a drive it sees first)."""
    book.used_bytes(prefix)
    return max(0, book.room(prefix, quota))


@dataclass(frozen=True)
class PutHold:
    """Room held for bytes a client sends straight to the store: a presigned PUT of ``key`` (a
    307 or a mint) or, with ``upload_id``, a multipart upload's parts (drive/direct.py)."""

    prefix: str
    key: str
    size: int | None  # None: a mint that did not say; all the room left is held
    previous: ObjectInfo | None  # what it replaces (counted new minus old)
    expires_in: int  # seconds until the URL (or the upload) expires and the room goes back
    upload_id: str | None = None
    part_bytes: int | None = None


@dataclass(frozen=True)
class Keys:
    """The keys of one drive a write holds: ``exclusive`` ones it changes, ``shared`` ones it only
    reads whole (a COPY's source, which other readers may copy at once); a folder's key (ending
    in "/") holds everything under it."""

    prefix: str
    exclusive: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()


class WriteLease(Protocol):
    """The keys one request holds for a write, until :meth:`release` (or the end of a ``with``)."""

    prefix: str

    def holds(self, path: str, exclusive: bool) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> "WriteLease": ...

    def __exit__(self, *exc) -> None: ...


class NoLease:
    """What a write holds where nothing is counted (no usage book): nothing."""

    prefix = ""

    def holds(self, path: str, exclusive: bool) -> bool:
        return False

    def release(self) -> None:
        pass

    def __enter__(self) -> "NoLease":
        return self

    def __exit__(self, *exc) -> None:
        pass


class UsageBook(Protocol):
    """A drive's count and its quota's reservations (gateway/quota.py keeps them in the database)."""

    def used_bytes(self, prefix: str) -> int:
        """What the drive holds, dead properties included."""

    def room(self, prefix: str, quota: int) -> int:
        """:func:`room_left` of the drive now (a hint: a reservation checks again)."""

    def add(self, prefix: str, delta: int) -> None: ...

    def open(self, prefix: str, n: int, quota: int, also=None) -> int:
        """Reserve ``n`` bytes for a write that starts now; QuotaExceeded if they do not fit.
        ``also(session, n)`` runs in the reservation's own transaction (a row that carries it,
        closed by :meth:`give_back`)."""

    def settle(self, prefix: str, reserved: int, delta: int) -> None:
        """Close a write: its reservation goes back and ``delta`` (:func:`needed`) counts."""

    def give_back(self, prefix: str, claim) -> int | None:
        """Close a reservation a row of its own carries (:meth:`open` with ``also``), once:
        ``claim(session)`` removes the row and returns its bytes (None: removed already)."""

    def hold(self, put: PutHold, quota: int | None) -> None:
        """Reserve room for ``put`` until its object appears or its URL expires (QuotaExceeded)."""

    def hold_many(self, puts: list[PutHold], quota: int | None) -> list[QuotaExceeded | None]:
        """:meth:`hold` for many presigned PUTs of one drive: together when they fit, else each
        alone; for each, None (held) or its refusal."""

    def open_parts_uploads(self, prefix: str) -> int:
        """How many multipart uploads sent straight to the store the drive has open."""

    def parts_upload(self, prefix: str, key: str, upload_id: str):
        """The open multipart upload's hold (``id``, ``size``, ``part_bytes``), or None."""

    def keep_parts_upload(self, hold, seconds: int) -> bool: ...

    def close_parts_upload(self, prefix: str, hold_id: int, stored: ObjectInfo | None) -> None: ...

    def writing(
        self, keys: Keys, *, within: Iterable[WriteLease] = (), quota: int | None = None, frees: bool = False,
        urls: bool = True,
    ) -> WriteLease:
        """Hold ``keys`` for one write (one write of a key at a time, on every replica);
        WriteBusy when another holds one and does not end soon. What ``within`` (the request's
        own leases) holds is not taken again; upload URLs still out for the ``exclusive`` keys
        are counted whole, QuotaExceeded when their room does not fit ``quota`` unless the write
        ``frees`` room (a DELETE), or left as they are (``urls`` False)."""

    def open_stream(self, prefix: str, n: int, quota: int) -> tuple[int, int]:
        """Reserve ``n`` bytes for a new streamed upload: (reserved, lease id)."""

    def extend_stream(self, prefix: str, lease: int, n: int, quota: int) -> int: ...

    def renew_stream(self, lease: int) -> None: ...

    def close_stream(self, prefix: str, lease: int, reserved: int, delta: int) -> None: ...

    def change_properties(self, prefix: str, quota: int | None, change) -> int: ...

    def check_property_room(self, prefix: str, n: int, quota: int | None) -> None: ...


def open_upload(
    book: UsageBook, prefix: str, quota: int | None, previous_size: int, declared: int | None, step: int
) -> "Upload":
    """An :class:`Upload` for a body streamed through the gateway, begun (QuotaExceeded if its
    declared length does not fit)."""
    upload = Upload(book, prefix, quota, previous_size, declared, step)
    upload.begin()
    return upload


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
        self.lease: int | None = None  # its hold of kind "stream" in the book
        self._open = False  # counted in flight (a quota applies)
        self._done = False

    def begin(self) -> None:
        """Open the upload, reserving its declared length (QuotaExceeded if it does not fit)."""
        if self.quota is None:
            return
        n = needed(self.declared, self.previous_size) if self.declared is not None else 0
        self.reserved, self.lease = self.book.open_stream(self.prefix, n, self.quota)
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
                await run_in_threadpool(self.book.renew_stream, self.lease)
                renewed = time.monotonic()
            yield chunk

    def _reserve_more(self, missing: int) -> None:
        """A step more; near the quota, all the room left (so of uploads racing for the last
        room one gets it and finishes, rather than all starving on small reservations); else
        exactly what is missing; else this upload is over the quota."""
        step = max(missing, self.step)
        if self._extend(step):
            return
        room = self.book.room(self.prefix, self.quota)  # asked only near the quota: a step did not fit
        tries = ([room] if missing <= room < step else []) + [missing]
        if not any(self._extend(n) for n in dict.fromkeys(tries) if n != step):
            raise UploadTooLarge("upload exceeds the drive quota")

    def _extend(self, n: int) -> bool:
        try:
            self.reserved += self.book.extend_stream(self.prefix, self.lease, n, self.quota)
        except QuotaExceeded:
            return False
        return True

    def commit(self, size: int) -> None:
        """The object is stored: the drive grew by new minus old."""
        if not self._done:
            self._done = True
            if self._open:
                self.book.close_stream(self.prefix, self.lease, self.reserved, needed(size, self.previous_size))
            else:
                self.book.add(self.prefix, needed(size, self.previous_size))

    def abort(self) -> None:
        """Nothing was stored: give the reservation back."""
        if not self._done:
            self._done = True
            if self._open:
                self.book.close_stream(self.prefix, self.lease, self.reserved, 0)
