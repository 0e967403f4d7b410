"""Name conflicts in a drive: one rule, and one wording, for the HTTP routes and WebDAV.

A drive is a tree: a file cannot hold anything, and a file cannot take a folder's name (stores
over a filesystem, like the embedded ``rclone serve s3``, cannot hold both). WebDAV refuses such
writes through its own checks on the resources (RFC 4918: the parent must be a collection);
this module says what stands in the way, in the words the HTTP routes answer with, under the
error_code ``name_conflict``.
"""

from __future__ import annotations

import asyncio

from starlette.concurrency import run_in_threadpool

from drive.keys import DrivePath
from drive.listing import FOLDER_MARKER
from drive.store import ObjectInfo, ObjectStore, list_together
from drive.store.caching import CachingStore

NAME_CONFLICT = "name_conflict"


def folder_named(store: ObjectStore, prefix: str, rel: str) -> str | None:
    """Why a file may not be written at ``rel`` because a folder has its name (None: none has)."""
    if store.list_page(prefix + rel.rstrip("/") + "/", max_keys=1).entries:
        return _folder_exists(rel)
    return None


def _folder_exists(rel: str) -> str:
    return f"a folder named {rel.rstrip('/')} exists"


def unknown_ancestors(store: CachingStore, prefix: str, rel: str) -> list[str]:
    """The folders above ``rel`` (as paths in the drive) that :func:`file_above` must ask the
    store about: all of them, but those a write was checked into within
    :data:`~drive.store.caching.KNOWN_FOLDER_TTL`. No store request: cheap enough for the event loop."""
    parts = rel.rstrip("/").split("/")
    ancestors = ["/".join(parts[:depth]) for depth in range(1, len(parts))]
    return [a for a in ancestors if not store.is_known_folder(f"{prefix}{a}/")]


def file_above(store: CachingStore, prefix: str, rel: str, unknown: list[str] | None = None) -> str | None:
    """Why nothing may be made at ``rel`` because one of the folders above it is a file
    (None: none is). One HEAD per level, nearest the root first, but none for a folder a write
    was checked into within KNOWN_FOLDER_TTL (writes in a row into one folder, the
    common case, then cost no store request here; every write the gateway makes forgets
    what it changes, as for listings). ``unknown``: :func:`unknown_ancestors`, if the caller
    has them already."""
    if unknown is None:
        unknown = unknown_ancestors(store, prefix, rel)
    for ancestor in unknown:
        if store.head(prefix + ancestor) is not None:
            return f"{ancestor} is a file, so it cannot hold {rel.rstrip('/')}"
    store.note_folders([f"{prefix}{a}/" for a in unknown])
    return None


def file_coming(store: CachingStore, key: str) -> None:
    """A file is about to be written at ``key`` (streamed, or through a presigned URL the
    gateway hands out): from now on it is not taken for a folder above anything."""
    store.forget_folder(key)


class ReservedName(ValueError):
    """A name the drive keeps for itself (its folders' marker objects): never written by a client."""


def check_new_name(name: str) -> None:
    """ReservedName unless a client may write a file or folder of this name."""
    if name == FOLDER_MARKER:
        raise ReservedName(f"{FOLDER_MARKER} is reserved for folder markers")


class NameConflict(Exception):
    """A write the tree refuses (a file above its path, or a folder of its name): a 409
    ``name_conflict``, the message saying what stands in the way."""


async def replaced_object(store: CachingStore, path: DrivePath) -> ObjectInfo | None:
    """The object a write at ``path`` would replace (its size and ETag settle the quota), or
    NameConflict when a file stands above the path or a folder has its name: the store requests
    all at once, before any byte moves. Stores over a filesystem (the embedded rclone) cannot
    hold both a file and a folder of one name, and a refused PUT there leaves their folder view
    wrong for minutes; on S3 and R2 the same rule keeps the drive a tree."""
    checks = [
        run_in_threadpool(store.head, path.key),
        run_in_threadpool(folder_named, store, path.prefix, path.rel),
    ]
    unknown = unknown_ancestors(store, path.prefix, path.rel)
    if unknown:  # else known folders, all of them
        checks.append(run_in_threadpool(file_above, store, path.prefix, path.rel, unknown))
    previous, folder, *above = await asyncio.gather(*checks)
    why = (above[0] if above else None) or (folder if previous is None else None)
    if why:
        raise NameConflict(why)
    file_coming(store, path.key)
    return previous


async def replaced_objects(
    store: CachingStore, paths: list[DrivePath], at_once: asyncio.Semaphore
) -> list[ObjectInfo | None | NameConflict]:
    """:func:`replaced_object` of each of ``paths`` (files of one drive, each named once), answered
    in its place: from their folders' listings where a folder holds many of them and none above
    it is unknown (drive/store list_together: two store requests a file become one a folder),
    else file by file, ``at_once`` at a time."""
    outcomes: list[ObjectInfo | None | NameConflict] = [None] * len(paths)
    known = [p for p in paths if not unknown_ancestors(store, p.prefix, p.rel)]
    listed = await run_in_threadpool(list_together, store, [p.key for p in known])
    for n, path in enumerate(paths):
        if path.key not in listed.objects:
            continue
        previous = listed.objects[path.key]
        if previous is None and path.key + "/" in listed.folders:
            outcomes[n] = NameConflict(_folder_exists(path.rel))
        else:
            file_coming(store, path.key)
            outcomes[n] = previous

    async def one(n: int) -> None:
        async with at_once:
            try:
                outcomes[n] = await replaced_object(store, paths[n])
            except NameConflict as exc:
                outcomes[n] = exc

    await asyncio.gather(*(one(n) for n, path in enumerate(paths) if path.key not in listed.objects))
    return outcomes
