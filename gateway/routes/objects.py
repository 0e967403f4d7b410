"""/v1/objects: transit objects (gateway/transit.py, docs/transit-objects.md). In-pod tokens may
use them for their owner, as the account's token does."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from gateway.auth import ApprovedUser
from gateway.bounds import MAX_CONTENT_LENGTH, PlainText
from gateway.deps import TransitDep
from gateway.openapi import errors

router = APIRouter(prefix="/v1/objects", tags=["objects"])
NOT_FOUND = (404, "object_not_found: no live transit object of yours with this id")
STORE_DOWN = (503, "store_unavailable: the object store did not answer; retry after Retry-After")
NO_ACCOUNT = (403, "no_account: the environment admin token has no transit objects")


class MintRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: PlainText = Field(default="", max_length=200, description="your name for it (shown in the listing)")
    size_bytes: Annotated[int, Field(strict=True, ge=0, le=MAX_CONTENT_LENGTH)] = Field(
        description="its exact size: reserved in your transit quota and signed into the upload URL (the store "
        "refuses a body of any other size)"
    )


@router.post(
    "",
    status_code=201,
    summary="Mint a transit object (expires 24 h later): answers a presigned PUT of its declared size",
    responses=errors(
        NO_ACCOUNT,
        (409, "too_many_objects: you hold the most transit objects one user may"),
        (413, "object_too_large: over the cap of one object; or quota_exceeded: over your transit quota"),
        STORE_DOWN,
    ),
)
async def mint(body: MintRequest, principal: ApprovedUser, transit: TransitDep) -> dict:
    return await run_in_threadpool(transit.mint, principal, body.label, body.size_bytes)


@router.get("", summary="Your live transit objects, newest first", responses=errors(NO_ACCOUNT, STORE_DOWN))
def list_objects(principal: ApprovedUser, transit: TransitDep) -> dict:
    return {"objects": transit.list(principal), "quota": transit.quota(principal)}


@router.get(
    "/{object_id}",
    summary="A fresh presigned GET of a transit object (usable by many pods until it expires)",
    responses=errors(NO_ACCOUNT, NOT_FOUND, (409, "not_uploaded: its bytes have not been PUT yet"), STORE_DOWN),
)
def fetch(object_id: str, principal: ApprovedUser, transit: TransitDep) -> dict:
    return transit.fetch(principal, object_id)


@router.delete(
    "/{object_id}",
    status_code=204,
    summary="Delete a transit object (idempotent: 204 whether or not it was there)",
    responses=errors(NO_ACCOUNT, STORE_DOWN),
)
def delete(object_id: str, principal: ApprovedUser, transit: TransitDep) -> Response:
    transit.delete(principal, object_id)
    return Response(status_code=204)
