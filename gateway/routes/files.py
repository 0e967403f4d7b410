"""/v1/files: my drive, the caller's own prefix ``users/{id}/`` (handlers in gateway/drive_http.py)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from drive import keys
from gateway import drive_http
from gateway.auth import ApprovedUser
from gateway.deps import services
from gateway.drive_http import Drive
from gateway.openapi import (
    BINARY_BODY,
    HTML_PAGE,
    JSON_QUERY,
    content,
    errors,
    merge,
    no_body,
    redirect,
)
from gateway.principal import Principal

router = APIRouter(tags=["files"])

FOLLOW_HINT = (
    b"307 Temporary Redirect: nothing is stored yet. Send the same PUT to the URL in the Location header;\n"
    b"with curl, add -L (curl -L -T FILE URL).\n"
)


def with_follow_hint(response: Response) -> Response:
    """A 307 to a presigned PUT, with a body saying what to do: curl without -L prints it (and
    exits 0 having stored nothing), where an empty body would leave the person none the wiser."""
    if response.status_code == 307:
        response.body = FOLLOW_HINT
        response.headers["content-length"] = str(len(FOLLOW_HINT))
        response.headers["content-type"] = "text/plain; charset=utf-8"
    return response


# What the drive routes answer (gateway/drive_http.py), shared with gateway/routes/shared.py.
def _object(required: dict[str, dict], **optional: dict) -> dict:
    return {"type": "object", "required": list(required), "properties": {**required, **optional}}


_STR, _INT = {"type": "string"}, {"type": "integer", "minimum": 0}
_NULLABLE_STR = {"type": ["string", "null"]}
_SHA1 = {"type": "string", "description": "SHA1 (hex) of bytes that passed through the gateway"}
_MD5 = {"type": "string", "description": "MD5 (hex) of bytes that passed through the gateway"}
_CONTENT_TYPE = {"type": "string", "description": "the file's Content-Type (drive/content_types.py: served_type)"}
_MODIFIED = {"type": "string", "description": "the modification time a client gave (X-OC-Mtime), else the store's"}
ENTRY = _object(
    {"name": _STR, "path": _STR, "type": {"type": "string", "enum": ["file", "dir"]}},
    size=_INT,
    content_type=_CONTENT_TYPE,
    etag=_STR,
    last_modified=_MODIFIED,
    sha1=_SHA1,
    md5=_MD5,
)
UPLOAD_RESULT = _object({"path": _STR, "size": _INT, "etag": _STR, "parts": _INT}, sha1=_SHA1, md5=_MD5)
PARTS_STARTED = _object({"upload_id": _STR, "size": _INT, "part_bytes": _INT, "parts": _INT, "expires_in": _INT})
MINT = _object(
    {"url": _STR, "method": {"type": "string", "enum": ["PUT"]}, "expires_in": _INT, "headers": {"type": "object"}}
)
MINTED_MANY = _object(
    {
        "files": {
            "type": "array",
            "items": {
                "anyOf": [
                    _object({"path": _STR, **MINT["properties"]}),
                    _object({"path": {"type": ["string", "null"]}, "error": _object(
                        {"status": {"type": "integer"}, "error_code": _STR, "message": _STR})}),
                ]
            },
        },
        "minted": _INT,
        "refused": _INT,
        "expires_in": _INT,
    }
)
FILE_LINK = _object({"url": _STR, "size": _INT, "expires_in": _INT, "etag": _STR, "content_type": _CONTENT_TYPE})
FOLDER = _object({"path": _STR, "entries": {"type": "array", "items": ENTRY}})
LISTING = _object(
    {
        "prefix": _STR,
        "glob": _NULLABLE_STR,
        "quota": _object({"used_bytes": {"type": "integer"}, "quota_bytes": {"type": ["integer", "null"]}}),
        "files": {
            "type": "array",
            "items": _object(
                {"path": _STR, "size": _INT, "content_type": _CONTENT_TYPE, "etag": _STR, "last_modified": _MODIFIED},
                sha1=_SHA1,
                md5=_MD5,
            ),
        },
        "count": _INT,
        "total_bytes": _INT,
    }
)


def json_of(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


INVALID_PATH = (400, "invalid_path: a name the drive cannot hold (docs/my-drive.md, names)")
NO_DRIVE = (403, "no_drive: the environment admin token has no drive")
STORE_DOWN = (503, "store_unavailable: the object store is restarting; retry after Retry-After")
FOLLOW_307 = {
    307: {
        "description": "Expect: 100-continue with a Content-Length: send the same PUT to Location "
        "(a presigned PUT); nothing is stored yet",
        "headers": {"Location": {"description": "the presigned PUT", "schema": {"type": "string"}}},
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}
UPLOADED = merge(
    content(200, "Stored, replacing a file (path, size, etag, parts)", json_of(UPLOAD_RESULT)),
    content(201, "Stored as a new file (path, size, etag, parts)", json_of(UPLOAD_RESULT)),
)
READ_ONLY = (403, "read_only: you may read this drive but not write to it; no_drive: the environment admin token has none")
UPLOAD_ERRORS = errors(
    (
        400,
        "invalid_path, is_a_folder (a path ending in '/'), reserved_name, bad_content_length, "
        "incomplete_body or client_disconnected (nothing is stored), bad_mtime (X-OC-Mtime is not seconds "
        "since the epoch), bad_checksum (OC-Checksum is not SHA1:hex or MD5:hex), checksum_mismatch (the body "
        "is not what OC-Checksum said: nothing is stored); a mint (POST without a body): mtime_needs_length "
        "(X-OC-Mtime without X-Content-Length), checksum_unverifiable (OC-Checksum: those bytes never pass here), "
        "bad_md5 (X-Content-MD5 is not an MD5), md5_needs_length; a multipart upload (?uploads, ?uploadId): "
        "bad_part (a partNumber outside the upload), bad_parts (the completion does not name every part once, "
        "in order, or the store refused them: the upload is aborted); a batch mint (?mint): bad_mint (the body "
        "is not its JSON), too_many_files, not_a_folder (its path is not a folder's)",
    ),
    READ_ONLY,
    (408, "body_timeout: the client sent nothing for 60 s in the middle of its body (nothing is stored; the "
          "connection is closed)"),
    (409, "name_conflict: a folder has this name, or a file is where a folder would be"),
    (413, "quota_exceeded: the upload would pass the drive's quota (nothing is stored)"),
    (
        423,
        "locked: a WebDAV lock holds the file; send its token in an If header; busy: another request is "
        "writing the same file (or moving or deleting a folder that holds it): retry in a moment",
    ),
    STORE_DOWN,
)
MINTED = content(
    200,
    "Stored, replacing a file (path, size, etag, parts); with no body, a presigned PUT to send the "
    "bytes to (url, method, expires_in, headers); FOLDER/?mint: one for each file asked, or its error "
    "(files, minted, refused, expires_in)",
    json_of({"anyOf": [UPLOAD_RESULT, MINT, MINTED_MANY]}),
)
OC_MTIME = {
    "name": "X-OC-Mtime",
    "in": "header",
    "required": False,
    "description": "the file's modification time, seconds since the epoch (0 to 253402300799); answered "
    "X-OC-Mtime: accepted. Reported as Last-Modified, last_modified and getlastmodified",
    "schema": {"type": "string", "pattern": "^[0-9]{1,12}([.][0-9]{1,9})?$"},
}
OC_CHECKSUM = {
    "name": "OC-Checksum",
    "in": "header",
    "required": False,
    "description": "SHA1:<hex> or MD5:<hex> (several separated by spaces): the body is stored only if it "
    "has these hashes (with Expect: 100-continue too: such a body is streamed, never redirected)",
    "schema": {"type": "string", "maxLength": 512},
}
PUT_EXTRA = {
    "parameters": [
        OC_MTIME,
        OC_CHECKSUM,
        {
            "name": "Expect",
            "in": "header",
            "required": False,
            "description": "100-continue with a Content-Length: answered 307 to a presigned PUT before any "
            "byte is read; any other value is ignored (the body is streamed)",
            "schema": {"type": "string", "examples": ["100-continue"]},
        }
    ],
    **BINARY_BODY,
}
DIRECT = merge(
    content(
        201,
        "Stored as a new file (path, size, etag, parts); ?uploads: a multipart upload started (upload_id, size, "
        "part_bytes, parts, expires_in); ?uploadId= with the parts: that upload completed (path, size, etag, parts, md5)",
        json_of({"anyOf": [UPLOAD_RESULT, PARTS_STARTED]}),
    ),
    errors(
        (404, "no_such_upload: no multipart upload of that id is open for this file (finished, aborted, expired)"),
        (429, "too_many_uploads: the drive has the most multipart uploads open at once; complete or abort some"),
    ),
)
_QUERY_FLAG = {"type": "string", "maxLength": 0}
MINT_HEADERS = {
    "parameters": [
        OC_MTIME,
        OC_CHECKSUM,
        {
            "name": "X-Content-MD5",
            "in": "header",
            "required": False,
            "description": "with no body: the MD5 (32 hex digits or base64) of the bytes the presigned PUT (or part) "
            "will send; signed into the URL as Content-MD5, so the store refuses other bytes",
            "schema": {"type": "string", "maxLength": 64},
        },
        {
            "name": "mint",
            "in": "query",
            "required": False,
            "description": 'on a folder: mint presigned PUTs for many files, the JSON body {"files": [{"path": '
            '"a/b.bin", "size": 123, "mtime": 1700000000, "md5": "…", "content_type": "…"}, …]} (at most 1000 '
            "files, 2 MiB; paths relative to the folder)",
            "schema": _QUERY_FLAG,
            "allowEmptyValue": True,
        },
        {
            "name": "uploads",
            "in": "query",
            "required": False,
            "description": "start a multipart upload straight to the store (X-Content-Length: its size)",
            "schema": _QUERY_FLAG,
            "allowEmptyValue": True,
        },
        {
            "name": "uploadId",
            "in": "query",
            "required": False,
            "description": "a multipart upload: with partNumber, mint that part's URL; without, complete it with "
            'the body {"parts": [{"number": 1, "etag": "…"}, …]} (X-OC-Mtime, X-Content-MD5 as for a file)',
            "schema": {"type": "string", "maxLength": 1024},
        },
        {
            "name": "partNumber",
            "in": "query",
            "required": False,
            "description": "with uploadId: the part (1 to the upload's parts) whose presigned PUT to mint",
            "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
        },
        {
            "name": "X-Content-Length",
            "in": "header",
            "required": False,
            "description": "with no body: the size the presigned PUT will send (held against the quota)",
            "schema": {"type": "integer", "minimum": 0},
        },
        {
            "name": "X-Content-Type",
            "in": "header",
            "required": False,
            "description": "with no body: the Content-Type the presigned PUT must send",
            "schema": {"type": "string", "maxLength": 256},
        },
    ],
    **BINARY_BODY,
}
DOWNLOAD = merge(
    redirect(302, "A file: to a short-lived presigned GET"),
    content(
        200,
        "A file with ?json=1 or Accept: application/json (url, size, expires_in, etag, content_type); "
        "a folder (a path ending in '/'): its listing, an HTML page or JSON (path, entries)",
        {**json_of({"anyOf": [FILE_LINK, FOLDER]}), **HTML_PAGE},
    ),
    errors(INVALID_PATH, NO_DRIVE, (404, "not_found: no such folder (or file, with ?json=1)"), STORE_DOWN),
)
HEADERS = merge(
    no_body(
        200,
        "The file's (or folder's) headers: Content-Length, Content-Type, ETag, Last-Modified (the time "
        "a client gave with X-OC-Mtime, else the store's); OC-Checksum and Digest when its bytes passed "
        "through the gateway",
        {
            "ETag": {"schema": {"type": "string"}},
            "Last-Modified": {"schema": {"type": "string"}},
            "OC-Checksum": {"schema": {"type": "string"}, "description": "SHA1:<hex>"},
            "Digest": {"schema": {"type": "string"}, "description": "SHA=<base64>,MD5=<base64> (RFC 3230)"},
        },
    ),
    no_body(404, "No such file or folder (no body)"),
    errors(INVALID_PATH, NO_DRIVE, STORE_DOWN),
)
DELETED = merge(
    no_body(
        204,
        "Deleted (a folder: X-Deleted-Count says how many files)",
        {"X-Deleted-Count": {"schema": {"type": "integer"}}},
    ),
    errors(
        (400, "invalid_path, or refused: the drive's root cannot be deleted"),
        READ_ONLY,
        (404, "not_found: no such file or folder; no_such_upload: no multipart upload of that uploadId is open"),
        (
            423,
            "locked: a WebDAV lock holds it; send its token in an If header; busy: another request is "
            "writing it (or a folder that holds it): retry in a moment",
        ),
        STORE_DOWN,
    ),
)


DELETE_EXTRA = {
    "parameters": [
        {
            "name": "uploadId",
            "in": "query",
            "required": False,
            "description": "abort that multipart upload of the file (its parts and its quota hold go)",
            "schema": {"type": "string", "maxLength": 1024},
        }
    ]
}


def my_drive(request: Request, principal: Principal) -> Drive:
    return Drive(
        prefix=principal.drive_prefix,
        mount=b"/v1/files/",
        writable=True,
        quota_bytes=services(request).settings.user_quota_bytes,
    )


@router.get(
    "/v1/files",
    summary="List my drive (flat, streamed JSON) with quota",
    responses=merge(
        content(
            200, "prefix, glob, quota, files (path, size, etag, last_modified), count, total_bytes", json_of(LISTING)
        ),
        errors(INVALID_PATH, NO_DRIVE, STORE_DOWN),
    ),
)
async def list_files(
    request: Request,
    principal: ApprovedUser,
    prefix: str = Query("", max_length=1024, description="narrows the listing to keys starting with this path"),
    glob: str | None = Query(None, max_length=1024, description="fnmatch pattern applied to the relative paths"),
):
    drive = my_drive(request, principal)
    service = services(request).drive
    list_prefix = keys.listing_prefix(drive.prefix, prefix)
    used = await run_in_threadpool(service.used_bytes, drive.prefix)
    first = await run_in_threadpool(service.first_page, list_prefix)  # errors surface before any byte is sent
    header = {"prefix": prefix, "glob": glob, "quota": {"used_bytes": used, "quota_bytes": drive.quota_bytes}}
    return drive_http.flat_listing(drive, service.files(list_prefix, first), glob, header)


@router.head(
    "/v1/files/{path:anypath}", summary="Size, type, ETag and Last-Modified of a file", responses=HEADERS
)
async def head_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    return await drive_http.head(request, my_drive(request, principal))


@router.get(
    "/v1/files/{path:anypath}",
    summary="Download (302 to a presigned GET) or list a folder",
    responses=DOWNLOAD,
    openapi_extra={"parameters": [JSON_QUERY]},
)
async def get_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    return await drive_http.get(request, my_drive(request, principal))


@router.put(
    "/v1/files/{path:anypath}",
    summary="Upload: 307 to a presigned PUT with Expect, else streamed",
    responses=merge(UPLOADED, FOLLOW_307, UPLOAD_ERRORS),
    openapi_extra=PUT_EXTRA,
)
async def put_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    return with_follow_hint(await drive_http.put(request, my_drive(request, principal)))


@router.post(
    "/v1/files/{path:anypath}",
    summary="Upload a body (streamed), or mint a presigned PUT if empty",
    responses=merge(UPLOADED, MINTED, UPLOAD_ERRORS, DIRECT),
    openapi_extra=MINT_HEADERS,
)
async def post_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    return await drive_http.post(request, my_drive(request, principal))


@router.delete(
    "/v1/files/{path:anypath}",
    status_code=204,
    summary="Delete a file, or every file under a folder",
    responses=DELETED,
    openapi_extra=DELETE_EXTRA,
)
async def delete_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    return await drive_http.delete(request, my_drive(request, principal))
