"""``kgpu ls / cp / sync / rm / mv``: the drive, through the bundled rclone and the HTTP API."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from client import rclone
from client.errors import ApiError, TransferFailed, UsageError
from client.locations import Remote, is_remote, parse_remote
from client.output import ProgressBar, emit_json, human_bytes, table
from client.session import Session


def http_path(remote: Remote, folder: bool = False) -> str:
    """The HTTP route of a drive path: ``/v1/files/…``, or ``/v1/shared/ORG/…`` for a shared drive."""
    if remote.in_shared:
        if not remote.org:
            raise UsageError("name a shared drive: kgpu:shared/ORG/PATH")
        path = f"/v1/shared/{remote.org}/{remote.shared_path}"
    else:
        path = f"/v1/files/{remote.path}"
    return path if not folder or path.endswith("/") else path + "/"


def _not_found(remote: Remote) -> ApiError:
    """The refusal for a drive path that is neither a file nor a folder, however the client found out."""
    return ApiError(404, "not_found", f"no file or folder {remote}")


def is_file(session: Session, remote: Remote) -> bool:
    if remote.is_root or remote.folder_hint:
        return False
    return session.api.head(http_path(remote)) is not None


def is_folder(session: Session, remote: Remote) -> bool:
    """A HEAD of the folder's path: the server looks for one key under it, never lists it."""
    return remote.is_root or session.api.head(http_path(remote, folder=True)) is not None


# ---------------------------------------------------------------- ls


def ls(session: Session, target: str, recursive: bool) -> int:
    remote = parse_remote(target or "kgpu:")
    depth = ["-R"] if recursive else ["--max-depth", "1"]
    outcome = rclone.run(session.login, ["lsjson", f"{rclone.REMOTE}:{remote.path}", *depth])
    if outcome.returncode != 0:
        if outcome.returncode == rclone.DIRECTORY_NOT_FOUND:
            raise _not_found(remote)
        raise TransferFailed(_rclone_failure("ls", outcome))
    entries = [
        {"path": e["Path"] + ("/" if e["IsDir"] else ""), "name": e["Name"], "type": "dir" if e["IsDir"] else "file",
         "size": None if e["IsDir"] else e["Size"], "modified": None if e["IsDir"] else e["ModTime"]}
        for e in json.loads(outcome.output or "[]")
    ]
    entries.sort(key=lambda e: e["path"])
    if session.as_json:
        emit_json({"location": str(remote), "entries": entries})
    elif entries:
        print(table([[human_bytes(e["size"]) if e["type"] == "file" else "-", e["modified"] or "-", e["path"]]
                     for e in entries]))
    return 0


# ---------------------------------------------------------------- cp, sync, mv


def cp(session: Session, source: str, destination: str, recursive: bool, transfers: int) -> int:
    if is_remote(destination) and (not is_remote(source) or parse_remote(destination).in_shared):
        return _upload(session, source, parse_remote(destination), recursive, transfers)
    src, dst, folder = _endpoints(session, source, destination, recursive, "cp")
    verb = "copy" if folder else "copyto"  # copyto: a file to DST itself, a folder's contents into DST
    return _transfer(session, [verb, src, dst, *_parallel(transfers)], "cp", source, destination)


def sync(session: Session, source: str, destination: str, transfers: int) -> int:
    if not is_remote(source) and not is_remote(destination):
        raise UsageError("one side of kgpu sync must be in your drive (kgpu:PATH)")
    if is_remote(destination):
        dst = parse_remote(destination)
        if dst.in_shared:
            raise UsageError("shared drives are read-only here: kgpu cp uploads into them, if your role allows")
        if not dst.path:
            raise UsageError("sync into a folder of your drive (kgpu:FOLDER), not its root")
    src, dst_text = _rclone_path(source), _rclone_path(destination)
    if not is_remote(source) and not Path(source).is_dir():
        raise UsageError(f"{source} is not a folder: kgpu sync makes a folder like another one")
    return _transfer(session, ["sync", src, dst_text, *_parallel(transfers)], "sync", source, destination)


def mv(session: Session, source: str, destination: str, transfers: int) -> int:
    for side in (source, destination):
        if is_remote(side) and parse_remote(side).in_shared:
            raise UsageError("kgpu mv does not move into or out of shared drives: kgpu cp, then kgpu rm")
    src, dst, _ = _endpoints(session, source, destination, True, "mv")
    return _transfer(session, ["moveto", src, dst, *_parallel(transfers)], "mv", source, destination)


def _parallel(transfers: int) -> list[str]:
    return ["--transfers", str(transfers), "--checkers", str(max(8, transfers))]


def _rclone_path(text: str) -> str:
    if is_remote(text):
        return f"{rclone.REMOTE}:{parse_remote(text).path}"
    return os.path.abspath(text)  # a local path with ":" in it must not read as a remote


def _endpoints(session: Session, source: str, destination: str, recursive: bool, verb: str) -> tuple[str, str, bool | None]:
    """rclone's source and destination, and whether the source is a folder (None: not asked).

    Like cp(1): a file copied onto an existing folder (or a path ending in "/") lands inside it.
    A drive path copied with -r to a local path that does not exist yet goes there whichever it is,
    so the server is not asked: rclone finds out (and says when it is neither, _transfer).
    """
    if not is_remote(source) and not is_remote(destination):
        raise UsageError(f"one side of kgpu {verb} must be in your drive (kgpu:PATH); use {verb} for local files")
    if is_remote(source):
        src = parse_remote(source)
        if recursive and not is_remote(destination) and _new_local_path(destination):
            return _rclone_path(source), os.path.abspath(destination), None
        if recursive:  # -r names a folder, mostly: one HEAD then
            folder = is_folder(session, src)
            exists = folder or is_file(session, src)
        else:
            folder = not is_file(session, src)
            exists = not folder or is_folder(session, src)
        if not exists:
            raise _not_found(src)
        name = src.name
    else:
        if not os.path.exists(source):
            raise UsageError(f"{source}: no such file or folder")
        folder = os.path.isdir(source)
        name = Path(os.path.abspath(source)).name
    if folder and not recursive:
        raise UsageError(f"{source} is a folder: use kgpu {verb} -r")
    if is_remote(destination):
        dst = parse_remote(destination)
        if not folder and (dst.folder_hint or is_folder(session, dst)):
            dst = dst.child(name)
        dst_text = f"{rclone.REMOTE}:{dst.path}"
    else:
        dst_text = os.path.abspath(destination)
        if not folder and (destination.endswith("/") or os.path.isdir(destination)):
            dst_text = os.path.join(dst_text, name)
    return _rclone_path(source), dst_text, folder


def _new_local_path(path: str) -> bool:
    return not path.endswith("/") and not os.path.lexists(path)


def _transfer(session: Session, args: list[str], verb: str, source: str, destination: str) -> int:
    bar = ProgressBar(f"{verb} {source} → {destination}", enabled=None if not session.as_json else False)
    outcome = rclone.run(session.login, args, on_stats=bar.update)
    bar.close()
    if outcome.returncode == rclone.DIRECTORY_NOT_FOUND and is_remote(source):
        raise _not_found(parse_remote(source))
    if outcome.returncode != 0:
        raise TransferFailed(_rclone_failure(verb, outcome))
    stats = outcome.stats
    summary = {
        "source": source, "destination": destination,
        "bytes": stats.get("bytes", 0), "files": stats.get("transfers", 0),
        "deleted": stats.get("deletes", 0), "server_side": stats.get("serverSideCopies", 0) + stats.get("serverSideMoves", 0),
        "errors": stats.get("errors", 0), "seconds": round(stats.get("elapsedTime", 0.0), 3),
    }
    if session.as_json:
        emit_json(summary)
    else:
        print(f"{verb}: {summary['files']} files, {human_bytes(summary['bytes'])} in {summary['seconds']} s"
              + (f", {summary['deleted']} deleted" if summary["deleted"] else ""))
    return 0


def _rclone_failure(verb: str, outcome: rclone.Outcome) -> str:
    lines = outcome.errors[-5:] or [f"rclone exited with code {outcome.returncode}"]
    return f"{verb} failed: " + "; ".join(lines)


# ---------------------------------------------------------------- rm


def rm(session: Session, target: str, recursive: bool) -> int:
    remote = parse_remote(target)
    if remote.is_root:
        raise UsageError(f"refusing to delete {remote}: name a file or folder inside it")
    if is_file(session, remote):
        deleted = session.api.delete(http_path(remote))
    elif is_folder(session, remote):
        if not recursive:
            raise UsageError(f"{remote} is a folder: use kgpu rm -r")
        deleted = session.api.delete(http_path(remote, folder=True))
    else:
        raise _not_found(remote)
    if session.as_json:
        emit_json({"deleted": str(remote), "files": deleted})
    else:
        print(f"deleted {remote} ({deleted} file{'s' if deleted != 1 else ''})")
    return 0


def _upload(session: Session, source: str, destination: Remote, recursive: bool, transfers: int) -> int:
    """Local files into a drive, straight to the object store (client/uploads.py)."""
    from client import uploads  # only here: the other commands start faster without it

    if is_remote(source):
        raise UsageError("copy into a shared drive from local files (kgpu cp LOCAL kgpu:shared/ORG/PATH)")
    if not os.path.exists(source):
        raise UsageError(f"{source}: no such file or folder")
    folder = os.path.isdir(source)
    if folder and not recursive:
        raise UsageError(f"{source} is a folder: use kgpu cp -r")
    base = http_path(destination)
    into_folder = not folder and (destination.folder_hint or destination.is_root or is_folder(session, destination))
    files = uploads.plan(Path(source), base, into_folder)
    files = uploads.unchanged(files, _present(session, destination, base))
    bar = ProgressBar(f"cp {source} → {destination}", enabled=None if not session.as_json else False)
    try:
        done = uploads.upload(session.api, files, transfers, bar.update)
    finally:
        bar.close()
    if session.as_json:
        emit_json({"source": source, "destination": str(destination), **done,
                   "deleted": 0, "server_side": 0, "errors": 0})
    else:
        print(f"cp: {done['files']} files, {human_bytes(done['bytes'])} in {done['seconds']} s")
    return 0


def _present(session: Session, destination: Remote, base: str) -> dict[str, tuple[int, float]]:
    """What my drive holds at or under the destination (route -> size, modification time), one
    listing; a shared drive's files are always sent."""
    if destination.in_shared:
        return {}
    reply = session.api.call("GET", "/v1/files", params={"prefix": destination.path})
    return {f"/v1/files/{f['path']}": (f["size"], _seconds(f["last_modified"])) for f in reply.get("files", [])}


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
