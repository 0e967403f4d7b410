"""/healthz: is the service up, and can it reach its database and object store?"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from drive.store import StoreError
from gateway.deps import SessionsDep, StoreDep
from gateway.openapi import content, merge

_CHECK = {"type": "string", "enum": ["ok", "unavailable"]}
_HEALTH = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["status", "checks"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "degraded"]},
                "checks": {
                    "type": "object",
                    "required": ["database", "object_store"],
                    "properties": {"database": _CHECK, "object_store": _CHECK},
                },
            },
        }
    }
}

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    summary="Health (public): the database and the object store",
    responses=merge(
        content(200, "Everything answers: status ok", _HEALTH),
        content(503, "status degraded: a check failed (the store restarts itself in seconds); Retry-After", _HEALTH),
    ),
)
async def healthz(sessions: SessionsDep, store: StoreDep):
    checks = {"database": "ok", "object_store": "ok"}

    def check_db():
        with sessions() as session:
            session.execute(text("SELECT 1"))

    try:
        await run_in_threadpool(check_db)
    except Exception:
        checks["database"] = "unavailable"
    try:
        await run_in_threadpool(store.head, ".kgpu-healthz")
    except StoreError:
        checks["object_store"] = "unavailable"
    healthy = all(v == "ok" for v in checks.values())
    body = {"status": "ok" if healthy else "degraded", "checks": checks}
    if healthy:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})  # the store restarts itself in seconds
