"""HTTP handlers shared by every drive (my drive at /v1/files, shared drives at /v1/shared/{org}).

A :class:`Drive` says where a drive lives in the store, where it is mounted in
the URL space, whether the caller may write, and its quota. The handlers here
do the rest the same way for every drive:

* downloads are 302s to presigned GETs (SPEC decision 3);
* uploads with ``Content-Length`` and ``Expect: 100-continue`` are 307s to
  presigned PUTs, answered before any body byte is read; every other upload is
  streamed through to the store once (SPEC decision 4).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from drive import keys, listing
from drive.checksums import ChecksumMismatch, digest_header
from drive.direct import DeclaredMd5, DirectUploadError, NoSuchUpload, TooManyUploads, parse_md5, parse_number
from drive.content_types import known_type, served_type, stored_type
from drive.facts import BadClientFact, ClientFacts, client_facts
from drive.keys import DrivePath, InvalidPath
from drive import names
from drive.names import NAME_CONFLICT, NameConflict, ReservedName
from drive.service import DriveService, DuplicatePath, File, Link, UrlAsked, WholeDrive
from drive.uploads import BodyTimeout, ClientGone, IncompleteBody, UploadTooLarge, WriteBusy
from drive.usage import QuotaExceeded
from gateway.errors import ApiError

@dataclass(frozen=True)
class Drive:
    prefix: str  # where the drive lives in the store: "users/7/", "orgs/vitallab/"
    mount: bytes  # where it is mounted in the URL space: b"/v1/files/", b"/v1/shared/vitallab/"
    writable: bool
    quota_bytes: int | None  # None: no quota

    def path(self, request: Request) -> DrivePath:
        """The request's path inside this drive, checked on the raw URL bytes."""
        return self.path_from_raw(raw_path(request))

    def path_from_raw(self, raw: bytes) -> DrivePath:
        return keys.from_url_path(self.prefix, self.mount, raw)

    def require_write(self) -> None:
        if not self.writable:
            raise ApiError(403, "read_only", "you may read this drive but not write to it")


def raw_path(request: Request) -> bytes:
    """The URL path exactly as the client sent it (percent-encoding intact), without the query."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    return raw.split(b"?", 1)[0]


def wants_json(request: Request) -> bool:
    flag = request.query_params.get("json", "").lower()
    return flag in ("1", "true", "yes") or "application/json" in request.headers.get("accept", "")


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise ApiError(400, "bad_content_length", "Content-Length must be a non-negative integer")
    return int(value)


def has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return length != "0"
    return "chunked" in request.headers.get("transfer-encoding", "").lower()


def _content_type(request: Request, path: DrivePath) -> str:
    return stored_type(request.headers.get("content-type"), path.name)


def _service(request: Request) -> DriveService:
    return request.app.state.drive


def client_facts_of(request: Request) -> ClientFacts:
    """``X-OC-Mtime`` and ``OC-Checksum`` (drive/facts.py), 400 bad_mtime or bad_checksum when
    one cannot be read."""
    with answers():
        return client_facts(request.headers.get)


@dataclass(frozen=True)
class Answer:
    """How the HTTP side answers one of the drive's exceptions."""

    status: int
    code: str | None = None  # None: the exception's own ``code``
    headers: dict | None = None


CLOSE = {"Connection": "close"}  # a body that did not arrive whole (or was refused): its rest may still come

# The drive's exceptions and their answers, looked up along an exception's classes (a subclass's own first).
ANSWERS: dict[type[Exception], Answer] = {
    BadClientFact: Answer(400),
    DirectUploadError: Answer(400),
    WholeDrive: Answer(400, "refused"),
    DuplicatePath: Answer(400, "duplicate_path"),
    ReservedName: Answer(400, "reserved_name"),
    ChecksumMismatch: Answer(400, "checksum_mismatch"),
    ClientGone: Answer(400, "client_disconnected"),
    IncompleteBody: Answer(400, "incomplete_body", CLOSE),
    NoSuchUpload: Answer(404, "no_such_upload"),
    BodyTimeout: Answer(408, "body_timeout", CLOSE),  # an IncompleteBody, answered as what it is
    NameConflict: Answer(409, NAME_CONFLICT),
    UploadTooLarge: Answer(413, "quota_exceeded", CLOSE),
    WriteBusy: Answer(423, "busy"),
    TooManyUploads: Answer(429, "too_many_uploads"),
}


def answer_of(exc: Exception) -> ApiError:
    """The drive's exception ``exc`` (an instance of a kind in :data:`ANSWERS`) as an HTTP error."""
    answer = next(ANSWERS[kind] for kind in type(exc).__mro__ if kind in ANSWERS)
    return ApiError(answer.status, answer.code or exc.code, str(exc), answer.headers)


@contextmanager
def answers() -> Iterator[None]:
    """Inside: the drive's exceptions become their HTTP answers (:data:`ANSWERS`)."""
    try:
        yield
    except tuple(ANSWERS) as exc:
        raise answer_of(exc) from None


# ---------------------------------------------------------------- listings


LISTING_CHUNK = 500  # entries written per chunk of a streamed listing (one thread-pool hop each)


def _in_chunks(parts: Iterator[bytes]) -> Iterator[bytes]:
    """``parts`` joined :data:`LISTING_CHUNK` at a time."""
    while chunk := list(islice(parts, LISTING_CHUNK)):
        yield b"".join(chunk)


def flat_listing(drive: Drive, files: Iterator[File], glob: str | None, header: dict) -> StreamingResponse:
    """``files`` (drive/service.py: DriveService.files) as one JSON document, streamed page by
    page after ``header``."""

    def body() -> Iterator[bytes]:
        yield json.dumps(header)[:-1].encode() + b', "files": ['
        count = total = 0
        for entry, facts in files:
            item = listing.entry_json(entry, drive.prefix, facts)
            if glob is not None and not fnmatch.fnmatchcase(item["path"], glob):
                continue
            del item["name"], item["type"]
            yield (b"," if count else b"") + json.dumps(item).encode()
            count += 1
            total += entry.size
        yield f'], "count": {count}, "total_bytes": {total}}}'.encode()

    return StreamingResponse(_in_chunks(body()), media_type="application/json")


async def folder(request: Request, drive: Drive, path: DrivePath, title: str) -> Response:
    """A folder's members as JSON or HTML, streamed a page at a time as the store lists them (the
    first page is asked before the answer starts: a store that is down is a 503). A store that
    fails after that cuts the connection: the client sees an unfinished body, never a short
    listing that looks complete."""
    pages = await run_in_threadpool(_service(request).folder_listing, path.key, path.rel == "")
    if pages is None:
        raise ApiError(404, "not_found", f"no folder {path.rel}")

    def items(page: list) -> Iterator[dict]:
        return (listing.entry_json(entry, drive.prefix, facts) for entry, facts in page)

    if wants_json(request):

        def body() -> Iterator[bytes]:
            head = json.dumps({"path": path.rel})[:-1] + ', "entries": ['
            comma = ""
            for page in pages:
                chunk = ",".join(json.dumps(item) for item in items(page))
                if chunk:
                    yield (head + comma + chunk).encode()
                    head, comma = "", ","
            yield (head + "]}").encode()

        return StreamingResponse(body(), media_type="application/json")

    html = (chunk.encode() for chunk in listing.render_html(title, (items(page) for page in pages)))
    return StreamingResponse(html, media_type="text/html; charset=utf-8")


# ---------------------------------------------------------------- one file


async def head(request: Request, drive: Drive) -> Response:
    path = drive.path(request)
    if path.is_dir:
        exists = await run_in_threadpool(_service(request).folder_exists, path.key, path.rel == "")
        return Response(status_code=200 if exists else 404, media_type="text/html; charset=utf-8")
    found = await run_in_threadpool(_service(request).stat, path.key)
    if found is None:
        return Response(status_code=404)
    info, facts = found
    headers = {
        "Content-Length": str(info.size),
        "Content-Type": served_type(info.content_type, path.name),
        "ETag": info.etag,
        "Last-Modified": facts.mtime.strftime("%a, %d %b %Y %H:%M:%S GMT"),
        "Accept-Ranges": "bytes",
    }
    if facts.has_hashes:
        headers["OC-Checksum"] = f"SHA1:{facts.sha1}" if facts.sha1 else f"MD5:{facts.md5}"
        headers["Digest"] = digest_header(facts.sha1, facts.md5)
    return Response(status_code=200, headers=headers)


async def get(request: Request, drive: Drive) -> Response:
    path = drive.path(request)
    if path.is_dir:
        return await folder(request, drive, path, (drive.mount + path.rel.encode()).decode())
    service = _service(request)
    if wants_json(request):
        found = await run_in_threadpool(service.file_link, path)
        if found is None:
            raise ApiError(404, "not_found", f"no file {path.rel}")
        info, link, content_type = found
        return JSONResponse(
            {
                "url": link.url,
                "size": info.size,
                "expires_in": link.expires_in,
                "etag": info.etag.strip('"'),
                "content_type": content_type,
            }
        )
    return Response(status_code=302, headers={"Location": service.download_url(path), "Cache-Control": "no-store"})


DRAIN_LIMIT = 16 << 20


async def _drain(request: Request) -> None:
    """Read and drop what is left of a refused body, up to DRAIN_LIMIT bytes or 5 s.

    Closing a connection with unread bytes in it makes the kernel send a reset, and the
    client then sees "connection reset" instead of the 413 that explains the refusal."""
    taken = 0
    try:
        async with asyncio.timeout(5):
            while taken <= DRAIN_LIMIT:
                message = await request.receive()
                taken += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body"):
                    return
    except TimeoutError:
        pass


async def stream_upload(request: Request, drive: Drive, path: DrivePath) -> JSONResponse:
    """The body streamed through to the store and hashed on the way (SHA1, MD5): committed only
    whole and, with ``OC-Checksum``, only if it is what the client announced; ``X-OC-Mtime``
    becomes its modification time (drive/service.py: DriveService.put_file)."""
    length = _content_length(request)
    told = client_facts_of(request)
    with answers():
        try:
            result, previous = await _service(request).put_file(
                path,
                request.receive,
                quota=drive.quota_bytes,
                content_length=length,
                content_type=_content_type(request, path),
                expected=told.checksums,
                mtime=told.mtime,
            )
        except (WriteBusy, QuotaExceeded):  # refused before the body was read
            if length is not None and length <= DRAIN_LIMIT:
                await _drain(request)
            raise
        except UploadTooLarge:  # refused as it arrived
            await _drain(request)
            raise
    body = {
        "path": path.rel,
        "size": result.size,
        "etag": result.etag.strip('"'),
        "parts": result.parts,
        "sha1": result.sha1,
        "md5": result.md5,
    }
    accepted = {"X-OC-Mtime": "accepted"} if told.mtime is not None else None
    return JSONResponse(body, status_code=200 if previous else 201, headers=accepted)


def _file_path(request: Request, drive: Drive, method: str) -> DrivePath:
    path = _a_file(drive.path(request), method)
    drive.require_write()
    return path


def _a_file(path: DrivePath, method: str) -> DrivePath:
    """``path`` if a file may be written there (400 is_a_folder, reserved_name)."""
    if path.is_dir:
        raise ApiError(400, "is_a_folder", f"{method} needs a file path, not one ending in '/'")
    with answers():
        names.check_new_name(path.name)
    return path


async def put(request: Request, drive: Drive) -> Response:
    path = _file_path(request, drive, "PUT")
    length = _content_length(request)
    told = client_facts_of(request)
    # A body the client wants verified (OC-Checksum) must pass through the gateway: streamed.
    redirect = not told.checksums
    if redirect and request.headers.get("expect", "").lower() == "100-continue" and length is not None:
        # Answered before the body is read: uvicorn sends 100 Continue only when the app reads.
        with answers():
            link = await _service(request).upload_url(path, length, drive.quota_bytes, told.mtime)
        return Response(status_code=307, headers={"Location": link.url, "Connection": "close"})
    return await stream_upload(request, drive, path)


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("x-content-length")
    if declared is not None and not (declared.isdigit() and len(declared) <= 18):
        raise ApiError(400, "bad_content_length", "X-Content-Length must be a non-negative integer")
    return int(declared) if declared is not None else None


def _declared_md5(request: Request) -> DeclaredMd5 | None:
    with answers():
        return parse_md5(request.headers.get("x-content-md5"))


async def post(request: Request, drive: Drive) -> Response:
    """A body is streamed through (curl --data-binary sends POST); no body mints a presigned PUT;
    ``?uploads``, ``?uploadId=`` are a multipart upload sent straight to the store (drive/direct.py);
    ``FOLDER/?mint`` mints presigned PUTs for many files (:func:`mint_many`)."""
    query = request.query_params
    if "mint" in query:
        return await mint_many(request, drive)
    path = _file_path(request, drive, "POST")
    if "uploads" in query or "uploadId" in query:
        return await direct_parts(request, drive, path)
    if has_body(request):
        return await stream_upload(request, drive, path)
    # The bytes go straight to the store: hold the size the client declares (X-Content-Length),
    # or all the room left if it declares none, until the object appears or the URL expires.
    declared = _declared_length(request)
    md5 = _declared_md5(request)
    if md5 is not None and declared is None:
        raise ApiError(400, "md5_needs_length", "X-Content-MD5 on a mint needs the size too (X-Content-Length)")
    told = client_facts_of(request)
    if told.mtime is not None and declared is None:
        raise ApiError(400, "mtime_needs_length", "X-OC-Mtime on a mint needs the size too (X-Content-Length)")
    if told.checksums:
        raise ApiError(
            400,
            "checksum_unverifiable",
            "a minted URL sends the bytes straight to the store, which checks no OC-Checksum: declare the MD5 "
            "with X-Content-MD5 (the store checks that), or send the body through the gateway (POST or PUT with "
            "it) to have OC-Checksum verified",
        )
    with answers():
        link = await _service(request).upload_url(path, declared, drive.quota_bytes, told.mtime, md5)
    return JSONResponse(_grant(path, link, md5, request.headers.get("x-content-type")))


def _grant(path: DrivePath, link: Link, md5: DeclaredMd5 | None, content_type: str | None) -> dict:
    """A minted presigned PUT as the client is told it: the headers its PUT must send."""
    content_type = content_type or known_type(path.name)
    headers = {"Content-Type": content_type} if content_type else {}
    return {
        "url": link.url,
        "method": "PUT",
        "expires_in": link.expires_in,
        "headers": headers | ({"Content-MD5": md5.base64} if md5 else {}),
    }


MAX_MINT_FILES = 1000  # files one batch mint asks for at most
MAX_MINT_BODY = 2 << 20  # bytes of its JSON (1000 entries of the longest paths fit)
MINT_SHAPE = '{"files": [{"path": "a/b.bin", "size": 123, "mtime": 1700000000, "md5": "…"}, …]}'


@dataclass(frozen=True)
class _Wanted:
    """One file of a batch mint, read and checked as a single mint's headers are."""

    rel: str  # as the client named it, relative to the folder
    path: DrivePath
    size: int
    mtime: float | None
    md5: DeclaredMd5 | None
    content_type: str | None


def _wanted(item: object, folder: DrivePath) -> _Wanted:
    """One entry of a batch mint (400 with the single mint's error codes when it breaks a rule)."""
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        raise ApiError(400, "bad_mint", f"each file is an object with a path and a size: {MINT_SHAPE}")
    rel, size, mtime = item["path"], item.get("size"), item.get("mtime")
    path = _a_file(keys.from_text(folder.prefix, folder.rel + rel), "a mint")
    if type(size) is not int or not 0 <= size < 10**18:
        raise ApiError(400, "bad_content_length", "size must be a non-negative integer (bytes)")
    if mtime is not None and (type(mtime) not in (int, float, str)):
        raise ApiError(400, "bad_mtime", "mtime is seconds since the epoch")
    content_type = item.get("content_type")
    if content_type is not None and not (isinstance(content_type, str) and 0 < len(content_type) <= 256):
        raise ApiError(400, "bad_content_type", "content_type is a media type of at most 256 characters")
    md5 = item.get("md5")
    with answers():
        told = client_facts({"x-oc-mtime": None if mtime is None else str(mtime)}.get)
        declared = parse_md5(md5 if isinstance(md5, str) or md5 is None else "?")
    return _Wanted(rel, path, size, told.mtime, declared, content_type)


def _refused(rel: object, exc: ApiError | InvalidPath) -> dict:
    if isinstance(exc, InvalidPath):
        exc = ApiError(400, "invalid_path", str(exc))
    return {"path": rel, "error": {"status": exc.status, "error_code": exc.error_code, "message": exc.message}}


async def mint_many(request: Request, drive: Drive) -> JSONResponse:
    """``POST FOLDER/?mint`` with :data:`MINT_SHAPE`: a presigned PUT for each file (its path
    relative to FOLDER), each by the single mint's rules and answered in its place, a refused
    one with its own error (the others are minted): drive/service.py DriveService.upload_urls."""
    folder = drive.path(request)
    if not folder.is_dir:
        raise ApiError(400, "not_a_folder", "?mint names the folder its files' paths are relative to: end it in '/'")
    drive.require_write()
    body = await _small_json(request, MAX_MINT_BODY, "bad_mint", f"the body must be JSON: {MINT_SHAPE}")
    items = body.get("files") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise ApiError(400, "bad_mint", f"the body must be {MINT_SHAPE}, with at least one file")
    if len(items) > MAX_MINT_FILES:
        raise ApiError(400, "too_many_files", f"a batch mint asks for at most {MAX_MINT_FILES} files; this one {len(items)}")
    replies: list[_Wanted | dict] = []
    for item in items:
        try:
            replies.append(_wanted(item, folder))
        except (ApiError, InvalidPath) as exc:
            replies.append(_refused(item.get("path") if isinstance(item, dict) else None, exc))
    wanted = [(n, w) for n, w in enumerate(replies) if isinstance(w, _Wanted)]
    service = _service(request)
    if wanted:
        with answers():
            minted = await service.upload_urls(
                [UrlAsked(w.path, w.size, w.mtime, w.md5) for _, w in wanted], drive.quota_bytes
            )
        for (n, w), got in zip(wanted, minted):
            if isinstance(got, Link):
                replies[n] = {"path": w.rel, **_grant(w.path, got, w.md5, w.content_type)}
            else:
                replies[n] = _refused(w.rel, answer_of(got))
    refused = sum("error" in reply for reply in replies)
    return JSONResponse({"files": replies, "minted": len(replies) - refused, "refused": refused,
                         "expires_in": service.url_seconds})


MAX_PARTS_BODY = 1 << 20  # the JSON that completes a multipart upload (10,000 parts fit)


async def direct_parts(request: Request, drive: Drive, path: DrivePath) -> JSONResponse:
    """A multipart upload sent straight to the store: ``?uploads`` starts it (X-Content-Length),
    ``?uploadId=ID&partNumber=N`` mints a part's URL, ``?uploadId=ID`` with the parts completes it."""
    service = _service(request)
    query = request.query_params
    md5 = _declared_md5(request)
    with answers():
        if "uploads" in query:
            size = _declared_length(request)
            if size is None:
                raise ApiError(400, "bad_content_length", "a multipart upload needs its size: X-Content-Length")
            content_type = request.headers.get("x-content-type") or known_type(path.name)
            started = await service.start_parts(path, size, drive.quota_bytes, content_type)
            body = {"upload_id": started.upload_id, "size": size, "part_bytes": started.plan.part_bytes,
                    "parts": started.plan.count, "expires_in": started.expires_in}
            return JSONResponse(body, status_code=201)
        upload_id = query["uploadId"]
        if "partNumber" in query:
            number = parse_number(query["partNumber"])
            link = await run_in_threadpool(service.part_url, drive.prefix, path.key, upload_id, number, md5)
            headers = {"Content-MD5": md5.base64} if md5 else {}
            return JSONResponse({"url": link.url, "method": "PUT", "expires_in": link.expires_in, "headers": headers})
        parts = await _small_json(
            request, MAX_PARTS_BODY, "bad_parts", 'the body must be JSON: {"parts": [{"number": 1, "etag": "…"}, …]}'
        )
        mtime = client_facts_of(request).mtime
        stored, facts = await service.finish_parts(path, upload_id, parts, mtime, md5)
    body = {"path": path.rel, "size": stored.size, "etag": stored.etag.strip('"'), "parts": len(parts["parts"])}
    body |= {"md5": facts.md5} if facts.md5 else {}
    return JSONResponse(body, status_code=201, headers={"X-OC-Mtime": "accepted"} if mtime is not None else None)


async def _small_json(request: Request, limit: int, code: str, shape: str) -> object:
    """A JSON body of at most ``limit`` bytes (400 ``code`` otherwise, ``shape`` saying what it must be)."""
    chunks, taken = [], 0
    async for chunk in request.stream():
        taken += len(chunk)
        if taken > limit:
            await _drain(request)  # so the client reads the 400, not a reset
            raise ApiError(400, code, f"the body is at most {limit} bytes of JSON")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise ApiError(400, code, shape) from None


async def delete(request: Request, drive: Drive) -> Response:
    """One file, or every file under a folder (a path ending in '/', or with no exact key):
    drive/service.py DriveService.delete; ``?uploadId=`` aborts a multipart upload instead."""
    path = drive.path(request)
    drive.require_write()
    service = _service(request)
    if "uploadId" in request.query_params:
        path = _file_path(request, drive, "DELETE")
        with answers():
            await run_in_threadpool(service.abort_parts, drive.prefix, path.key, request.query_params["uploadId"])
        return Response(status_code=204)
    with answers():
        deleted = await run_in_threadpool(service.delete, path)
    if deleted.file is not None:
        return Response(status_code=204)
    if deleted.count == 0:
        raise ApiError(404, "not_found", f"no file or folder {path.rel}")
    return Response(status_code=204, headers={"X-Deleted-Count": str(deleted.count)})


class AnyPathConvertor(Convertor):
    """Like Starlette's ``path`` convertor, but also across newlines, so a path holding an
    encoded control character reaches :mod:`drive.keys` and gets its 400 instead of a 404."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", AnyPathConvertor())
