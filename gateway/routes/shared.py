"""/v1/shared: the shared drives of the caller's organisations, at ``orgs/{slug}/`` in the store.

Same handlers as my drive (gateway/drive_http.py); reading needs any role in
the org, writing needs ``uploader`` or ``admin``, and an org the caller is not
in answers 404 as if it did not exist. Membership is read on every request, so
a removed member loses access at once.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from drive import listing
from drive.content_types import served_type
from gateway import drive_http, orgs
from gateway.auth import ApprovedUser
from gateway.deps import services
from gateway.drive_http import Drive
from gateway.errors import ApiError
from gateway.models import SharedFile, utcnow
from gateway.openapi import HTML_PAGE, JSON_QUERY, content, errors, merge, redirect
from gateway.principal import Principal
from gateway.routes.files import (
    DELETE_EXTRA,
    DELETED,
    DOWNLOAD,
    FOLLOW_307,
    HEADERS,
    MINT_HEADERS,
    MINTED,
    PARTS_STARTED,
    PUT_EXTRA,
    UPLOAD_ERRORS,
    UPLOAD_RESULT,
    UPLOADED,
    json_of,
    with_follow_hint,
)

router = APIRouter(tags=["shared drives"])

ORGS = {
    "type": "object",
    "required": ["orgs"],
    "properties": {
        "orgs": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "path", "type", "title", "role"]},
        }
    },
}
NO_ORG = errors((404, "org_not_found: no organisation of that name that you belong to; or not_found; "
                        "no_such_upload: no multipart upload of that uploadId is open"))
REGISTERED = content(
    201,
    "Stored as a new file (path, size, etag, parts); for …/registered with no body, the upload "
    "recorded (id, org, key, size, etag, content_type, uploader_user_id, registered_at); ?uploads: a "
    "multipart upload started (upload_id, size, part_bytes, parts, expires_in); ?uploadId= with the parts: completed",
    json_of({"anyOf": [UPLOAD_RESULT, PARTS_STARTED,
                       {"type": "object", "required": ["id", "org", "key", "registered_at"]}]}),
)


def _shared_drive(request: Request, principal: Principal, slug: str) -> tuple[Drive, orgs.Access]:
    with services(request).sessions() as session:
        access = orgs.access(session, principal, slug)
    drive = Drive(
        prefix=f"orgs/{access.org.slug}/",
        mount=f"/v1/shared/{access.org.slug}/".encode(),
        writable=access.can_write,
        quota_bytes=None,
    )
    return drive, access


async def shared_drive(request: Request, principal: Principal, slug: str) -> Drive:
    drive, _ = await run_in_threadpool(_shared_drive, request, principal, slug)
    return drive


@router.get(
    "/v1/shared",
    summary="The organisations you belong to (HTML for rclone, JSON with ?json=1)",
    responses=merge(
        content(200, "With ?json=1 or Accept: application/json: {orgs: [...]}", {**json_of(ORGS), **HTML_PAGE}),
        redirect(301, "Without JSON asked for: to /v1/shared/, the HTML folder page rclone reads"),
    ),
    openapi_extra={"parameters": [JSON_QUERY]},
)
@router.get("/v1/shared/", include_in_schema=False)
async def list_orgs(request: Request, principal: ApprovedUser) -> Response:
    def load() -> list[dict]:
        with services(request).sessions() as session:
            return [
                {"name": org.slug, "path": org.slug + "/", "type": "dir", "title": org.name, "role": role}
                for org, role in orgs.visible_orgs(session, principal)
            ]

    items = await run_in_threadpool(load)
    if drive_http.wants_json(request):
        return JSONResponse({"orgs": items})
    if not request.url.path.endswith("/"):
        # Relative links in the page resolve against the folder, so the folder URL ends in '/'.
        return RedirectResponse(str(request.url.replace(path="/v1/shared/")), status_code=301)
    html = (chunk.encode() for chunk in listing.render_html("/v1/shared/", [items]))
    return StreamingResponse(html, media_type="text/html; charset=utf-8")


@router.api_route("/v1/shared/{org}", methods=["GET", "HEAD"], include_in_schema=False)
async def org_root_without_slash(org: str, request: Request, principal: ApprovedUser) -> Response:
    await shared_drive(request, principal, org)
    return RedirectResponse(str(request.url.replace(path=f"/v1/shared/{org}/")), status_code=301)


@router.head(
    "/v1/shared/{org}/{path:anypath}", summary="Size, type and ETag of a shared file", responses=HEADERS
)
async def head_shared(org: str, path: str, request: Request, principal: ApprovedUser) -> Response:
    return await drive_http.head(request, await shared_drive(request, principal, org))


@router.get(
    "/v1/shared/{org}/{path:anypath}",
    summary="Download (302 to a presigned GET) or list a folder",
    responses=merge(DOWNLOAD, NO_ORG),
    openapi_extra={"parameters": [JSON_QUERY]},
)
async def get_shared(org: str, path: str, request: Request, principal: ApprovedUser) -> Response:
    return await drive_http.get(request, await shared_drive(request, principal, org))


@router.put(
    "/v1/shared/{org}/{path:anypath}",
    summary="Upload (uploader/admin): 307 with Expect, else streamed",
    responses=merge(UPLOADED, FOLLOW_307, UPLOAD_ERRORS, NO_ORG),
    openapi_extra=PUT_EXTRA,
)
async def put_shared(org: str, path: str, request: Request, principal: ApprovedUser) -> Response:
    return with_follow_hint(await drive_http.put(request, await shared_drive(request, principal, org)))


@router.delete(
    "/v1/shared/{org}/{path:anypath}",
    status_code=204,
    summary="Delete a shared file or folder",
    responses=merge(DELETED, NO_ORG),
    openapi_extra=DELETE_EXTRA,
)
async def delete_shared(org: str, path: str, request: Request, principal: ApprovedUser) -> Response:
    return await drive_http.delete(request, await shared_drive(request, principal, org))


@router.post(
    "/v1/shared/{org}/{path:anypath}",
    summary="Mint a presigned PUT (no body), stream a body, or record an upload (…/registered)",
    responses=merge(UPLOADED, MINTED, REGISTERED, UPLOAD_ERRORS, NO_ORG),
    openapi_extra=MINT_HEADERS,
)
async def post_shared(org: str, path: str, request: Request, principal: ApprovedUser) -> Response:
    drive, access = await run_in_threadpool(_shared_drive, request, principal, org)
    if path.endswith("/registered") and not drive_http.has_body(request):
        return await _register(request, principal, drive, access)
    return await drive_http.post(request, drive)


async def _register(request: Request, principal: Principal, drive: Drive, access: orgs.Access) -> JSONResponse:
    """Record an out-of-band PUT in the shared-file table, once the object is really there."""
    drive.require_write()
    path = drive.path_from_raw(drive_http.raw_path(request).removesuffix(b"/registered"))
    if path.is_dir:
        raise ApiError(400, "is_a_folder", "only files can be registered")
    found = await run_in_threadpool(services(request).drive.stat, path.key)
    if found is None:
        raise ApiError(404, "not_found", f"no object {path.rel} to register; PUT it first")
    info, _ = found

    def record() -> dict:
        with services(request).sessions.begin() as session:
            org_id = access.org.id
            row = session.scalar(select(SharedFile).where(SharedFile.org_id == org_id, SharedFile.key == path.rel))
            if row is None:
                row = SharedFile(org_id=org_id, key=path.rel)
                session.add(row)
            row.size = info.size
            row.etag = info.etag.strip('"')
            row.content_type = served_type(info.content_type, path.name)
            row.uploader_user_id = principal.user_id
            row.registered_at = utcnow()
            session.flush()
            return {
                "id": row.id,
                "org": access.org.slug,
                "key": row.key,
                "size": row.size,
                "etag": row.etag,
                "content_type": row.content_type,
                "uploader_user_id": row.uploader_user_id,
                "registered_at": row.registered_at.isoformat(),
            }

    return JSONResponse(await run_in_threadpool(record), status_code=201)
