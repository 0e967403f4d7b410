"""The object-store interface.

Every backend (the embedded ``rclone serve s3``, moto, Cloudflare R2, AWS S3)
is reached through :class:`ObjectStore`. The drive code never talks to boto3
directly, so a new backend is one module implementing this protocol plus a
run of ``tests/test_store_conformance.py`` against it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterator, Protocol, Sequence, TypeVar, runtime_checkable


class StoreError(Exception):
    """Base class for object-store failures the HTTP layer maps to envelopes."""


class StoreUnavailable(StoreError):
    """The store could not be reached or answered with a server error (503)."""

    raised = 0  # in this process: every store operation that failed so (GET /metrics reports it)
    _counting = threading.Lock()

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        with StoreUnavailable._counting:
            StoreUnavailable.raised += 1


class ObjectNotFound(StoreError):
    """The key (or multipart upload) does not exist."""


class PartsRefused(StoreError):
    """The store refused to complete a multipart upload with the parts named (one missing, a
    wrong ETag, a part too small); some stores drop the upload then."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # quoted, as HTTP and S3 write it: '"abc..."'
    last_modified: datetime
    content_type: str | None = None


@dataclass(frozen=True)
class CommonPrefix:
    """A "folder" returned by a delimited listing; ``prefix`` ends with the delimiter."""

    prefix: str


@dataclass(frozen=True)
class ListPage:
    entries: list[ObjectInfo | CommonPrefix]
    next_token: str | None


@dataclass(frozen=True)
class UploadedPart:
    number: int
    etag: str


class StreamedPut(Protocol):
    """One PUT whose body is sent as it arrives (its length known and signed up front): the
    object exists only after :meth:`finish`; :meth:`abort` (or a body cut short) leaves none.
    Its calls block and come one at a time, from worker threads."""

    def send(self, chunks: Sequence[bytes]) -> None: ...

    def finish(self) -> str:
        """After the last byte: the store's answer, the new object's ETag."""

    def abort(self) -> None:
        """Give up: the connection closes before the body's end, so the store keeps nothing."""


@runtime_checkable
class ObjectStore(Protocol):
    bucket: str
    # The ETag of an object stored by one PUT is the MD5 of its bytes (R2, rclone serve s3, moto,
    # S3 without SSE-KMS or SSE-C; KGPU_S3_PUT_ETAG_IS_MD5): a streamed upload need not compute it
    # (drive/uploads.py), and the drive reports it for a file a client sent straight to the store
    # (drive/facts.py proven_md5). False: the drive computes MD5s itself, and knows none of the rest.
    put_etag_is_md5: bool
    # The ETag it lists for an object a multipart upload made is the MD5 of its bytes too (rclone
    # serve s3 over a directory; never R2 or S3, whose are "…-N"): a streamed upload in parts, which
    # computes that MD5 anyway, records it as the ETag without asking the store (drive/uploads.py).
    multipart_etag_is_md5: bool
    # False while the store cannot answer (the embedded store restarting): no URL of it is handed
    # out then, a remembered one included (gateway/edge.py). A store elsewhere (R2, S3) is True.
    serving: bool

    def ensure_bucket(self) -> None: ...

    def put_object(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Store ``data`` in one request; returns the ETag."""

    def open_put(self, key: str, size: int, content_type: str | None = None) -> StreamedPut:
        """A PUT of exactly ``size`` bytes, sent as they come (:class:`StreamedPut`)."""

    def head(self, key: str) -> ObjectInfo | None: ...

    def list_page(
        self, prefix: str, delimiter: str | None = None, token: str | None = None, max_keys: int = 1000
    ) -> ListPage: ...

    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: list[str]) -> None: ...

    def copy(self, src_key: str, dst_key: str) -> str:
        """A server-side copy; returns the new object's ETag."""

    def presign_get(self, key: str, expires_in: int, content_type: str | None = None) -> str:
        """A presigned GET; with ``content_type``, the store answers it with that Content-Type
        (``response-content-type``, signed) whatever type the object was stored with."""

    def presign_put(
        self, key: str, expires_in: int, content_length: int | None = None, content_md5: str | None = None
    ) -> str:
        """A presigned PUT; with ``content_length``, a body of any other size is refused; with
        ``content_md5`` (base64), a body with another MD5."""

    def presign_part(
        self, key: str, upload_id: str, number: int, expires_in: int, content_length: int, content_md5: str | None = None
    ) -> str:
        """A presigned PUT of part ``number`` of a multipart upload, of exactly ``content_length`` bytes."""

    def create_multipart(self, key: str, content_type: str | None = None) -> str: ...

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> UploadedPart: ...

    def open_part(self, key: str, upload_id: str, number: int, size: int) -> StreamedPut:
        """Part ``number`` of a multipart upload as a PUT of exactly ``size`` bytes sent as they come
        (:class:`StreamedPut`; :meth:`StreamedPut.finish` answers the part's ETag)."""

    def complete_multipart(self, key: str, upload_id: str, parts: list[UploadedPart]) -> str: ...

    def abort_multipart(self, key: str, upload_id: str) -> None: ...

    def abort_stale_multiparts(self, older_than_seconds: float) -> int:
        """Abort every unfinished multipart upload started longer ago than that (one a server
        killed mid-upload left behind); how many."""


def iter_entries(
    store: ObjectStore, prefix: str, delimiter: str | None = None, page_size: int = 1000
) -> Iterator[ObjectInfo | CommonPrefix]:
    """Every entry under ``prefix``, fetched one page at a time (never all in memory)."""
    token: str | None = None
    while True:
        page = store.list_page(prefix, delimiter=delimiter, token=token, max_keys=page_size)
        yield from page.entries
        if not page.next_token:
            return
        token = page.next_token


def iter_objects(store: ObjectStore, prefix: str) -> Iterator[ObjectInfo]:
    for entry in iter_entries(store, prefix):
        if isinstance(entry, ObjectInfo):
            yield entry


T = TypeVar("T")
R = TypeVar("R")


def at_once(ask: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    """``ask(item)`` of each of ``items``, in order, up to ``threads`` store requests at a time
    (one item: in this thread, no pool)."""
    if len(items) <= 1:
        return [ask(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), threads)) as pool:
        return list(pool.map(ask, items))


LISTED_TOGETHER = 4  # keys of one folder from which the folder is listed rather than each key asked
LISTING_THREADS = 8  # folders of one list_together listed at once


@dataclass(frozen=True)
class Listed:
    """What :func:`list_together` learned: the object at each key it could answer (None: none),
    the sub-folders (``…/``) those listings showed, and the keys left to ask one by one."""

    objects: dict[str, ObjectInfo | None]
    folders: set[str]
    unlisted: list[str]


def list_together(store: ObjectStore, keys: Sequence[str]) -> Listed:
    """The objects at ``keys`` from their folders' listings, where a folder holds
    :data:`LISTED_TOGETHER` or more of them: one request (its first page) instead of one a key,
    up to :data:`LISTING_THREADS` folders at once. A folder with fewer of them, or past one page,
    is left to the caller, key by key."""
    by_folder: dict[str, list[str]] = {}
    for key in keys:
        by_folder.setdefault(key.rpartition("/")[0] + "/", []).append(key)
    listed_folders = [folder for folder, members in by_folder.items() if len(members) >= LISTED_TOGETHER]

    def first_page(folder: str) -> ListPage:
        return store.list_page(folder, delimiter="/")

    pages = dict(zip(listed_folders, at_once(first_page, listed_folders, LISTING_THREADS)))
    objects: dict[str, ObjectInfo | None] = {}
    folders: set[str] = set()
    unlisted: list[str] = []
    for folder, members in by_folder.items():
        page = pages.get(folder)
        if page is None or page.next_token is not None:
            unlisted += members
            continue
        listed = {entry.key: entry for entry in page.entries if isinstance(entry, ObjectInfo)}
        objects.update((key, listed.get(key)) for key in members)
        folders.update(entry.prefix for entry in page.entries if isinstance(entry, CommonPrefix))
    return Listed(objects, folders, unlisted)


def delete_prefix(store: ObjectStore, prefix: str) -> tuple[int, int]:
    """Delete every object under ``prefix``, 1,000 per request; returns (objects, bytes) freed."""
    batch: list[str] = []
    count = freed = 0
    for info in iter_objects(store, prefix):
        batch.append(info.key)
        count += 1
        freed += info.size
        if len(batch) == 1000:
            store.delete_many(batch)
            batch = []
    if batch:
        store.delete_many(batch)
    return count, freed
