"""Dead properties (PROPPATCH) and locks, kept in SQLite under the data directory
(:class:`SqlitePropertyManager`, :class:`SqliteLockStorage`), keyed by the object key
(``/users/7/a/b``), so both mount points see the same ones and both survive a restart.
A PROPFIND reads those of a whole folder with one range query each
(:func:`note_folder_extras`), not two queries per member."""

from __future__ import annotations

import pickle
import sqlite3
import threading
from collections.abc import MutableMapping
from pathlib import Path
from urllib.parse import unquote

from wsgidav import util
from wsgidav.dav_provider import DAVProvider
from wsgidav.lock_man.lock_storage import LockStorageDict
from wsgidav.prop_man.property_manager import PropertyManager

from drive.dav.context import EXTRAS_KEY, listed_without

_LOCK_URL_PREFIX = "URL2TOKEN:"  # wsgidav's LockStorageDict key for a URL's lock tokens


class SqliteMap(MutableMapping):
    """A persistent ``str`` → picklable mapping in one SQLite table, safe across threads
    (and processes: WAL). It stands in for the ``shelve`` wsgidav's managers use."""

    def __init__(self, path: Path, table: str):
        if not table.isidentifier():
            raise ValueError(table)
        self._table = table
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (k TEXT PRIMARY KEY, v BLOB NOT NULL)")

    def _query(self, sql: str, args: tuple = ()) -> list:
        with self._lock:
            return self._conn.execute(sql.format(t=self._table), args).fetchall()

    def __getitem__(self, key: str):
        rows = self._query("SELECT v FROM {t} WHERE k = ?", (key,))
        if not rows:
            raise KeyError(key)
        return pickle.loads(rows[0][0])

    def __setitem__(self, key: str, value) -> None:
        self._query("INSERT OR REPLACE INTO {t} (k, v) VALUES (?, ?)", (key, pickle.dumps(value)))

    def __delitem__(self, key: str) -> None:
        with self._lock:
            deleted = self._conn.execute(f"DELETE FROM {self._table} WHERE k = ?", (key,)).rowcount
        if not deleted:
            raise KeyError(key)

    def __contains__(self, key) -> bool:
        return bool(self._query("SELECT 1 FROM {t} WHERE k = ?", (key,)))

    def __iter__(self):
        return iter([row[0] for row in self._query("SELECT k FROM {t}")])

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM {t}")[0][0]

    def items(self):
        return [(k, pickle.loads(v)) for k, v in self._query("SELECT k, v FROM {t}")]

    def keys_under(self, prefix: str) -> list[str]:
        """Keys equal to ``prefix`` or below it as a URL path."""
        base = prefix.rstrip("/")
        rows = self._query("SELECT k FROM {t} WHERE k >= ? AND k < ?", (base, base + "\U0010ffff"))
        return [row[0] for row in rows if util.is_equal_or_child_uri(base or "/", row[0])]

    def clear(self) -> None:
        self._query("DELETE FROM {t}")

    def sync(self) -> None:
        pass

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SqlitePropertyManager(PropertyManager):
    """wsgidav's property manager with its dictionary in SQLite (dead properties survive restarts)."""

    def __init__(self, path: Path):
        super().__init__()
        self._path = Path(path)
        self._dict = SqliteMap(self._path, "dav_properties")
        self._loaded = True

    def __repr__(self) -> str:
        return f"SqlitePropertyManager({self._path})"

    def _lazy_open(self):
        pass

    def _sync(self):
        pass

    def _close(self):
        pass  # the connection lives as long as the process

    def urls_under(self, url: str) -> list[str]:
        """Unquoted, without a trailing slash: the URLs at or under ``url`` with dead properties."""
        return [unquote(key).rstrip("/") or "/" for key in self._dict.keys_under(url)]

    def get_properties(self, norm_url, environ=None):
        if environ is not None and listed_without(environ, norm_url, locks=False):
            return []
        return super().get_properties(norm_url, environ)

    def get_property(self, norm_url, name, environ=None):
        if environ is not None and listed_without(environ, norm_url, locks=False):
            return None
        return super().get_property(norm_url, name, environ)

    def _retarget(self, src_url: str, dest_url: str, url: str) -> str:
        return dest_url.rstrip("/") + url[len(src_url.rstrip("/")) :]

    def move_properties(self, src_url, dest_url, with_children, environ=None):
        urls = self._dict.keys_under(src_url) if with_children else [src_url]
        for url in urls:
            if url in self._dict:
                self._dict[self._retarget(src_url, dest_url, url)] = self._dict[url]
                del self._dict[url]

    def copy_tree(self, src_url: str, dest_url: str, *, with_children: bool) -> None:
        urls = self._dict.keys_under(src_url) if with_children else [src_url]
        for url in urls:
            if url in self._dict:
                self._dict[self._retarget(src_url, dest_url, url)] = self._dict[url]

    def remove_tree(self, url: str) -> None:
        for key in self._dict.keys_under(url):
            del self._dict[key]


class SqliteLockStorage(LockStorageDict):
    """wsgidav's lock storage with its dictionary in SQLite (locks survive restarts)."""

    def __init__(self, path: Path):
        super().__init__()
        self._path = Path(path)

    def __repr__(self) -> str:
        return f"SqliteLockStorage({self._path})"

    def open(self):
        self._dict = SqliteMap(self._path, "dav_locks")

    def close(self):
        self._dict = None

    def urls_under(self, key: str) -> list[str]:
        """The ``URL2TOKEN:`` keys at or under ``key`` (the URLs with locks, expired ones too)."""
        return self._dict.keys_under(key) if self._dict is not None else []

    def _flush(self):
        pass


def note_folder_extras(folder) -> None:
    """Read which URLs at or under ``folder`` (a folder resource) have dead properties or locks: one range query
    each, so a PROPFIND asks nothing more for the members that have none (most of them).

    Kept in the request's environ for this PROPFIND only (dropped by any write,
    :func:`_invalidate`), so it is never older than the request.
    """
    provider, environ = folder.provider, folder.environ
    ref = folder.get_ref_url()
    base = unquote(ref).rstrip("/")
    properties = provider.prop_manager
    storage = getattr(provider.lock_manager, "storage", None)
    if not isinstance(properties, SqlitePropertyManager) or not isinstance(storage, SqliteLockStorage):
        return
    with_properties = frozenset(properties.urls_under(ref))
    # Lock storage keys are "URL2TOKEN:" + the (quoted) ref URL without a trailing slash.
    lock_keys = storage.urls_under(_LOCK_URL_PREFIX + (ref.rstrip("/") or "/"))
    with_locks = frozenset(unquote(key[len(_LOCK_URL_PREFIX) :]).rstrip("/") or "/" for key in lock_keys)
    environ.setdefault(EXTRAS_KEY, {})[base or "/"] = (with_properties, with_locks)


def remove_property_tree(provider: DAVProvider, ref_url: str) -> None:
    """Drop the dead properties of ``ref_url`` and of everything under it."""
    properties = provider.prop_manager
    if isinstance(properties, SqlitePropertyManager):
        properties.remove_tree(ref_url)
    elif properties is not None:
        properties.remove_properties(ref_url)
