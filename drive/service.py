"""The drive's operations, the same for every protocol (the HTTP routes of gateway/drive_http.py
and the WebDAV resources of drive/dav/): each runs the drive's rules in one order — the keys
held, names (drive/names.py), the quota (the usage book, drive/usage.py), the store, the facts
(drive/facts.py) — and the listing cache follows from the store itself (drive/store/caching.py).
The keys a write changes are held through :meth:`DriveService.writing` (the one way every
protocol holds them) from before it reads what it replaces until it is counted: by the
operation itself (:meth:`DriveService.delete`, :meth:`DriveService.put_file`, the presigned
PUTs and direct uploads), or by a WebDAV resource around the steps it runs. The caller turns
the outcome, or the exception, into its protocol's answer; nothing here speaks HTTP.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from itertools import chain
from typing import AsyncIterator, Callable, Iterable, Iterator, Protocol

from starlette.concurrency import run_in_threadpool

from drive import direct, names
from drive.checksums import Checksum
from drive.direct import DeclaredMd5, DirectUploadError, NoSuchUpload, PartPlan, TooManyUploads, completed_parts, plan_parts
from drive.content_types import served_type
from drive.facts import STORE_MD5, Carried, Facts, FactsBook, proven_md5, resolve
from drive.keys import DrivePath
from drive.listing import FOLDER_MARKER, is_hidden
from drive.store import (
    CommonPrefix,
    ListPage,
    ObjectInfo,
    PartsRefused,
    StoreError,
    StoreUnavailable,
    UploadedPart,
    delete_prefix,
    iter_objects,
)
from drive.store.caching import CachingStore
from drive.uploads import MiB, UploadResult, choose_part_size, receive_body, stream_to_store
from drive.usage import Keys, NoLease, PutHold, QuotaExceeded, Upload, UsageBook, WriteLease, open_upload

COPY_THREADS = 8  # server-side copies at once, for a folder
Member = tuple[ObjectInfo | CommonPrefix, Facts | None]  # a folder's member: a file with its facts, or a folder
File = tuple[ObjectInfo, Facts]  # a file with its facts
COMPLETING_SECONDS = 600  # a multipart upload being completed is held at least this much longer
NAME_CHECKS_AT_ONCE = 16  # a batch mint's name checks (store requests) running at once


class WholeDrive(Exception):
    """A DELETE of a drive's root: refused (its folders go one at a time)."""


class DuplicatePath(ValueError):
    """A batch mint names one file twice: the first stands, the others are refused."""


@dataclass(frozen=True)
class UrlAsked:
    """One presigned PUT a mint asks for: the file, its size (None: all the room left), the
    client's modification time and declared MD5."""

    path: DrivePath
    size: int | None
    mtime: float | None = None
    md5: DeclaredMd5 | None = None


@dataclass(frozen=True)
class Link:
    """A presigned URL the client uses, and how long it lasts."""

    url: str
    expires_in: int


@dataclass(frozen=True)
class Deleted:
    """What a DELETE removed: ``file``, the file the path named, else ``count`` objects of a
    folder (0: there was nothing to delete)."""

    count: int
    file: ObjectInfo | None = None


@dataclass(frozen=True)
class PartsStarted:
    """A multipart upload sent straight to the store, begun: its id, how it is cut, how long it may take."""

    upload_id: str
    plan: PartPlan
    expires_in: int


def _one_a_deepest_folder(asked: list[UrlAsked]) -> list[UrlAsked]:
    """One file of each folder holding files of ``asked`` that is not above another such folder."""
    one_a_folder = {one.path.rel.rpartition("/")[0]: one for one in asked if "/" in one.path.rel}
    above = {folder.rsplit("/", depth)[0] for folder in one_a_folder for depth in range(1, folder.count("/") + 1)}
    return [one for folder, one in one_a_folder.items() if folder not in above]


def _refused_in_batch(asked: list[UrlAsked]) -> list[Exception | None]:
    """A file a batch names twice (DuplicatePath), or under another file of the batch
    (NameConflict), refused in its place; the first of each stands (None: not refused)."""
    keys_asked = {one.path.key for one in asked}
    seen: set[str] = set()
    refusals: list[Exception | None] = []
    for one in asked:
        parts = one.path.rel.split("/")
        folders = ("/".join(parts[:n]) for n in range(1, len(parts)))
        above = next((a for a in folders if one.path.prefix + a in keys_asked), None)
        if one.path.key in seen:
            refusals.append(DuplicatePath("this path is named twice in the batch"))
        elif above is not None:
            refusals.append(names.NameConflict(f"{above} is a file in this batch, so it cannot hold {one.path.rel}"))
        else:
            seen.add(one.path.key)
            refusals.append(None)
    return refusals


class Written(Protocol):
    """What a body streamed to the store was (drive/uploads.py's result)."""

    size: int
    etag: str | None
    sha1: str | None
    md5: str | None


class DriveSettings(Protocol):
    """What configures a drive (gateway/settings.py's Settings: KGPU_* of these names), read by
    each operation, so a changed setting applies from the next request on."""

    upload_part_bytes: int  # a body's parts, its length known; a direct upload's parts
    upload_unknown_length_part_bytes: int  # a body's parts, its length unknown
    presign_expires_seconds: int  # a presigned URL's life
    direct_upload_seconds: int  # a direct multipart upload's life


@dataclass(frozen=True)
class DefaultSettings:
    """A drive's settings where none are given (a test's bare drive): gateway/settings.py's defaults."""

    upload_part_bytes: int = 8 * MiB
    upload_unknown_length_part_bytes: int = 12 * MiB
    presign_expires_seconds: int = 3600
    direct_upload_seconds: int = 6 * 3600


@dataclass(frozen=True)
class DriveService:
    store: CachingStore
    usage: UsageBook | None = None  # None: nothing counted (a test's bare drive)
    facts: FactsBook | None = None  # None: no modification times or checksums kept
    settings: DriveSettings = DefaultSettings()

    @property
    def url_seconds(self) -> int:
        return self.settings.presign_expires_seconds

    # ------------------------------------------------------------ reads

    def stat(self, key: str) -> tuple[ObjectInfo, Facts] | None:
        """The object at ``key`` and its facts (modification time, hashes); None: none there."""
        info = self.store.head(key)
        if info is None:
            return None
        return info, self.facts_of(info)

    def facts_of(self, info: ObjectInfo) -> Facts:
        return self.facts.facts_of(info) if self.facts is not None else resolve(info, None)

    def used_bytes(self, prefix: str) -> int:
        return self.usage.used_bytes(prefix) if self.usage is not None else 0

    def first_page(self, prefix: str, delimiter: str | None = None, max_keys: int = 1000) -> ListPage:
        """A listing's first page, asked before any byte of the answer is sent (so a store that is
        down is a 503, not a cut answer); :meth:`files` goes on from it."""
        return self.store.list_page(prefix, delimiter=delimiter, max_keys=max_keys)

    def folder_exists(self, folder_key: str, is_root: bool) -> bool:
        """A drive's root always exists; a folder while anything is under it."""
        return is_root or bool(self.first_page(folder_key, "/", max_keys=1).entries)

    def files(self, prefix: str, first: ListPage) -> Iterator[File]:
        """Every file under ``prefix`` (folder markers hidden) with its facts, page by page (one
        range query of facts a page), never all in memory."""
        page = first
        while True:
            objects = [entry for entry in page.entries if isinstance(entry, ObjectInfo)]
            rows = self.facts.between(objects[0].key, objects[-1].key) if objects and self.facts else {}
            for entry in objects:
                if not is_hidden(entry.key):
                    yield entry, resolve(entry, rows.get(entry.key))
            if not page.next_token:
                return
            page = self.store.list_page(prefix, token=page.next_token)

    def folder_listing(self, folder_key: str, is_root: bool) -> Iterator[list[Member]] | None:
        """A folder's :meth:`members`, a page at a time as the store lists them (or the listing
        cache holds them, drive/store/caching.py): the first page is read before this returns,
        so a store that is down raises here, before any byte of an answer. None: no such folder
        (nothing under it, and not a drive's root)."""
        pages = self.store.folder_pages(folder_key)
        first = next(pages, [])
        if not first and not is_root:
            return None
        return self.members(folder_key, chain((first,), pages))

    def members(self, folder_key: str, pages: Iterable[list[ObjectInfo | CommonPrefix]]) -> Iterator[list[Member]]:
        """A folder's files (with their facts) and folders, one level, a page of ``pages`` (what
        ``store.folder_pages`` returned) at a time with one query of the page's facts: never the
        whole folder in memory. Its marker object is no member."""
        for page in pages:
            files = [e.key for e in page if isinstance(e, ObjectInfo) and e.key != folder_key and not is_hidden(e.key)]
            rows = self.facts.of_keys(files) if self.facts is not None and files else {}
            yield [
                (entry, None) if isinstance(entry, CommonPrefix) else (entry, resolve(entry, rows.get(entry.key)))
                for entry in page
                if isinstance(entry, CommonPrefix) or (entry.key != folder_key and not is_hidden(entry.key))
            ]

    def file_or_nothing(self, key: str) -> bool:
        """Whether ``key`` is a file, or neither a file nor a folder."""
        return self.store.head(key) is not None or not self.first_page(key + "/", max_keys=1).entries

    def file_above(self, prefix: str, rel: str) -> str | None:
        """Why nothing may be made at ``rel`` in the drive ``prefix``: a folder above it is a file
        (drive/names.py); None: none is."""
        return names.file_above(self.store, prefix, rel)

    def read_url(self, key: str, content_type: str | None = None) -> str:
        """Where the client reads the object: a presigned GET (the bytes never pass through here),
        answered with ``content_type`` when one is given (drive/content_types.py: served_type)."""
        return self.store.presign_get(key, self.url_seconds, content_type)

    @property
    def serving(self) -> bool:
        """Whether the store answers now (False while the embedded store restarts): a URL of it
        remembered from before is not handed out then (gateway/edge.py)."""
        return self.store.serving

    def download_url(self, path: DrivePath) -> str:
        """The 302's target for the file at ``path``. No HEAD (a redirect is the hot path, and
        the store itself answers 404 for a missing key), so the stored type is not known: the URL
        names the type a listing gives the file (drive/content_types.py: served_type)."""
        return self.read_url(path.key, served_type(None, path.name))

    def file_link(self, path: DrivePath) -> tuple[ObjectInfo, Link, str] | None:
        """The file at ``path``, its :meth:`read_url` and the served type that URL answers
        (drive/content_types.py: served_type); None: no file there."""
        info = self.store.head(path.key)
        if info is None:
            return None
        served = served_type(info.content_type, path.name)
        return info, Link(self.read_url(path.key, served), self.url_seconds), served

    # ------------------------------------------------------------ writes

    def writing(
        self, prefix: str, exclusive: Iterable[str] = (), shared: Iterable[str] = (), **options
    ) -> WriteLease | NoLease:
        """Hold keys of the drive ``prefix`` for one write, taken before it reads what it
        replaces and released once it is counted (``release()`` or a ``with``): one write of a
        key at a time, on every replica; a folder's key holds all under it; ``shared`` keys are
        only read whole (a COPY's source). ``options`` are the usage book's
        (drive/usage.py UsageBook.writing): ``within`` (the request's own leases, not taken
        again), ``quota``, ``frees`` (a DELETE), ``urls`` (False: upload URLs still out for the
        keys are left as they are, for a write that hands out another; else counted whole).
        WriteBusy when another write holds one and does not end soon; QuotaExceeded when those
        URLs' room does not fit ``quota``, unless the write ``frees`` room."""
        if self.usage is None:
            return NoLease()
        return self.usage.writing(Keys(prefix, tuple(exclusive), tuple(shared)), **options)

    @asynccontextmanager
    async def _held(
        self, prefix: str, keys: list[str], *, quota: int | None, urls: bool = True
    ) -> AsyncIterator[WriteLease | NoLease]:
        """:meth:`writing` for a caller on the event loop: the keys held for the block."""
        lease = await run_in_threadpool(partial(self.writing, prefix, keys, quota=quota, urls=urls))
        try:
            yield lease
        finally:
            await run_in_threadpool(lease.release)

    async def put_file(
        self,
        path: DrivePath,
        receive,
        *,
        quota: int | None,
        content_length: int | None,
        content_type: str,
        expected: tuple[Checksum, ...] = (),
        mtime: float | None = None,
    ) -> tuple[UploadResult, ObjectInfo | None]:
        """A body streamed through the gateway into the file ``path``, in the drive's order: the
        key held (WriteBusy; QuotaExceeded when upload URLs still out for it do not fit), what it
        replaces read and the names checked (NameConflict), the quota reserved
        (:meth:`begin_upload`: QuotaExceeded), then :meth:`receive_file`. What was stored, and
        the object it replaced (None: a new file). A store that fails the write because a folder
        above is a file is a NameConflict that says so."""
        async with self._held(path.prefix, [path.key], quota=quota):
            previous = await self.replaced_object(path)
            upload = await run_in_threadpool(self.begin_upload, path.prefix, previous, content_length, quota)
            try:
                result = await self.receive_file(
                    upload, path.key, receive,
                    content_length=content_length, content_type=content_type, expected=expected, mtime=mtime,
                )
            except StoreUnavailable:
                # A bare 500 from the store, explained when a folder above is a file.
                why = await run_in_threadpool(self.file_above, path.prefix, path.rel)
                if why:
                    raise names.NameConflict(why) from None
                raise
        return result, previous

    async def replaced_object(self, path: DrivePath) -> ObjectInfo | None:
        """What a write at ``path`` replaces, the names checked (drive/names.py: NameConflict)."""
        return await names.replaced_object(self.store, path)

    def begin_upload(
        self, prefix: str, previous: ObjectInfo | None, declared: int | None, quota: int | None
    ) -> Upload | None:
        """The quota side of a body streamed through the gateway, before any byte moves: its
        declared length reserved (QuotaExceeded if it does not fit), an unknown one as it
        arrives, a part at a time (``Upload.guard``). None: nothing is counted."""
        if self.usage is None:
            return None
        previous_size = previous.size if previous else 0
        return open_upload(
            self.usage, prefix, quota, previous_size, declared, self.settings.upload_unknown_length_part_bytes
        )

    async def receive_file(
        self,
        upload: Upload | None,
        key: str,
        receive,
        *,
        content_length: int | None,
        content_type: str,
        expected: tuple[Checksum, ...] = (),
        mtime: float | None = None,
    ) -> UploadResult:
        """The one way a request body reaches the store, for every protocol: read from the ASGI
        ``receive`` to the body's end (drive/uploads.py:receive_body), counted against ``upload``
        as it arrives (its quota), streamed and hashed by drive/uploads.py:stream_to_store in
        parts of this drive's sizes, and stored only whole and as announced (``expected``); then
        committed (:meth:`commit_upload`, with ``mtime``). Any failure aborts ``upload`` and stores
        nothing; the exceptions are stream_to_store's, for the caller to answer."""
        chunks = receive_body(receive)
        try:
            result = await stream_to_store(
                self.store,
                key,
                upload.guard(chunks) if upload is not None else chunks,
                content_length=content_length,
                content_type=content_type,
                part_size=choose_part_size(
                    content_length, self.settings.upload_part_bytes, self.settings.upload_unknown_length_part_bytes
                ),
                expected=expected,
            )
        except BaseException:
            if upload is not None:
                await run_in_threadpool(upload.abort)
            raise
        await run_in_threadpool(self.commit_upload, upload, key, result, mtime)
        return result

    def commit_upload(self, upload: Upload | None, key: str, written: Written, mtime: float | None) -> None:
        """A streamed body is stored whole: the drive's count (new minus old), then its facts."""
        if upload is not None:
            upload.commit(written.size)
        if self.facts is not None:
            self.facts.record(
                key, etag=written.etag or "", size=written.size, mtime=mtime, sha1=written.sha1, md5=written.md5
            )

    async def upload_url(
        self, path: DrivePath, size: int | None, quota: int | None, mtime: float | None, md5: DeclaredMd5 | None = None
    ) -> Link:
        """A presigned PUT of the file ``path`` (a 307 or a mint): :meth:`upload_urls` for one
        file, its refusal raised (WriteBusy, NameConflict, QuotaExceeded)."""
        (outcome,) = await self.upload_urls([UrlAsked(path, size, mtime, md5)], quota)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def upload_urls(self, asked: list[UrlAsked], quota: int | None) -> list[Link | Exception]:
        """Presigned PUTs for files of one drive (a mint, or a batch mint), each by the same
        rules and answered in its place, a URL or why not: a file named twice in the batch
        (DuplicatePath) or under another file of it (NameConflict) is refused; the others' keys
        are held at once (WriteBusy, for all) while their names are checked (NameConflict) and
        their room is held until each object appears or its URL expires (together when it fits,
        else each alone: QuotaExceeded for each that does not; ``size`` None: all the room
        left); the modification times (and declared MD5s) noted for objects of those sizes; then
        the URLs (the store records them, so cached listings check them). A URL signs the length:
        a store that checks signatures refuses a body of another size, so the hold covers
        whatever arrives; and the MD5 (``Content-MD5``), which the store checks."""
        outcomes: list[Link | Exception | None] = _refused_in_batch(asked)
        wanted = [(n, one) for n, one in enumerate(asked) if outcomes[n] is None]
        if not wanted:
            return outcomes
        at_once = asyncio.Semaphore(NAME_CHECKS_AT_ONCE)

        async def folders_above(one: UrlAsked) -> None:
            async with at_once:
                await run_in_threadpool(names.file_above, self.store, one.path.prefix, one.path.rel)

        prefix = wanted[0][1].path.prefix
        async with self._held(prefix, [one.path.key for _, one in wanted], quota=quota, urls=False):
            # The folders above the files asked of the store once each, not once a file: one file
            # of each deepest folder first (file_above remembers the folders it finds), so each
            # file's own check (the single mint's) asks only about the file itself.
            await asyncio.gather(*(folders_above(one) for one in _one_a_deepest_folder([one for _, one in wanted])))
            found = await names.replaced_objects(self.store, [one.path for _, one in wanted], at_once)
            named = []
            for (n, one), previous in zip(wanted, found):
                if isinstance(previous, names.NameConflict):
                    outcomes[n] = previous
                else:
                    named.append((n, one, previous))
            minted = await run_in_threadpool(self._hand_out_puts, [(one, previous) for _, one, previous in named], quota)
        for (n, _, _), outcome in zip(named, minted):
            outcomes[n] = outcome
        return outcomes

    def _hand_out_puts(
        self, asked: list[tuple[UrlAsked, ObjectInfo | None]], quota: int | None
    ) -> list[Link | QuotaExceeded]:
        """The room, facts and URLs of :meth:`upload_urls`' files (with what each replaces), in
        three writes for all (drive/usage.py ``UsageBook.hold_many``)."""
        expires_in = self.url_seconds
        if not asked:
            return []
        if self.usage is not None:
            puts = [PutHold(one.path.prefix, one.path.key, one.size, previous, expires_in) for one, previous in asked]
            refused = self.usage.hold_many(puts, quota)
        else:
            refused = [None] * len(asked)
        granted = [one for (one, _), refusal in zip(asked, refused) if refusal is None]
        if self.facts is not None:
            noted = [(one.path.key, one.size, one.mtime, self._vouched(one.md5)) for one in granted if one.size is not None]
            noted = [entry for entry in noted if entry[2] is not None or entry[3] is not None]
            if noted:
                self.facts.hand_out(noted, expires_in)
        wanted = [(one.path.key, one.size, one.md5 and one.md5.base64) for one in granted]
        urls = iter(self.store.presign_puts(wanted, expires_in))
        return [refusal if refusal is not None else Link(next(urls), expires_in) for refusal in refused]

    # ------------------------------------------------------------ multipart uploads sent straight to the store

    async def start_parts(
        self, path: DrivePath, size: int, quota: int | None, content_type: str | None
    ) -> PartsStarted:
        """A multipart upload of ``size`` bytes the client sends straight to the store into the
        file ``path`` (drive/direct.py), cut in parts of this drive's size (DirectUploadError
        when it cannot be): its key held while the names are checked (NameConflict), started in
        the store, its size held against the quota for ``direct_upload_seconds``
        (QuotaExceeded, and the upload aborted, if it does not fit), at most
        ``drive.direct.MAX_OPEN_UPLOADS`` open in a drive (TooManyUploads)."""
        plan = plan_parts(size, self.settings.upload_part_bytes)
        lifetime = self.settings.direct_upload_seconds
        async with self._held(path.prefix, [path.key], quota=quota, urls=False):
            previous = await self.replaced_object(path)
            upload_id = await run_in_threadpool(
                self._start_parts, path.prefix, path.key, plan, quota, previous, lifetime, content_type
            )
        return PartsStarted(upload_id, plan, lifetime)

    def _start_parts(
        self,
        prefix: str,
        key: str,
        plan: PartPlan,
        quota: int | None,
        previous: ObjectInfo | None,
        lifetime: int,
        content_type: str | None,
    ) -> str:
        if self.usage is None:
            raise NoSuchUpload("a drive without a usage book keeps no multipart uploads")
        if self.usage.open_parts_uploads(prefix) >= direct.MAX_OPEN_UPLOADS:
            raise TooManyUploads(
                f"this drive has {direct.MAX_OPEN_UPLOADS} multipart uploads open: complete or abort some first"
            )
        upload_id = self.store.create_multipart(key, content_type)
        try:
            put = PutHold(prefix, key, plan.size, previous, lifetime, upload_id=upload_id, part_bytes=plan.part_bytes)
            self.usage.hold(put, quota)
        except BaseException:
            self.store.abort_multipart(key, upload_id)
            raise
        return upload_id

    def _open_parts(self, prefix: str, key: str, upload_id: str):
        hold = self.usage.parts_upload(prefix, key, upload_id) if self.usage is not None else None
        if hold is None:
            raise NoSuchUpload(f"no multipart upload {upload_id[:80]} is open for this file")
        return hold, PartPlan(hold.size, hold.part_bytes)

    def part_url(self, prefix: str, key: str, upload_id: str, number: int, md5: DeclaredMd5 | None) -> Link:
        """Where the client PUTs part ``number``: its exact length (and declared MD5) signed in."""
        _, plan = self._open_parts(prefix, key, upload_id)
        url = self.store.presign_part(
            key, upload_id, number, self.url_seconds, plan.length(number), md5.base64 if md5 else None
        )
        return Link(url, self.url_seconds)

    async def finish_parts(
        self, path: DrivePath, upload_id: str, body: object, mtime: float | None, md5: DeclaredMd5 | None
    ) -> tuple[ObjectInfo, Facts]:
        """:meth:`complete_parts`, its key held and the names checked again (NameConflict): the
        object stored and its facts."""
        async with self._held(path.prefix, [path.key], quota=None, urls=False):
            await self.replaced_object(path)
            stored = await run_in_threadpool(self.complete_parts, path.prefix, path.key, upload_id, body, mtime, md5)
        return stored, await run_in_threadpool(self.facts_of, stored)

    def complete_parts(
        self, prefix: str, key: str, upload_id: str, body: object, mtime: float | None, md5: DeclaredMd5 | None
    ) -> ObjectInfo:
        """The gateway completes a multipart upload with every part of its plan; the object
        counts, new minus old, and its facts are the client's modification time and the MD5 the
        store vouches for (:func:`~drive.facts.proven_md5`), never a SHA1. Parts the store
        refuses (a wrong ETag: DirectUploadError ``bad_parts``) end the upload, its hold given
        back: some stores (rclone serve s3) drop it then, so none is kept open."""
        hold, plan = self._open_parts(prefix, key, upload_id)
        parts = completed_parts(plan, body)
        if not self.usage.keep_parts_upload(hold, COMPLETING_SECONDS):
            raise NoSuchUpload(f"the multipart upload {upload_id[:80]} expired")
        try:
            self.store.complete_multipart(key, upload_id, [UploadedPart(number, etag) for number, etag in parts])
        except PartsRefused as exc:
            self.usage.close_parts_upload(prefix, hold.id, None)
            try:
                self.store.abort_multipart(key, upload_id)
            except StoreError:
                pass  # the store dropped it already
            raise DirectUploadError("bad_parts", f"{exc}: the upload is aborted, start it again") from None
        stored = self.store.head(key)
        if stored is None:  # deleted at once by another client; nothing to count
            raise NoSuchUpload("the completed object is gone already")
        self.usage.close_parts_upload(prefix, hold.id, stored)
        if self.facts is not None:
            self.facts.record(key, etag=stored.etag, size=stored.size, mtime=mtime, sha1=None,
                              md5=proven_md5(stored, self._vouched(md5)))
        return stored

    def _vouched(self, md5: DeclaredMd5 | None) -> str | None:
        """Who vouches for a direct upload's MD5 (drive/facts.py proven_md5): the MD5 the client
        declared (the URL signs it), else the store, where its ETags are MD5s."""
        if md5 is not None:
            return md5.hex
        return STORE_MD5 if self.store.put_etag_is_md5 else None

    def abort_parts(self, prefix: str, key: str, upload_id: str) -> None:
        """The client gives a multipart upload up: its parts and its hold go."""
        hold, _ = self._open_parts(prefix, key, upload_id)
        self.usage.close_parts_upload(prefix, hold.id, None)
        self.store.abort_multipart(key, upload_id)

    def create_empty(
        self, path: DrivePath, content_type: str, *, quota: int | None, within: Iterable[WriteLease] = ()
    ) -> ObjectInfo:
        """Make the file ``path`` exist, empty (WebDAV's LOCK of an unmapped URL), its key held
        (WriteBusy; QuotaExceeded when upload URLs still out for it do not fit ``quota``),
        unless a write made it meanwhile (that write counted it; it is not replaced): what is
        there now."""
        with self.writing(path.prefix, [path.key], within=within, quota=quota):
            info = self.store.head(path.key)
            if info is None:
                etag = self.store.put_object(path.key, b"", content_type)
                info = ObjectInfo(path.key, 0, etag, datetime.now(timezone.utc), content_type)
        return info

    def mkdir(self, folder_key: str) -> None:
        """Make the folder exist, empty: its hidden marker object (drive/listing.py)."""
        self.store.put_object(folder_key + FOLDER_MARKER, b"")

    def delete(self, path: DrivePath, *, file_only: bool = False, within: Iterable[WriteLease] = ()) -> Deleted:
        """A DELETE, for every protocol: the file ``path`` names or, when it names none (or ends
        in "/"), everything under the folder of that name (``file_only``: a file or nothing, as
        a WebDAV file resource asks). What it may remove is held first (a DELETE frees room, so
        upload URLs still out never refuse it; WriteBusy when another write holds it; ``within``:
        the request's own leases), then looked at: the objects go from the store (and its
        cached listings), their facts and the drive's count. A drive's root: WholeDrive."""
        if path.rel == "":
            raise WholeDrive("refusing to delete a whole drive; delete its folders one by one")
        folder_key = path.key if path.is_dir else path.key + "/"
        held = [] if path.is_dir else [path.key]
        held += [] if file_only else [folder_key]
        with self.writing(path.prefix, held, within=within, frees=True):
            if not path.is_dir:
                info = self.delete_file(path.prefix, path.key)
                if info is not None or file_only:
                    return Deleted(int(info is not None), info)
            count, _ = self.delete_folder(path.prefix, folder_key)
        return Deleted(count)

    def delete_file(self, prefix: str, key: str) -> ObjectInfo | None:
        """Delete the object at ``key``, its facts, and its size from the drive's count; what was
        deleted, or None when nothing was there."""
        info = self.store.head(key)
        if info is not None:
            self.remove_file(prefix, info)
        return info

    def remove_file(self, prefix: str, info: ObjectInfo) -> None:
        """The object ``info`` goes (deleted, or moved away): from the store, its facts, the count."""
        self.store.delete(info.key)
        if self.facts is not None:
            self.facts.forget(info.key)
        self._count(prefix, -info.size)

    def remove_objects(self, prefix: str, folder_key: str, objects: list[ObjectInfo]) -> None:
        """The objects of a folder moved away go: from the store, their facts, the count."""
        self.store.delete_many([info.key for info in objects])
        if self.facts is not None:
            self.facts.forget_under(folder_key)
        self._count(prefix, -sum(info.size for info in objects))

    def transfer_keys(self, source: DrivePath, dest: DrivePath, *, move: bool) -> list[Keys]:
        """What a COPY or MOVE holds (:meth:`writing`) until the quota has counted it, so that no
        other write changes what is copied, moved or replaced meanwhile: both ends, the source
        only shared for a COPY (other copies of it may run at once); a source in another drive
        (a COPY out of an organisation's read-only drive) is held there."""
        if source.prefix == dest.prefix:
            if move:
                return [Keys(dest.prefix, (source.key, dest.key))]
            return [Keys(dest.prefix, (dest.key,), (source.key,))]
        return [Keys(dest.prefix, (dest.key,)), Keys(source.prefix, (), (source.key,))]

    def transfer(
        self,
        source: DrivePath,
        dest: DrivePath,
        *,
        info: ObjectInfo | None,
        move: bool,
        quota: int | None,
        mtime: float | None = None,
        depth_infinity: bool = True,
        extra: int = 0,
        then: Callable[[], None] = lambda: None,
    ) -> None:
        """A COPY or MOVE, the caller holding :meth:`transfer_keys` and the destination empty: of
        the file ``info`` (as read under the hold), or of the folder ``source`` (``info`` None;
        without ``depth_infinity``, the folder alone). In the drive's order: the room it adds reserved
        in the destination drive (QuotaExceeded; a move within one drive adds none), ``extra``
        bytes more for what comes along (WebDAV's dead properties, carried by ``then``); the
        store's server-side copies, their facts following (``mtime``: a file's new time); the
        count settled; for a MOVE the source removed; then ``then()``, the room still held."""
        if info is not None:
            objects = [info]
        else:
            objects = list(iter_objects(self.store, source.key)) if depth_infinity else []
        moved_within = move and source.prefix == dest.prefix  # the drive does not grow
        reserved = self._reserve(dest.prefix, 0 if moved_within else sum(o.size for o in objects) + extra, quota)
        added = 0
        try:
            if info is not None:
                added = self.copy_file(info, dest.key, mtime)
            elif depth_infinity:
                self.copy_folder(source.key, dest.key, objects)
                added = sum(o.size for o in objects)
            else:
                self.mkdir(dest.key)
            if move:
                self._settle(dest.prefix, reserved, added)
                reserved = added = 0
                if info is not None:
                    self.remove_file(source.prefix, info)
                else:
                    self.remove_objects(source.prefix, source.key, objects)
            then()
        finally:
            self._settle(dest.prefix, reserved, added)

    def _reserve(self, prefix: str, incoming: int, quota: int | None) -> int:
        """Reserve ``incoming`` bytes in the drive before a copy moves any (QuotaExceeded when
        they do not fit; 0 when nothing needs reserving); closed by :meth:`_settle`."""
        if self.usage is None or quota is None or incoming <= 0:
            return 0
        return self.usage.open(prefix, incoming, quota)

    def _settle(self, prefix: str, reserved: int, added: int) -> None:
        """What a write really added (0: it failed) counts; the rest of its reservation goes back."""
        if reserved:
            self.usage.settle(prefix, reserved, added)
        else:
            self._count(prefix, added)

    def copy_file(self, source: ObjectInfo, dest_key: str, mtime: float | None) -> int:
        """A server-side copy of ``source``, its facts following (``mtime``, when the client gave
        one, instead of the source's time): what the destination grew by (the caller reserved
        the source's size, and settles it with this)."""
        etag = self.store.copy(source.key, dest_key)
        added = source.size
        if etag.strip('"') != source.etag.strip('"'):
            # An upload URL for the source (which no request holds) landed meanwhile, or the
            # store gives a copy its own ETag: count what was copied (a MOVE then takes away
            # what was counted at the source: the URL's object replaced it).
            copied = self.store.head(dest_key)
            added = copied.size if copied is not None else source.size
        if self.facts is not None:
            self.facts.carry([Carried(source, dest_key, etag)], mtime=mtime)
        return added

    def copy_folder(self, src_key: str, dest_key: str, objects: list[ObjectInfo]) -> None:
        """Server-side copies of a folder's ``objects`` (listed by the caller, who reserved their
        bytes), :data:`COPY_THREADS` at a time, their facts following; the destination exists
        even if empty. What was copied before a failure is counted at the next recount."""
        pairs = [(info, dest_key + info.key[len(src_key) :]) for info in objects]
        if src_key + FOLDER_MARKER not in {info.key for info in objects}:
            pairs.append((None, dest_key + FOLDER_MARKER))

        inner = self.store.inner  # one change reported for the whole folder, below

        def copy_one(pair) -> Carried | None:
            source, target = pair
            if source is None:
                inner.put_object(target, b"")
                return None
            etag = inner.copy(source.key, target)
            return None if is_hidden(source.key) else Carried(source, target, etag)

        try:
            with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
                carried = [item for item in pool.map(copy_one, pairs) if item is not None]
        finally:
            self.store.changed([dest_key])
        if self.facts is not None:
            self.facts.carry(carried)

    def delete_folder(self, prefix: str, folder_key: str) -> tuple[int, int]:
        """Delete everything under ``folder_key`` (ending in "/"): (objects, bytes) freed."""
        count, freed = delete_prefix(self.store, folder_key)
        if self.facts is not None:
            self.facts.forget_under(folder_key)
        self._count(prefix, -freed)
        return count, freed

    def _count(self, prefix: str, delta: int) -> None:
        if self.usage is not None and delta:
            self.usage.add(prefix, delta)
