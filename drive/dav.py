"""WebDAV over the object store: a wsgidav provider for one drive prefix per request.

One :class:`ObjectStoreProvider` serves every caller: the drive it shows is read
from ``environ[ENVIRON_KEY]`` (a :class:`DavContext` the ASGI wrapper in
gateway/dav_app.py puts there after authenticating the request), never from the
URL alone. Every path goes through :mod:`drive.keys`, so nothing escapes the
caller's prefix.

How a drive looks as WebDAV:

* a **file** is an object; its live properties come from the store (size, ETag,
  Last-Modified, Content-Type).
* a **folder** is a key prefix: it exists while any key starts with ``rel/``.
  MKCOL makes an empty folder exist by writing an empty marker object
  ``rel/.kgpu-folder`` (a key ending in ``/`` would do on S3, but ``rclone serve
  s3`` cannot store one). Markers are hidden from every listing, WebDAV and HTTP
  (:func:`drive.listing.is_hidden`), and the name is refused for writes.
* a folder's members come from one delimited list call per 1,000 keys: the list
  already carries size, ETag and Last-Modified, so no member is ever HEADed.
* ``shared/`` at the root of my drive is virtual and read-only: one folder per
  organisation the caller may read, mapped to ``orgs/{slug}/``. The name is
  reserved there (a real ``users/{id}/shared/`` folder is hidden by it).
* COPY and MOVE are server-side copies in the store (then deletes, for MOVE),
  for files and whole folders, run 8 at a time.
* dead properties (PROPPATCH) and locks live in SQLite under the data directory
  (:class:`SqlitePropertyManager`, :class:`SqliteLockStorage`), keyed by the
  object key (``/users/7/a/b``), so both mount points see the same ones and
  both survive a restart. A PROPFIND reads those of a whole folder with one
  range query each (:func:`_note_folder_extras`), not two queries per member.
* a folder's listing is kept for :data:`LISTING_TTL` seconds (:class:`ListingCache`),
  dropped on every write the gateway makes or sees under it (:func:`invalidate_listing`).
* a PROPFIND Depth 1 of a folder whose members have no dead properties or locks,
  asking for allprop or named properties (not the quota ones), is written from the
  listing with string templates (:func:`_fast_propfind`), the same bytes wsgidav
  would write, without one resource object or XML element per member.
"""

from __future__ import annotations

import asyncio
import functools
import io
import mimetypes
import os
import pickle
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections import OrderedDict
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote, unquote

from wsgidav import util, xml_tools
from wsgidav.dav_error import (
    HTTP_BAD_REQUEST,
    HTTP_FORBIDDEN,
    HTTP_INSUFFICIENT_STORAGE,
    HTTP_NOT_FOUND,
    HTTP_REQUEST_ENTITY_TOO_LARGE,
    HTTP_REQUEST_TIMEOUT,
    HTTP_SERVICE_UNAVAILABLE,
    DAVError,
)
from wsgidav.dav_provider import DAVCollection, DAVNonCollection, DAVProvider
from wsgidav.lock_man.lock_storage import LockStorageDict
from wsgidav.prop_man.property_manager import PropertyManager
from wsgidav.xml_tools import etree

from drive import keys
from drive.keys import DrivePath, InvalidPath
from drive.listing import FOLDER_MARKER, is_hidden
from drive.store import (
    CommonPrefix,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StoreUnavailable,
    delete_prefix,
    iter_entries,
    iter_objects,
)
from drive.uploads import (
    BodyTimeout,
    IncompleteBody,
    UploadTooLarge,
    choose_part_size,
    receive_body,
    stream_to_store,
)

ENVIRON_KEY = "kgpu.dav"
_CACHE_KEY = "kgpu.dav.cache"
_DEST_EXISTED_KEY = "kgpu.dav.dest_existed"
_EXTRAS_KEY = "kgpu.dav.extras"  # folder ref URL -> (ref URLs with dead properties, lock roots), this request
_LOCK_URL_PREFIX = "URL2TOKEN:"  # wsgidav's LockStorageDict key for a URL's lock tokens
SHARED = "shared"  # the virtual read-only subtree at the root of my drive
_IGNORED_CONTENT_TYPES = {"", "application/x-www-form-urlencoded"}
COPY_THREADS = 8
_CLOSE = ("Connection", "close")  # after a body that did not arrive whole: its rest may still be coming


@dataclass
class DavContext:
    """Who is calling and which drive they see; one per request."""

    store: ObjectStore
    prefix: str  # the caller's own drive, "users/7/"
    principal: str  # lock owner, "user:7"
    load_orgs: Callable[[], list[str]] = list  # slugs of the orgs the caller may read
    usage: object | None = None  # gateway.quota.UsageBook: used_bytes(prefix), add(prefix, delta)
    quota_bytes: int | None = None
    part_size: int = 8 << 20
    unknown_length_part_size: int = 16 << 20
    presign_expires: int = 3600
    _orgs: list[str] | None = field(default=None, repr=False)

    def org_slugs(self) -> list[str]:
        if self._orgs is None:
            self._orgs = list(self.load_orgs())
        return self._orgs

    def used_bytes(self) -> int:
        return self.usage.used_bytes(self.prefix) if self.usage is not None else 0

    def add_usage(self, prefix: str, delta: int) -> None:
        if self.usage is not None and delta and prefix == self.prefix:
            self.usage.add(prefix, delta)

    def reserve_room(self, prefix: str, incoming: int) -> int:
        """Reserve ``incoming`` bytes in the caller's drive before a copy moves any (507 when they
        do not fit; 0 when nothing needs reserving); close it with :meth:`settle_room`."""
        if self.usage is None or self.quota_bytes is None or prefix != self.prefix or incoming <= 0:
            return 0
        try:
            return self.usage.open(prefix, incoming, self.quota_bytes)
        except UploadTooLarge as exc:
            raise DAVError(HTTP_INSUFFICIENT_STORAGE, str(exc)) from None

    def settle_room(self, prefix: str, reserved: int, added: int) -> None:
        """What a write really added (0: it failed) counts; the rest of its reservation goes back."""
        if reserved:
            self.usage.settle(prefix, reserved, added)
        else:
            self.add_usage(prefix, added)


@contextmanager
def store_errors() -> Iterator[None]:
    """Store and path failures as WebDAV statuses (wsgidav turns anything else into a 500)."""
    try:
        yield
    except StoreUnavailable as exc:
        raise DAVError(HTTP_SERVICE_UNAVAILABLE, str(exc)) from None
    except ObjectNotFound:
        raise DAVError(HTTP_NOT_FOUND) from None
    except InvalidPath as exc:
        raise DAVError(HTTP_BAD_REQUEST, str(exc)) from None


def _ctx(environ: dict) -> DavContext:
    return environ[ENVIRON_KEY]


def _invalidate(environ: dict, *changed_keys: str) -> None:
    """After a write: forget this request's resources and hints, and the cached listings
    of the folders that hold (or are under) ``changed_keys``."""
    environ.get(_CACHE_KEY, {}).clear()
    environ.pop(_EXTRAS_KEY, None)
    store = _ctx(environ).store
    for key in changed_keys:
        invalidate_listing(store, key)


def _cache_key(path: str) -> str:
    return "/" + path.strip("/")


def _guess_type(name: str) -> str:
    return _type_of_suffix(os.path.splitext(name)[1].lower())


@functools.lru_cache(maxsize=1024)
def _type_of_suffix(suffix: str) -> str:
    return mimetypes.guess_type("x" + suffix)[0] or "application/octet-stream"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------- folder listings, cached briefly

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

    def invalidate(self, key: str) -> None:
        """Forget the folders that hold ``key`` (at any depth) and those under it."""
        with self._lock:
            self._generation += 1
            for folder in [f for f in self._folders if key.startswith(f) or f.startswith(key)]:
                self._drop(folder)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._folders.clear()
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


# ---------------------------------------------------------------- provider


class ObjectStoreProvider(DAVProvider):
    """One instance per mount point; the drive comes from the request's :class:`DavContext`.

    ``proxy_reads``: GET serves the bytes (read from a presigned URL) instead of being
    left to the HTTP routes' 302; the /v1/dav mount, for clients that do not follow
    redirects.
    """

    def __init__(self, *, proxy_reads: bool):
        super().__init__()
        self.proxy_reads = proxy_reads

    def __repr__(self) -> str:
        return f"ObjectStoreProvider(proxy_reads={self.proxy_reads})"

    def is_readonly(self) -> bool:
        return False

    def ref_url_to_path(self, ref_url: str) -> str:
        """Inverse of the resources' ``get_ref_url`` ("/users/7/a/b" → "/a/b")."""
        head, _, rest = unquote(ref_url).lstrip("/").partition("/")
        owner, _, rel = rest.partition("/")
        if head == "orgs":
            return f"/{SHARED}/{owner}/{rel}"
        return "/" + rel

    def get_resource_inst(self, path: str, environ: dict):
        cache = environ.setdefault(_CACHE_KEY, {})
        key = _cache_key(path)
        if key not in cache:
            with store_errors():
                cache[key] = self._resolve(path, environ)
        return cache[key]

    def _resolve(self, path: str, environ: dict):
        ctx = _ctx(environ)
        segments = [s for s in path.split("/") if s]
        prefix, inner, readonly = ctx.prefix, segments, False
        if segments and segments[0] == SHARED:
            if len(segments) == 1:
                return SharedRoot("/" + SHARED, environ)
            if segments[1] not in ctx.org_slugs():
                return None
            prefix, inner, readonly = f"orgs/{segments[1]}/", segments[2:], True
        if not inner:
            return FolderResource(path, environ, DrivePath(prefix, ""), readonly)
        if inner[-1] == FOLDER_MARKER:
            return None
        location = keys.from_text(prefix, "/".join(inner))
        info = ctx.store.head(location.key)
        if info is not None:
            return FileResource(path, environ, location, info, readonly)
        if ctx.store.list_page(location.key + "/", max_keys=1).entries:
            return FolderResource(path, environ, DrivePath(prefix, location.rel + "/"), readonly)
        return None

    def custom_request_handler(self, environ, start_response, default_handler):
        method = environ["REQUEST_METHOD"]
        if method == "PROPFIND":
            # RFC 4918 9.1: a server may refuse Depth: infinity (403 propfind-finite-depth).
            default_handler.__self__.allow_propfind_infinite = False
        if method in ("COPY", "MOVE"):
            plain_start_response = start_response

            def start_response(status, headers, exc_info=None):
                # A COPY/MOVE done by handle_copy/handle_move is reported as 204 by wsgidav;
                # RFC 4918 wants 201 when the destination did not exist before.
                if status.startswith("204") and environ.get(_DEST_EXISTED_KEY) is False:
                    status = "201 Created"
                return plain_start_response(status, headers, exc_info)

        if method == "PROPFIND" and environ.get("HTTP_DEPTH") == "1":
            with store_errors():
                fast = _fast_propfind(self, environ, start_response)
            if fast is not None:
                yield from fast
                return
        with store_errors():
            yield from default_handler(environ, start_response)


# ---------------------------------------------------------------- resources


class _Located:
    """Shared by files and folders: where the resource lives in the store."""

    location: DrivePath
    readonly: bool
    environ: dict
    provider: ObjectStoreProvider

    def get_ref_url(self) -> str:
        # Locks and dead properties are keyed by the object key: the same for both mounts.
        # (Asked once per property of every member of a listing: computed once.)
        ref = self.__dict__.get("_ref")
        if ref is None:
            ref = self.__dict__["_ref"] = quote("/" + self.location.key)
        return ref

    def _require_writable(self) -> None:
        if self.readonly:
            raise DAVError(HTTP_FORBIDDEN, "the shared/ folders are read-only here")

    def _check_new_name(self, name: str) -> None:
        if name == FOLDER_MARKER:
            raise DAVError(HTTP_FORBIDDEN, f"{FOLDER_MARKER} is reserved for folder markers")
        if name == SHARED and self.location.rel == "" and self.location.prefix == _ctx(self.environ).prefix:
            raise DAVError(HTTP_FORBIDDEN, "shared/ is reserved for your organisations' drives")

    def get_property_value(self, name):
        if name == "{DAV:}lockdiscovery" and not _may_have(self.environ, self.get_ref_url(), locks=True):
            return etree.Element(name)  # what wsgidav builds for a URL without locks, without asking
        return super().get_property_value(name)

    def set_property_value(self, name, value, *, dry_run=False):
        self._require_writable()
        return super().set_property_value(name, value, dry_run=dry_run)

    def handle_copy(self, dest_path, *, depth_infinity):
        return _transfer(self, dest_path, move=False, depth_infinity=depth_infinity)

    def handle_move(self, dest_path):
        return _transfer(self, dest_path, move=True, depth_infinity=True)


class FileResource(_Located, DAVNonCollection):
    def __init__(self, path: str, environ: dict, location: DrivePath, info: ObjectInfo | None, readonly: bool):
        DAVNonCollection.__init__(self, path, environ)
        self.location = location
        self.info = info  # None: created by this PUT, not yet written
        self.readonly = readonly
        self._writer: BodyWriter | None = None

    def get_content_length(self) -> int:
        return self.info.size if self.info else 0

    def get_content_type(self) -> str:
        if self.info and self.info.content_type:
            return self.info.content_type
        return _guess_type(self.name)

    def get_display_name(self) -> str:
        return self.name

    def get_etag(self) -> str | None:
        # Unquoted here (wsgidav quotes it in headers and compares it unquoted in If headers);
        # the getetag property is quoted in get_property_value.
        if not self.info or not self.info.etag:
            return None
        return self.info.etag.strip('"')

    def support_etag(self) -> bool:
        return True

    def support_ranges(self) -> bool:
        return True

    def get_last_modified(self) -> float | None:
        if self.info is None:
            return None
        cached = self.__dict__.get("_modified")
        if cached is None or cached[0] is not self.info:
            cached = self.__dict__["_modified"] = (self.info, self.info.last_modified.timestamp())
        return cached[1]

    def get_property_value(self, name):
        if name == "{DAV:}getetag":
            etag = self.get_etag()
            if etag is None:
                raise DAVError(HTTP_NOT_FOUND)
            return f'"{etag}"'
        return super().get_property_value(name)

    def get_content(self):
        if not self.provider.proxy_reads or self.info is None:
            raise DAVError(HTTP_FORBIDDEN, "downloads are redirects here: GET follows a 302")
        ctx = _ctx(self.environ)
        return PresignedReader(ctx.store.presign_get(self.location.key, ctx.presign_expires), self.info.size)

    def begin_write(self, *, content_type=None):
        self._require_writable()
        ctx = _ctx(self.environ)
        length_header = self.environ.get("CONTENT_LENGTH", "")
        length = int(length_header) if length_header.isdigit() else None
        previous = self.info.size if self.info else 0
        reservation = None  # gateway.quota.Upload: the quota reserved before any byte moves
        if ctx.usage is not None and self.location.prefix == ctx.prefix:
            try:
                with store_errors():
                    reservation = ctx.usage.open_upload(
                        ctx.prefix, ctx.quota_bytes, previous, length, ctx.unknown_length_part_size
                    )
            except UploadTooLarge as exc:
                raise DAVError(HTTP_REQUEST_ENTITY_TOO_LARGE, str(exc), add_headers=[_CLOSE]) from None
        sent = (content_type or "").split(";")[0].strip().lower()
        kind = content_type if sent not in _IGNORED_CONTENT_TYPES else _guess_type(self.name)
        self._writer = BodyWriter(
            self.environ,
            ctx.store,
            self.location.key,
            kind,
            content_length=length,
            part_size=choose_part_size(length, ctx.part_size, ctx.unknown_length_part_size),
            max_bytes=None,
            reservation=reservation,
        )
        self._previous_size = previous
        return self._writer

    def end_write(self, *, with_errors):
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if with_errors:
            if writer.reservation is not None:
                writer.reservation.abort()
            return  # nothing was committed: stream_to_store aborted what it had started
        ctx = _ctx(self.environ)
        self.info = ObjectInfo(self.location.key, writer.size, writer.etag or "", _utcnow(), writer.content_type)
        if writer.reservation is not None:
            writer.reservation.commit(writer.size)  # settled as new minus old
        else:
            ctx.add_usage(self.location.prefix, writer.size - self._previous_size)
        _invalidate(self.environ, self.location.key)
        self.environ[_CACHE_KEY][_cache_key(self.path)] = self

    def delete(self):
        self._require_writable()
        ctx = _ctx(self.environ)
        with store_errors():
            ctx.store.delete(self.location.key)
        ctx.add_usage(self.location.prefix, -(self.info.size if self.info else 0))
        self.remove_all_properties(recursive=False)
        self.remove_all_locks(recursive=False)
        _invalidate(self.environ, self.location.key)


class FolderResource(_Located, DAVCollection):
    def __init__(self, path: str, environ: dict, location: DrivePath, readonly: bool):
        DAVCollection.__init__(self, path, environ)
        self.location = location  # rel is "" (a drive's root) or ends in "/"
        self.readonly = readonly

    @property
    def _is_my_root(self) -> bool:
        return self.location.rel == "" and self.location.prefix == _ctx(self.environ).prefix

    def get_display_name(self) -> str:
        return self.name

    def get_used_bytes(self):
        return _ctx(self.environ).used_bytes() if self._is_my_root else None

    def get_available_bytes(self):
        ctx = _ctx(self.environ)
        if not self._is_my_root or ctx.quota_bytes is None:
            return None
        return max(0, ctx.quota_bytes - ctx.used_bytes())

    def get_member_list(self):
        ctx = _ctx(self.environ)
        cache = self.environ.setdefault(_CACHE_KEY, {})
        base = self.location.key
        members = []
        with store_errors():
            entries = listing_cache(ctx.store).entries(ctx.store, base)
            if self.environ.get("REQUEST_METHOD") == "PROPFIND":
                _note_folder_extras(self)
            for entry in entries:
                if isinstance(entry, CommonPrefix):
                    name = entry.prefix[len(base) : -1]
                    if not name or "/" in name or (name == SHARED and self._is_my_root):
                        continue
                    member = FolderResource(
                        util.join_uri(self.path, name),
                        self.environ,
                        DrivePath(self.location.prefix, self.location.rel + name + "/"),
                        self.readonly,
                    )
                else:
                    name = entry.key[len(base) :]
                    if not name or "/" in name or is_hidden(entry.key):
                        continue
                    member = FileResource(
                        util.join_uri(self.path, name),
                        self.environ,
                        DrivePath(self.location.prefix, self.location.rel + name),
                        entry,
                        self.readonly,
                    )
                cache.setdefault(_cache_key(member.path), member)
                members.append(member)
            if self._is_my_root and ctx.org_slugs():
                members.append(SharedRoot("/" + SHARED, self.environ))
        return members

    def get_member_names(self):
        return [member.name for member in self.get_member_list()]

    def get_member(self, name):
        return self.provider.get_resource_inst(util.join_uri(self.path, name), self.environ)

    def create_empty_resource(self, name):
        self._require_writable()
        self._check_new_name(name)
        ctx = _ctx(self.environ)
        with store_errors():
            location = keys.from_text(self.location.prefix, self.location.rel + name)
            resource = FileResource(util.join_uri(self.path, name), self.environ, location, None, False)
            if self.environ["REQUEST_METHOD"] != "PUT":
                # LOCK on an unmapped URL creates an empty resource (RFC 4918 7.3).
                kind = _guess_type(name)
                etag = ctx.store.put_object(location.key, b"", kind)
                resource.info = ObjectInfo(location.key, 0, etag, _utcnow(), kind)
        _invalidate(self.environ, location.key)
        self.environ[_CACHE_KEY][_cache_key(resource.path)] = resource
        return resource

    def create_collection(self, name):
        self._require_writable()
        self._check_new_name(name)
        with store_errors():
            location = keys.from_text(self.location.prefix, self.location.rel + name + "/")
            _ctx(self.environ).store.put_object(location.key + FOLDER_MARKER, b"")
        _invalidate(self.environ, location.key)

    def support_recursive_delete(self) -> bool:
        return True

    def handle_delete(self):
        locks = self.provider.lock_manager
        if locks is not None and locks.get_url_lock_list(self.get_ref_url(), recursive=True):
            return False  # wsgidav walks the tree and checks every lock first, then calls delete()
        self.delete()
        return True

    def delete(self):
        self._require_writable()
        if self.location.rel == "":
            raise DAVError(HTTP_FORBIDDEN, "refusing to delete a whole drive")
        ctx = _ctx(self.environ)
        with store_errors():
            _, freed = delete_prefix(ctx.store, self.location.key)
        ctx.add_usage(self.location.prefix, -freed)
        _remove_property_tree(self.provider, self.get_ref_url())
        self.remove_all_locks(recursive=True)
        _invalidate(self.environ, self.location.key)
        return []


class SharedRoot(DAVCollection):
    """``shared/``: one read-only folder per organisation the caller may read."""

    readonly = True

    def __init__(self, path: str, environ: dict):
        super().__init__(path, environ)

    def get_ref_url(self) -> str:
        return "/orgs/"

    def get_display_name(self) -> str:
        return SHARED

    def get_member_names(self):
        return list(_ctx(self.environ).org_slugs())

    def get_member(self, name):
        return self.provider.get_resource_inst(util.join_uri(self.path, name), self.environ)

    def prevent_locking(self) -> bool:
        return True

    def create_empty_resource(self, name):
        raise DAVError(HTTP_FORBIDDEN, "the shared/ folders are read-only here")

    def create_collection(self, name):
        raise DAVError(HTTP_FORBIDDEN, "the shared/ folders are read-only here")

    def delete(self):
        raise DAVError(HTTP_FORBIDDEN, "the shared/ folders are read-only here")

    def handle_copy(self, dest_path, *, depth_infinity):
        raise DAVError(HTTP_FORBIDDEN, "copy one organisation's folder at a time")

    def handle_move(self, dest_path):
        raise DAVError(HTTP_FORBIDDEN, "the shared/ folders are read-only here")


# ---------------------------------------------------------------- dead properties and locks of a listing


def _note_folder_extras(folder: FolderResource) -> None:
    """Read which URLs at or under ``folder`` have dead properties or locks: one range query
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
    environ.setdefault(_EXTRAS_KEY, {})[base or "/"] = (with_properties, with_locks)


def _may_have(environ: dict, ref_url: str, *, locks: bool) -> bool:
    """False only when a listing of the folder that holds ``ref_url`` (or of itself)
    found no dead properties (``locks=False``) or no lock (``locks=True``) for it."""
    known = environ.get(_EXTRAS_KEY)
    if not known:
        return True
    url = unquote(ref_url).rstrip("/") or "/"
    found = known.get(url)
    if found is None:
        found = known.get(url.rsplit("/", 1)[0])
        if found is None:
            return True
    with_properties, with_locks = found
    if locks:
        return url in with_locks
    return url in with_properties


# ---------------------------------------------------------------- PROPFIND Depth 1, fast path

_SLOW_NAMES = frozenset({"{DAV:}quota-used-bytes", "{DAV:}quota-available-bytes"})  # None is a 200 there
_FILE_ALLPROP = [
    "{DAV:}resourcetype",
    "{DAV:}getcontentlength",
    "{DAV:}getcontenttype",
    "{DAV:}getlastmodified",
    "{DAV:}displayname",
    "{DAV:}getetag",
    "{DAV:}lockdiscovery",
    "{DAV:}supportedlock",
]
_FOLDER_ALLPROP = ["{DAV:}resourcetype", "{DAV:}displayname", "{DAV:}lockdiscovery", "{DAV:}supportedlock"]
_HREF_SAFE = "/" + "!*'()," + "$-_|."  # DAVResource.get_href
_FAST_PAGE = 500  # members per chunk written
_OK = "HTTP/1.1 200 OK"
_NOT_FOUND = "HTTP/1.1 404 Not Found"
_ROOT_TAG = re.compile(r"<([A-Za-z_][\w.-]*):multistatus((?:\s+xmlns:[\w.-]+=\"[^\"&<]*\")*)\s*>")
_NS_DECL = re.compile(r"xmlns:([\w.-]+)=\"([^\"]*)\"")


def _xml_text(text: str) -> str:
    # What ElementTree's serializer escapes in text (wsgidav's etree here is the standard library's).
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    return text


@functools.lru_cache(maxsize=4096)
def _rfc1123(timestamp: float) -> str:
    return util.get_rfc1123_time(timestamp)


def _read_propfind_names(environ: dict):
    """(mode, names) the fast path can answer, or None; the body is put back for wsgidav either way."""
    if environ.get("HTTP_TRANSFER_ENCODING"):
        return None
    length = environ.get("CONTENT_LENGTH", "").strip()
    if length == "":
        body = b""
    elif length.isdigit():
        body = environ["wsgi.input"].read(int(length)) if int(length) else b""
        environ["wsgi.input"] = io.BytesIO(body)
    else:
        return None
    if not body:
        return "allprop", None
    try:
        request = util.parse_xml_body(environ, allow_empty=True)
    except DAVError:  # wsgidav's own 400, from its own parse
        return None
    finally:
        environ["wsgi.input"] = io.BytesIO(body)
    if request is None or request.tag != "{DAV:}propfind" or len(request) != 1:
        return None
    (node,) = request
    if node.tag == "{DAV:}allprop" and len(node) == 0:
        return "allprop", None
    if node.tag != "{DAV:}prop" or len(node) == 0:
        return None
    names = []
    for prop in node:
        tag = prop.tag
        if not isinstance(tag, str) or not tag.startswith("{") or tag.startswith("{}") or tag in _SLOW_NAMES:
            return None
        names.append(tag)
    return "named", names


def _fast_propfind(provider: ObjectStoreProvider, environ: dict, start_response):
    """PROPFIND Depth 1 of a folder written with string templates, or None to leave it to wsgidav.

    Only when no member of the folder has dead properties or locks (what
    :func:`_note_folder_extras` reads) and the request asks for allprop or for named
    properties: live ones are computed as wsgidav would, every other name is a 404
    (no member has dead properties). The folder itself (and ``shared/`` in my drive's
    root) still go through wsgidav's own code; the output is byte for byte wsgidav's.
    """
    if any(key.startswith("HTTP_IF") for key in environ):
        return None
    if provider.lock_manager is None or provider.prop_manager is None:
        return None
    asked = _read_propfind_names(environ)
    if asked is None:
        return None
    mode, names = asked
    folder = provider.get_resource_inst(environ["PATH_INFO"], environ)
    if not isinstance(folder, FolderResource) or folder.prevent_locking():
        return None
    ctx = _ctx(environ)
    base = folder.location.key
    entries = listing_cache(ctx.store).entries(ctx.store, base)
    _note_folder_extras(folder)
    folder_url = unquote(folder.get_ref_url()).rstrip("/") or "/"
    found = environ.get(_EXTRAS_KEY, {}).get(folder_url)
    if found is None:
        return None
    for url in found[0] | found[1]:
        if url != folder_url and url.rsplit("/", 1)[0] == folder_url:
            return None  # a member has dead properties or a lock: wsgidav's way
    folder_href = folder.get_href()
    if not folder_href.endswith("/"):
        return None

    # The folder itself (and shared/) the normal way, in a multistatus of their own.
    slow = [folder]
    if folder._is_my_root and ctx.org_slugs():
        slow.append(SharedRoot("/" + SHARED, environ))
    multistatus = xml_tools.make_multistatus_el()
    for resource in slow:
        if mode == "allprop":
            props = resource.get_properties("allprop")
        else:
            props = resource.get_properties("named", name_list=names)
        util.add_property_response(multistatus, resource.get_href(), props)
    data = xml_tools.xml_to_bytes(multistatus, pretty=False).decode("utf-8")
    root = _ROOT_TAG.search(data)
    if root is None:
        return None
    prefixes = {uri: prefix for prefix, uri in _NS_DECL.findall(root.group(2))}
    d = root.group(1)
    if prefixes.get("DAV:") != d:
        return None
    close_response = f"</{d}:response>"
    close_all = f"</{d}:multistatus>"
    first_end = data.find(close_response)
    if first_end < 0 or not data.endswith(close_all):
        return None
    first_end += len(close_response)
    head, rest = data[:first_end], data[first_end : -len(close_all)]

    def tag(name: str) -> str | None:
        uri, _, local = name[1:].partition("}")
        prefix = prefixes.get(uri)
        return None if prefix is None else f"{prefix}:{local}"

    asked_names = names if names is not None else list(dict.fromkeys(_FILE_ALLPROP + _FOLDER_ALLPROP))
    tags = {name: tag(name) for name in asked_names}
    if None in tags.values():
        return None
    empty = {name: f"<{t} />" for name, t in tags.items()}
    opening = {name: f"<{t}>" for name, t in tags.items()}
    closing = {name: f"</{t}>" for name, t in tags.items()}
    collection = f"<{d}:resourcetype><{d}:collection /></{d}:resourcetype>"
    lock_entry = (
        f"<{d}:lockentry><{d}:lockscope><{d}:%s /></{d}:lockscope><{d}:locktype><{d}:write /></{d}:locktype></{d}:lockentry>"
    )
    supported = f"<{d}:supportedlock>{lock_entry % 'exclusive'}{lock_entry % 'shared'}</{d}:supportedlock>"
    propstat_open = f"<{d}:propstat><{d}:prop>"

    def propstat(status: str, parts: list[str]) -> str:
        return f"{propstat_open}{''.join(parts)}</{d}:prop><{d}:status>{status}</{d}:status></{d}:propstat>"

    def render(href: str, values: list) -> str:
        # values: (name, text or None for an empty element or an XML string, is_xml) or (name, _NOT_FOUND)
        ok: list[str] = []
        missing: list[str] = []
        order = []
        for name, value in values:
            if value is _NOT_FOUND:
                if not missing:
                    order.append(_NOT_FOUND)
                missing.append(empty[name])
                continue
            if not ok:
                order.append(_OK)
            if not value:  # None or "": an empty element, as ElementTree writes it
                ok.append(empty[name])
            elif value.__class__ is _Xml:
                ok.append(value)
            else:
                ok.append(f"{opening[name]}{_xml_text(value)}{closing[name]}")
        stats = "".join(propstat(status, ok if status is _OK else missing) for status in order)
        return f"<{d}:response><{d}:href>{href}</{d}:href>{stats}</{d}:response>"

    collection_xml, supported_xml = _Xml(collection), _Xml(supported)

    def file_values(name: str, info: ObjectInfo) -> list:
        etag = info.etag.strip('"') if info.etag else None
        modified = info.last_modified
        known = {
            "{DAV:}resourcetype": "",
            "{DAV:}getcontentlength": str(info.size),
            "{DAV:}getcontenttype": info.content_type or _guess_type(name),
            "{DAV:}getlastmodified": _rfc1123(modified.timestamp()) if modified is not None else _NOT_FOUND,
            "{DAV:}displayname": name,
            "{DAV:}getetag": f'"{etag}"' if etag else _NOT_FOUND,
            "{DAV:}lockdiscovery": None,
            "{DAV:}supportedlock": supported_xml,
        }
        if names is None:
            return [(n, v) for n, v in ((n, known[n]) for n in _FILE_ALLPROP) if v is not _NOT_FOUND]
        return [(n, known.get(n, _NOT_FOUND)) for n in names]

    def folder_values(name: str) -> list:
        known = {
            "{DAV:}resourcetype": collection_xml,
            "{DAV:}displayname": name,
            "{DAV:}lockdiscovery": None,
            "{DAV:}supportedlock": supported_xml,
        }
        if names is None:
            return [(n, known[n]) for n in _FOLDER_ALLPROP]
        return [(n, known.get(n, _NOT_FOUND)) for n in names]

    skip_shared = folder._is_my_root

    def members():
        for entry in entries:
            if isinstance(entry, CommonPrefix):
                name = entry.prefix[len(base) : -1]
                if not name or "/" in name or (name == SHARED and skip_shared):
                    continue
                yield render(folder_href + quote(name, safe=_HREF_SAFE) + "/", folder_values(name))
            else:
                name = entry.key[len(base) :]
                if not name or "/" in name or is_hidden(entry.key):
                    continue
                yield render(folder_href + quote(name, safe=_HREF_SAFE), file_values(name, entry))

    def body():
        yield head.encode("utf-8", "xmlcharrefreplace")
        page: list[str] = []
        for response in members():
            page.append(response)
            if len(page) >= _FAST_PAGE:
                yield "".join(page).encode("utf-8", "xmlcharrefreplace")
                page = []
        page.append(rest)
        page.append(close_all)
        yield "".join(page).encode("utf-8", "xmlcharrefreplace")

    start_response(
        "207 Multi-Status",
        [("Content-Type", "application/xml; charset=utf-8"), ("Date", util.get_rfc1123_time())],
    )
    return body()


class _Xml(str):
    """A property value that is already XML (written as is)."""


# ---------------------------------------------------------------- copy, move, delete


def _transfer(src, dest_path: str, *, move: bool, depth_infinity: bool) -> bool:
    """COPY or MOVE ``src`` to ``dest_path`` with server-side copies in the store.

    wsgidav has already checked the request: the destination's parent is a
    collection, Overwrite allows replacing an existing destination, no lock is in
    the way, and the destination is not ``src`` itself or below it.
    """
    environ, provider = src.environ, src.provider
    ctx = _ctx(environ)
    if move:
        src._require_writable()
    if util.is_child_uri(dest_path, src.path):
        raise DAVError(HTTP_FORBIDDEN, "cannot copy or move a resource over a folder that holds it")
    with store_errors():
        parent = provider.get_resource_inst(util.get_uri_parent(dest_path), environ)
        if parent is None or not isinstance(parent, FolderResource):
            raise DAVError(HTTP_FORBIDDEN if parent is not None else HTTP_NOT_FOUND, "no such destination folder")
        parent._require_writable()
        name = util.get_uri_name(dest_path)
        parent._check_new_name(name)
        suffix = "/" if src.is_collection else ""
        dest = keys.from_text(parent.location.prefix, parent.location.rel + name + suffix)
        existing = provider.get_resource_inst(dest_path, environ)
        environ[_DEST_EXISTED_KEY] = existing is not None
        if existing is not None:
            existing.delete()  # RFC 4918 9.8.4 / 9.9.3: Overwrite: T deletes the destination first
        src_ref, dest_ref = src.get_ref_url(), quote("/" + dest.key)
        store = ctx.store
        if not src.is_collection:
            size = src.get_content_length()
            moved_within = move and src.location.prefix == dest.prefix  # the drive does not grow
            reserved = 0 if moved_within else ctx.reserve_room(dest.prefix, size)
            try:
                store.copy(src.location.key, dest.key)
            except BaseException:
                ctx.settle_room(dest.prefix, reserved, 0)
                raise
            ctx.settle_room(dest.prefix, reserved, size)
            if move:
                store.delete(src.location.key)
                ctx.add_usage(src.location.prefix, -src.get_content_length())
        elif not depth_infinity:
            store.put_object(dest.key + FOLDER_MARKER, b"")
        else:
            objects = list(iter_objects(store, src.location.key))
            total = sum(info.size for info in objects)
            moved_within = move and src.location.prefix == dest.prefix
            reserved = 0 if moved_within else ctx.reserve_room(dest.prefix, total)
            pairs = [(info.key, dest.key + info.key[len(src.location.key) :]) for info in objects]
            if src.location.key + FOLDER_MARKER not in {info.key for info in objects}:
                pairs.append((None, dest.key + FOLDER_MARKER))  # the destination folder exists even if empty

            def copy_one(pair: tuple[str | None, str]) -> None:
                source, target = pair
                if source is None:
                    store.put_object(target, b"")
                else:
                    store.copy(source, target)

            try:
                with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
                    list(pool.map(copy_one, pairs))
            except BaseException:
                ctx.settle_room(dest.prefix, reserved, 0)  # what was copied is counted at the next recount
                raise
            ctx.settle_room(dest.prefix, reserved, total)
            if move:
                store.delete_many([info.key for info in objects])
                ctx.add_usage(src.location.prefix, -total)
    properties = provider.prop_manager
    if properties is not None:
        if move:
            properties.move_properties(src_ref, dest_ref, with_children=src.is_collection)
        elif isinstance(properties, SqlitePropertyManager):
            properties.copy_tree(src_ref, dest_ref, with_children=src.is_collection and depth_infinity)
        else:
            properties.copy_properties(src_ref, dest_ref)
    if move:
        src.remove_all_locks(recursive=True)
    _invalidate(environ, src.location.key, dest.key)
    return True


def _remove_property_tree(provider: DAVProvider, ref_url: str) -> None:
    properties = provider.prop_manager
    if isinstance(properties, SqlitePropertyManager):
        properties.remove_tree(ref_url)
    elif properties is not None:
        properties.remove_properties(ref_url)


# ---------------------------------------------------------------- bytes in and out


class BodyWriter:
    """wsgidav's file object for a PUT. The body is not read through ``wsgi.input`` (whose
    end a2wsgi cannot tell from a client that went away): :meth:`writelines` reads it from
    the ASGI ``receive`` behind it and streams it with :func:`drive.uploads.stream_to_store`,
    the one rule /v1/files/ uses too, so the object is created or replaced only when the
    body arrived whole, a stalled client is cut off after the idle timeout, and a started
    multipart upload is aborted otherwise."""

    def __init__(
        self,
        environ: dict,
        store: ObjectStore,
        key: str,
        content_type: str,
        *,
        content_length: int | None,
        part_size: int,
        max_bytes: int | None,
        reservation=None,
    ):
        self.reservation = reservation
        self.environ = environ
        self.store = store
        self.key = key
        self.content_type = content_type
        self.content_length = content_length
        self.part_size = part_size
        self.max_bytes = max_bytes
        self.size = 0
        self.etag: str | None = None

    def writelines(self, _wsgi_chunks) -> None:
        # _wsgi_chunks is wsgidav's lazy reader of wsgi.input: never started, so nothing is read twice.
        body = self.environ["wsgi.input"]  # a2wsgi's Body: the ASGI receive and the event loop it runs on
        self.environ["wsgidav.some_input_read"] = 1  # wsgidav must not read the rest after an error
        chunks = receive_body(body.receive)
        upload = stream_to_store(
            self.store,
            self.key,
            chunks if self.reservation is None else self.reservation.guard(chunks),
            content_length=self.content_length,
            content_type=self.content_type,
            part_size=self.part_size,
            max_bytes=self.max_bytes,
        )
        try:
            with store_errors():
                result = asyncio.run_coroutine_threadsafe(upload, body.loop).result()
        except UploadTooLarge as exc:
            raise DAVError(HTTP_REQUEST_ENTITY_TOO_LARGE, str(exc), add_headers=[_CLOSE]) from None
        except BodyTimeout as exc:
            raise DAVError(HTTP_REQUEST_TIMEOUT, str(exc), add_headers=[_CLOSE]) from None
        except IncompleteBody as exc:
            raise DAVError(HTTP_BAD_REQUEST, str(exc), add_headers=[_CLOSE]) from None
        self.environ["wsgidav.all_input_read"] = 1
        self.size, self.etag = result.size, result.etag

    def write(self, data: bytes) -> None:
        raise NotImplementedError("BodyWriter reads the body itself: wsgidav calls writelines")

    def close(self) -> None:
        pass  # committed (or not) by writelines


class PresignedReader:
    """A file-like view of an object read through a presigned GET (seek opens a ranged GET)."""

    def __init__(self, url: str, size: int, timeout: float = 60.0):
        self.url = url
        self.size = size
        self.timeout = timeout
        self.pos = 0
        self._response = None

    def seek(self, pos: int) -> None:
        self.close()
        self.pos = pos

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.size:
            return b""
        if self._response is None:
            self._open()
        data = self._response.read() if n is None or n < 0 else self._response.read(n)
        self.pos += len(data)
        return data

    def _open(self) -> None:
        request = urllib.request.Request(self.url)
        if self.pos:
            request.add_header("Range", f"bytes={self.pos}-")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise DAVError(HTTP_NOT_FOUND if exc.code == 404 else HTTP_SERVICE_UNAVAILABLE) from None
        except OSError as exc:
            raise DAVError(HTTP_SERVICE_UNAVAILABLE, f"object store unreachable: {exc}") from None
        if self.pos and not response.headers.get("Content-Range"):
            skip = self.pos  # a store that ignored Range sent the whole object
            while skip:
                skipped = len(response.read(min(skip, 1 << 20)))
                if not skipped:
                    break
                skip -= skipped
        self._response = response

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None


# ---------------------------------------------------------------- persistent locks and properties


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
        if environ is not None and not _may_have(environ, norm_url, locks=False):
            return []
        return super().get_properties(norm_url, environ)

    def get_property(self, norm_url, name, environ=None):
        if environ is not None and not _may_have(environ, norm_url, locks=False):
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
