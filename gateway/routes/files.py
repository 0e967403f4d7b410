"""/v1/files: my drive, the caller's prefix ``users/{id}/`` in the object store.

Downloads are 302s to presigned GETs and uploads with ``Expect: 100-continue``
are 307s to presigned PUTs, so file bytes do not pass through the gateway where
that can be avoided (SPEC decisions 3 and 4). Every other upload is streamed
through to the store once.
"""

from __future__ import annotations

import fnmatch
import json
import mimetypes
from typing import Iterator

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from drive import keys, listing
from drive.keys import DrivePath
from drive.store import CommonPrefix, ObjectInfo, ObjectStore, StoreUnavailable, iter_entries
from drive.uploads import IncompleteBody, UploadTooLarge, choose_part_size, stream_to_store
from gateway.auth import ApprovedUser, Principal
from gateway.errors import ApiError

router = APIRouter(tags=["files"])

MOUNT = b"/v1/files/"
_IGNORED_CONTENT_TYPES = {"", "application/x-www-form-urlencoded"}


def _drive_path(request: Request, principal: Principal) -> DrivePath:
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    raw = raw.split(b"?", 1)[0]
    rel = raw[len(MOUNT) :] if raw.startswith(MOUNT) else b""
    return keys.from_raw_path(principal.drive_prefix, rel)


def _wants_json(request: Request) -> bool:
    flag = request.query_params.get("json", "").lower()
    return flag in ("1", "true", "yes") or "application/json" in request.headers.get("accept", "")


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise ApiError(400, "bad_content_length", "Content-Length must be a non-negative integer")
    return int(value)


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return length != "0"
    return "chunked" in request.headers.get("transfer-encoding", "").lower()


def _content_type(request: Request, path: DrivePath) -> str:
    sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if sent not in _IGNORED_CONTENT_TYPES:
        return request.headers["content-type"]
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _expect_continue(request: Request) -> bool:
    return request.headers.get("expect", "").lower() == "100-continue"


def _store(request: Request) -> ObjectStore:
    return request.app.state.store


def _quota(request: Request, principal: Principal, incoming: int) -> tuple[int, int]:
    """(used, quota) after refusing with 413 if ``incoming`` more bytes would not fit."""
    state = request.app.state
    quota = state.settings.user_quota_bytes
    used = state.usage.used_bytes(principal.drive_prefix)
    if used + incoming > quota:
        raise ApiError(
            413,
            "quota_exceeded",
            f"this upload ({incoming} bytes) would take the drive to {used + incoming} of {quota} bytes",
            {"Connection": "close"},
        )
    return used, quota


def _file_json(obj: ObjectInfo, prefix: str) -> dict:
    item = listing.entry_json(obj, prefix)
    return {k: item[k] for k in ("path", "size", "etag", "last_modified")}


# ---------------------------------------------------------------- listings


@router.get("/v1/files", summary="List my drive (flat, streamed JSON)")
async def list_files(
    request: Request,
    principal: ApprovedUser,
    prefix: str = Query("", description="narrows the listing to keys starting with this path"),
    glob: str | None = Query(None, description="fnmatch pattern applied to the relative paths"),
):
    store = _store(request)
    drive = principal.drive_prefix
    list_prefix = keys.listing_prefix(drive, prefix)
    used = await run_in_threadpool(request.app.state.usage.used_bytes, drive)
    quota = request.app.state.settings.user_quota_bytes
    first = await run_in_threadpool(store.list_page, list_prefix)  # errors surface before any byte is sent
    whole_drive = list_prefix == drive and glob is None

    def body() -> Iterator[bytes]:
        header = {"prefix": prefix, "glob": glob, "quota": {"used_bytes": used, "quota_bytes": quota}}
        yield json.dumps(header)[:-1].encode() + b', "files": ['
        count = total = 0
        page = first
        while True:
            for entry in page.entries:
                if not isinstance(entry, ObjectInfo):
                    continue
                rel = entry.key[len(drive) :]
                if glob is not None and not fnmatch.fnmatchcase(rel, glob):
                    continue
                yield (b"," if count else b"") + json.dumps(_file_json(entry, drive)).encode()
                count += 1
                total += entry.size
            if not page.next_token:
                break
            page = store.list_page(list_prefix, token=page.next_token)
        if whole_drive:
            request.app.state.usage.set_counted(drive, total)
        yield f'], "count": {count}, "total_bytes": {total}}}'.encode()

    return StreamingResponse(body(), media_type="application/json")


async def _folder(request: Request, path: DrivePath) -> Response:
    store = _store(request)
    first = await run_in_threadpool(store.list_page, path.key, "/")
    if path.rel and not first.entries:
        raise ApiError(404, "not_found", f"no folder {path.rel}")

    def items() -> Iterator[dict]:
        page = first
        while True:
            for entry in page.entries:
                if isinstance(entry, ObjectInfo) and entry.key == path.key:
                    continue  # a folder marker object is not a child of itself
                yield listing.entry_json(entry, path.prefix)
            if not page.next_token:
                return
            page = store.list_page(path.key, "/", page.next_token)

    if _wants_json(request):

        def body() -> Iterator[bytes]:
            yield json.dumps({"path": path.rel})[:-1].encode() + b', "entries": ['
            for n, item in enumerate(items()):
                yield (b"," if n else b"") + json.dumps(item).encode()
            yield b"]}"

        return StreamingResponse(body(), media_type="application/json")
    title = "/v1/files/" + path.rel
    html = (chunk.encode() for chunk in listing.render_html(title, items()))
    return StreamingResponse(html, media_type="text/html; charset=utf-8")


# ---------------------------------------------------------------- one file


@router.head("/v1/files/{path:path}", summary="Size, type, ETag and Last-Modified of a file")
async def head_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    drive_path = _drive_path(request, principal)
    if drive_path.is_dir:
        return Response(status_code=200, media_type="text/html; charset=utf-8")
    info = await run_in_threadpool(_store(request).head, drive_path.key)
    if info is None:
        return Response(status_code=404)
    return Response(
        status_code=200,
        headers={
            "Content-Length": str(info.size),
            "Content-Type": info.content_type or "application/octet-stream",
            "ETag": info.etag,
            "Last-Modified": info.last_modified.strftime("%a, %d %b %Y %H:%M:%S GMT"),
            "Accept-Ranges": "bytes",
        },
    )


@router.get("/v1/files/{path:path}", summary="Download (302 to a presigned GET) or list a folder")
async def get_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    drive_path = _drive_path(request, principal)
    if drive_path.is_dir:
        return await _folder(request, drive_path)
    store = _store(request)
    expires = request.app.state.settings.presign_expires_seconds
    if _wants_json(request):
        info = await run_in_threadpool(store.head, drive_path.key)
        if info is None:
            raise ApiError(404, "not_found", f"no file {drive_path.rel}")
        return JSONResponse(
            {
                "url": store.presign_get(drive_path.key, expires),
                "size": info.size,
                "expires_in": expires,
                "etag": info.etag.strip('"'),
                "content_type": info.content_type,
            }
        )
    # No HEAD here: a redirect is the hot path, and the store itself answers 404 for a missing key.
    return Response(
        status_code=302,
        headers={"Location": store.presign_get(drive_path.key, expires), "Cache-Control": "no-store"},
    )


async def _stream_upload(request: Request, principal: Principal, drive_path: DrivePath) -> JSONResponse:
    state = request.app.state
    store = _store(request)
    length = _content_length(request)
    used, quota = await run_in_threadpool(_quota, request, principal, length or 0)
    previous = await run_in_threadpool(store.head, drive_path.key)
    if previous is None:
        await run_in_threadpool(_refuse_if_folder, store, drive_path)
    settings = state.settings
    part_size = choose_part_size(length, settings.upload_part_bytes, settings.upload_unknown_length_part_bytes)
    try:
        result = await stream_to_store(
            store,
            drive_path.key,
            request.stream(),
            content_length=length,
            content_type=_content_type(request, drive_path),
            part_size=part_size,
            max_bytes=quota - used + (previous.size if previous else 0),
        )
    except UploadTooLarge as exc:
        raise ApiError(413, "quota_exceeded", str(exc), {"Connection": "close"}) from None
    except IncompleteBody as exc:
        raise ApiError(400, "incomplete_body", str(exc), {"Connection": "close"}) from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away before the body was complete") from None
    except StoreUnavailable:
        await run_in_threadpool(_raise_if_name_conflict, store, drive_path)
        raise
    await run_in_threadpool(state.usage.add, principal.drive_prefix, result.size - (previous.size if previous else 0))
    return JSONResponse(
        {"path": drive_path.rel, "size": result.size, "etag": result.etag.strip('"'), "parts": result.parts},
        status_code=200 if previous else 201,
    )


def _refuse_if_folder(store: ObjectStore, path: DrivePath) -> None:
    """A file may not take the name of a folder. Stores over a filesystem (the embedded
    rclone) cannot hold both, and a refused PUT there leaves their folder view wrong for
    minutes, so this is checked before the write rather than explained after it."""
    if store.list_page(path.key + "/", max_keys=1).entries:
        raise ApiError(409, "name_conflict", f"a folder named {path.rel} exists")


def _raise_if_name_conflict(store: ObjectStore, path: DrivePath) -> None:
    """Explain a refused write (a bare 500 from the store) when a parent is a file."""
    parts = path.rel.split("/")
    for depth in range(1, len(parts)):
        ancestor = "/".join(parts[:depth])
        if store.head(path.prefix + ancestor) is not None:
            raise ApiError(409, "name_conflict", f"{ancestor} is a file, so it cannot hold {path.rel}")


@router.put("/v1/files/{path:path}", summary="Upload: 307 to a presigned PUT with Expect, else streamed")
async def put_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    drive_path = _drive_path(request, principal)
    if drive_path.is_dir:
        raise ApiError(400, "is_a_folder", "PUT needs a file path, not one ending in '/'")
    length = _content_length(request)
    if _expect_continue(request) and length is not None:
        # Answered before the body is read: uvicorn sends 100 Continue only when the app reads.
        await run_in_threadpool(_quota, request, principal, length)
        await run_in_threadpool(request.app.state.usage.add, principal.drive_prefix, length)
        url = _store(request).presign_put(drive_path.key, request.app.state.settings.presign_expires_seconds)
        return Response(status_code=307, headers={"Location": url, "Connection": "close"})
    return await _stream_upload(request, principal, drive_path)


@router.post("/v1/files/{path:path}", summary="Upload a body (streamed), or mint a presigned PUT if empty")
async def post_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    drive_path = _drive_path(request, principal)
    if drive_path.is_dir:
        raise ApiError(400, "is_a_folder", "POST needs a file path, not one ending in '/'")
    if _has_body(request):
        return await _stream_upload(request, principal, drive_path)
    expires = request.app.state.settings.presign_expires_seconds
    content_type = request.headers.get("x-content-type") or mimetypes.guess_type(drive_path.name)[0]
    return JSONResponse(
        {
            "url": _store(request).presign_put(drive_path.key, expires),
            "method": "PUT",
            "expires_in": expires,
            "headers": {"Content-Type": content_type} if content_type else {},
        }
    )


@router.delete("/v1/files/{path:path}", status_code=204, summary="Delete a file, or every file under a folder")
async def delete_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    drive_path = _drive_path(request, principal)
    if drive_path.rel == "":
        raise ApiError(400, "refused", "refusing to delete the whole drive; delete its folders one by one")
    store = _store(request)
    if not drive_path.is_dir:
        info = await run_in_threadpool(store.head, drive_path.key)
        if info is not None:
            await run_in_threadpool(store.delete, drive_path.key)
            await run_in_threadpool(request.app.state.usage.add, principal.drive_prefix, -info.size)
            return Response(status_code=204)
    folder = drive_path.key if drive_path.is_dir else drive_path.key + "/"

    def delete_prefix() -> tuple[int, int]:
        batch: list[str] = []
        count = freed = 0
        for entry in iter_entries(store, folder):
            if isinstance(entry, CommonPrefix):
                continue
            batch.append(entry.key)
            count += 1
            freed += entry.size
            if len(batch) == 1000:
                store.delete_many(batch)
                batch = []
        if batch:
            store.delete_many(batch)
        return count, freed

    count, freed = await run_in_threadpool(delete_prefix)
    if count == 0:
        raise ApiError(404, "not_found", f"no file or folder {drive_path.rel}")
    await run_in_threadpool(request.app.state.usage.add, principal.drive_prefix, -freed)
    return Response(status_code=204, headers={"X-Deleted-Count": str(count)})
