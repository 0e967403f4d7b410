"""/v1/gpus/{gpu_id}/files/{path}: a rented pod's files, streamed both ways (docs/pod-files.md).
HTTP only: the headers' spans (Range, Content-Range, Content-Length) and the answers' shapes;
the rental, the transfer and the refusals are gateway/pod_files.py's."""

from __future__ import annotations

import logging
import re
from email.utils import formatdate

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from fastapi.responses import JSONResponse
from starlette.responses import StreamingResponse

from gateway.auth import ApprovedUser
from gateway.deps import PodFilesDep, RentalIdPath
from gateway.domain_errors import RangeNotSatisfiable
from gateway.drive_http import AnyPathConvertor
from gateway.ended_early import end_early
from gateway.errors import ApiError, request_id_var
from gateway.log_line import one_line
from gateway.openapi import GPU_ENDED, RETRY_AFTER, content, errors, merge
from gateway.pods import PodError

log = logging.getLogger("kgpu")
router = APIRouter(tags=["pod files"])
assert AnyPathConvertor.regex  # imported for what importing it does: {path:anypath} takes newlines, for their 400
FILE_ROUTE = "/v1/gpus/{gpu_id}/files/{path:anypath}"

_STR, _INT = {"type": "string"}, {"type": "integer", "minimum": 0}
_ENTRY = {
    "type": "object",
    "required": ["name", "type", "size", "mtime"],
    "properties": {
        "name": _STR, "type": {"type": "string", "enum": ["file", "folder", "symlink", "other"]}, "size": _INT,
        "mtime": _STR,
    },
}
_LISTING = {
    "type": "object",
    "required": ["path", "entries", "truncated"],
    "properties": {"path": _STR, "entries": {"type": "array", "items": _ENTRY}, "truncated": {"type": "boolean"}},
}
_WRITTEN = {"type": "object", "required": ["gpu_id", "path", "size"], "properties": {"gpu_id": _STR, "path": _STR, "size": _INT}}
_RANGE_HEADER = {"Content-Range": {"description": "bytes */SIZE: the file's present size", "schema": {"type": "string"}}}
POD_FILE_ERRORS = errors(
    (400, "invalid_path (.., NUL, a name past 255 bytes, outside /workspace, /tmp and /files), symlink_refused, "
          "not_a_regular_file (a device, FIFO or socket), bad_range, or body_cut"),
    (403, "pod_file_denied: the pod's permissions refuse it (a read-only folder)"),
    (404, "gpu_not_found: no rental of yours with this id; or pod_file_not_found"),
    (409, "gpu_not_running, gpu_not_ready, is_a_folder, or not_a_folder"),
    GPU_ENDED,
    (503, "pod_unavailable: the pod did not answer in time, or has 4 transfers going; pod_file_error"),
)
_429 = {429: {
    **errors((429, "too_many_transfers: you have the most pod-file transfers going at once, across your GPUs, "
                   "that one user may (8 unless the server sets another); retry after Retry-After"))[429],
    "headers": RETRY_AFTER,
}}
_416 = {416: {**errors((416, "range_not_satisfiable: the span starts past the file's end"))[416], "headers": _RANGE_HEADER}}
_BODY = {
    "requestBody": {
        "required": True,
        "description": "the file's bytes: Content-Length required; chunked only with Content-Range",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    "parameters": [{
        "name": "Content-Range", "in": "header", "required": False,
        "description": "bytes S-E/T (or S-E/*): write at S after the file is cut to S (a resume)",
        "schema": {"type": "string", "examples": ["bytes 1048576-2097151/2097152"]},
    }],
}
_RANGE_PARAM = {"parameters": [{
    "name": "Range", "in": "header", "required": False, "description": "bytes=S-E, bytes=S- or bytes=-N (one span)",
    "schema": {"type": "string", "examples": ["bytes=1048576-"]},
}]}


def _span(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, length) of a Range header's one span over ``size`` bytes; None: the whole file
    (no header, or one this answers whole, as RFC 9110 allows: several spans, another unit)."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        length = min(int(last), size)
        if length == 0:
            raise RangeNotSatisfiable(f"the file holds {size} bytes", size)
        return size - length, length
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise RangeNotSatisfiable(f"the file holds {size} bytes: no byte at {start}", size)
    return start, end - start + 1


def _upload_span(request: Request) -> tuple[int | None, int]:
    """(start or None for a whole file, length) of a PUT, from Content-Range and Content-Length."""
    given = request.headers.get("content-length")
    if given is not None and not given.isdigit():
        raise ApiError(400, "bad_length", "Content-Length is not a number")
    length = int(given) if given is not None else None
    ranged = request.headers.get("content-range")
    if ranged is None:
        if length is None:
            raise ApiError(411, "length_required", "send Content-Length (a chunked body needs Content-Range: bytes S-E/T)")
        return None, length
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", ranged.strip())
    if not match:
        raise ApiError(400, "bad_range", "Content-Range must be bytes S-E/T (or bytes S-E/*)")
    start, end, total = int(match.group(1)), int(match.group(2)), match.group(3)
    if end < start or (total != "*" and int(total) <= end):
        raise ApiError(400, "bad_range", f"Content-Range {ranged} holds no byte")
    if length is not None and length != end - start + 1:
        raise ApiError(400, "bad_range", f"Content-Range {ranged} is {end - start + 1} bytes; Content-Length says {length}")
    return start, end - start + 1


_READ = dict(
    summary="A pod's file (Range: 206), or a folder's listing (a path ending in /)",
    responses=merge(
        content(200, "the file's bytes; a folder: its listing", {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": _LISTING},
        }),
        content(206, "the span asked for", {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}),
        POD_FILE_ERRORS,
        _429,
        _416,
    ),
    openapi_extra=_RANGE_PARAM,
)


# One route per method (not one api_route for both): each gets its own operationId, which
# OpenAPI requires to be unique.
@router.get(FILE_ROUTE, **_READ)
@router.head(FILE_ROUTE, **_READ)
async def get_pod_file(
    rental_id: RentalIdPath, path: str, request: Request, principal: ApprovedUser, files: PodFilesDep
) -> Response:
    target = files.path(path)
    ref = await run_in_threadpool(files.pod, principal, rental_id)
    if target.folder:
        listing = JSONResponse(await files.listing(principal, ref, target))
        return Response(status_code=200, media_type="application/json") if request.method == "HEAD" else listing
    opened = files.opened(principal, ref, target)
    download = await opened.__aenter__()
    try:
        span = _span(request.headers.get("range"), download.size)
        start, length = span or (0, download.size)
        headers = {
            "Accept-Ranges": "bytes", "Content-Length": str(length),
            "Last-Modified": formatdate(download.mtime, usegmt=True), "Cache-Control": "no-store",
        }
        if span:
            headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{download.size}"
        status = 206 if span else 200
        if request.method == "HEAD" or length == 0:
            await opened.__aexit__(None, None, None)
            return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    except BaseException as exc:
        await opened.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    return _Streamed(download.chunks(start, length), opened, f"{rental_id} {target.text}", length,
                     status_code=status, headers=headers, media_type="application/octet-stream")


class _Streamed(StreamingResponse):
    """A streamed answer that closes the pod's side however it ends (a client gone included). A pod
    failing once the head is sent (its file cut short, the pod gone, its reader stalled) ends the
    body short of its Content-Length: the connection closed (the client sees the cut), one warning
    line, no traceback, however often a tenant makes it happen."""

    def __init__(self, chunks, opened, what: str, length: int, **kwargs):
        super().__init__(chunks, **kwargs)
        self._opened = opened
        self._what = what
        self._length = length
        self._sent = 0

    async def __call__(self, scope, receive, send) -> None:
        async def counted(message) -> None:
            await send(message)
            self._sent += len(message.get("body", b""))

        try:
            await super().__call__(scope, receive, counted)
        except PodError as exc:
            log.warning("pod file download cut: %s: %d of %d bytes sent: %s (request %s)", one_line(self._what),
                        self._sent, self._length, one_line(str(exc)), request_id_var.get())
            end_early()
        finally:
            await self.body_iterator.aclose()
            await self._opened.__aexit__(None, None, None)


@router.put(
    FILE_ROUTE,
    summary="Write a pod's file (whole, or at Content-Range's start: a resume), streamed",
    responses=merge(
        content(200, "replaced (or written at a range)", {"application/json": {"schema": _WRITTEN}}),
        content(201, "created", {"application/json": {"schema": _WRITTEN}}),
        POD_FILE_ERRORS,
        errors((411, "length_required: no Content-Length and no Content-Range"),
               (507, "pod_disk_full: the pod's disk has no room")),
        _429,
        _416,
    ),
    openapi_extra=_BODY,
)
async def put_pod_file(
    rental_id: RentalIdPath, path: str, request: Request, principal: ApprovedUser, files: PodFilesDep
) -> Response:
    target = files.path(path, folder_ok=False)
    start, length = _upload_span(request)
    ref = await run_in_threadpool(files.pod, principal, rental_id)
    try:
        written = await files.write(principal, ref, target, request.stream(), length, start)
    except ClientDisconnect:
        return Response(status_code=400)  # nobody reads it: the client has gone
    body = {"gpu_id": rental_id, "path": target.text, "size": written.size}
    return JSONResponse(body, status_code=201 if written.created else 200)
