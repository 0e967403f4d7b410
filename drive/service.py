"""The drive's operations, the same for every protocol (the HTTP routes of gateway/drive_http.py
and the WebDAV resources of drive/dav/): each runs the drive's rules in one order — names
(drive/names.py, checked by the caller before), the quota (the usage book, drive/usage.py),
the store, the facts (drive/facts.py) — and the listing cache follows from the store itself
(drive/store/caching.py). The keys a write changes are held through :meth:`DriveService.writing`
(the one way every protocol holds them) from before it reads what it replaces until it is
counted; the caller turns the outcome into its protocol's answer; nothing here speaks HTTP.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain
from typing import Callable, Iterable, Iterator, Protocol

from starlette.concurrency import run_in_threadpool

from drive import direct
from drive.checksums import Checksum
from drive.direct import DeclaredMd5, NoSuchUpload, PartPlan, TooManyUploads, completed_parts
from drive.facts import STORE_MD5, Carried, Facts, FactsBook, proven_md5, resolve
from drive.keys import DrivePath
from drive.listing import FOLDER_MARKER, is_hidden
from drive.store import (
    CommonPrefix,
    ListPage,
    ObjectInfo,
    PartsRefused,
    StoreError,
    UploadedPart,
    delete_prefix,
    iter_objects,
)
from drive.store.caching import CachingStore
from drive.uploads import MiB, UploadResult, choose_part_size, receive_body, stream_to_store
from drive.usage import NoLease, QuotaExceeded, Upload, UsageBook, WriteLease, open_upload

COPY_THREADS = 8  # server-side copies at once, for a folder
Member = tuple[ObjectInfo | CommonPrefix, Facts | None]  # a folder's member: a file with its facts, or a folder
COMPLETING_SECONDS = 600  # a multipart upload being completed is held at least this much longer


@dataclass(frozen=True)
class UrlAsked:
    """One presigned PUT a mint asks for: its key, its size (None: all the room left), what it
    replaces (read while the key is held), the client's modification time and declared MD5."""

    key: str
    size: int | None
    previous: ObjectInfo | None
    mtime: float | None = None
    md5: DeclaredMd5 | None = None


class Written(Protocol):
    """What a body streamed to the store was (drive/uploads.py's result)."""

    size: int
    etag: str | None
    sha1: str | None
    md5: str | None


@dataclass(frozen=True)
class DriveService:
    store: CachingStore
    usage: UsageBook | None = None  # None: nothing counted (a test's bare drive)
    facts: FactsBook | None = None  # None: no modification times or checksums kept
    part_bytes: int = 8 * MiB  # a streamed body's parts, its length known (KGPU_UPLOAD_PART_BYTES)
    unknown_length_part_bytes: int = 12 * MiB  # and unknown (KGPU_UPLOAD_UNKNOWN_LENGTH_PART_BYTES)

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

    def files(self, prefix: str, first: ListPage) -> Iterator[tuple[ObjectInfo, Facts]]:
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

    def read_url(self, key: str, expires_in: int) -> str:
        """Where the client reads the object: a presigned GET (the bytes never pass through here)."""
        return self.store.presign_get(key, expires_in)

    # ------------------------------------------------------------ writes (the caller holds the keys)

    def writing(
        self,
        prefix: str,
        exclusive: Iterable[str] = (),
        shared: Iterable[str] = (),
        *,
        within: Iterable[WriteLease] = (),
        quota: int | None = None,
        frees: bool = False,
        urls: bool = True,
    ) -> WriteLease | NoLease:
        """Hold keys of the drive ``prefix`` for one write, taken before it reads what it
        replaces and released once it is counted (``release()`` or a ``with``): one write of a
        key at a time, on every replica; a folder's key holds all under it; ``shared`` keys are
        only read whole (a COPY's source); what ``within`` (the request's own leases) holds is
        not taken again. Upload URLs still out for the keys are counted whole (``urls`` False:
        left as they are, for a write that hands out another). WriteBusy when another write
        holds one and does not end soon; QuotaExceeded when those URLs' room does not fit
        ``quota``, unless the write ``frees`` room (a DELETE)."""
        if self.usage is None:
            return NoLease()
        return self.usage.writing(
            prefix, list(exclusive), list(shared), within=within, quota=quota, frees=frees, urls=urls
        )

    def begin_upload(
        self, prefix: str, previous: ObjectInfo | None, declared: int | None, quota: int | None
    ) -> Upload | None:
        """The quota side of a body streamed through the gateway, before any byte moves: its
        declared length reserved (QuotaExceeded if it does not fit), an unknown one as it
        arrives, a part at a time (``Upload.guard``). None: nothing is counted."""
        if self.usage is None:
            return None
        previous_size = previous.size if previous else 0
        return open_upload(self.usage, prefix, quota, previous_size, declared, self.unknown_length_part_bytes)

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
                part_size=choose_part_size(content_length, self.part_bytes, self.unknown_length_part_bytes),
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

    def upload_url(
        self,
        prefix: str,
        key: str,
        size: int | None,
        quota: int | None,
        previous: ObjectInfo | None,
        mtime: float | None,
        expires_in: int,
        md5: DeclaredMd5 | None = None,
    ) -> str:
        """A presigned PUT of ``key``: the room its bytes need held until the object appears or
        the URL expires (QuotaExceeded if it does not fit; ``size`` None: all the room left), the
        modification time (and declared MD5) noted for the object of that size, then the URL (the
        store records it, so cached listings check it). The length is signed into the URL: a
        store that checks signatures refuses a body of another size, so the hold covers whatever
        arrives; so is the MD5 (``Content-MD5``), which the store checks."""
        (outcome,) = self.upload_urls(prefix, [UrlAsked(key, size, previous, mtime, md5)], quota, expires_in)
        if isinstance(outcome, QuotaExceeded):
            raise outcome
        return outcome

    def upload_urls(
        self, prefix: str, asked: list[UrlAsked], quota: int | None, expires_in: int
    ) -> list[str | QuotaExceeded]:
        """:meth:`upload_url` for many files of one drive at once (a batch mint), each by the same
        rules, in three writes for all: their room held together when it fits, else each alone
        (drive/usage.py ``UsageBook.hold_many``: each that does not fit gets its QuotaExceeded in
        its place, and nothing is held past the quota); the facts of those granted; their URLs."""
        if self.usage is not None:
            refused = self.usage.hold_many(prefix, [(a.key, a.size, a.previous) for a in asked], quota, expires_in)
        else:
            refused = [None] * len(asked)
        granted = [a for a, refusal in zip(asked, refused) if refusal is None]
        if self.facts is not None:
            noted = [(a.key, a.size, a.mtime, self._vouched(a.md5)) for a in granted if a.size is not None]
            noted = [entry for entry in noted if entry[2] is not None or entry[3] is not None]
            if noted:
                self.facts.hand_out(noted, expires_in)
        urls = iter(self.store.presign_puts([(a.key, a.size, a.md5 and a.md5.base64) for a in granted], expires_in))
        return [refusal if refusal is not None else next(urls) for refusal in refused]

    # ------------------------------------------------------------ multipart uploads sent straight to the store

    def start_parts(
        self,
        prefix: str,
        key: str,
        plan: PartPlan,
        quota: int | None,
        previous: ObjectInfo | None,
        lifetime: int,
        content_type: str | None,
    ) -> str:
        """A multipart upload of ``plan.size`` bytes the client sends straight to the store
        (drive/direct.py): started in the store, its size held against the quota for
        ``lifetime`` seconds (QuotaExceeded, and the upload aborted, if it does not fit), at most
        ``drive.direct.MAX_OPEN_UPLOADS`` open in a drive (TooManyUploads). Its id."""
        if self.usage is None:
            raise NoSuchUpload("a drive without a usage book keeps no multipart uploads")
        if self.usage.open_parts_uploads(prefix) >= direct.MAX_OPEN_UPLOADS:
            raise TooManyUploads(
                f"this drive has {direct.MAX_OPEN_UPLOADS} multipart uploads open: complete or abort some first"
            )
        upload_id = self.store.create_multipart(key, content_type)
        try:
            self.usage.hold(prefix, key, plan.size, quota, previous, lifetime,
                            upload_id=upload_id, part_bytes=plan.part_bytes)
        except BaseException:
            self.store.abort_multipart(key, upload_id)
            raise
        return upload_id

    def _open_parts(self, prefix: str, key: str, upload_id: str):
        hold = self.usage.parts_upload(prefix, key, upload_id) if self.usage is not None else None
        if hold is None:
            raise NoSuchUpload(f"no multipart upload {upload_id[:80]} is open for this file")
        return hold, PartPlan(hold.size, hold.part_bytes)

    def part_url(
        self, prefix: str, key: str, upload_id: str, number: int, expires_in: int, md5: DeclaredMd5 | None
    ) -> str:
        """Where the client PUTs part ``number``: its exact length (and declared MD5) signed in."""
        _, plan = self._open_parts(prefix, key, upload_id)
        return self.store.presign_part(
            key, upload_id, number, expires_in, plan.length(number), md5.base64 if md5 else None
        )

    def complete_parts(
        self, prefix: str, key: str, upload_id: str, body: object, mtime: float | None, md5: DeclaredMd5 | None
    ) -> ObjectInfo:
        """The gateway completes a multipart upload with every part of its plan; the object
        counts, new minus old, and its facts are the client's modification time and the MD5 the
        store vouches for (:func:`~drive.facts.proven_md5`), never a SHA1. Parts the store
        refuses (PartsRefused: a wrong ETag) end the upload, its hold given back: some stores
        (rclone serve s3) drop it then, so none is kept open."""
        hold, plan = self._open_parts(prefix, key, upload_id)
        parts = completed_parts(plan, body)
        if not self.usage.keep_parts_upload(hold, COMPLETING_SECONDS):
            raise NoSuchUpload(f"the multipart upload {upload_id[:80]} expired")
        try:
            self.store.complete_multipart(key, upload_id, [UploadedPart(number, etag) for number, etag in parts])
        except PartsRefused:
            self.usage.close_parts_upload(prefix, hold.id, None)
            try:
                self.store.abort_multipart(key, upload_id)
            except StoreError:
                pass  # the store dropped it already
            raise
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

    def create_empty(self, key: str, content_type: str) -> ObjectInfo:
        """Make ``key`` exist, an empty file, unless a write made it meanwhile (that write counted
        it; it is not replaced): what is there now."""
        info = self.store.head(key)
        if info is None:
            etag = self.store.put_object(key, b"", content_type)
            info = ObjectInfo(key, 0, etag, datetime.now(timezone.utc), content_type)
        return info

    def mkdir(self, folder_key: str) -> None:
        """Make the folder exist, empty: its hidden marker object (drive/listing.py)."""
        self.store.put_object(folder_key + FOLDER_MARKER, b"")

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
        """A COPY or MOVE, both ends held by the caller and the destination empty: of the file
        ``info`` (as read under the hold), or of the folder ``source`` (``info`` None; without
        ``depth_infinity``, the folder alone). In the drive's order: the room it adds reserved
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
