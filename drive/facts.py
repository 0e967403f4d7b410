"""Object facts: the modification time a client gave an object and the SHA1 and MD5 of its bytes,
which S3 listings do not carry (no user metadata there). The one home of the rule, used by the
HTTP routes and WebDAV alike:

* a fact is written when the gateway commits an object (a streamed PUT, a COPY or MOVE, a
  PROPPATCH of ``{DAV:}lastmodified``), with the ETag and size the store lists for it;
* it is valid only while the object's ETag and size are still those (:func:`resolve`): an object
  replaced behind the gateway's back (a presigned PUT, another tool sharing the bucket) falls
  back to the store's Last-Modified and no hash;
* a presigned PUT handed out with a modification time records it as *pending*: it is taken once
  an object of the announced size appears, written after the URL was handed out;
* facts are keyed by the object key ("users/7/a/b.txt"), so they never leave the drive's prefix;
  a folder's are read with one indexed query (:meth:`FactsBook.in_folder`), a whole subtree's
  with one range query; they are deleted, moved and copied with their objects.
"""

from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable

from sqlalchemy import Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from drive.checksums import Checksum, InvalidChecksum, md5_of_etag, parse_oc_checksum
from drive.store import ObjectInfo

MAX_MTIME = 253402300799  # 9999-12-31T23:59:59Z: what an HTTP date can still write
CLOCK_SLACK = 2.0  # seconds: a store's Last-Modified may lag the gateway's clock by this much
_MTIME = re.compile(r"\d{1,12}(\.\d{1,9})?")
_COLUMNS = (
    "etag", "size", "mtime", "sha1", "md5", "pending_size", "pending_mtime", "pending_since", "pending_until", "pending_md5"
)
_NOT_PENDING = {
    "pending_size": None, "pending_mtime": None, "pending_since": None, "pending_until": None, "pending_md5": None
}


class InvalidMtime(ValueError):
    """An ``X-OC-Mtime`` (or ``{DAV:}lastmodified``) that is not seconds since the epoch in range."""


def parse_mtime(value: str) -> float:
    """Seconds since the epoch, as ``X-OC-Mtime`` carries them: digits, optionally a fraction,
    between 0 and the year 9999."""
    text = value.strip()
    if not _MTIME.fullmatch(text):
        raise InvalidMtime("X-OC-Mtime must be seconds since the epoch (digits, e.g. 1700000000)")
    seconds = float(text)
    if seconds > MAX_MTIME:
        raise InvalidMtime("X-OC-Mtime is past the year 9999")
    return seconds


class BadClientFact(ValueError):
    """An ``X-OC-Mtime`` or ``OC-Checksum`` header that cannot be read: a 400 with ``code``
    (``bad_mtime``, ``bad_checksum``) on every protocol."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ClientFacts:
    """What a client says of the body it sends: its modification time (``X-OC-Mtime``, None:
    not said) and the hashes to check it against (``OC-Checksum``, () : none)."""

    mtime: float | None = None
    checksums: tuple[Checksum, ...] = ()


def client_facts(header: Callable[[str], str | None]) -> ClientFacts:
    """The one reading of ``X-OC-Mtime`` and ``OC-Checksum``, for every protocol: ``header``
    gives a request header's value by its lower-case name (None: absent). BadClientFact
    (``bad_mtime`` first, then ``bad_checksum``) when one cannot be read."""
    return ClientFacts(mtime_header(header("x-oc-mtime")), checksums_header(header("oc-checksum")))


def mtime_header(value: str | None) -> float | None:
    """The modification time a client gives its upload (``X-OC-Mtime``, seconds since the epoch)."""
    if value is None:
        return None
    try:
        return parse_mtime(value)
    except InvalidMtime as exc:
        raise BadClientFact("bad_mtime", str(exc)) from None


def checksums_header(value: str | None) -> tuple[Checksum, ...]:
    """The hashes a client announces for its body (``OC-Checksum: SHA1:…``), checked before commit."""
    if value is None:
        return ()
    try:
        return parse_oc_checksum(value)
    except InvalidChecksum as exc:
        raise BadClientFact("bad_checksum", str(exc)) from None


_SECONDS = re.compile(r"\d+(\.\d+)?")
_HTTP_DATE_EXAMPLE = "Sun, 06 Nov 1994 08:49:37 GMT"


def parse_lastmodified(value: str) -> float:
    """A ``{DAV:}lastmodified`` a client PROPPATCHes: seconds since the epoch (what rclone sends)
    or an HTTP date (RFC 1123, RFC 850, asctime, or RFC 2822 with a zone), from 1970 to the end
    of the year 9999. A date that cannot be (32 Jan, 30 Feb, 25:00) is refused, never rolled over
    into the next month; each refusal is an :class:`InvalidMtime` with a message for a person."""
    text = value.strip()
    if not text:
        raise InvalidMtime(
            f"lastmodified is empty: give seconds since the epoch (e.g. 1700000000) or an HTTP date "
            f"(e.g. {_HTTP_DATE_EXAMPLE})"
        )
    if _SECONDS.fullmatch(text):
        seconds = float(text)
        if seconds > MAX_MTIME:
            raise InvalidMtime("lastmodified is past the year 9999 (the last second an HTTP date can write)")
        return seconds
    try:
        parts = email.utils.parsedate_tz(text)
    except (ValueError, TypeError, IndexError, OverflowError):
        parts = None
    if parts is None:
        raise InvalidMtime(
            f"lastmodified must be seconds since the epoch (e.g. 1700000000) or an HTTP date "
            f"(e.g. {_HTTP_DATE_EXAMPLE})"
        )
    year, month, day, hour, minute, second = parts[:6]
    if year > 9999:
        raise InvalidMtime("lastmodified is past the year 9999 (the last year an HTTP date can write)")
    try:
        zone = timezone(timedelta(seconds=parts[9] or 0))
        moment = datetime(year, month, day, hour, minute, second, tzinfo=zone)
    except (ValueError, OverflowError):
        shown = text if len(text) <= 64 else text[:64] + "…"
        raise InvalidMtime(f'lastmodified is a date that does not exist ("{shown}")') from None
    seconds = moment.timestamp()
    if seconds < 0:
        raise InvalidMtime("lastmodified is before 1970 (the epoch)")
    if seconds > MAX_MTIME:
        raise InvalidMtime("lastmodified is past the year 9999 (the last year an HTTP date can write)")
    return float(seconds)


@dataclass(frozen=True)
class Facts:
    """What to report for one object: its modification time, and its hashes when known."""

    mtime: datetime
    sha1: str | None = None
    md5: str | None = None

    @property
    def has_hashes(self) -> bool:
        """Any hash known (an object sent straight to the store has at most its MD5)."""
        return self.sha1 is not None or self.md5 is not None


@dataclass(frozen=True)
class FactRow:
    etag: str | None
    size: int | None
    mtime: float | None
    sha1: str | None
    md5: str | None
    pending_size: int | None
    pending_mtime: float | None
    pending_since: float | None
    pending_until: float | None
    pending_md5: str | None = None


def bare_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


def _as_datetime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def resolve(info: ObjectInfo, row: FactRow | None) -> Facts:
    """The facts of the object ``info`` describes, given its row (or none)."""
    if row is not None:
        if row.etag is not None and row.etag == bare_etag(info.etag) and row.size == info.size:
            mtime = _as_datetime(row.mtime) if row.mtime is not None else info.last_modified
            return Facts(mtime, row.sha1, row.md5)
        if (
            row.pending_size == info.size
            and row.pending_since is not None
            and row.pending_until is not None
            and row.pending_since - CLOCK_SLACK <= info.last_modified.timestamp() <= row.pending_until + CLOCK_SLACK
        ):
            mtime = _as_datetime(row.pending_mtime) if row.pending_mtime is not None else info.last_modified
            return Facts(mtime, md5=proven_md5(info, row.pending_md5))
    return Facts(info.last_modified)


# What a direct upload's facts say of its MD5 when the store's ETag of it is its MD5 (the store's
# ``put_etag_is_md5``): no client declared one, the store computed it.
STORE_MD5 = "etag"


def proven_md5(info: ObjectInfo, vouched: str | None) -> str | None:
    """The MD5 of bytes a client sent straight to the store, only as the store vouches for it
    (the gateway never saw them, so it never reports a SHA1 for them: docs/my-drive.md, "Hashes").
    ``vouched``: :data:`STORE_MD5` where the store's ETags are the MD5s of its objects, then a
    plain MD5 ETag is reported (a multipart "…-N" one is none); else the MD5 a client declared,
    which the URL signed (``Content-MD5``, so the store refused other bytes), reported only where
    the store's ETag is that very MD5. Nothing the client says alone is ever reported."""
    if vouched == STORE_MD5:
        return md5_of_etag(info.etag) or None
    return vouched if vouched is not None and vouched == bare_etag(info.etag).lower() else None


def folder_of(key: str) -> str:
    return key.rsplit("/", 1)[0] + "/"


def _under(column, prefix: str):
    """Keys starting with ``prefix`` (which ends in "/"): a range, byte by byte ("0" follows "/")."""
    return (column >= prefix) & (column < prefix[:-1] + "0")


@dataclass(frozen=True)
class Carried:
    """One object a COPY or MOVE wrote: its source, and the destination's key and listed ETag."""

    source: ObjectInfo
    dest_key: str
    dest_etag: str


class FactsBook:
    """The table ``object_facts`` (gateway/models.py ObjectFact) over the main database."""

    def __init__(self, sessions: sessionmaker, table: Table):
        self._sessions = sessions
        self._table = table

    def _rows(self, session: Session, where) -> dict[str, FactRow]:
        t = self._table
        found = session.execute(select(t.c.key, *(t.c[name] for name in _COLUMNS)).where(where)).all()
        return {row[0]: FactRow(*row[1:]) for row in found}

    def _upsert(self, session: Session, key: str, values: dict) -> None:
        module = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        row = {"key": key, "folder": folder_of(key), **values}
        statement = module.insert(self._table).values(**row)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["key"], set_={name: statement.excluded[name] for name in row if name != "key"}
            )
        )

    # ------------------------------------------------------------ reads

    def get(self, key: str) -> FactRow | None:
        with self._sessions() as session:
            return self._rows(session, self._table.c.key == key).get(key)

    def facts_of(self, info: ObjectInfo) -> Facts:
        return resolve(info, self.get(info.key))

    def in_folder(self, folder: str) -> dict[str, FactRow]:
        """The rows of the objects directly in ``folder`` (a key prefix ending in "/")."""
        with self._sessions() as session:
            return self._rows(session, self._table.c.folder == folder)

    def of_keys(self, keys: list[str]) -> dict[str, FactRow]:
        """The rows of ``keys`` (one page of a folder's listing: an index probe each)."""
        if not keys:
            return {}
        with self._sessions() as session:
            return self._rows(session, self._table.c.key.in_(keys))

    def between(self, first: str, last: str) -> dict[str, FactRow]:
        """The rows of the keys from ``first`` to ``last`` (one page of a flat listing)."""
        t = self._table
        with self._sessions() as session:
            return self._rows(session, (t.c.key >= first) & (t.c.key <= last))

    def under(self, prefix: str) -> dict[str, FactRow]:
        with self._sessions() as session:
            return self._rows(session, _under(self._table.c.key, prefix))

    # ------------------------------------------------------------ writes

    def record(
        self, key: str, *, etag: str, size: int, mtime: float | None, sha1: str | None, md5: str | None
    ) -> None:
        """An object the gateway committed: its listed ETag and size, and what it knows of it."""
        values = {"etag": bare_etag(etag), "size": size, "mtime": mtime, "sha1": sha1, "md5": md5, **_NOT_PENDING}
        with self._sessions.begin() as session:
            self._upsert(session, key, values)

    def hand_out(self, urls: list[tuple[str, int, float | None, str | None]], expires_in: int) -> None:
        """Presigned PUTs, valid ``expires_in`` seconds, handed out (one transaction for all) as
        (key, size, modification time, who vouches for its MD5: a declared hex, or
        :data:`STORE_MD5`): each the object's once an object of that size appears in that time
        (its bytes never pass through the gateway: no SHA1, and the MD5 only as
        :func:`proven_md5` allows)."""
        now = time.time()
        with self._sessions.begin() as session:
            for key, size, mtime, md5 in urls:
                self._upsert(
                    session,
                    key,
                    {
                        **({} if self._exists(session, key) else {"etag": None, "size": None, "mtime": None}),
                        "pending_size": size,
                        "pending_mtime": mtime,
                        "pending_since": now,
                        "pending_until": now + expires_in,
                        "pending_md5": md5,
                    },
                )

    def _exists(self, session: Session, key: str) -> bool:
        return session.scalar(select(self._table.c.key).where(self._table.c.key == key)) is not None

    def set_mtime(self, info: ObjectInfo, mtime: float) -> None:
        """A new modification time for the object ``info`` describes; its hashes stay if they are
        still valid for it."""
        with self._sessions.begin() as session:
            row = self._rows(session, self._table.c.key == info.key).get(info.key)
            facts = resolve(info, row)
            self._upsert(
                session,
                info.key,
                {
                    "etag": bare_etag(info.etag),
                    "size": info.size,
                    "mtime": mtime,
                    "sha1": facts.sha1,
                    "md5": facts.md5,
                    **_NOT_PENDING,
                },
            )

    def carry(self, carried: Iterable[Carried], *, mtime: float | None = None) -> None:
        """The facts of copied (or moved) objects follow them: each destination keeps its source's
        modification time (``mtime`` instead, when the client gave one) and its hashes, if they
        were valid for the source. (A move then forgets the source's.)"""
        carried = list(carried)
        if not carried:
            return
        t = self._table
        sources = [item.source.key for item in carried]
        with self._sessions.begin() as session:
            if len(sources) == 1:
                rows = self._rows(session, t.c.key == sources[0])
            else:
                rows = self._rows(session, (t.c.key >= min(sources)) & (t.c.key <= max(sources)))
            for item in carried:
                facts = resolve(item.source, rows.get(item.source.key))
                self._upsert(
                    session,
                    item.dest_key,
                    {
                        "etag": bare_etag(item.dest_etag),
                        "size": item.source.size,
                        "mtime": mtime if mtime is not None else facts.mtime.timestamp(),
                        "sha1": facts.sha1,
                        "md5": facts.md5,
                        **_NOT_PENDING,
                    },
                )

    def forget(self, key: str) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(self._table).where(self._table.c.key == key))

    def forget_under(self, prefix: str) -> None:
        """Every object's facts under the folder ``prefix`` (ending in "/")."""
        with self._sessions.begin() as session:
            session.execute(delete(self._table).where(_under(self._table.c.key, prefix)))
