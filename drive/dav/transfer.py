"""COPY and MOVE: server-side copies in the store (then deletes, for MOVE), for files and whole
folders, by the drive's one operation (drive/service.py: DriveService.transfer, which reserves
the bytes a copy adds in the quota before the store copies them and settles them after). Dead
properties follow (copied or moved, their bytes reserved with the copy's), and so do
modification times and checksums (drive/facts.py; a file's ``X-OC-Mtime`` sets the
destination's time); locks do not (RFC 4918 7.5)."""

from __future__ import annotations

from contextlib import ExitStack
from urllib.parse import quote

from wsgidav import util
from wsgidav.dav_error import HTTP_INSUFFICIENT_STORAGE, HTTP_NOT_FOUND, DAVError

from drive import keys
from drive.dav.context import (
    CACHE_KEY,
    DEST_EXISTED_KEY,
    client_mtime,
    coded_error,
    context_of,
    forget_after_write,
    store_errors,
)
from drive.dav.storage import DbPropertyManager
from drive.uploads import UploadTooLarge


def transfer(src, dest_path: str, parent, *, move: bool, depth_infinity: bool) -> bool:
    """COPY or MOVE ``src`` (a file or folder resource) to ``dest_path`` in the folder resource
    ``parent`` (writable, the new name checked) with server-side copies in the store.

    wsgidav has already checked the request: the destination's parent is a
    collection, Overwrite allows replacing an existing destination, no lock is in
    the way, and the destination is not ``src`` itself or below it.
    """
    ctx = context_of(src.environ)
    with store_errors():
        name = util.get_uri_name(dest_path)
        suffix = "/" if src.is_collection else ""
        dest = keys.from_text(parent.location.prefix, parent.location.rel + name + suffix)
    with ExitStack() as held:
        for wanted in ctx.drive.transfer_keys(src.location, dest, move=move):
            held.enter_context(ctx.hold_keys(wanted.prefix, list(wanted.exclusive), list(wanted.shared)))
        _transfer_held(src, dest, dest_path, move=move, depth_infinity=depth_infinity)
    return True


def _transfer_held(src, dest, dest_path: str, *, move: bool, depth_infinity: bool) -> None:
    environ, provider = src.environ, src.provider
    ctx = context_of(environ)
    environ.get(CACHE_KEY, {}).clear()  # what wsgidav resolved before the keys were held is read again
    properties = provider.prop_manager
    src_ref, dest_ref = src.get_ref_url(), quote("/" + dest.key)
    # A COPY's dead properties count in the quota too: reserved with its bytes, settled once copied.
    copied_properties = 0
    if not move and isinstance(properties, DbPropertyManager):
        copied_properties = properties.bytes_under(src_ref, with_children=src.is_collection and depth_infinity)

    def follow_properties() -> None:
        if properties is None:
            return
        if move:
            properties.move_properties(src_ref, dest_ref, with_children=src.is_collection)
        elif isinstance(properties, DbPropertyManager):
            properties.copy_tree(src_ref, dest_ref, with_children=src.is_collection and depth_infinity)
        else:
            properties.copy_properties(src_ref, dest_ref)

    with store_errors():
        if not src.is_collection:
            src.info = ctx.store.head(src.location.key)
            if src.info is None:
                raise DAVError(HTTP_NOT_FOUND)  # another request moved or deleted it meanwhile
        existing = provider.get_resource_inst(dest_path, environ)
        environ[DEST_EXISTED_KEY] = existing is not None
        if existing is not None:
            existing.delete()  # RFC 4918 9.8.4 / 9.9.3: Overwrite: T deletes the destination first
        try:
            ctx.drive.transfer(
                src.location,
                dest,
                info=None if src.is_collection else src.info,
                move=move,
                quota=ctx.quota_of(dest.prefix),
                mtime=None if src.is_collection else client_mtime(environ),
                depth_infinity=depth_infinity,
                extra=copied_properties,
                then=follow_properties,
            )
        except UploadTooLarge as exc:
            # The PUT path's quota message and code (507 here: RFC 4918 11.5 for a COPY that does not fit).
            raise coded_error(HTTP_INSUFFICIENT_STORAGE, "quota_exceeded", str(exc)) from None
    if move:
        src.remove_all_locks(recursive=True)
    forget_after_write(environ)
