"""/v1/files: my drive, the caller's own prefix ``users/{id}/`` (handlers in gateway/drive_http.py)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from drive import keys
from gateway import drive_http
from gateway.auth import ApprovedUser, Principal
from gateway.drive_http import Drive

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


def my_drive(request: Request, principal: Principal) -> Drive:
    return Drive(
        prefix=principal.drive_prefix,
        mount=b"/v1/files/",
        writable=True,
        quota_bytes=request.app.state.settings.user_quota_bytes,
    )


@router.get("/v1/files", summary="List my drive (flat, streamed JSON) with quota")
async def list_files(
    request: Request,
    principal: ApprovedUser,
    prefix: str = Query("", max_length=1024, description="narrows the listing to keys starting with this path"),
    glob: str | None = Query(None, max_length=1024, description="fnmatch pattern applied to the relative paths"),
):
    drive = my_drive(request, principal)
    store = request.app.state.store
    list_prefix = keys.listing_prefix(drive.prefix, prefix)
    used = await run_in_threadpool(request.app.state.usage.used_bytes, drive.prefix)
    first = await run_in_threadpool(store.list_page, list_prefix)  # errors surface before any byte is sent
    header = {"prefix": prefix, "glob": glob, "quota": {"used_bytes": used, "quota_bytes": drive.quota_bytes}}
    return drive_http.flat_listing(request, drive, list_prefix, glob, first, header)


@router.head("/v1/files/{path:anypath}", summary="Size, type, ETag and Last-Modified of a file")
async def head_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    return await drive_http.head(request, my_drive(request, principal))


@router.get("/v1/files/{path:anypath}", summary="Download (302 to a presigned GET) or list a folder")
async def get_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    return await drive_http.get(request, my_drive(request, principal))


@router.put("/v1/files/{path:anypath}", summary="Upload: 307 to a presigned PUT with Expect, else streamed")
async def put_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    return with_follow_hint(await drive_http.put(request, my_drive(request, principal)))


@router.post("/v1/files/{path:anypath}", summary="Upload a body (streamed), or mint a presigned PUT if empty")
async def post_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    return await drive_http.post(request, my_drive(request, principal))


@router.delete("/v1/files/{path:anypath}", status_code=204, summary="Delete a file, or every file under a folder")
async def delete_file(request: Request, principal: ApprovedUser, path: str) -> Response:
    return await drive_http.delete(request, my_drive(request, principal))
