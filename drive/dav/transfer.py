"""COPY and MOVE: server-side copies in the store (then deletes, for MOVE), for files and whole
folders, run :data:`COPY_THREADS` at a time; the bytes a copy adds are reserved in the quota
before the store copies them and settled after. Dead properties follow (copied or moved),
and so do modification times and checksums (drive/facts.py; a file's ``X-OC-Mtime`` sets the
destination's time); locks do not (RFC 4918 7.5)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

from wsgidav import util

from drive import keys
from drive.dav.context import DEST_EXISTED_KEY, client_mtime, context_of, invalidate_after_write, store_errors
from drive.dav.storage import DbPropertyManager
from drive.facts import Carried
from drive.listing import FOLDER_MARKER, is_hidden
from drive.store import iter_objects

COPY_THREADS = 8


def transfer(src, dest_path: str, parent, *, move: bool, depth_infinity: bool) -> bool:
    """COPY or MOVE ``src`` (a file or folder resource) to ``dest_path`` in the folder resource
    ``parent`` (writable, the new name checked) with server-side copies in the store.

    wsgidav has already checked the request: the destination's parent is a
    collection, Overwrite allows replacing an existing destination, no lock is in
    the way, and the destination is not ``src`` itself or below it.
    """
    environ, provider = src.environ, src.provider
    ctx = context_of(environ)
    with store_errors():
        name = util.get_uri_name(dest_path)
        suffix = "/" if src.is_collection else ""
        dest = keys.from_text(parent.location.prefix, parent.location.rel + name + suffix)
        existing = provider.get_resource_inst(dest_path, environ)
        environ[DEST_EXISTED_KEY] = existing is not None
        if existing is not None:
            existing.delete()  # RFC 4918 9.8.4 / 9.9.3: Overwrite: T deletes the destination first
        src_ref, dest_ref = src.get_ref_url(), quote("/" + dest.key)
        store = ctx.store
        if not src.is_collection:
            size = src.get_content_length()
            moved_within = move and src.location.prefix == dest.prefix  # the drive does not grow
            reserved = 0 if moved_within else ctx.reserve_room(dest.prefix, size)
            try:
                etag = store.copy(src.location.key, dest.key)
            except BaseException:
                ctx.settle_room(dest.prefix, reserved, 0)
                raise
            ctx.settle_room(dest.prefix, reserved, size)
            if ctx.facts is not None:
                ctx.facts.carry([Carried(src.info, dest.key, etag)], mtime=client_mtime(environ))
            if move:
                store.delete(src.location.key)
                if ctx.facts is not None:
                    ctx.facts.forget(src.location.key)
                ctx.add_usage(src.location.prefix, -src.get_content_length())
        elif not depth_infinity:
            store.put_object(dest.key + FOLDER_MARKER, b"")
        else:
            objects = list(iter_objects(store, src.location.key))
            total = sum(info.size for info in objects)
            moved_within = move and src.location.prefix == dest.prefix
            reserved = 0 if moved_within else ctx.reserve_room(dest.prefix, total)
            pairs = [(info, dest.key + info.key[len(src.location.key) :]) for info in objects]
            if src.location.key + FOLDER_MARKER not in {info.key for info in objects}:
                pairs.append((None, dest.key + FOLDER_MARKER))  # the destination folder exists even if empty

            def copy_one(pair) -> Carried | None:
                source, target = pair
                if source is None:
                    store.put_object(target, b"")
                    return None
                etag = store.copy(source.key, target)
                return None if is_hidden(source.key) else Carried(source, target, etag)

            try:
                with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
                    carried = [item for item in pool.map(copy_one, pairs) if item is not None]
            except BaseException:
                ctx.settle_room(dest.prefix, reserved, 0)  # what was copied is counted at the next recount
                raise
            ctx.settle_room(dest.prefix, reserved, total)
            if ctx.facts is not None:
                ctx.facts.carry(carried)
            if move:
                store.delete_many([info.key for info in objects])
                if ctx.facts is not None:
                    ctx.facts.forget_under(src.location.key)
                ctx.add_usage(src.location.prefix, -total)
    properties = provider.prop_manager
    if properties is not None:
        if move:
            properties.move_properties(src_ref, dest_ref, with_children=src.is_collection)
        elif isinstance(properties, DbPropertyManager):
            properties.copy_tree(src_ref, dest_ref, with_children=src.is_collection and depth_infinity)
        else:
            properties.copy_properties(src_ref, dest_ref)
    if move:
        src.remove_all_locks(recursive=True)
    invalidate_after_write(environ, src.location.key, dest.key)
    return True
