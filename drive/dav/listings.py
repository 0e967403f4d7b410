"""Folder listings of the store, kept briefly: a folder's listing is served again for
:data:`LISTING_TTL` seconds (:class:`ListingCache`) and dropped on every write the gateway
makes or sees under it (:func:`invalidate_listing`)."""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict

from drive.store import ObjectStore, iter_entries

LISTING_TTL = 2.0  # seconds a folder's listing is served again without asking the store
LISTING_MAX_FOLDERS = 64
LISTING_MAX_ENTRIES = 100_000  # all cached folders together (about 500 bytes an entry: 50 MB at most)


class ListingCache:
    """Recent delimited listings of one store's folders, by folder key ("users/7/a/").

    Every write the gateway makes (WebDAV here, and the HTTP routes of
    gateway/drive_http.py) drops the listings it could change, through
    :func:`invalidate_listing`. Writes it cannot see are those a client makes
    straight to the store with a presigned URL (the 307 of a PUT with
    ``Expect: 100-continue``, the URL a body-less POST returns) and those of
    other processes sharing the bucket: a listing may miss them for up to
    :data:`LISTING_TTL` seconds, counted from when the listing began.
    """

    def __init__(
        self, ttl: float = LISTING_TTL, max_folders: int = LISTING_MAX_FOLDERS, max_entries: int = LISTING_MAX_ENTRIES
    ):
        self.ttl = ttl
        self.max_folders = max_folders
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._folders: OrderedDict[str, tuple[float, list]] = OrderedDict()
        self._entries = 0
        self._generation = 0  # bumped by every invalidation: a listing that raced one is not kept
        # Folders a write was recently checked into (none of their names is a file), by folder
        # key: for the TTL, drive/names.py asks the store no more about them.
        self._known_folders: dict[str, float] = {}

    def entries(self, store: ObjectStore, folder: str) -> list:
        """The members of ``folder`` (ObjectInfo and CommonPrefix, as iter_entries yields them)."""
        now = time.monotonic()
        with self._lock:
            hit = self._folders.get(folder)
            if hit is not None and now - hit[0] < self.ttl:
                self._folders.move_to_end(folder)
                return hit[1]
            generation = self._generation
        listed = list(iter_entries(store, folder, "/"))
        with self._lock:
            if generation == self._generation and len(listed) <= self.max_entries:
                self._drop(folder)
                self._folders[folder] = (now, listed)
                self._entries += len(listed)
                while len(self._folders) > self.max_folders or self._entries > self.max_entries:
                    self._drop(next(iter(self._folders)))
        return listed

    def is_known_folder(self, folder: str) -> bool:
        with self._lock:
            seen = self._known_folders.get(folder)
            return seen is not None and time.monotonic() - seen < self.ttl

    def note_folders(self, folders: list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._known_folders) > self.max_entries:
                self._known_folders.clear()
            for folder in folders:
                self._known_folders[folder] = now

    def forget_folder(self, key: str) -> None:
        """``key`` is about to be a file: it is no known folder (its listings stay)."""
        with self._lock:
            self._known_folders.pop(key.rstrip("/") + "/", None)

    def invalidate(self, key: str) -> None:
        """Forget the folders that hold ``key`` (at any depth) and those under it."""
        with self._lock:
            self._generation += 1
            for folder in [f for f in self._folders if key.startswith(f) or f.startswith(key)]:
                self._drop(folder)
            for folder in [f for f in self._known_folders if f.startswith(key)]:
                del self._known_folders[folder]  # a file written as "a" ends "a/" being known

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._folders.clear()
            self._known_folders.clear()
            self._entries = 0

    def _drop(self, folder: str) -> None:
        hit = self._folders.pop(folder, None)
        if hit is not None:
            self._entries -= len(hit[1])


_LISTINGS: weakref.WeakKeyDictionary[object, ListingCache] = weakref.WeakKeyDictionary()
_LISTINGS_LOCK = threading.Lock()


def listing_cache(store: ObjectStore) -> ListingCache:
    """The listing cache of ``store`` (one per store object, gone with it)."""
    with _LISTINGS_LOCK:
        cache = _LISTINGS.get(store)
        if cache is None:
            cache = _LISTINGS[store] = ListingCache()
        return cache


def invalidate_listing(store: ObjectStore, key: str) -> None:
    """Call after writing or deleting ``key`` (an object, or a folder prefix ending in "/")."""
    with _LISTINGS_LOCK:
        cache = _LISTINGS.get(store)
    if cache is not None:
        cache.invalidate(key)
