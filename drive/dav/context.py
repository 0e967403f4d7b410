"""One WebDAV request's context: who calls and which drive they see (:class:`DavContext`, put in
``environ[ENVIRON_KEY]`` by gateway/dav_app.py after authenticating the request, never read
from the URL alone), store failures as WebDAV statuses, and what the request remembers
(resources it resolved, which listed URLs have dead properties or locks) until it writes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator
from urllib.parse import unquote

from wsgidav.dav_error import (
    HTTP_BAD_REQUEST,
    HTTP_INSUFFICIENT_STORAGE,
    HTTP_LOCKED,
    HTTP_NOT_FOUND,
    HTTP_SERVICE_UNAVAILABLE,
    DAVError,
)

from drive.checksums import Checksum
from drive.facts import BadClientFact, FactsBook, client_facts
from drive.keys import InvalidPath
from drive.service import DriveService
from drive.store import ObjectNotFound, StoreUnavailable
from drive.store.caching import CachingStore
from drive.uploads import UploadTooLarge, WriteBusy
from drive.usage import UsageBook, free_bytes

ENVIRON_KEY = "kgpu.dav"
CACHE_KEY = "kgpu.dav.cache"  # path -> resource, this request
DEST_EXISTED_KEY = "kgpu.dav.dest_existed"
EXTRAS_KEY = "kgpu.dav.extras"  # folder ref URL -> (ref URLs with dead properties, lock roots), this request
MTIME_KEY = "kgpu.dav.mtime"  # the request's X-OC-Mtime, checked (seconds since the epoch)
CHECKSUMS_KEY = "kgpu.dav.checksums"  # the request's OC-Checksum, checked
LISTINGS_KEY = "kgpu.dav.listings"  # folder key -> its listing begun when a PROPFIND resolved it, this request
MTIME_APPLIED_KEY = "kgpu.dav.mtime_applied"  # the write gave a file that time: answer X-OC-Mtime: accepted
SHARED = "shared"  # the virtual read-only subtree at the root of my drive
CLOSE_CONNECTION = ("Connection", "close")  # after a body that did not arrive whole: its rest may still be coming


@dataclass
class DavContext:
    """Who is calling and which drive they see; one per request."""

    drive: DriveService  # the drive's operations (drive/service.py), the HTTP routes' own
    prefix: str  # the caller's own drive, "users/7/"
    principal: str  # lock owner, "user:7"
    load_orgs: Callable[[], list[str]] = list  # slugs of the orgs the caller may read
    quota_bytes: int | None = None
    _orgs: list[str] | None = field(default=None, repr=False)
    _leases: list = field(default_factory=list, repr=False)  # the keys this request holds now
    # A PROPPATCH's dead properties, (ref URL, name) -> XML value (None: removed), noted by its dry
    # run and made at once by its real run; then True, or the DAVError that refused them.
    property_plan: dict = field(default_factory=dict, repr=False)
    property_outcome: object = field(default=None, repr=False)
    # (status, error_code, message): the whole request's answer, in the envelope, instead of
    # wsgidav's (a PROPPATCH past the quota: 507 rather than a 207; gateway/dav_app.py).
    answer: tuple | None = None

    @property
    def store(self) -> CachingStore:
        """The drive's store: every write through it drops the listings it changes."""
        return self.drive.store

    @property
    def usage(self) -> UsageBook | None:
        """What the drive holds and may take (drive/usage.py)."""
        return self.drive.usage

    @property
    def facts(self) -> FactsBook | None:
        """Modification times and checksums (drive/facts.py)."""
        return self.drive.facts

    def org_slugs(self) -> list[str]:
        if self._orgs is None:
            self._orgs = list(self.load_orgs())
        return self._orgs

    def used_bytes(self) -> int:
        return self.usage.used_bytes(self.prefix) if self.usage is not None else 0

    def available_bytes(self) -> int | None:
        """What the caller's drive may still take (the quota's one formula, drive.usage.room_left:
        what uploads in flight were promised is not available either); None: no quota."""
        if self.usage is None or self.quota_bytes is None:
            return None
        return free_bytes(self.usage, self.prefix, self.quota_bytes)

    def quota_of(self, prefix: str) -> int | None:
        """The quota a write into the drive ``prefix`` counts against: the caller's own drive's
        (the others it sees are read-only here)."""
        return self.quota_bytes if prefix == self.prefix else None

    def hold_keys(
        self,
        prefix: str,
        exclusive: list[str] = (),
        shared: list[str] = (),
        *,
        frees: bool = False,
        too_large: int = HTTP_INSUFFICIENT_STORAGE,
    ):
        """Hold keys of ``prefix`` for a write (drive/service.py: DriveService.writing), as a
        context manager or until ``release()``. What this request holds already is not taken
        again. 423 ``busy`` when another write holds one and does not end soon; ``too_large``
        quota_exceeded when the room the upload URLs still out for them need does not fit (a
        write that ``frees`` it, a DELETE, never is). Read what a write replaces inside."""
        with write_errors(too_large):
            lease = self.drive.writing(
                prefix, exclusive, shared, within=self._leases, quota=self.quota_of(prefix), frees=frees
            )
        self._leases.append(lease)
        return _Held(lease, lambda: self._leases.remove(lease))

    @property
    def leases(self) -> tuple:
        """What this request holds now (the ``within`` of a drive operation that holds keys itself)."""
        return tuple(self._leases)


@contextmanager
def write_errors(too_large: int = HTTP_INSUFFICIENT_STORAGE) -> Iterator[None]:
    """A write's refusals by the drive as WebDAV statuses: 423 ``busy`` when another write holds
    its keys and does not end soon, ``too_large`` quota_exceeded when it does not fit."""
    try:
        yield
    except WriteBusy as exc:
        raise coded_error(HTTP_LOCKED, "busy", str(exc)) from None
    except UploadTooLarge as exc:
        raise coded_error(too_large, "quota_exceeded", str(exc)) from None


class _Held:
    """A lease a request holds: released by ``release()`` or at the end of a ``with``."""

    def __init__(self, lease, restore: Callable[[], None]):
        self._lease = lease
        self._restore = restore

    def release(self) -> None:
        if self._restore is not None:
            self._restore, restore = None, self._restore
            restore()
            self._lease.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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


class AnswerCut(BaseException):
    """An answer already begun (a streamed PROPFIND) that cannot be finished: the store failed
    after its first page. No status can say so any more, so the connection is cut and the client
    sees an unfinished body, never a short listing that looks complete. A BaseException, so that
    no handler on the way (wsgidav's ErrorPrinter, the gateway's own) turns it into an error page
    written after what was sent; the HTTP server closes the connection (uvicorn logs it)."""


def context_of(environ: dict) -> DavContext:
    return environ[ENVIRON_KEY]


def coded_error(status: int, code: str, message: str, **extra) -> DAVError:
    """A DAVError whose envelope carries ``code`` as its error_code (gateway/dav_app.py), the same
    one the HTTP routes answer for the same mistake."""
    return DAVError(status, f"[{code}] {message}", **extra)


def read_client_facts(environ: dict) -> None:
    """Check the ``X-OC-Mtime`` and ``OC-Checksum`` a client sent (drive/facts.py: 400 with
    bad_mtime or bad_checksum) and keep them in the environ for the write that follows."""
    try:
        told = client_facts(lambda name: environ.get("HTTP_" + name.upper().replace("-", "_")))
    except BadClientFact as exc:
        raise coded_error(HTTP_BAD_REQUEST, exc.code, str(exc)) from None
    if told.mtime is not None:
        environ[MTIME_KEY] = told.mtime
    if told.checksums:
        environ[CHECKSUMS_KEY] = told.checksums


def client_mtime(environ: dict) -> float | None:
    """The request's X-OC-Mtime; the caller gives it to a file (noted for the answer's header)."""
    mtime = environ.get(MTIME_KEY)
    if mtime is not None:
        environ[MTIME_APPLIED_KEY] = True
    return mtime


def client_checksums(environ: dict) -> tuple[Checksum, ...]:
    return environ.get(CHECKSUMS_KEY, ())


def forget_after_write(environ: dict) -> None:
    """After a write: forget this request's resources and hints (the store's cached listings
    were dropped by the write itself, drive/store/caching.py)."""
    environ.get(CACHE_KEY, {}).clear()
    environ.pop(EXTRAS_KEY, None)
    environ.pop(LISTINGS_KEY, None)


def folder_pages(environ: dict, folder_key: str) -> Iterator[list]:
    """A folder's listing, a page at a time (drive/store/caching.py): the one this request began
    when it resolved the folder (its first page told the folder exists), else a new one."""
    begun = environ.get(LISTINGS_KEY, {}).pop(folder_key, None)
    return begun if begun is not None else context_of(environ).store.folder_pages(folder_key)


def cache_key(path: str) -> str:
    return "/" + path.strip("/")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)



def listed_without(environ: dict, ref_url: str, *, locks: bool) -> bool:
    """True when a listing of the folder that holds ``ref_url`` (or of itself), made in this
    request (:func:`drive.dav.storage.note_folder_extras`), found no dead properties
    (``locks=False``) or no lock (``locks=True``) for it: nothing more need be asked."""
    known = environ.get(EXTRAS_KEY)
    if not known:
        return False
    url = unquote(ref_url).rstrip("/") or "/"
    found = known.get(url)
    if found is None:
        found = known.get(url.rsplit("/", 1)[0])
        if found is None:
            return False
    with_properties, with_locks = found
    if locks:
        return url not in with_locks
    return url not in with_properties
