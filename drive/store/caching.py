"""A store that remembers its folder listings, wrapped around the real one (as rclone's cache
wraps a remote): the gateway holds a :class:`CachingStore`, so every write it makes, HTTP or
WebDAV, goes through here and drops the listings it changes. No write site invalidates by hand.

A cached listing of a folder is served again only while it is provably current, checked on
every use with one small database query (:class:`ChangeMarks`, the drive's row):

* **writes through this gateway** drop the listings of the folders that hold the key (and all
  under a folder's key) at once, before the write returns;
* **writes through another gateway** (replicas on one database) bump the drive's *generation*
  after the store has the change; a listing made under an older generation is listed again;
* **presigned PUTs** (a 307, a mint: the client writes straight to the store) are recorded when
  the URL is handed out (:meth:`CachingStore.presign_put`). While such a URL is valid, a cached
  listing of a folder that holds its key is checked with one HEAD per URL (at most
  :data:`URLS_CHECKED`; more, and the folder is listed again): an object that differs from the
  listed one means the listing is made again.

So a listing is never stale for any of these writes (bound 0). Only a write no gateway made or
handed a URL for (another tool writing the bucket with its own keys) goes unseen, for at most
:data:`LISTING_MAX_AGE` seconds. The cache is bounded: :data:`LISTING_MAX_FOLDERS` folders and
:data:`LISTING_MAX_ENTRIES` entries in all, and one drive holds at most
:data:`DRIVE_MAX_FOLDERS` of the folders, so one tenant listing many folders pushes out only its
own; a drive's writes and marks touch only its own listings.

A listing the cache cannot answer is streamed: the caller gets the store's first page as soon
as the store returns it, and the rest page by page as it reads on (a PROPFIND writes its first
members before the store has listed the second page). It is kept once read to its end, unless
a write here raced it or the folder holds more than :data:`FOLDER_MAX_ENTRIES` entries (listed
from the store each time: memory stays flat in a folder's size).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from itertools import chain
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from drive.keys import drive_of
from drive.store import CommonPrefix, ListPage, ObjectInfo, ObjectStore, StreamedPut, UploadedPart

LISTING_MAX_AGE = 300.0  # seconds: a write made behind every gateway's back is seen after this at most
KNOWN_FOLDER_TTL = 2.0  # seconds drive/names.py trusts that a folder a write went into is no file
LISTING_MAX_FOLDERS = 64
LISTING_MAX_ENTRIES = 100_000  # all cached folders together (about 330 bytes an entry: 33 MB at most)
LISTING_PAGE = 1000  # keys per list call: the most S3 answers in one
FIRST_PAGE = 100  # keys in a listing's first call: its first entries sooner (one more call past 100 entries)
FOLDER_MAX_ENTRIES = 20_000  # one folder's listing kept at most; a bigger one is streamed from the store each time
DRIVE_MAX_FOLDERS = 16  # one drive's share of the folders
URLS_CHECKED = 8  # presigned PUTs still out under a folder that a cached listing of it HEADs; more: listed again


class ChangeMarks(Protocol):
    """What the gateways sharing a bucket tell each other about a drive (the database,
    :class:`drive.changes.DbChangeMarks`)."""

    def generation(self, drive: str) -> int:
        """The drive's generation now (0: never changed)."""

    def bump(self, drive: str) -> None:
        """The drive changed (after the store has the change)."""

    def urls_out(self, drive: str, keys: list[str], expires_in: int) -> None:
        """Presigned PUTs of ``keys`` were handed out, valid for ``expires_in`` seconds."""

    def look(self, drive: str, folder: str, limit: int) -> tuple[int, list[str]]:
        """The drive's generation and the keys under ``folder`` with a presigned PUT still
        valid (at most ``limit``), in one read."""


@dataclass
class _Listing:
    entries: list
    generation: int
    listed_at: float


@dataclass
class _ChangingPut:
    """A streamed PUT whose end drops the listings it changes (as :meth:`CachingStore.put_object`)."""

    inner: StreamedPut
    changed: Callable[[], None]

    def send(self, chunks) -> None:
        self.inner.send(chunks)

    def finish(self) -> str:
        try:
            return self.inner.finish()
        finally:
            self.changed()

    def abort(self) -> None:
        self.inner.abort()


@dataclass(frozen=True)
class CacheLimits:
    """How long a listing is kept and how much of them: the module's note says why each."""

    max_age: float = LISTING_MAX_AGE
    max_folders: int = LISTING_MAX_FOLDERS
    max_entries: int = LISTING_MAX_ENTRIES
    drive_max_folders: int = DRIVE_MAX_FOLDERS
    folder_max_entries: int = FOLDER_MAX_ENTRIES


class CachingStore:
    """An :class:`~drive.store.ObjectStore` over ``inner`` whose folder listings
    (:meth:`folder_entries`) are kept while current (see the module's note)."""

    def __init__(self, inner: ObjectStore, marks: ChangeMarks, limits: CacheLimits = CacheLimits()):
        self.inner = inner
        self.marks = marks
        self.limits = limits
        self.page_size = LISTING_PAGE
        self._lock = threading.Lock()
        self._folders: OrderedDict[str, _Listing] = OrderedDict()
        self._entries = 0
        self._dropped = 0  # bumped by every local write: a listing that raced one is not kept
        # Folders a write was recently checked into (none of their names is a file), by folder
        # key: for KNOWN_FOLDER_TTL, drive/names.py asks the store no more about them.
        self._known_folders: dict[str, float] = {}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # what a store has beyond the protocol (its endpoint)

    # ------------------------------------------------------------ listings

    def folder_entries(self, folder: str) -> Iterator[ObjectInfo | CommonPrefix]:
        """The members of ``folder`` one by one (:meth:`folder_pages`, flattened)."""
        return chain.from_iterable(self.folder_pages(folder))

    def folder_pages(self, folder: str) -> Iterator[list[ObjectInfo | CommonPrefix]]:
        """The members of ``folder`` (ObjectInfo and CommonPrefix, as a delimited listing yields
        them), a page at a time: from the cache while current, else streamed from the store.

        The store's first page is read before this returns (a store that is down raises here,
        before a caller has answered anything); the others as the caller reads on. A listing
        read to its end is kept when it raced no write here and holds at most
        :data:`FOLDER_MAX_ENTRIES` entries; a bigger folder is listed from the store every
        time, so no folder's size sets the memory a listing takes."""
        drive = drive_of(folder)
        with self._lock:
            hit = self._folders.get(folder)
        if hit is not None and time.monotonic() - hit.listed_at < self.limits.max_age:
            generation, urls = self.marks.look(drive, folder, URLS_CHECKED + 1)
            if generation == hit.generation and self._urls_listed(hit.entries, folder, urls):
                with self._lock:
                    if self._folders.get(folder) is hit:
                        self._folders.move_to_end(folder)
                entries, size = hit.entries, self.page_size
                return (entries[start : start + size] for start in range(0, len(entries), size))
        else:
            generation = self.marks.generation(drive)
        # The generation is read before the store is listed: a change that lands meanwhile
        # bumps it after, and the next use lists again.
        with self._lock:
            dropped = self._dropped
        listed_at = time.monotonic()
        first = self.inner.list_page(folder, "/", max_keys=min(FIRST_PAGE, self.page_size))
        return self._streamed(folder, first, _Listing([], generation, listed_at), dropped)

    def _streamed(self, folder: str, page: ListPage, listing: _Listing, dropped: int) -> Iterator[list]:
        """The pages from ``page`` on, kept in ``listing`` as they pass while the folder is
        small enough, and cached once the last one has been read."""
        keep = min(self.limits.folder_max_entries, self.limits.max_entries)
        kept: list | None = listing.entries
        while True:
            if kept is not None and len(kept) + len(page.entries) <= keep:
                kept.extend(page.entries)
            else:
                kept = None  # too big to keep: what passed is let go
            yield page.entries
            if not page.next_token:
                break
            page = self.inner.list_page(folder, "/", page.next_token, max_keys=self.page_size)
        if kept is None:
            return
        with self._lock:
            if dropped == self._dropped:
                self._drop(folder)
                self._folders[folder] = _Listing(kept, listing.generation, listing.listed_at)
                self._entries += len(kept)
                self._trim(drive_of(folder))

    def _urls_listed(self, entries: list, folder: str, urls: list[str]) -> bool:
        """Whether the objects behind the presigned PUTs still out under ``folder`` are as the
        listing shows them (a HEAD each; more than URLS_CHECKED: not checked, False)."""
        if not urls:
            return True
        if len(urls) > URLS_CHECKED:
            return False
        listed = {e.key: e for e in entries if isinstance(e, ObjectInfo)}
        prefixes = {e.prefix for e in entries if isinstance(e, CommonPrefix)}
        for key in urls:
            rest = key[len(folder) :]
            found = self.inner.head(key)
            if "/" in rest:  # deeper: its folder must be listed once it exists
                if found is not None and folder + rest.split("/", 1)[0] + "/" not in prefixes:
                    return False
                continue
            seen = listed.get(key)
            if (found is None) != (seen is None):
                return False
            if found is not None and (found.etag.strip('"') != seen.etag.strip('"') or found.size != seen.size):
                return False
        return True

    def _trim(self, drive: str) -> None:
        mine = [f for f in self._folders if f.startswith(drive)]
        for folder in mine[: max(0, len(mine) - self.limits.drive_max_folders)]:
            self._drop(folder)
        while len(self._folders) > self.limits.max_folders or self._entries > self.limits.max_entries:
            self._drop(next(iter(self._folders)))

    def _drop(self, folder: str) -> None:
        hit = self._folders.pop(folder, None)
        if hit is not None:
            self._entries -= len(hit.entries)

    def cached_folders(self) -> list[str]:
        with self._lock:
            return list(self._folders)

    def clear(self) -> None:
        with self._lock:
            self._dropped += 1
            self._folders.clear()
            self._known_folders.clear()
            self._entries = 0

    # ------------------------------------------------------------ writes

    def changed(self, keys: list[str]) -> None:
        """After the store changed ``keys`` (objects, or folders' keys ending in "/"): forget the
        folders that hold them (at any depth) and those under them, here and on every replica.
        The writes below call it; a batch written through ``inner`` (a folder's copies) calls it
        once, with the folder's key, so other replicas are told once, not once an object."""
        with self._lock:
            self._dropped += 1
            for key in keys:
                for folder in [f for f in self._folders if key.startswith(f) or f.startswith(key)]:
                    self._drop(folder)
                for folder in [f for f in self._known_folders if f.startswith(key)]:
                    del self._known_folders[folder]  # a file written as "a" ends "a/" being known
        for drive in dict.fromkeys(drive_of(key) for key in keys):
            self.marks.bump(drive)

    def put_object(self, key: str, data: bytes, content_type: str | None = None) -> str:
        try:
            return self.inner.put_object(key, data, content_type)
        finally:
            self.changed([key])

    def open_put(self, key: str, size: int, content_type: str | None = None) -> StreamedPut:
        return _ChangingPut(self.inner.open_put(key, size, content_type), lambda: self.changed([key]))

    def delete(self, key: str) -> None:
        try:
            self.inner.delete(key)
        finally:
            self.changed([key])

    def delete_many(self, keys: list[str]) -> None:
        try:
            self.inner.delete_many(keys)
        finally:
            if keys:
                self.changed(keys)

    def copy(self, src_key: str, dst_key: str) -> str:
        try:
            return self.inner.copy(src_key, dst_key)
        finally:
            self.changed([dst_key])

    def complete_multipart(self, key: str, upload_id: str, parts: list[UploadedPart]) -> str:
        try:
            return self.inner.complete_multipart(key, upload_id, parts)
        finally:
            self.changed([key])

    @property
    def put_etag_is_md5(self) -> bool:
        return getattr(self.inner, "put_etag_is_md5", False)

    @property
    def multipart_etag_is_md5(self) -> bool:
        return getattr(self.inner, "multipart_etag_is_md5", False)

    @property
    def serving(self) -> bool:
        return getattr(self.inner, "serving", True)

    def presign_put(
        self, key: str, expires_in: int, content_length: int | None = None, content_md5: str | None = None
    ) -> str:
        """A presigned PUT, recorded first: until it expires, listings of its folders check it."""
        return self.presign_puts([(key, content_length, content_md5)], expires_in)[0]

    def presign_puts(self, wanted: list[tuple[str, int | None, str | None]], expires_in: int) -> list[str]:
        """Presigned PUTs of (key, length, Content-MD5), recorded first (one write for each drive
        among them), as :meth:`presign_put`."""
        drives: dict[str, list[str]] = {}
        for key, _, _ in wanted:
            drives.setdefault(drive_of(key), []).append(key)
        for drive, keys in drives.items():
            self.marks.urls_out(drive, keys, expires_in)
        for key, _, _ in wanted:
            self._forget_known(key)
        return [
            self.inner.presign_put(key, expires_in, content_length=length, content_md5=md5)
            for key, length, md5 in wanted
        ]

    # ------------------------------------------------------------ reads and the rest, as they are

    def ensure_bucket(self) -> None:
        self.inner.ensure_bucket()

    def head(self, key: str) -> ObjectInfo | None:
        return self.inner.head(key)

    def list_page(
        self, prefix: str, delimiter: str | None = None, token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        return self.inner.list_page(prefix, delimiter=delimiter, token=token, max_keys=max_keys)

    def presign_get(self, key: str, expires_in: int, content_type: str | None = None) -> str:
        return self.inner.presign_get(key, expires_in, content_type)

    def create_multipart(self, key: str, content_type: str | None = None) -> str:
        return self.inner.create_multipart(key, content_type)

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> UploadedPart:
        return self.inner.upload_part(key, upload_id, number, data)

    def open_part(self, key: str, upload_id: str, number: int, size: int) -> StreamedPut:
        return self.inner.open_part(key, upload_id, number, size)

    def presign_part(
        self, key: str, upload_id: str, number: int, expires_in: int, content_length: int, content_md5: str | None = None
    ) -> str:
        """A part's URL changes no object (the gateway completes the upload: :meth:`complete_multipart`)."""
        return self.inner.presign_part(key, upload_id, number, expires_in, content_length, content_md5)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self.inner.abort_multipart(key, upload_id)

    def abort_stale_multiparts(self, older_than_seconds: float) -> int:
        return self.inner.abort_stale_multiparts(older_than_seconds)

    # ------------------------------------------------------------ folders known to be folders (drive/names.py)

    def is_known_folder(self, folder: str) -> bool:
        with self._lock:
            seen = self._known_folders.get(folder)
            return seen is not None and time.monotonic() - seen < KNOWN_FOLDER_TTL

    def note_folders(self, folders: list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._known_folders) > self.limits.max_entries:
                self._known_folders.clear()
            for folder in folders:
                self._known_folders[folder] = now

    def forget_folder(self, key: str) -> None:
        """``key`` is about to be a file: it is no known folder (its listings stay)."""
        self._forget_known(key)

    def _forget_known(self, key: str) -> None:
        with self._lock:
            self._known_folders.pop(key.rstrip("/") + "/", None)
