"""A fast path for the hottest request of the service: ``GET /v1/files/{file}`` → 302.

Downloads are redirects (SPEC decision 3), so a client reading many files makes
one such request per file. This ASGI layer answers the plain case itself —
a token already in the auth cache, an approved account, a file path, no JSON
asked for — with the same key mapping and presigner the routes use, skipping
FastAPI's routing and dependency resolution (about half the cost of the
request). Anything else, or anything that goes wrong, falls through to the
full application, which answers it (errors included) as usual.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from drive import keys
from drive.keys import InvalidPath
from drive.store import StoreUnavailable
from gateway.auth import remember

MOUNT = b"/v1/files/"


class FastDownload:
    def __init__(self, app: ASGIApp, fastapi_app):
        self.app = app
        self.state = fastapi_app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        location = self._redirect(scope) if scope["type"] == "http" and scope["method"] == "GET" else None
        if location is None:
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 302,
                "headers": [(b"location", location.encode()), (b"cache-control", b"no-store"), (b"content-length", b"0")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    def _redirect(self, scope: Scope) -> str | None:
        raw = scope.get("raw_path") or b""
        if not raw.startswith(MOUNT) or raw.endswith(b"/") or b"json" in scope.get("query_string", b""):
            return None
        authorization = accept = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"accept":
                accept = value
        if authorization is None or (accept is not None and b"json" in accept):
            return None
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return None
        principal = self.state.authenticator.cached(token.strip())
        if principal is None:
            return None
        remember(scope, principal, allow_basic=True)  # should the route answer after all: no second lookup
        if principal.status != "approved" or principal.user_id is None:
            return None
        try:
            path = keys.from_raw_path(principal.drive_prefix, raw[len(MOUNT) :])
        except InvalidPath:
            return None
        try:
            return self.state.store.presign_get(path.key, self.state.settings.presign_expires_seconds)
        except StoreUnavailable:
            return None  # the embedded store is restarting: the full application answers the 503
