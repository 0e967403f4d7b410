"""Dead properties (PROPPATCH) and locks, in the main database (the tables ``dav_properties``
and ``dav_locks``, gateway/models.py), so every gateway replica on one database sees the same
ones and they survive restarts. Both are keyed by the quoted object key (``/users/7/a%20b``,
the resources' ref URL), so both mount points see the same ones. A PROPFIND reads those of a
whole folder with one range query each (:func:`note_folder_extras`), not two per member.

The URL columns compare byte by byte (collation "C" on PostgreSQL, SQLite's own), so "at or
under ``/a/b``" is ``url = '/a/b' OR url >= '/a/b/' AND url < '/a/b0'`` ("0" follows "/").
A lock whose time ran out is never returned; it is deleted when met, or by the next LOCK.
"""

from __future__ import annotations

import pickle
import sqlite3
import time
from contextlib import contextmanager
from typing import Iterator
from pathlib import Path
from urllib.parse import unquote

from sqlalchemy import Table, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker
from wsgidav.dav_error import HTTP_INSUFFICIENT_STORAGE, PRECONDITION_CODE_LockConflict, DAVError, DAVErrorCondition
from wsgidav.dav_provider import DAVProvider
from wsgidav.lock_man.lock_manager import LockManager, generate_lock_token, normalize_lock_root, validate_lock
from wsgidav.lock_man.lock_storage import LockStorageDict
from wsgidav.prop_man.property_manager import PropertyManager

from drive.dav.context import ENVIRON_KEY, EXTRAS_KEY, coded_error, listed_without
from drive.keys import drive_of
from drive.uploads import UploadTooLarge

_GRANTING_KEY = 0x6B677075_64617601  # the PostgreSQL advisory lock held while a LOCK is granted


def _at_or_under(column, url: str):
    base = url.rstrip("/")
    return or_(column == base, (column >= base + "/") & (column < base + "0"))


def _retarget(src_url: str, dest_url: str, url: str) -> str:
    return dest_url.rstrip("/") + url[len(src_url.rstrip("/")) :]


def _upsert(session: Session, table: Table, row: dict, keys: list[str]):
    module = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = module.insert(table).values(**row)
    return session.execute(
        statement.on_conflict_do_update(
            index_elements=keys, set_={name: statement.excluded[name] for name in row if name not in keys}
        )
    )


# Dead properties are small notes about a file (an ownCloud client's, an editor's): capped, so
# that PROPPATCH cannot turn the database into storage outside the drive's quota (issue 19, 12:
# five PROPPATCHes put 100 MiB into it, and one allprop PROPFIND answered 120 MiB).
MAX_PROPERTY_BYTES = 64 << 10
MAX_RESOURCE_PROPERTY_BYTES = 256 << 10


class _InTable:
    """What wsgidav's two stores kept in a database table share: the table and its sessions. wsgidav
    opens, syncs, flushes and closes its own stores (files); a table needs none of that, each call
    being its own transaction."""

    def __init__(self, sessions: sessionmaker, table: Table):
        super().__init__()
        self._sessions = sessions
        self._table = table

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._table.name})"

    def _no_step(self) -> None:
        """Opening, syncing, flushing or closing: nothing to do for a table."""


class DbPropertyManager(_InTable, PropertyManager):
    """wsgidav's property manager over the table ``dav_properties`` (url, name, value: the XML).

    Dead properties count in their drive's quota (issue 19, item 12): every change goes through
    ``usage.change_properties`` (drive/usage.py), in one transaction with the drive's count,
    and a PROPPATCH that does not fit is refused whole with 507 ``quota_exceeded``. A PROPPATCH's
    dry run checks all its properties together (the caps and the quota) and its real run makes
    them in one transaction, so a refused PROPPATCH changes nothing."""

    _lazy_open = _sync = _close = _InTable._no_step

    def __init__(self, sessions: sessionmaker, table: Table, usage=None):
        super().__init__(sessions, table)
        self._usage = usage  # drive.usage.UsageBook (None: nothing counted)
        self._loaded = True

    @property
    def _size(self):
        """What a row weighs (the quota's measure: gateway.quota.PROPERTY_BYTES)."""
        return func.length(self._table.c.name) + func.length(self._table.c.value)

    def urls_under(self, url: str) -> list[str]:
        """Unquoted, without a trailing slash: the URLs at or under ``url`` with dead properties."""
        t = self._table
        with self._sessions() as session:
            urls = session.scalars(select(t.c.url).where(_at_or_under(t.c.url, url)).distinct()).all()
        return [unquote(found).rstrip("/") or "/" for found in urls]

    def bytes_under(self, url: str, *, with_children: bool) -> int:
        """What the dead properties of ``url`` (and of the URLs under it) weigh in the quota."""
        t = self._table
        where = _at_or_under(t.c.url, url) if with_children else t.c.url == url
        with self._sessions() as session:
            return session.scalar(select(func.coalesce(func.sum(self._size), 0)).where(where)) or 0

    def get_properties(self, norm_url, environ=None):
        if environ is not None and listed_without(environ, norm_url, locks=False):
            return []
        t = self._table
        with self._sessions() as session:
            return list(session.scalars(select(t.c.name).where(t.c.url == norm_url)))

    def get_property(self, norm_url, name, environ=None):
        if environ is not None and listed_without(environ, norm_url, locks=False):
            return None
        t = self._table
        with self._sessions() as session:
            return session.scalar(select(t.c.value).where(t.c.url == norm_url, t.c.name == name))

    def write_property(self, norm_url, name, property_value, dry_run=False, environ=None):
        size = len(name) + len(property_value)
        if size > MAX_PROPERTY_BYTES:
            raise DAVError(HTTP_INSUFFICIENT_STORAGE, f"a dead property holds at most {MAX_PROPERTY_BYTES} bytes")
        self._update(norm_url, name, property_value, dry_run, environ)

    def remove_property(self, norm_url, name, dry_run=False, environ=None):
        self._update(norm_url, name, None, dry_run, environ)

    def _update(self, url: str, name: str, value: bytes | None, dry_run: bool, environ) -> None:
        """One property of a PROPPATCH set (``value``) or removed (None). The dry run notes it in
        the request's plan and checks the plan so far; the real run's first property makes the
        whole plan at once (the others find it made, or its refusal)."""
        ctx = environ.get(ENVIRON_KEY) if environ else None
        if ctx is None or (not dry_run and (url, name) not in ctx.property_plan):
            self._apply({(url, name): value}, self._quota(ctx, url))  # not a PROPPATCH's (an import)
            return
        if dry_run:
            ctx.property_plan[(url, name)] = value
            self._check(ctx.property_plan, ctx)
            return
        if ctx.property_outcome is None:
            try:
                self._apply(ctx.property_plan, self._quota(ctx, url), ctx)
                ctx.property_outcome = True
            except DAVError as exc:
                ctx.property_outcome = exc
        if isinstance(ctx.property_outcome, DAVError):
            raise ctx.property_outcome

    @staticmethod
    def _quota(ctx, url: str) -> int | None:
        return ctx.quota_bytes if ctx is not None and drive_of(url) == ctx.prefix else None

    def _weights(self, session: Session, urls) -> dict[tuple[str, str], int]:
        t = self._table
        rows = session.execute(select(t.c.url, t.c.name, self._size).where(t.c.url.in_(sorted(urls)))).all()
        return {(url, name): size for url, name, size in rows}

    @staticmethod
    def _outcome(plan: dict, weights: dict) -> int:
        """How many bytes ``plan`` adds (negative: frees); DAVError 507 if it would take a
        resource past MAX_RESOURCE_PROPERTY_BYTES."""
        after = dict(weights)
        for (url, name), value in plan.items():
            if value is None:
                after.pop((url, name), None)
            else:
                after[(url, name)] = len(name) + len(value)
        for url in {url for url, _ in plan}:
            if sum(size for (at, _), size in after.items() if at == url) > MAX_RESOURCE_PROPERTY_BYTES:
                raise DAVError(
                    HTTP_INSUFFICIENT_STORAGE,
                    f"the dead properties of one resource hold at most {MAX_RESOURCE_PROPERTY_BYTES} bytes in all",
                )
        return sum(after.values()) - sum(weights.values())

    def _check(self, plan: dict, ctx) -> None:
        """PROPPATCH's dry run: the caps and the quota for every property of the request so far."""
        with self._sessions() as session:
            weights = self._weights(session, {url for url, _ in plan})
        grows = self._outcome(plan, weights)
        url = next(iter(plan))[0]
        if self._usage is not None and grows > 0:
            try:
                self._usage.check_property_room(drive_of(url), grows, self._quota(ctx, url))
            except UploadTooLarge as exc:
                raise self._refused(ctx, str(exc)) from None

    @staticmethod
    def _refused(ctx, message: str) -> DAVError:
        """Past the quota: the whole PROPPATCH is answered 507 quota_exceeded, in the envelope
        (gateway/dav_app.py answers ``ctx.answer`` instead of wsgidav's 207)."""
        if ctx is not None:
            ctx.answer = (HTTP_INSUFFICIENT_STORAGE, "quota_exceeded", message)
        return coded_error(HTTP_INSUFFICIENT_STORAGE, "quota_exceeded", message)

    def _apply(self, plan: dict, quota: int | None, ctx=None) -> None:
        """Make ``plan`` ((url, name) -> value, None: removed) in one transaction with the count."""
        t = self._table

        def change(session: Session) -> int:
            weights = self._weights(session, {url for url, _ in plan})
            grows = self._outcome(plan, weights)  # the caps again: this drive's changes go one at a time
            for (url, name), value in plan.items():
                if value is None:
                    session.execute(delete(t).where(t.c.url == url, t.c.name == name))
                else:
                    _upsert(session, t, {"url": url, "name": name, "value": value}, ["url", "name"])
            return grows

        try:
            self._change(next(iter(plan))[0], quota, change)
        except UploadTooLarge as exc:
            raise self._refused(ctx, str(exc)) from None

    def _change(self, url: str, quota: int | None, change) -> None:
        """``change(session)`` (it returns the bytes it adds) counted in the drive of ``url``."""
        if self._usage is not None:
            self._usage.change_properties(drive_of(url), quota, change)
            return
        with self._sessions.begin() as session:
            change(session)

    def _remove(self, url: str, where) -> None:
        t = self._table

        def change(session: Session) -> int:
            freed = session.scalar(select(func.coalesce(func.sum(self._size), 0)).where(where)) or 0
            if freed:
                session.execute(delete(t).where(where))
            return -freed

        self._change(url, None, change)

    def remove_properties(self, norm_url, environ=None):
        self._remove(norm_url, self._table.c.url == norm_url)

    def remove_tree(self, url: str) -> None:
        self._remove(url, _at_or_under(self._table.c.url, url))

    def copy_properties(self, src_url, dest_url, environ=None):
        self.copy_tree(src_url, dest_url, with_children=False)

    def copy_tree(self, src_url: str, dest_url: str, *, with_children: bool) -> None:
        """Counted in the destination's drive, unchecked: a COPY reserves their bytes first, with
        its objects' (drive/service.py: DriveService.transfer's ``extra``)."""
        self._transfer(src_url, dest_url, with_children=with_children, move=False)

    def move_properties(self, src_url, dest_url, with_children, environ=None):
        self._transfer(src_url, dest_url, with_children=with_children, move=True)

    def _transfer(self, src_url: str, dest_url: str, *, with_children: bool, move: bool) -> None:
        """The properties of ``src_url`` (and of the URLs under it) replace those of their
        counterparts under ``dest_url``; a move then drops them at the source (within one drive:
        a MOVE never leaves it)."""
        t = self._table
        where = _at_or_under(t.c.url, src_url) if with_children else t.c.url == src_url

        def change(session: Session) -> int:
            rows = session.execute(select(t.c.url, t.c.name, t.c.value).where(where)).all()
            if move:
                session.execute(delete(t).where(where))
            targets = sorted({_retarget(src_url, dest_url, url) for url, _, _ in rows})
            if not targets:
                return 0
            replaced = session.scalar(select(func.coalesce(func.sum(self._size), 0)).where(t.c.url.in_(targets))) or 0
            session.execute(delete(t).where(t.c.url.in_(targets)))
            session.execute(
                t.insert(),
                [{"url": _retarget(src_url, dest_url, url), "name": name, "value": value} for url, name, value in rows],
            )
            carried = sum(len(name) + len(value) for _, name, value in rows)
            return (0 if move else carried) - replaced

        self._change(dest_url, None, change)


class DbLockManager(LockManager):
    """wsgidav's lock manager, whose conflict check and grant of a LOCK are one step across every
    gateway on the database (wsgidav holds a lock of its process only): on PostgreSQL they run
    under a transaction-scoped advisory lock; on SQLite, which one host serves, wsgidav's own."""

    def acquire(self, **request):
        with self.storage.granting():
            return super().acquire(**request)

    def _get_write_conflicts(self, url, depth, token_list, principal):
        # wsgidav asks for the locks of the URL and of each folder above it, one query each, on
        # every write (the HTTP PUT, POST and DELETE of /v1/files/ too); most paths have none.
        if not self.storage.any_on_path(url, under=depth == "infinity"):
            return DAVErrorCondition(PRECONDITION_CODE_LockConflict)
        return super()._get_write_conflicts(url, depth, token_list, principal)


class DbLockStorage(_InTable, LockStorageDict):
    """wsgidav's lock storage over the table ``dav_locks`` (one row a lock; ``root`` is the
    locked URL, ``expire`` the time it runs out in seconds since the epoch, as wsgidav has it)."""

    _FIELDS = ("token", "root", "principal", "scope", "type", "depth", "owner", "timeout", "expire")

    open = close = _flush = _InTable._no_step

    @contextmanager
    def granting(self) -> Iterator[None]:
        """Held while a LOCK is checked and granted: one at a time across PostgreSQL clients."""
        with self._sessions.begin() as session:
            if session.get_bind().dialect.name == "postgresql":
                session.execute(select(func.pg_advisory_xact_lock(_GRANTING_KEY)))
            yield

    def _live(self):
        expire = self._table.c.expire
        return or_(expire < 0, expire >= time.time())

    def _as_lock(self, row) -> dict:
        return dict(zip(self._FIELDS, row))

    def _select(self):
        return select(*(self._table.c[name] for name in self._FIELDS))

    def cleanup(self):
        """Delete the locks whose time ran out."""
        with self._sessions.begin() as session:
            self._sweep(session)

    def _sweep(self, session: Session) -> None:
        t = self._table
        session.execute(delete(t).where(t.c.expire >= 0, t.c.expire < time.time()))

    def clear(self):
        with self._sessions.begin() as session:
            session.execute(delete(self._table))

    def get(self, token):
        t = self._table
        with self._sessions() as session:
            row = session.execute(self._select().where(t.c.token == token)).first()
        if row is None:
            return None
        lock = self._as_lock(row)
        if 0 <= lock["expire"] < time.time():
            self.delete(token)
            return None
        return lock

    def create(self, path, lock):
        lock["root"] = normalize_lock_root(path)
        timeout = float(lock.get("timeout") if lock.get("timeout") is not None else self.LOCK_TIME_OUT_DEFAULT)
        if timeout < 0 or timeout > self.LOCK_TIME_OUT_MAX:
            timeout = self.LOCK_TIME_OUT_MAX
        lock["timeout"] = timeout
        lock["expire"] = time.time() + timeout
        validate_lock(lock)
        lock["token"] = generate_lock_token()
        with self._sessions.begin() as session:
            self._sweep(session)  # LOCKs are rare: the expired ones go here
            session.execute(self._table.insert().values(**{name: lock[name] for name in self._FIELDS}))
        return lock

    def refresh(self, token, *, timeout):
        if timeout < 0 or timeout > self.LOCK_TIME_OUT_MAX:
            timeout = self.LOCK_TIME_OUT_MAX
        t = self._table
        with self._sessions.begin() as session:
            session.execute(update(t).where(t.c.token == token).values(timeout=timeout, expire=time.time() + timeout))
        lock = self.get(token)
        if lock is None:
            raise ValueError(f"no lock {token}")
        return lock

    def delete(self, token):
        t = self._table
        with self._sessions.begin() as session:
            return session.execute(delete(t).where(t.c.token == token)).rowcount > 0

    def get_lock_list(self, path, *, include_root, include_children, token_only):
        t = self._table
        root = normalize_lock_root(path)
        base = root.rstrip("/")
        wanted = []
        if include_root:
            wanted.append(t.c.root == root)
        if include_children:
            wanted.append((t.c.root >= base + "/") & (t.c.root < base + "0"))
        with self._sessions() as session:
            rows = session.execute(self._select().where(or_(*wanted), self._live())).all()
        locks = [self._as_lock(row) for row in rows]
        return [lock["token"] for lock in locks] if token_only else locks

    def any_on_path(self, url: str, *, under: bool) -> bool:
        """Whether a live lock is on ``url``, on a folder above it, or (``under``) below it: one query."""
        t = self._table
        root = normalize_lock_root(url)
        segments = root.strip("/").split("/")
        above = ["/"] + ["/" + "/".join(segments[:n]) for n in range(1, len(segments) + 1)]
        where = t.c.root.in_(above)
        if under:
            where = or_(where, _at_or_under(t.c.root, root))
        with self._sessions() as session:
            return session.execute(select(t.c.token).where(where, self._live()).limit(1)).first() is not None

    def roots_under(self, url: str) -> list[str]:
        """Unquoted, without a trailing slash: the locked URLs at or under ``url``."""
        t = self._table
        with self._sessions() as session:
            roots = session.scalars(select(t.c.root).where(_at_or_under(t.c.root, url), self._live()).distinct()).all()
        return [unquote(root).rstrip("/") or "/" for root in roots]


def import_sqlite_properties(path: Path, properties: DbPropertyManager) -> int:
    """Copy the dead properties of an older server's ``webdav.sqlite3`` (a table ``dav_properties``
    of ref URL → pickled {name: XML}, written by this server itself) into the database, once:
    the file is then renamed ``*.imported``. Its locks are not kept (they expire anyway)."""
    if not path.exists():
        return 0
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)  # never creates it
    except sqlite3.OperationalError:
        return 0  # another process of this data directory imported it a moment ago
    try:
        rows = connection.execute("SELECT k, v FROM dav_properties").fetchall()
    except sqlite3.OperationalError:
        rows = []  # a file that never held a property
    finally:
        connection.close()
    count = 0
    for url, blob in rows:
        for name, value in pickle.loads(blob).items():
            properties.write_property(url, name, value)
            count += 1
    for suffix in ("", "-wal", "-shm"):  # with its write-ahead log, which an old server left behind
        try:
            path.with_name(path.name + suffix).rename(path.with_name(path.name + ".imported" + suffix))
        except FileNotFoundError:
            pass  # none, or renamed by that other process
    return count


def note_folder_extras(folder) -> None:
    """Read which URLs at or under ``folder`` (a folder resource) have dead properties or locks:
    one range query each, so a PROPFIND asks nothing more for the members that have none (most).

    Kept in the request's environ for this PROPFIND only (dropped by any write,
    :func:`~drive.dav.context.forget_after_write`), so it is never older than the request.
    """
    provider, environ = folder.provider, folder.environ
    ref = folder.get_ref_url()
    base = unquote(ref).rstrip("/")
    properties = provider.prop_manager
    storage = getattr(provider.lock_manager, "storage", None)
    if not isinstance(properties, DbPropertyManager) or not isinstance(storage, DbLockStorage):
        return
    with_properties = frozenset(properties.urls_under(ref))
    with_locks = frozenset(storage.roots_under(ref))
    environ.setdefault(EXTRAS_KEY, {})[base or "/"] = (with_properties, with_locks)


def remove_property_tree(provider: DAVProvider, ref_url: str) -> None:
    """Drop the dead properties of ``ref_url`` and of everything under it."""
    properties = provider.prop_manager
    if isinstance(properties, DbPropertyManager):
        properties.remove_tree(ref_url)
    elif properties is not None:
        properties.remove_properties(ref_url)
