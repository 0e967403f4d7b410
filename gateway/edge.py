"""The outermost ASGI application: the hottest request answered in front of FastAPI, and the
access log of every request.

Downloads are redirects (SPEC decision 3), so a client reading many files makes one
``GET /v1/files/{file}`` → 302 per file. :class:`Gateway` (the FastAPI application itself)
answers the plain case before FastAPI's middleware stack and routing — a token already in
the auth cache, an approved account, a file path, no JSON asked for, headers the full
application would take — with the same key mapping, presigner and request id the routes use.
Anything else, or anything that goes wrong, goes to the full application, which answers it
(errors in their envelope included) as usual. Every request is counted for ``/metrics``
(gateway/traffic.py: its family, status, latency and body bytes) as it is logged.
"""

from __future__ import annotations

import time
from typing import Callable

from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from drive import keys
from drive.keys import InvalidPath
from drive.service import DriveService
from gateway import access_log
from gateway.traffic import TRAFFIC, family_of
from gateway.auth import Authenticator, remember
from gateway.bounds import header_problem
from gateway.dav_app import maybe_shared
from gateway.errors import request_id_of

MOUNT = b"/v1/files/"


class RecentRedirects:
    """The redirects handed out in the current second, by drive prefix and raw path.

    A presigned URL is a function of its key, its served type and the second it is signed in
    (drive/presign.py), so within one second a file's 302 is the same bytes however often it is
    asked: the key's checks, its type and the signature are done once a second for it, not once a
    request (many clients reading one file: a job's workers, a page's images). At most
    :attr:`LIMIT` are held (the rest are signed each time); all are let go as the second turns.
    Used from the event loop only."""

    LIMIT = 4096

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._second = -1
        self._locations: dict[tuple[str, bytes], bytes] = {}

    def get(self, prefix: str, rel: bytes) -> bytes | None:
        second = int(self._clock())
        if second != self._second:
            self._second, self._locations = second, {}
            return None
        return self._locations.get((prefix, rel))

    def put(self, prefix: str, rel: bytes, location: bytes) -> None:
        if len(self._locations) < self.LIMIT:
            self._locations[(prefix, rel)] = location


class Gateway(FastAPI):
    # What the redirect needs, set by the lifespan once the services exist (None: the full
    # application answers everything): read as one attribute, not three lookups on app.state.
    _redirects: tuple[Authenticator, DriveService] | None = None

    def serve_redirects(self, authenticator: Authenticator, drive: DriveService) -> None:
        """Answer downloads here, with these (the lifespan, once they exist)."""
        self._redirects = (authenticator, drive)
        self._recent = RecentRedirects()

    def stop_redirects(self) -> None:
        self._redirects = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        location = self._redirect(scope) if scope["method"] == "GET" else None
        if location is not None:
            request_id = request_id_of(scope["headers"])
            await send(
                {
                    "type": "http.response.start",
                    "status": 302,
                    "headers": [
                        (b"location", location),
                        (b"cache-control", b"no-store"),
                        (b"content-length", b"0"),
                        (b"x-request-id", request_id.encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            seconds = time.perf_counter() - started
            access_log.record(scope, 302, request_id, seconds)
            TRAFFIC.request("files", 302, seconds)
            return
        answer = {"status": 500, "request_id": "-", "received": 0, "sent": 0}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                answer["received"] += len(message.get("body", b""))
            return message

        async def noting_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                answer["sent"] += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                answer["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"x-request-id":
                        answer["request_id"] = value.decode("latin-1")
            await send(message)

        try:
            await super().__call__(scope, counting_receive, noting_send)
        finally:
            seconds = time.perf_counter() - started
            access_log.record(scope, answer["status"], answer["request_id"], seconds)
            raw = (scope.get("raw_path") or scope["path"].encode()).split(b"?", 1)[0]
            TRAFFIC.request(family_of(raw), answer["status"], seconds, answer["received"], answer["sent"])

    def _redirect(self, scope: Scope) -> bytes | None:
        """The presigned GET this request is answered with here, or None: the full application answers."""
        try:
            return self._presigned_get(scope)
        except Exception:  # noqa: BLE001 - the full application answers, and reports, whatever this is
            return None

    def _presigned_get(self, scope: Scope) -> bytes | None:
        raw = (scope.get("raw_path") or b"").split(b"?", 1)[0]
        rel = keys.under_mount(MOUNT, raw)
        if not rel or rel.endswith(b"/") or b"json" in scope.get("query_string", b""):
            return None
        if maybe_shared(rel):
            return None  # shared/{org}/...: the org's drive, answered by the /v1/shared routes
        authorization = accept = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"accept":
                accept = value
        if authorization is None or (accept is not None and b"json" in accept):
            return None
        if header_problem(scope["headers"]) is not None:
            return None
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or self._redirects is None:
            return None
        authenticator, drive = self._redirects
        principal = authenticator.cached(token.strip())
        if principal is None:
            return None
        location = None
        try:
            if principal.status == "approved" and principal.user_id is not None and drive.serving:
                prefix = principal.drive_prefix
                location = self._recent.get(prefix, rel)
                if location is None:
                    location = drive.download_url(keys.from_raw_path(prefix, rel)).encode()
                    self._recent.put(prefix, rel, location)
        except InvalidPath:
            pass
        finally:  # a store that is down raises on, and the full application answers its 503
            if location is None:
                remember(scope, principal, allow_basic=True)  # the full application answers: no second lookup
        return location
