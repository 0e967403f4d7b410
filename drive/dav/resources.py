"""The resources of a drive as wsgidav sees them.

* a **file** (:class:`FileResource`) is an object; its live properties come from the store
  (size, ETag, Last-Modified, Content-Type).
* a **folder** (:class:`FolderResource`) is a key prefix: it exists while any key starts with
  ``rel/``. MKCOL makes an empty folder exist by writing an empty marker object
  ``rel/.kgpu-folder`` (a key ending in ``/`` would do on S3, but ``rclone serve s3`` cannot
  store one). Markers are hidden from every listing, WebDAV and HTTP
  (:func:`drive.listing.is_hidden`), and the name is refused for writes.
* a folder's members come from one delimited list call per 1,000 keys (cached while current,
  :mod:`drive.store.caching`): the list already carries size, ETag and Last-Modified, so no
  member is ever HEADed.
* ``shared/`` (:class:`SharedRoot`) at the root of my drive: one read-only folder per
  organisation the caller may read.
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING
from urllib.parse import quote

from wsgidav import util
from wsgidav.dav_error import (
    HTTP_BAD_REQUEST,
    HTTP_CONFLICT,
    HTTP_FORBIDDEN,
    HTTP_NOT_FOUND,
    HTTP_REQUEST_ENTITY_TOO_LARGE,
    DAVError,
)
from wsgidav.dav_provider import DAVCollection, DAVNonCollection
from wsgidav.xml_tools import etree

from drive import keys, names
from drive.checksums import InvalidChecksum, oc_checksums_text, parse_oc_checksum
from drive.content_types import guess_type, served_type, stored_type
from drive.dav.bodies import BodyWriter, PresignedReader
from drive.dav.context import (
    CACHE_KEY,
    CLOSE_CONNECTION,
    SHARED,
    cache_key,
    context_of,
    coded_error,
    folder_pages,
    forget_after_write,
    listed_without,
    store_errors,
    utcnow,
    write_errors,
)
from drive.dav.storage import note_folder_extras, remove_property_tree
from drive.dav.transfer import transfer
from drive.facts import Facts, FactRow, InvalidMtime, parse_lastmodified, resolve
from drive.keys import DrivePath
from drive.listing import is_hidden
from drive.service import WholeDrive
from drive.store import CommonPrefix, ObjectInfo
from drive.uploads import UploadTooLarge

if TYPE_CHECKING:
    from drive.dav.provider import ObjectStoreProvider

OC_NS = "{http://owncloud.org/ns}"
OC_CHECKSUMS = OC_NS + "checksums"  # <oc:checksums><oc:checksum>SHA1:… MD5:…</oc:checksum></oc:checksums>
LASTMODIFIED = "{DAV:}lastmodified"  # what ownCloud clients (rclone's owncloud vendor) PROPPATCH
_UNREAD = object()  # a file's fact row not read yet


def folder_fact_rows(folder: "FolderResource") -> dict[str, FactRow]:
    """The fact rows of a folder's files, one query (none outside a PROPFIND: nothing reads them)."""
    ctx = context_of(folder.environ)
    if ctx.facts is None:
        return {}
    return ctx.facts.in_folder(folder.location.key)


def _mtime_of(value) -> float:
    """A ``{DAV:}lastmodified`` value: seconds since the epoch (what rclone sends) or an HTTP date.
    One that cannot be is a 409 for this property in the 207 (RFC 4918 9.2.1: a value whose
    semantics are not appropriate for the property), with what is wrong in words."""
    if value is None:
        raise DAVError(HTTP_FORBIDDEN, "lastmodified cannot be removed, only set")
    try:
        return parse_lastmodified(value.text or "")
    except InvalidMtime as exc:
        raise DAVError(HTTP_CONFLICT, str(exc)) from None


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
        try:
            names.check_new_name(name)
        except names.ReservedName as exc:
            raise DAVError(HTTP_FORBIDDEN, str(exc)) from None
        if name == SHARED and self.location.rel == "" and self.location.prefix == context_of(self.environ).prefix:
            raise DAVError(HTTP_FORBIDDEN, "shared/ is reserved for your organisations' drives")

    def get_property_value(self, name):
        if name == "{DAV:}lockdiscovery" and listed_without(self.environ, self.get_ref_url(), locks=True):
            return etree.Element(name)  # what wsgidav builds for a URL without locks, without asking
        return super().get_property_value(name)

    def set_property_value(self, name, value, *, dry_run=False):
        self._require_writable()
        return super().set_property_value(name, value, dry_run=dry_run)

    def handle_copy(self, dest_path, *, depth_infinity):
        return transfer(self, dest_path, self._destination_folder(dest_path), move=False, depth_infinity=depth_infinity)

    def handle_move(self, dest_path):
        self._require_writable()
        return transfer(self, dest_path, self._destination_folder(dest_path), move=True, depth_infinity=True)

    def _destination_folder(self, dest_path: str) -> "FolderResource":
        """The writable folder a COPY or MOVE to ``dest_path`` writes into, the new name checked."""
        if util.is_child_uri(dest_path, self.path):
            raise DAVError(HTTP_FORBIDDEN, "cannot copy or move a resource over a folder that holds it")
        with store_errors():
            parent = self.provider.get_resource_inst(util.get_uri_parent(dest_path), self.environ)
            if parent is None or not isinstance(parent, FolderResource):
                raise DAVError(HTTP_FORBIDDEN if parent is not None else HTTP_NOT_FOUND, "no such destination folder")
            parent._require_writable()
            parent._check_new_name(util.get_uri_name(dest_path))
        return parent


class FileResource(_Located, DAVNonCollection):
    def __init__(
        self,
        path: str,
        environ: dict,
        location: DrivePath,
        info: ObjectInfo | None,
        readonly: bool,
        fact_row=_UNREAD,
    ):
        DAVNonCollection.__init__(self, path, environ)
        self.location = location
        self.info = info  # None: created by this PUT, not yet written
        self.readonly = readonly
        self._writer: BodyWriter | None = None
        self._held = None  # the key, held from begin_write to end_write
        self._fact_row = fact_row  # its row of object_facts (None: none), read when first needed

    def get_facts(self) -> Facts | None:
        """Its modification time and hashes (drive/facts.py); None while it does not exist."""
        if self.info is None:
            return None
        if self._fact_row is _UNREAD:
            ctx = context_of(self.environ)
            self._fact_row = ctx.facts.get(self.location.key) if ctx.facts is not None else None
        return resolve(self.info, self._fact_row)

    def get_content_length(self) -> int:
        return self.info.size if self.info else 0

    def get_content_type(self) -> str:
        return served_type(self.info.content_type if self.info else None, self.name)

    def get_display_name(self) -> str:
        return self.name

    def get_etag(self) -> str | None:
        # Unquoted here (wsgidav quotes it in headers and compares it unquoted in If headers);
        # the getetag property is quoted in get_property_value.
        # An empty one ('""': the embedded store's HEAD of a file another request is deleting)
        # is none, not an ETag wsgidav refuses with a 500.
        return (self.info.etag.strip('"') or None) if self.info else None

    def support_etag(self) -> bool:
        return True

    def support_ranges(self) -> bool:
        return True

    def get_last_modified(self) -> float | None:
        if self.info is None:
            return None
        cached = self.__dict__.get("_modified")
        if cached is None or cached[0] is not self.info:
            cached = self.__dict__["_modified"] = (self.info, self.get_facts().mtime.timestamp())
        return cached[1]

    def get_property_value(self, name):
        if name == "{DAV:}getetag":
            etag = self.get_etag()
            if etag is None:
                raise DAVError(HTTP_NOT_FOUND)
            return f'"{etag}"'
        if name == OC_CHECKSUMS:
            facts = self.get_facts()
            if facts is None or not facts.has_hashes:
                raise DAVError(HTTP_NOT_FOUND)  # its bytes never passed through the gateway
            element = etree.Element(OC_CHECKSUMS)
            etree.SubElement(element, OC_NS + "checksum").text = oc_checksums_text(facts.sha1, facts.md5)
            return element
        return super().get_property_value(name)

    def set_property_value(self, name, value, *, dry_run=False):
        if name == LASTMODIFIED and self.info is not None:
            self._require_writable()
            mtime = _mtime_of(value)
            ctx = context_of(self.environ)
            if not dry_run and ctx.facts is not None:
                ctx.facts.set_mtime(self.info, mtime)
                self._fact_row = _UNREAD
                self.__dict__.pop("_modified", None)
            return
        if name == OC_CHECKSUMS and self.info is not None:
            # Computed here, never set: a client may only send back what it was told (rclone
            # does, with the modification time); anything else is refused.
            self._require_writable()
            facts = self.get_facts()
            text = " ".join((child.text or "") for child in (value if value is not None else []))
            try:
                claimed = parse_oc_checksum(text)
            except InvalidChecksum as exc:
                raise coded_error(HTTP_BAD_REQUEST, "bad_checksum", str(exc)) from None
            ours = {"SHA1": facts.sha1, "MD5": facts.md5}
            if not facts.has_hashes or any(ours[c.algorithm] != c.hex for c in claimed):
                raise DAVError(HTTP_CONFLICT, "checksums are computed by the server from the bytes it received")
            return
        return super().set_property_value(name, value, dry_run=dry_run)

    def get_content(self):
        if not self.provider.proxy_reads or self.info is None:
            raise DAVError(HTTP_FORBIDDEN, "downloads are redirects here: GET follows a 302")
        ctx = context_of(self.environ)
        return PresignedReader(ctx.drive.read_url(self.location.key), self.info.size)

    def begin_write(self, *, content_type=None):
        self._require_writable()
        ctx = context_of(self.environ)
        # Held until end_write: what this PUT replaces is read again once no other write can change it.
        self._held = ctx.hold_keys(self.location.prefix, [self.location.key], too_large=HTTP_REQUEST_ENTITY_TOO_LARGE)
        try:
            return self._begin_held_write(ctx, content_type)
        except BaseException:
            self._held.release()
            raise

    def _begin_held_write(self, ctx, content_type):
        length_header = self.environ.get("CONTENT_LENGTH", "")
        length = int(length_header) if length_header.isdigit() else None
        with store_errors():
            self.info = ctx.store.head(self.location.key)
        reservation = None  # drive.usage.Upload: the quota reserved before any byte moves
        if self.location.prefix == ctx.prefix:
            try:
                with store_errors():
                    reservation = ctx.drive.begin_upload(ctx.prefix, self.info, length, ctx.quota_bytes)
            except UploadTooLarge as exc:
                raise DAVError(HTTP_REQUEST_ENTITY_TOO_LARGE, str(exc), add_headers=[CLOSE_CONNECTION]) from None
        kind = stored_type(content_type, self.name)
        self._writer = BodyWriter(
            self.environ, ctx.drive, self.location.key, kind, content_length=length, reservation=reservation
        )
        return self._writer

    def end_write(self, *, with_errors):
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            self._end_held_write(writer, with_errors)
        finally:
            self._held.release()

    def _end_held_write(self, writer: BodyWriter, with_errors: bool) -> None:
        if with_errors:
            if writer.reservation is not None:
                writer.reservation.abort()  # when the body was never read (receive_file aborts its own)
            return
        self.info = ObjectInfo(self.location.key, writer.size, writer.etag or "", utcnow(), writer.content_type)
        self._fact_row = _UNREAD
        forget_after_write(self.environ)
        self.environ[CACHE_KEY][cache_key(self.path)] = self

    def delete(self):
        self._require_writable()
        ctx = context_of(self.environ)
        with write_errors(), store_errors():
            deleted = ctx.drive.delete(self.location, file_only=True, within=ctx.leases).file  # what is there now
        if deleted is None:
            raise DAVError(HTTP_NOT_FOUND)  # another request deleted or moved it meanwhile
        self.info = deleted
        self.remove_all_properties(recursive=False)
        self.remove_all_locks(recursive=False)
        forget_after_write(self.environ)


class FolderResource(_Located, DAVCollection):
    def __init__(self, path: str, environ: dict, location: DrivePath, readonly: bool):
        DAVCollection.__init__(self, path, environ)
        self.location = location  # rel is "" (a drive's root) or ends in "/"
        self.readonly = readonly

    @property
    def _is_my_root(self) -> bool:
        return self.location.rel == "" and self.location.prefix == context_of(self.environ).prefix

    def get_display_name(self) -> str:
        return self.name

    def get_used_bytes(self):
        return context_of(self.environ).used_bytes() if self._is_my_root else None

    def get_available_bytes(self):
        return context_of(self.environ).available_bytes() if self._is_my_root else None

    def get_member_list(self):
        ctx = context_of(self.environ)
        cache = self.environ.setdefault(CACHE_KEY, {})
        base = self.location.key
        members = []
        rows = None
        with store_errors():
            entries = chain.from_iterable(folder_pages(self.environ, base))
            if self.environ.get("REQUEST_METHOD") == "PROPFIND":
                note_folder_extras(self)
                rows = folder_fact_rows(self)
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
                        _UNREAD if rows is None else rows.get(entry.key),
                    )
                cache.setdefault(cache_key(member.path), member)
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
        ctx = context_of(self.environ)
        with store_errors():
            location = keys.from_text(self.location.prefix, self.location.rel + name)
            resource = FileResource(util.join_uri(self.path, name), self.environ, location, None, False)
            if self.environ["REQUEST_METHOD"] != "PUT":
                # LOCK on an unmapped URL creates an empty resource (RFC 4918 7.3).
                with write_errors():
                    resource.info = ctx.drive.create_empty(
                        location, guess_type(name), quota=ctx.quota_of(location.prefix), within=ctx.leases
                    )
        forget_after_write(self.environ)
        self.environ[CACHE_KEY][cache_key(resource.path)] = resource
        return resource

    def create_collection(self, name):
        self._require_writable()
        self._check_new_name(name)
        with store_errors():
            location = keys.from_text(self.location.prefix, self.location.rel + name + "/")
            context_of(self.environ).drive.mkdir(location.key)
        forget_after_write(self.environ)

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
        ctx = context_of(self.environ)
        try:
            with write_errors(), store_errors():
                ctx.drive.delete(self.location, within=ctx.leases)
        except WholeDrive as exc:
            raise DAVError(HTTP_FORBIDDEN, str(exc)) from None
        remove_property_tree(self.provider, self.get_ref_url())
        self.remove_all_locks(recursive=True)
        forget_after_write(self.environ)
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
        return list(context_of(self.environ).org_slugs())

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
